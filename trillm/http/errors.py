"""Error bodies: the mapping of domain exceptions and HTTP failures to OpenAI's `{"error": {...}}` responses.

This is the only module that knows HTTP status codes for `trillm.errors` exceptions. Nothing a client sends
may produce a 500: validation failures are 400s raised as `InvalidRequestError`; an unexpected exception is a
server bug, answered with a 500 in the same shape and logged with its traceback.
"""

from __future__ import annotations

import logging

from quart import Response, has_request_context, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from trillm.errors import (
    EngineDeadError,
    EngineDrainingError,
    InvalidRequestError,
    ModelNotFoundError,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
    TrillmError,
)
from trillm.http.schemas import ErrorDetail, ErrorResponse, encode

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"

_HTTP_CODES = {  # werkzeug's HTTP errors (routing, body size) → OpenAI `code`
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, message: str, *, type: str, param: str | None = None,
                   code: str | None = None) -> Response:
    """An OpenAI error body with the given status."""
    body = encode(ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)))
    return Response(body, status=status, content_type="application/json")


def describe_exception(exc: BaseException) -> tuple[int, ErrorDetail]:
    """The HTTP status and OpenAI error object for an exception (used for responses and in-stream errors)."""
    match exc:
        case InvalidRequestError():
            return 400, ErrorDetail(message=exc.message, type=INVALID_REQUEST, param=exc.param, code=exc.code)
        case ModelNotFoundError():
            return 404, ErrorDetail(message=str(exc), type=INVALID_REQUEST, param="model", code="model_not_found")
        case SessionLimitError():
            return 429, ErrorDetail(message=str(exc), type=INVALID_REQUEST, param="session_id", code="too_many_sessions")
        case SessionNotFoundError():
            return 404, ErrorDetail(message=str(exc), type=INVALID_REQUEST, param="session_id", code="session_not_found")
        case SessionBusyError():
            return 409, ErrorDetail(message=str(exc), type=INVALID_REQUEST, param="session_id", code="session_busy")
        case EngineDrainingError():
            message = str(exc) or "The server is shutting down and accepts no new requests"
            return 503, ErrorDetail(message=message, type=UNAVAILABLE, code="server_draining")
        case EngineDeadError():
            message = str(exc) or "The engine has failed"
            return 503, ErrorDetail(message=message, type=UNAVAILABLE, code="engine_failed")
        case TrillmError():
            log.error("unmapped domain error: %r", exc)
            return 500, ErrorDetail(message=str(exc), type=SERVER_ERROR, code="internal_error")
        case HTTPException():
            status = exc.code or 500
            message = exc.description or exc.name
            if status == 413:
                message = "The request body is larger than the server's limit"
            elif isinstance(exc, NotFound) and has_request_context() and request.path.startswith("/v1/"):
                message = (f"This server does not offer {request.path} (it serves /v1/models, /v1/chat/completions, "
                           "/v1/completions, /v1/chat/interactive and /v1/encode)")
            kind = INVALID_REQUEST if status < 500 else SERVER_ERROR
            return status, ErrorDetail(message=message, type=kind, code=_HTTP_CODES.get(status))
        case _:
            log.error("internal error", exc_info=exc)
            return 500, ErrorDetail(message=f"Internal server error ({type(exc).__name__})", type=SERVER_ERROR,
                                    code="internal_error")


def exception_response(exc: BaseException) -> Response:
    """The OpenAI error response for an exception."""
    status, detail = describe_exception(exc)
    response = Response(encode(ErrorResponse(error=detail)), status=status, content_type="application/json")
    if status == 413:
        # The rest of the oversized body is never read, so this connection cannot carry another request:
        # hypercorn would wait for the app to take that body before reading the next request.
        response.headers["Connection"] = "close"
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))  # RFC 9110: a 405 lists the methods
    return response


def register_error_handlers(app: QuartTrio) -> None:
    """Route every exception a view can raise (domain, HTTP, unexpected) to an OpenAI error body."""

    async def handle(exc: Exception) -> Response:
        return exception_response(exc)

    app.register_error_handler(HTTPException, handle)
    app.register_error_handler(TrillmError, handle)
    app.register_error_handler(Exception, handle)
