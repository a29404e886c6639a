"""Access log: one line per HTTP request (method, path, status, duration, request id, prompt/completion tokens).

Logged at INFO by the `trillm.access` logger, so a 4xx shows in the server's output and not only in /metrics;
`--disable-access-log` turns it off. A JSON answer is logged when the app hands it to hypercorn; a streamed one when
its stream ends (its status is sent first, its tokens are known only at the end), by its `RequestTrace`:

    POST /v1/chat/completions 200 1.234s id=chatcmpl-3f... prompt_tokens=31 completion_tokens=64
    POST /v1/embeddings 404 0.001s
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from quart import Response, g, has_request_context, request

if TYPE_CHECKING:
    from trillm.http.metrics import RequestTrace

log = logging.getLogger("trillm.access")


def begin() -> None:
    """Before a request: note when it started."""
    g.trillm_access_start_s = time.perf_counter()


def finish(response: Response) -> None:
    """After the view answered: log the line now, or when the stream ends for a streamed generation."""
    started_s = getattr(g, "trillm_access_start_s", None)
    if started_s is None:
        return  # the request failed before the app saw it
    trace: RequestTrace | None = getattr(g, "trillm_access_trace", None)
    line = f"{request.method} {request.path} {response.status_code}"
    if trace is not None and response.status_code == 200 and not trace.is_finished:  # a stream, still running
        trace.on_finish = lambda: _write(line, started_s, trace)
        return
    _write(line, started_s, trace)


def _write(line: str, started_s: float, trace: RequestTrace | None) -> None:
    elapsed_s = time.perf_counter() - started_s
    if trace is None:
        log.info("%s %.3fs", line, elapsed_s)
    else:
        log.info("%s %.3fs id=%s prompt_tokens=%d completion_tokens=%d", line, elapsed_s, trace.request_id,
                 trace.num_prompt_tokens, trace.num_output_tokens)


def attached(trace: RequestTrace) -> RequestTrace:
    """`trace`, attached to the request being served (if any): `ServerMetrics.trace` passes every trace here."""
    if has_request_context():
        g.trillm_access_trace = trace
    return trace
