"""Framing: how streamed responses are cut into SSE events or NDJSON lines, and how their bodies start.

SSE (chat and text completions): `data: <json>\\n\\n` per chunk and `data: [DONE]\\n\\n` last. NDJSON (LMDeploy's
interactive stream): one JSON object per line, no prefix, no terminator.

A streamed body is an async generator that Quart iterates after the view returns. Each of ours first yields an
empty sentinel that the view consumes (`primed`): from then on the generator is suspended inside its `try`, so
its `finally` (which closes the ChoiceStream and so aborts the sequences) runs whether Quart closes it, the client
disconnects, or the response is dropped before its body was ever sent (Trio then finalizes the generator).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

from quart import Response

from trillm.http.schemas import ErrorDetail, ErrorResponse, encode

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(value: object) -> bytes:
    return b"data: " + encode(value) + b"\n\n"


def sse_error(detail: ErrorDetail) -> bytes:
    return sse_event(ErrorResponse(error=detail))


def ndjson_line(value: object) -> bytes:
    return encode(value) + b"\n"


async def primed(body: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """Run `body` up to its sentinel `yield b""`, so that its cleanup is guaranteed; return it for Quart."""
    sentinel = await body.__anext__()
    assert sentinel == b"", "a streamed body must yield an empty sentinel first"
    return body


async def streaming_response(body: AsyncGenerator[bytes, None], content_type: str) -> Response:
    """A 200 response that sends `body` chunk by chunk, with no response timeout."""
    response = Response(await primed(body), status=200, content_type=content_type, headers=SSE_HEADERS)
    response.timeout = None  # Quart's RESPONSE_TIMEOUT would cut long streams
    return response
