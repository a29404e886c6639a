"""ChatSession: one interactive session on a server, as the terminal and web chats see it.

Both user interfaces drive `/v1/chat/interactive` through `trillm.APIClient` and share what is not about display:

- The session id is chosen here, before the first turn, at random below 2³¹ (the ids the server hands out for
  `session_id: -1` start at 2³¹). Knowing the id before the first answer arrives lets a cancel always name its
  session; an id the server assigned would only be known once the first line came back, and a turn interrupted
  before that would leave a session nobody can end.
- A cancel is sent as `cancel: true` for the session, so the server ends the turn and keeps its partial answer in the
  history (API.md, interactive semantics 4) whether or not the client also closed its stream.
- Right after a cancel the server may still be finishing the cancelled turn: a new turn that meets 409 then is
  retried for up to `SETTLE_S` seconds instead of failing.
- `explain` turns an `APIError` into a sentence that says what to do next.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Generator
from typing import Any

from trillm.client import APIClient, APIError

log = logging.getLogger(__name__)

MAX_SESSION_ID = (1 << 31) - 1  # chosen ids fit a signed 32-bit integer, below the server's own (from 2³¹)
MAX_NEW_TOKENS = 512  # per answer unless the user sets otherwise, as LMDeploy's api_client and gradio ask
SETTLE_S = 5.0  # how long a turn right after a cancel retries on 409 while the server finishes the cancelled turn
RETRY_S = 0.1


def random_session_id() -> int:
    """A session id in [1, 2³¹ - 1]."""
    return 1 + secrets.randbelow(MAX_SESSION_ID)


class ChatSession:
    """An interactive session: streamed turns, cancel, end.

    Args:
        client: the server's client.
        session_id: the session to use; None picks a random one.
        clock, sleep: time functions (tests pass fakes).
    """

    def __init__(self, client: APIClient, session_id: int | None = None, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.session_id = random_session_id() if session_id is None else session_id
        self._clock = clock
        self._sleep = sleep
        self._cancelled_at: float | None = None

    def turn(self, prompt: str, **sampling: Any) -> Generator[dict[str, Any], None, None]:
        """Send one user turn and yield the streamed lines (`text` is the delta; the last has `finish_reason`).

        Args:
            prompt: the user's message.
            **sampling: `request_output_len`, `top_p`, `temperature` and other fields of the request.

        Raises:
            APIError: the request failed (409 only once the settling time after a cancel has passed).
        """
        while True:
            stream = self.client.chat_interactive_v1(prompt, session_id=self.session_id, interactive_mode=True,
                                                     stream=True, **sampling)
            try:
                first = next(stream, None)
            except APIError as exc:
                if exc.status_code == 409 and self._is_settling():
                    self._sleep(RETRY_S)
                    continue
                raise
            break
        self._cancelled_at = None
        if first is not None:
            yield first
        yield from stream

    def cancel(self) -> None:
        """Stop the running turn, if any; its partial answer stays in the session.

        Raises:
            APIError: the request failed.
        """
        self._cancelled_at = self._clock()
        for _ in self.client.chat_interactive_v1("", session_id=self.session_id, cancel=True):
            pass

    def end(self) -> None:
        """End the session on the server (cancelling a running turn); the same id starts afresh next turn.

        Raises:
            APIError: the request failed.
        """
        self._cancelled_at = self._clock()
        self.client.end_session(self.session_id)

    def restart(self) -> None:
        """End the session and continue under a new random id.

        Raises:
            APIError: the request failed (the id changes all the same).
        """
        try:
            self.end()
        finally:
            self.session_id = random_session_id()

    def _is_settling(self) -> bool:
        return self._cancelled_at is not None and self._clock() - self._cancelled_at < SETTLE_S


def explain(error: APIError, *, new_session_hint: str) -> str:
    """What went wrong and what to do, for a person.

    Args:
        error: the failure.
        new_session_hint: how this interface starts a new session, e.g. "type `end`".
    """
    code = (error.error or {}).get("code")
    server_says = (error.error or {}).get("message") or error.message
    if error.status_code is None and error.error is None:
        return f"{error.message}. Is `trillm serve api_server` running there? Start it (or fix the URL) and try again."
    if error.status_code == 409:
        return ("This session is still answering another message: another client is using the same session id. "
                f"Wait for that answer to finish and send again, or {new_session_hint} to start a new session.")
    if code == "context_length_exceeded":
        return (f"The conversation no longer fits in the model's context window: {server_says} "
                f"{new_session_hint[0].upper()}{new_session_hint[1:]} to start a new session.")
    if error.status_code == 401:
        return f"The server wants an API key: {server_says} Pass the key with --api-key."
    if error.status_code == 503:
        return f"The server cannot take requests now: {server_says} Restart it, then send your message again."
    return f"The server refused the message: {server_says}" if error.status_code else f"Error: {server_says}"
