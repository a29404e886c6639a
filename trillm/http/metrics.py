"""ServerMetrics: the Prometheus metrics of one app, served as text at /metrics.

HTTP-side measurements (requests by status, TTFT / TPOT / end-to-end latency) are recorded as requests pass; the
engine's state (running and waiting requests, KV usage, sessions, token counters) is read from
`Engine.statistics()` at scrape time by a collector, so there is no second bookkeeping of it here.

Names are `trillm:*`. The Kubernetes Gateway API Inference Extension's model-server protocol asks for a
TotalQueuedRequests gauge, a TotalRunningRequests gauge and a KVCacheUtilization gauge (fraction 0-1); its endpoint
picker scrapes them by name and defaults to vLLM's names, so the same three values are also exported as
`vllm:num_requests_waiting`, `vllm:num_requests_running` and `vllm:kv_cache_usage_perc` (plus the older
`vllm:gpu_cache_usage_perc`): a trillm replica joins an InferencePool without extra EPP flags.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trillm.http import access_log
from trillm.protocol.api import EngineStats

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TOKEN_LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    """Reads `Engine.statistics()` on each scrape; exports nothing while no engine is up."""

    def __init__(self, read_stats: Callable[[], EngineStats | None], model_name: Callable[[], str]) -> None:
        self._read_stats = read_stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._read_stats()
        if stats is None:
            return
        labels = {"model_name": self._model_name()}

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), value)
            return family

        running, waiting, kv_usage = stats.num_running, stats.num_waiting, stats.kv_usage
        yield gauge("trillm:num_requests_running", "Sequences in the running batch.", running)
        yield gauge("trillm:num_requests_waiting", "Sequences waiting for admission (queued).", waiting)
        yield gauge("trillm:kv_cache_usage_perc", "Fraction of KV-cache blocks that running and waiting requests "
                    "hold (0-1); idle sessions' parked KV is not counted (trillm:session_kv_usage_perc).", kv_usage)
        yield gauge("trillm:session_kv_usage_perc", "Fraction of KV-cache blocks only idle interactive sessions hold "
                    "(0-1): evicted first under memory pressure, so not load.", stats.session_kv_usage)
        yield gauge("trillm:num_sessions", "Interactive sessions held by the engine.", stats.num_sessions)
        yield counter("trillm:expired_sessions", "Interactive sessions ended by --session-idle-timeout.",
                      stats.num_expired_sessions)
        yield gauge("trillm:num_free_blocks", "Free KV-cache blocks.", stats.num_free_blocks)
        yield counter("trillm:prompt_tokens", "Prompt tokens of admitted sequences.", stats.prompt_tokens_total)
        yield counter("trillm:computed_prompt_tokens", "Prompt tokens actually prefilled (not reused from cache).",
                      stats.computed_prompt_tokens_total)
        yield counter("trillm:cached_prompt_tokens", "Prompt tokens reused from the prefix cache or a session's parked "
                      "KV instead of computed.", stats.cached_prompt_tokens_total)
        yield counter("trillm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache (full blocks).",
                      stats.prefix_cache_query_tokens_total)
        yield counter("trillm:prefix_cache_hits", "Prompt tokens found in the prefix cache (hit rate: hits / queries).",
                      stats.prefix_cache_hit_tokens_total)
        yield counter("trillm:generation_tokens", "Generated tokens.", stats.generation_tokens_total)
        yield counter("trillm:num_preemptions", "Sequences preempted for lack of KV blocks.", stats.num_preemptions)
        # Gateway API Inference Extension (endpoint picker) defaults: same values, vLLM's names.
        yield gauge("vllm:num_requests_waiting", "Alias of trillm:num_requests_waiting for the Gateway API "
                    "Inference Extension endpoint picker.", waiting)
        yield gauge("vllm:num_requests_running", "Alias of trillm:num_requests_running.", running)
        yield gauge("vllm:kv_cache_usage_perc", "Alias of trillm:kv_cache_usage_perc (fraction 0-1).", kv_usage)
        yield gauge("vllm:gpu_cache_usage_perc", "Alias of trillm:kv_cache_usage_perc (older EPP default).",
                    kv_usage)


class _ListenCollector(Collector):
    """Exports the kernel's count of connections dropped at a full listen queue since start-up (listening.py)."""

    def __init__(self, read_listen_drops: Callable[[], int | None]) -> None:
        self._read = read_listen_drops

    def collect(self) -> Iterator[Metric]:
        num_dropped = self._read()
        if num_dropped is not None:
            yield CounterMetricFamily(
                "trillm:listen_drops", "Connections the kernel dropped at a full listen queue since start-up (this "
                "network namespace: raise --backlog).", value=num_dropped,
            )


class RequestTrace:
    """Timing of one generation request: feeds TTFT, TPOT and end-to-end latency when it finishes."""

    def __init__(self, metrics: ServerMetrics, endpoint: str, request_id: str = "") -> None:
        self._metrics = metrics
        self.endpoint = endpoint
        self.request_id = request_id
        self.start_s = time.perf_counter()
        self.first_token_s: float | None = None
        self.num_prompt_tokens = 0  # set by the handler (the access log's line)
        self.num_output_tokens = 0
        self.on_finish: Callable[[], None] | None = None  # called once, when the request ends (access_log.py)
        self._is_finished = False

    @property
    def is_finished(self) -> bool:
        return self._is_finished

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens and self.first_token_s is None:
            self.first_token_s = time.perf_counter()
            self._metrics.time_to_first_token.observe(self.first_token_s - self.start_s)
        self.num_output_tokens += num_tokens

    def finish(self, *, is_disconnected: bool = False) -> float:
        """Record the end-to-end latency (once) and return it in seconds.

        `is_disconnected`: the client closed the connection before the response ended (its sequences are aborted and
        their KV freed by the stream's close); counted in `trillm:client_disconnects` and logged, not in the latencies.
        """
        elapsed_s = time.perf_counter() - self.start_s
        if self._is_finished:
            return elapsed_s
        self._is_finished = True
        if self.on_finish is not None:
            self.on_finish()
        if is_disconnected:
            self._metrics.client_disconnects.labels(endpoint=self.endpoint).inc()
            log.info("%s: the client disconnected after %.3f s and %d tokens; its request was aborted (%s)",
                     self.request_id or self.endpoint, elapsed_s, self.num_output_tokens, self.endpoint)
            return elapsed_s
        self._metrics.e2e_latency.observe(elapsed_s)
        if self.first_token_s is not None and self.num_output_tokens > 1:
            per_token_s = (time.perf_counter() - self.first_token_s) / (self.num_output_tokens - 1)
            self._metrics.time_per_output_token.observe(per_token_s)
        return elapsed_s


class ServerMetrics:
    """The registry of one app (each app has its own, so tests can build many)."""

    def __init__(self, read_stats: Callable[[], EngineStats | None], model_name: Callable[[], str],
                 read_listen_drops: Callable[[], int | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("trillm:http_requests", "HTTP requests by route and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.time_to_first_token = Histogram("trillm:time_to_first_token_seconds", "Time to the first token.",
                                             buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.time_per_output_token = Histogram("trillm:time_per_output_token_seconds",
                                               "Mean time per output token after the first.",
                                               buckets=_TOKEN_LATENCY_BUCKETS_S, registry=self.registry)
        self.e2e_latency = Histogram("trillm:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                                     buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.client_disconnects = Counter("trillm:client_disconnects", "Streams whose client closed the connection "
                                          "before the response ended.", ["endpoint"], registry=self.registry)
        self.registry.register(_EngineCollector(read_stats, model_name))
        self.registry.register(_ListenCollector(read_listen_drops))

    def trace(self, endpoint: str, request_id: str = "") -> RequestTrace:
        return access_log.attached(RequestTrace(self, endpoint, request_id))

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
