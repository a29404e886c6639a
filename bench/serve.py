"""Serving benchmark: streamed load on any OpenAI-compatible server, with vLLM `bench serve` semantics.

It speaks only the OpenAI HTTP API (`/v1/completions` or `/v1/chat/completions`, `GET /v1/models`), so the same
command measures trillm, vLLM, SGLang or LMDeploy. Every request streams (`stream: true`,
`stream_options.include_usage`) with `max_tokens` set to its output length, `temperature` 0 and `ignore_eos: true` (an
extension all four accept), so each request produces exactly its output length.

Per request, from the client's clock (`time.perf_counter`, reported in ms):

- TTFT: from sending the request to the first SSE chunk with non-empty text (`choices[0].text`, or on chat
  `delta.content` / `delta.reasoning_content`). Role-only and empty chunks do not count. It includes queueing in the
  server but not in the client: with `--max-concurrency` the clock starts once the request may go.
- ITL: the gaps between successive content chunks of one request. A chunk may carry several tokens, and chunks that
  arrive in one socket read are 0 ms apart: ITL is per chunk, not per token.
- E2E: from sending the request to the end of its stream (`data: [DONE]`).
- TPOT: (E2E - TTFT) / (output tokens - 1), the mean time per output token after the first; it excludes the first
  token (prefill and queueing). Requests with one output token have none.
- Output tokens come from the final `usage` chunk; a server that sends no usage is counted by content chunks instead,
  and the result says so (`output_tokens_source`). Prompt tokens come from `usage` too (else the count sent), and
  `usage.prompt_tokens_details.cached_tokens`, when reported, gives the prefix-cache hit fraction.

Each latency is summarised as mean, median, p90 and p99 (numpy's linear interpolation) over the completed requests
(ITL: over all gaps of all completed requests). Throughputs divide by the wall time from the first request sent to
the last one finished; failed requests add nothing to them. A request fails on an HTTP error status, a connection
error or reset, a timeout, an error event in the stream, or a stream with no content or no `[DONE]`; the run goes on
and reports the count and the first 5 distinct messages.

Datasets (`--dataset`; lengths in tokens, all drawn with numpy from `--seed`):

- `random`: `--input-len` / `--output-len`, each uniform in [len * (1 - r), len * (1 + r)] with `--range-ratio` r.
- `sharegpt-like`: lognormal lengths of mean 230 in / 220 out (PERF.md's mix), clipped to [4, `--max-input-len`] and
  [4, `--max-output-len`] (1024 each); the lognormal is chosen so that the clipped mean stays 230 / 220.
- `shared-prefix`: one `--prefix-len` prompt prefix shared by every request, plus `--suffix-len` random tokens each:
  it measures prefix caching (see the cached-token fraction).

Prompts on `/v1/completions` are random token ids (`--vocab-low` .. `--vocab-high`) sent as a list of ints, so lengths
are exact and no tokenizer is needed. Chat needs text: prompts there (and with `--text-prompts`) are common English
words, about one token each, so their lengths are approximate (and the chat template adds a few tokens).

Arrivals: `--request-rate` R requests/s (inf: all at once) with gamma-distributed gaps of mean 1/R and shape
`--burstiness` (1: Poisson); `--max-concurrency` caps the requests in flight. `--warmup` requests go first, untimed.

Output: a progress bar on stderr; a table on stdout, then one line `config: tokens, seconds, tok/s`; JSON with the
command, git commit, device, parameters and every figure in bench/results/<device>-serve-<dataset>-<date>.json.

Client cost: one shared httpx client on asyncio; bodies are encoded before the clock starts, and SSE events are split
by hand and decoded by a typed msgspec decoder that skips unread fields. Most of the remaining cost is httpx's own
HTTP/1.1 stack (one h11 event per HTTP chunk). `python -m bench.fake_openai --time-client` measures it: 23-32k chunks/s
on one core of a 2-core AMD EPYC VM (2026-11-25), above the 20k needed to never limit a 10k tok/s server.

Size: one module of about 800 lines, over STYLE's 600, so that the file reads top to bottom as the whole measurement
(config, datasets and arrivals, one request, the run, figures and report, command line); the fake server and the
client-speed check live in bench/fake_openai.py.

Examples:
    python -m bench.serve --base-url http://127.0.0.1:23333 --dataset sharegpt-like --num-prompts 1000
    python -m bench.serve --dataset random --input-len 1024 --output-len 128 --request-rate 8 --max-concurrency 64
    python -m bench.serve --endpoint /v1/chat/completions --dataset shared-prefix --prefix-len 1024 --num-prompts 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import httpx
import msgspec
import numpy as np

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
DATASETS = ("random", "sharegpt-like", "shared-prefix")
SHAREGPT_MEAN_INPUT_LEN = 230
SHAREGPT_MEAN_OUTPUT_LEN = 220
SHAREGPT_SIGMA = 1.0  # lognormal shape of both lengths: median ≈ 0.6 x mean, a long tail to the clip
MIN_LEN = 4  # shortest sharegpt-like prompt or output
NUM_ERRORS_KEPT = 5
CONNECT_TIMEOUT_S = 60.0
PROGRESS_INTERVAL_S = 0.2
# identity: the stream is read raw (`aiter_raw`), so no server or proxy may compress it
REQUEST_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
# Common English words that most BPE vocabularies (Llama, SmolLM2, GPT) hold as one token with their leading space.
WORDS = tuple(dict.fromkeys(f" {w}" for w in (
    "the of and to in is was for on that with as by at from his her it an be are this which or had not but have one "
    "were they their all first new more also after time two has been other when there who can into would some out "
    "year people only over up most about many may between she world three years such city under used well during "
    "state where its school later made part because war day life work house high while both since each place four "
    "long same water name five small home game end family group land line party power north south west east music "
    "film book team best way man back great little own right big last next few late early young"
).split()))


# --------------------------------------------------------------------------------------------------------------------
# Configuration


def _positive(name: str) -> Callable[[object, attrs.Attribute[Any], float | None], None]:
    def check(_: object, __: attrs.Attribute[Any], value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")

    return check


@attrs.frozen(kw_only=True)
class BenchConfig:
    """Every parameter of one run, built once from the command line (see `parse_args`)."""

    base_url: str = "http://127.0.0.1:23333"
    endpoint: str = attrs.field(default=COMPLETIONS, validator=attrs.validators.in_((COMPLETIONS, CHAT)))
    model: str | None = None
    api_key: str | None = attrs.field(default=None, repr=False)
    dataset: str = attrs.field(default="sharegpt-like", validator=attrs.validators.in_(DATASETS))
    num_prompts: int = attrs.field(default=1000, validator=_positive("--num-prompts"))
    input_len: int = attrs.field(default=1024, validator=_positive("--input-len"))
    output_len: int = attrs.field(default=128, validator=_positive("--output-len"))
    range_ratio: float = 0.0
    max_input_len: int = 1024
    max_output_len: int = 1024
    prefix_len: int = attrs.field(default=1024, validator=_positive("--prefix-len"))
    suffix_len: int = attrs.field(default=32, validator=_positive("--suffix-len"))
    vocab_low: int = 1000
    vocab_high: int = 30000
    is_text_prompts: bool = False
    request_rate: float = attrs.field(default=math.inf, validator=_positive("--request-rate"))
    burstiness: float = attrs.field(default=1.0, validator=_positive("--burstiness"))
    max_concurrency: int | None = attrs.field(default=None, validator=_positive("--max-concurrency"))
    seed: int = 0
    temperature: float = 0.0
    is_ignore_eos: bool = True
    extra_body: dict[str, Any] = attrs.field(factory=dict, hash=False)
    num_warmup: int = 1
    timeout_s: float | None = attrs.field(default=None, validator=_positive("--timeout-s"))
    device_name: str | None = None
    label: str = ""
    result_file: str | None = None
    is_save: bool = True
    is_progress: bool = True

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if not 0 <= self.vocab_low < self.vocab_high:
            raise ValueError(f"--vocab-low must be >= 0 and below --vocab-high, got {self.vocab_low}, "
                             f"{self.vocab_high}")
        if self.num_warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.num_warmup}")
        if self.dataset == "sharegpt-like" and self.max_input_len <= SHAREGPT_MEAN_INPUT_LEN:
            raise ValueError(f"--max-input-len must exceed the sharegpt-like mean {SHAREGPT_MEAN_INPUT_LEN}")
        if self.dataset == "sharegpt-like" and self.max_output_len <= SHAREGPT_MEAN_OUTPUT_LEN:
            raise ValueError(f"--max-output-len must exceed the sharegpt-like mean {SHAREGPT_MEAN_OUTPUT_LEN}")

    @property
    def is_text(self) -> bool:
        return self.endpoint == CHAT or self.is_text_prompts


# --------------------------------------------------------------------------------------------------------------------
# Datasets and arrivals


@attrs.frozen(kw_only=True)
class RequestSpec:
    """One request to send: its prompt (token ids, or text on chat and with --text-prompts) and its lengths."""

    prompt: tuple[int, ...] | str
    prompt_len: int  # tokens sent (text: words, about one token each)
    output_len: int  # max_tokens


def clipped_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[clip(X, low, high)] for X ~ lognormal(mu, sigma), in closed form."""
    root2_sigma = math.sqrt(2.0) * sigma

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf((math.log(x) - mu) / root2_sigma))

    def mean_below(x: float) -> float:  # E[X; X < x]
        return math.exp(mu + sigma**2 / 2) * 0.5 * (1.0 + math.erf((math.log(x) - mu - sigma**2) / root2_sigma))

    return low * cdf(low) + mean_below(high) - mean_below(low) + high * (1.0 - cdf(high))


def lognormal_mu(mean: float, sigma: float, low: float, high: float) -> float:
    """The mu whose lognormal, clipped to [low, high], has mean `mean` (bisection: the clipped mean rises with mu)."""
    assert low < mean < high, (low, mean, high)
    lo, hi = math.log(low) - 8 * sigma, math.log(high) + 8 * sigma
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if clipped_lognormal_mean(mid, sigma, low, high) < mean else (lo, mid)
    return (lo + hi) / 2


def sharegpt_like_lengths(rng: np.random.Generator, num: int, mean: float, max_len: int) -> np.ndarray:
    """`num` lognormal lengths clipped to [MIN_LEN, max_len] whose expected mean is `mean`."""
    mu = lognormal_mu(mean, SHAREGPT_SIGMA, MIN_LEN, max_len)
    draws = rng.lognormal(mu, SHAREGPT_SIGMA, size=num)
    return np.clip(np.rint(draws), MIN_LEN, max_len).astype(np.int64)


def random_lengths(rng: np.random.Generator, num: int, length: int, range_ratio: float) -> np.ndarray:
    """`num` lengths uniform in [length * (1 - range_ratio), length * (1 + range_ratio)], at least 1."""
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=num)


def arrival_offsets_s(rng: np.random.Generator, num: int, rate: float, burstiness: float) -> np.ndarray:
    """Send times of `num` requests in seconds after the first: gamma gaps of mean 1/rate and shape `burstiness`
    (1: Poisson; below 1 burstier, above 1 steadier); all 0 at rate inf."""
    if math.isinf(rate):
        return np.zeros(num)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


def _draw_ids(rng: np.random.Generator, length: int, config: BenchConfig) -> list[int]:
    """Random token ids, or for text prompts indices into WORDS."""
    low, high = (0, len(WORDS)) if config.is_text else (config.vocab_low, config.vocab_high)
    return rng.integers(low, high, size=length).tolist()  # type: ignore[no-any-return]


def _as_prompt(ids: list[int], config: BenchConfig) -> tuple[int, ...] | str:
    return "".join(WORDS[i] for i in ids) if config.is_text else tuple(ids)


def _lengths(rng: np.random.Generator, config: BenchConfig) -> tuple[np.ndarray, np.ndarray]:
    num = config.num_prompts
    if config.dataset == "sharegpt-like":
        return (sharegpt_like_lengths(rng, num, SHAREGPT_MEAN_INPUT_LEN, config.max_input_len),
                sharegpt_like_lengths(rng, num, SHAREGPT_MEAN_OUTPUT_LEN, config.max_output_len))
    input_len = config.suffix_len if config.dataset == "shared-prefix" else config.input_len
    return (random_lengths(rng, num, input_len, config.range_ratio),
            random_lengths(rng, num, config.output_len, config.range_ratio))


def build_requests(config: BenchConfig) -> list[RequestSpec]:
    """The run's requests, the same for the same config (lengths, prompts and arrivals use separate seeded streams)."""
    input_lens, output_lens = _lengths(np.random.default_rng([config.seed, 0]), config)
    rng = np.random.default_rng([config.seed, 1])
    prefix = _draw_ids(rng, config.prefix_len, config) if config.dataset == "shared-prefix" else []
    specs = []
    for input_len, output_len in zip(input_lens.tolist(), output_lens.tolist()):
        ids = prefix + _draw_ids(rng, input_len, config)
        specs.append(RequestSpec(prompt=_as_prompt(ids, config), prompt_len=len(ids), output_len=output_len))
    return specs


def request_body(config: BenchConfig, model: str, spec: RequestSpec) -> bytes:
    """The JSON body of one streamed request, encoded once before the clock starts."""
    body: dict[str, Any] = {"model": model, "max_tokens": spec.output_len, "temperature": config.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if config.endpoint == CHAT:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt if isinstance(spec.prompt, str) else list(spec.prompt)
    if config.is_ignore_eos:
        body["ignore_eos"] = True
    body.update(config.extra_body)
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------------------------------
# One request: send, read the SSE stream, time its chunks


@attrs.frozen(kw_only=True)
class RequestResult:
    """What one request measured; times in seconds from sending it. A failed request keeps its lengths and error."""

    prompt_len: int  # tokens sent
    output_len: int  # max_tokens asked for
    error: str = ""  # empty: completed
    prompt_tokens: int | None = None  # usage.prompt_tokens
    output_tokens: int = 0  # usage.completion_tokens, else the content chunks
    is_usage_reported: bool = False
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    num_chunks: int = 0  # chunks with content
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itls_s: tuple[float, ...] = ()

    @property
    def is_success(self) -> bool:
        return not self.error


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None  # /v1/completions
    delta: _Delta | None = None  # /v1/chat/completions


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Event(msgspec.Struct):
    """The fields of an SSE chunk the benchmark reads; msgspec skips the rest without building them."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None  # {"error": {"message": ...}} (OpenAI, vLLM, trillm)
    kind: str | None = msgspec.field(default=None, name="object")  # "error" with a top-level "message" (older vLLM)
    message: Any = None


_decode_event = msgspec.json.Decoder(_Event).decode


def _has_text(choice: _Choice) -> bool:
    if choice.text is not None:
        return bool(choice.text)
    delta = choice.delta
    return delta is not None and bool(delta.content or delta.reasoning_content)


def _error_text(event: _Event) -> str:
    error = event.error if event.error is not None else event.message
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message)[:300]


class SSEReader:
    """Reads one SSE response as its bytes arrive: `data:` lines, content-chunk times, the last usage, any error."""

    __slots__ = ("_pending", "is_done", "error", "usage", "num_chunks", "first_s", "last_s", "itls_s")

    def __init__(self) -> None:
        self._pending = b""  # an incomplete last line
        self.is_done = False
        self.error = ""
        self.usage: _Usage | None = None
        self.num_chunks = 0
        self.first_s = self.last_s = 0.0
        self.itls_s: list[float] = []

    def feed(self, data: bytes, now_s: float) -> None:
        """Take the bytes of one read, all received at `now_s`."""
        lines = (self._pending + data if self._pending else data).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                self._event(line[5:], now_s)

    def _event(self, payload: bytes, now_s: float) -> None:
        if payload.strip() == b"[DONE]":
            self.is_done = True
            return
        event = _decode_event(payload)
        if event.error is not None or event.kind == "error":
            self.error = self.error or _error_text(event)
        if event.usage is not None:
            self.usage = event.usage
        if event.choices and _has_text(event.choices[0]):
            if self.num_chunks:
                self.itls_s.append(now_s - self.last_s)
            else:
                self.first_s = now_s
            self.last_s = now_s
            self.num_chunks += 1

    def failure(self) -> str:
        if self.error:
            return f"error event: {self.error}"
        if not self.is_done:
            return "stream ended without data: [DONE]"
        return "" if self.num_chunks else "no content chunk in the stream"

    def result(self, spec: RequestSpec, start_s: float, end_s: float) -> RequestResult:
        if failure := self.failure():
            return RequestResult(prompt_len=spec.prompt_len, output_len=spec.output_len, error=failure)
        usage = self.usage or _Usage()
        is_usage = usage.completion_tokens is not None
        details = usage.prompt_tokens_details
        cached = details.cached_tokens if details is not None else None
        return RequestResult(
            prompt_len=spec.prompt_len, output_len=spec.output_len, prompt_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens if usage.completion_tokens is not None else self.num_chunks,
            is_usage_reported=is_usage,
            cached_tokens=cached, num_chunks=self.num_chunks, ttft_s=self.first_s - start_s, e2e_s=end_s - start_s,
            itls_s=tuple(self.itls_s))


async def send_request(client: httpx.AsyncClient, endpoint: str, body: bytes, spec: RequestSpec) -> RequestResult:
    """Send one streamed request and measure it; every failure comes back as a result with `error`, never raised."""
    reader = SSEReader()
    start_s = time.perf_counter()
    try:
        async with client.stream("POST", endpoint, content=body, headers=REQUEST_HEADERS) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace").strip()
                return RequestResult(prompt_len=spec.prompt_len, output_len=spec.output_len,
                                     error=f"HTTP {response.status_code}: {detail[:300]}")
            async for data in response.aiter_raw():  # uncompressed (REQUEST_HEADERS): skip httpx's decoder layer
                reader.feed(data, time.perf_counter())
    except Exception as exc:  # noqa: BLE001 - any one bad response (reset, timeout, bad JSON) fails that request only
        return RequestResult(prompt_len=spec.prompt_len, output_len=spec.output_len,
                             error=f"{type(exc).__name__}: {exc}"[:300])
    return reader.result(spec, start_s, time.perf_counter())


# --------------------------------------------------------------------------------------------------------------------
# The run: warm-up, arrivals, concurrency cap, progress


class Progress:
    """A progress line on stderr: requests done of the total, failures, output tok/s of the finished requests."""

    def __init__(self, total: int, *, is_enabled: bool, stream: TextIO = sys.stderr) -> None:
        self._total, self._is_enabled, self._stream = total, is_enabled, stream
        self._is_tty = stream.isatty()
        self._start_s = self._shown_s = time.perf_counter()
        self.num_done = self.num_failed = self.num_output_tokens = 0

    def update(self, result: RequestResult) -> None:
        self.num_done += 1
        self.num_failed += not result.is_success
        self.num_output_tokens += result.output_tokens
        now_s = time.perf_counter()
        is_step = self.num_done * 10 // self._total != (self.num_done - 1) * 10 // self._total
        if self.num_done == self._total or (now_s - self._shown_s >= PROGRESS_INTERVAL_S and (self._is_tty or is_step)):
            self._shown_s = now_s
            self._show(now_s)

    def _show(self, now_s: float) -> None:
        if not self._is_enabled:
            return
        width = 30
        filled = width * self.num_done // self._total
        rate = self.num_output_tokens / max(now_s - self._start_s, 1e-9)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.num_done}/{self._total} requests, "
                f"{self.num_failed} failed, {rate:,.0f} output tok/s")
        end = "\n" if self.num_done == self._total or not self._is_tty else ""
        self._stream.write(("\r" if self._is_tty else "") + line + end)
        self._stream.flush()


@attrs.frozen(kw_only=True)
class RunResult:
    """One benchmark run: the model served, per-request results in send order, wall time, peak requests in flight."""

    model: str
    results: tuple[RequestResult, ...]
    duration_s: float
    max_in_flight: int


class Dispatcher:
    """Sends the timed requests at their arrival times under the concurrency cap, counting requests in flight."""

    def __init__(self, client: httpx.AsyncClient, config: BenchConfig, progress: Progress) -> None:
        self._client, self._endpoint, self._progress = client, config.endpoint, progress
        self._limit: contextlib.AbstractAsyncContextManager[Any] = (
            asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext())
        self.num_in_flight = self.max_in_flight = 0

    async def one(self, body: bytes, spec: RequestSpec) -> RequestResult:
        async with self._limit:
            self.num_in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
            try:
                result = await send_request(self._client, self._endpoint, body, spec)
            finally:
                self.num_in_flight -= 1
        self._progress.update(result)
        return result

    async def run(self, bodies: Sequence[bytes], specs: Sequence[RequestSpec],
                  offsets_s: np.ndarray) -> list[RequestResult]:
        """Send request i at `offsets_s[i]` after the first (its task then waits for the cap); all results in order."""
        loop = asyncio.get_running_loop()
        start_s = loop.time()
        tasks = []
        async with asyncio.TaskGroup() as group:
            for body, spec, offset_s in zip(bodies, specs, offsets_s.tolist()):
                if (wait_s := start_s + offset_s - loop.time()) > 0:
                    await asyncio.sleep(wait_s)
                tasks.append(group.create_task(self.one(body, spec)))
        return [task.result() for task in tasks]


@contextlib.asynccontextmanager
async def open_client(config: BenchConfig) -> AsyncIterator[httpx.AsyncClient]:
    """One client for the run: unbounded connection pool (the cap is `--max-concurrency`), no read limit by default."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout_s, connect=CONNECT_TIMEOUT_S, pool=None)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with httpx.AsyncClient(base_url=config.base_url, limits=limits, timeout=timeout, headers=headers) as client:
        yield client


class ServerUnusableError(Exception):
    """The server gave no model id to send: it is down, or GET /v1/models failed or listed nothing."""


async def first_model_id(client: httpx.AsyncClient) -> str:
    """The first model id the server lists in GET /v1/models.

    Raises:
        ServerUnusableError: the request failed or the listing holds no id.
    """
    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, LookupError, TypeError) as exc:
        raise ServerUnusableError(f"GET {client.base_url}v1/models: {type(exc).__name__}: {exc}") from exc


async def warm_up(client: httpx.AsyncClient, config: BenchConfig, bodies: Sequence[bytes],
                  specs: Sequence[RequestSpec]) -> None:
    """Send `--warmup` requests (the first ones of the dataset, at once) and discard their results."""
    picks = [i % len(specs) for i in range(config.num_warmup)]
    results = await asyncio.gather(*(send_request(client, config.endpoint, bodies[i], specs[i]) for i in picks))
    for result in results:
        if not result.is_success:
            log.warning("warm-up request failed: %s", result.error)


async def run_benchmark(config: BenchConfig) -> RunResult:
    """Run the whole benchmark against `config.base_url`: warm-up, then the timed requests."""
    specs = build_requests(config)
    offsets_s = arrival_offsets_s(np.random.default_rng([config.seed, 2]), len(specs), config.request_rate,
                                  config.burstiness)
    async with open_client(config) as client:
        model = config.model or await first_model_id(client)
        bodies = [request_body(config, model, spec) for spec in specs]
        await warm_up(client, config, bodies, specs)
        dispatcher = Dispatcher(client, config, Progress(len(specs), is_enabled=config.is_progress))
        start_s = time.perf_counter()
        results = await dispatcher.run(bodies, specs, offsets_s)
        duration_s = time.perf_counter() - start_s
    return RunResult(model=model, results=tuple(results), duration_s=duration_s,
                     max_in_flight=dispatcher.max_in_flight)


# --------------------------------------------------------------------------------------------------------------------
# Figures, table, JSON


def _stats_ms(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    array_ms = 1000.0 * np.asarray(values_s, dtype=np.float64)
    if not array_ms.size:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "p90", "p99")}
    p50, p90, p99 = np.percentile(array_ms, (50, 90, 99)).tolist()
    return {f"mean_{name}_ms": float(array_ms.mean()), f"median_{name}_ms": p50, f"p90_{name}_ms": p90,
            f"p99_{name}_ms": p99}


def _distinct_errors(results: Sequence[RequestResult]) -> list[str]:
    errors: list[str] = []
    for result in results:
        if result.error and result.error not in errors:
            errors.append(result.error)
            if len(errors) == NUM_ERRORS_KEPT:
                break
    return errors


def _source(num_usage: int, num_done: int) -> str:
    if not num_done:
        return "none"
    return "usage" if num_usage == num_done else "chunks" if num_usage == 0 else "mixed"


def summarize(run: RunResult) -> dict[str, Any]:
    """Every figure of a run, keyed like vLLM's result JSON (latencies in ms, throughputs per second)."""
    done = [r for r in run.results if r.is_success]
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    num_usage = sum(r.is_usage_reported for r in done)
    cached = [r for r in done if r.cached_tokens is not None]
    cached_prompt_tokens = sum(r.prompt_tokens or r.prompt_len for r in cached)
    duration_s = max(run.duration_s, 1e-9)
    return {
        "duration_s": run.duration_s, "completed": len(done), "failed": len(run.results) - len(done),
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_per_s": len(done) / duration_s, "output_tok_per_s": output_tokens / duration_s,
        "total_tok_per_s": (input_tokens + output_tokens) / duration_s,
        "output_tokens_source": _source(num_usage, len(done)),
        "input_tokens_source": "usage" if all(r.prompt_tokens is not None for r in done) else "sent",
        "num_short_outputs": sum(r.output_tokens < r.output_len for r in done),
        "total_content_chunks": sum(r.num_chunks for r in done),
        "cached_tokens": sum(r.cached_tokens or 0 for r in cached) if cached else None,
        "cached_fraction": sum(r.cached_tokens or 0 for r in cached) / cached_prompt_tokens if cached else None,
        "max_in_flight": run.max_in_flight,
        **_stats_ms("ttft", [r.ttft_s for r in done]),
        **_stats_ms("tpot", [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]),
        **_stats_ms("itl", [gap for r in done for gap in r.itls_s]),
        **_stats_ms("e2e", [r.e2e_s for r in done]),
        "errors": _distinct_errors(run.results),
    }


def dataset_text(config: BenchConfig) -> str:
    kind = "text" if config.is_text else "token ids"
    if config.dataset == "sharegpt-like":
        return (f"sharegpt-like ({kind}, mean {SHAREGPT_MEAN_INPUT_LEN} in / {SHAREGPT_MEAN_OUTPUT_LEN} out, "
                f"max {config.max_input_len} / {config.max_output_len})")
    ratio = f", range ratio {config.range_ratio}" if config.range_ratio else ""
    if config.dataset == "shared-prefix":
        return (f"shared-prefix ({kind}, prefix {config.prefix_len} + {config.suffix_len} in, "
                f"{config.output_len} out{ratio})")
    return f"random ({kind}, {config.input_len} in, {config.output_len} out{ratio})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(config: BenchConfig, command: str, device_name: str, run: RunResult, figures: dict[str, Any],
                 saved: Path | None) -> None:
    """The table, then the one-line summary, on stdout."""
    cached = figures["cached_fraction"]
    rows = [
        ("command", command), ("device", device_name), ("server", f"{config.base_url}{config.endpoint}"),
        ("model", run.model), ("dataset", dataset_text(config)),
        ("request rate", f"{config.request_rate} req/s, burstiness {config.burstiness}"),
        ("max concurrency", f"{config.max_concurrency or 'none'} (peak in flight {figures['max_in_flight']})"),
        ("duration (s)", f"{figures['duration_s']:.2f}"),
        ("completed / failed", f"{figures['completed']} / {figures['failed']}"),
        ("input tokens", f"{figures['total_input_tokens']} (from {figures['input_tokens_source']})"),
        ("output tokens", f"{figures['total_output_tokens']} (from {figures['output_tokens_source']}, "
                          f"{figures['num_short_outputs']} requests short of max_tokens)"),
        ("request throughput", f"{figures['request_per_s']:.2f} req/s"),
        ("output throughput", f"{figures['output_tok_per_s']:.2f} tok/s"),
        ("total throughput", f"{figures['total_tok_per_s']:.2f} tok/s"),
        ("cached prompt tokens", "not reported" if cached is None else f"{100 * cached:.1f} %"),
    ]
    print(f"# serving benchmark{f', saved to {saved}' if saved else ''}")
    for name, value in rows:
        print(f"{name:<22}{value}")
    print(f"{'latency (ms)':<14}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        cells = "".join(f"{_ms(figures[f'{k}_{name}_ms']):>10}" for k in ("mean", "median", "p90", "p99"))
        print(f"{name.upper():<14}{cells}")
    for error in figures["errors"]:
        print(f"error: {error}")
    concurrency = config.max_concurrency or "inf"
    print(f"serve {config.dataset} {config.endpoint} model={run.model} n={config.num_prompts} "
          f"rate={config.request_rate} concurrency={concurrency}: {figures['total_output_tokens']} tokens, "
          f"{figures['duration_s']:.2f} s, {figures['output_tok_per_s']:.2f} tok/s")


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "bench.serve", *argv])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def detect_device_name() -> str:
    """The first GPU's name from nvidia-smi, else "cpu"."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    names = out.stdout.strip().splitlines()
    return names[0].strip() if out.returncode == 0 and names else "cpu"


def device_slug(device_name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": lower case, one dash between words."""
    return "-".join("".join(ch if ch.isalnum() else " " for ch in device_name.lower()).split())


def result_path(config: BenchConfig, device_name: str) -> Path:
    """`--result-file`, else bench/results/<device>-serve-<dataset>-<date>.json (-2, -3... rather than overwrite)."""
    if config.result_file:
        return Path(config.result_file)
    stem = f"{device_slug(device_name)}-serve-{config.dataset}-{datetime.date.today().isoformat()}"
    path, number = RESULTS_DIR / f"{stem}.json", 1
    while path.exists():
        number += 1
        path = RESULTS_DIR / f"{stem}-{number}.json"
    return path


def write_result(path: Path, argv: Sequence[str], config: BenchConfig, device_name: str, run: RunResult,
                 figures: dict[str, Any]) -> None:
    params = attrs.asdict(config, filter=lambda field, _: field.name != "api_key")
    params["request_rate"] = str(config.request_rate)  # "inf" is no JSON number
    payload = {
        "command": command_line(argv), "argv": list(argv), "git_commit": git_commit(),
        "device": device_name, "label": config.label, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": run.model, "dataset": dataset_text(config), "params": params, "results": figures,
        "requests": [{"prompt_len": r.prompt_len, "output_len": r.output_len, "prompt_tokens": r.prompt_tokens,
                      "output_tokens": r.output_tokens, "cached_tokens": r.cached_tokens,
                      "ttft_ms": 1000 * r.ttft_s, "e2e_ms": 1000 * r.e2e_s, "error": r.error} for r in run.results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Command line


_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (  # (flag, BenchConfig field, argparse keywords)
    ("--base-url", "base_url", {"help": "the server, without the /v1 path"}),
    ("--endpoint", "endpoint", {"choices": (COMPLETIONS, CHAT), "help": "chat sends text prompts built from common "
                                                                         "words: lengths there are approximate"}),
    ("--model", "model", {"help": "model id to send (default: the first id of GET /v1/models)"}),
    ("--api-key", "api_key", {"help": "bearer token (default: $OPENAI_API_KEY)"}),
    ("--dataset", "dataset", {"choices": DATASETS, "help": "prompt and output lengths (see above)"}),
    ("--num-prompts", "num_prompts", {"type": int, "help": "timed requests"}),
    ("--input-len", "input_len", {"type": int, "help": "random: prompt tokens"}),
    ("--output-len", "output_len", {"type": int, "help": "random, shared-prefix: output tokens (max_tokens)"}),
    ("--range-ratio", "range_ratio", {"type": float, "help": "random, shared-prefix: lengths uniform in len*(1 +- r)"}),
    ("--max-input-len", "max_input_len", {"type": int, "help": "sharegpt-like: clip of the prompt length"}),
    ("--max-output-len", "max_output_len", {"type": int, "help": "sharegpt-like: clip of the output length"}),
    ("--prefix-len", "prefix_len", {"type": int, "help": "shared-prefix: tokens shared by every prompt"}),
    ("--suffix-len", "suffix_len", {"type": int, "help": "shared-prefix: random tokens after the shared prefix"}),
    ("--vocab-low", "vocab_low", {"type": int, "help": "lowest prompt token id"}),
    ("--vocab-high", "vocab_high", {"type": int, "help": "prompt token ids stay below this"}),
    ("--text-prompts", "is_text_prompts", {"action": "store_true",
                                           "help": "text prompts on /v1/completions too (approximate lengths)"}),
    ("--request-rate", "request_rate", {"type": float, "help": "requests per second; inf sends all at once"}),
    ("--burstiness", "burstiness", {"type": float, "help": "gamma shape of the arrival gaps; 1 is Poisson"}),
    ("--max-concurrency", "max_concurrency", {"type": int, "help": "most requests in flight (default: no cap)"}),
    ("--seed", "seed", {"type": int, "help": "seed of lengths, prompts and arrivals"}),
    ("--temperature", "temperature", {"type": float, "help": "sampling temperature sent"}),
    ("--no-ignore-eos", "is_ignore_eos", {"action": "store_false", "help": "do not send ignore_eos: true"}),
    ("--extra-body", "extra_body", {"type": json.loads, "help": "JSON object merged into every request body"}),
    ("--warmup", "num_warmup", {"type": int, "help": "untimed requests sent first"}),
    ("--timeout-s", "timeout_s", {"type": float, "help": "read timeout per request (default: none)"}),
    ("--device-name", "device_name", {"help": "device label (default: nvidia-smi's first GPU, else cpu)"}),
    ("--label", "label", {"help": "free text stored in the result JSON"}),
    ("--result-file", "result_file", {"help": "JSON path (default: "
                                               "bench/results/<device>-serve-<dataset>-<date>.json)"}),
    ("--no-save", "is_save", {"action": "store_false", "help": "write no JSON"}),
    ("--no-progress", "is_progress", {"action": "store_false", "help": "no progress bar on stderr"}),
)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default is BenchConfig's."""
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    for flag, name, keywords in _FLAGS:
        default = getattr(defaults, name)
        if not isinstance(default, bool) and default not in (None, "") and "default" not in keywords["help"]:
            keywords = {**keywords, "help": f"{keywords['help']} (default: {default})"}
        parser.add_argument(flag, dest=name, default=default, **keywords)
    return parser


def parse_args(argv: Sequence[str]) -> BenchConfig:
    """The run's config from command-line arguments; a bad value exits with argparse's usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not isinstance(args.extra_body, dict):
        parser.error("--extra-body must be a JSON object")
    if args.api_key is None:
        args.api_key = os.environ.get("OPENAI_API_KEY")
    try:
        return BenchConfig(**vars(args))
    except ValueError as exc:
        parser.error(str(exc))


def _raise_open_file_limit() -> None:
    """Each connection is a file descriptor: lift the soft limit to the hard one for runs of thousands of clients."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def amain(argv: Sequence[str]) -> int:
    """The whole command: parse `argv`, run, save the JSON, print the report; the exit status."""
    config = parse_args(argv)
    try:
        run = await run_benchmark(config)
    except ServerUnusableError as exc:
        log.error("%s", exc)
        return 2
    figures = summarize(run)
    device_name = config.device_name or detect_device_name()
    path = None
    if config.is_save:
        path = result_path(config, device_name)
        write_result(path, argv, config, device_name, run, figures)
    print_report(config, command_line(argv), device_name, run, figures, path)
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    _raise_open_file_limit()
    return asyncio.run(amain(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
