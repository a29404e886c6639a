"""Domain exceptions: what can go wrong for a request or the engine, independent of HTTP.

Only `trillm/http/errors.py` maps these to OpenAI error bodies and status codes.
"""

from __future__ import annotations


class TrillmError(Exception):
    """Base class of trillm's domain errors."""


class InvalidRequestError(TrillmError):
    """A request that cannot be served as asked (HTTP 400). `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (or a session turn) does not fit in the context window (HTTP 400)."""

    def __init__(self, num_tokens: int, max_model_len: int, *, param: str = "messages", hint: str = "") -> None:
        message = (
            f"This model's maximum context length is {max_model_len} tokens, but the request has {num_tokens} "
            f"input tokens.{(' ' + hint) if hint else ''}"
        )
        super().__init__(message, param=param, code="context_length_exceeded")
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len


class ModelNotFoundError(TrillmError):
    """The request names a model this server does not serve (HTTP 404)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model


class SessionBusyError(TrillmError):
    """A session already has a running turn (HTTP 409)."""

    def __init__(self, session_id: int) -> None:
        super().__init__(f"session_id {session_id} has a turn in progress; cancel it or wait for it to finish")
        self.session_id = session_id


class SessionLimitError(TrillmError):
    """A new interactive session would pass the server's --max-sessions (HTTP 429)."""

    def __init__(self, max_sessions: int) -> None:
        super().__init__(
            f"the server holds its limit of {max_sessions} interactive sessions (--max-sessions): end sessions you "
            "no longer need (prompt \"\", request_output_len 0, interactive_mode false), or retry later; idle "
            "sessions end after --session-idle-timeout"
        )
        self.max_sessions = max_sessions


class SessionNotFoundError(TrillmError):
    """A turn that says it continues a session (header `x-session-continue`) names one this server does not hold
    (HTTP 404): it ended, expired, or lived on a replica that went away. Never silently started afresh."""

    def __init__(self, session_id: int) -> None:
        super().__init__(
            f"session {session_id} has no history on this server: it ended, expired after --session-idle-timeout, or "
            "was held by a server (replica) that restarted or went away. Start a new session (a new session_id, or "
            "-1) and send the conversation again"
        )
        self.session_id = session_id


class SessionOccupiedError(InvalidRequestError):
    """A stateless endpoint was given the id of an interactive session that has history (HTTP 400)."""

    def __init__(self, session_id: int) -> None:
        super().__init__(f"session_id {session_id} is occupied", param="session_id", code="session_occupied")
        self.session_id = session_id


class EngineDeadError(TrillmError):
    """The engine has failed (a rank process died or an actor crashed): every request gets HTTP 503."""


class EngineDrainingError(TrillmError):
    """The server is draining for shutdown and takes no new requests (HTTP 503)."""


class ModelLoadError(TrillmError):
    """A model could not be resolved or loaded: unsupported architecture, missing files, unreadable GGUF."""
