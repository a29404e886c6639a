"""TerminalChat: `trillm serve api_client URL`, a chat with a running server in this terminal.

A message may span several lines and ends with an empty line. `end` ends the session and starts a new one, `exit`
(or Ctrl-D) ends it and quits. Answers stream as they are generated; Ctrl-C during an answer stops that answer and
keeps the session (the server keeps the partial answer in the history), Ctrl-C while typing drops what was typed.
Failures are reported in a sentence that says what to do, and the chat goes on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextlib import closing
from typing import Any, TextIO

from trillm.client import APIClient, APIError
from trillm.ui.chat_session import MAX_NEW_TOKENS, ChatSession, explain

log = logging.getLogger(__name__)

NEW_SESSION_HINT = "type `end`"
FIRST_PROMPT = ">>> "
NEXT_PROMPT = "... "
COMMANDS = ("end", "exit")


class TerminalChat:
    """The read-answer loop over one ChatSession.

    Args:
        session: the server session to talk in.
        read_line: reads one line after showing a prompt (`input`); raises EOFError at the end of input.
        out: where answers and notes go.
    """

    def __init__(self, session: ChatSession, *, read_line: Callable[[str], str] = input,
                 out: TextIO = sys.stdout) -> None:
        self.session = session
        self._read_line = read_line
        self._out = out

    def run(self) -> int:
        """Chat until `exit` or the end of input; the exit status."""
        while True:
            try:
                message = self._read_message()
            except EOFError:
                message = "exit"
            if message == "exit":
                self._end_session()
                return 0
            if message == "end":
                old = self.session.session_id
                if self._end_session(restart=True):
                    self._say(f"[session {old} ended; new session {self.session.session_id}]")
                continue
            self._answer(message)

    def _read_message(self) -> str:
        """Lines up to an empty one, joined; Ctrl-C drops them and starts over."""
        lines: list[str] = []
        while True:
            try:
                line = self._read_line(NEXT_PROMPT if lines else FIRST_PROMPT)
            except KeyboardInterrupt:
                self._say("\n[input dropped; type `exit` to quit]")
                lines = []
                continue
            if line.strip() in COMMANDS and not lines:
                return line.strip()
            if not line.strip():
                if lines:
                    return "\n".join(lines)
                continue
            lines.append(line)

    def _answer(self, message: str) -> None:
        """Stream one answer; Ctrl-C cancels it on the server."""
        last: dict[str, Any] | None = None
        try:
            # closing(): a Ctrl-C that lands in this frame, not in the read, must still close the stream
            with closing(self.session.turn(message, request_output_len=MAX_NEW_TOKENS)) as lines:
                for line in lines:
                    self._write(line.get("text") or "")
                    last = line
        except KeyboardInterrupt:
            self._cancel()
            return
        except APIError as exc:
            self._say(("\n" if last else "") + explain(exc, new_session_hint=NEW_SESSION_HINT))
            return
        self._write("\n")
        if last is not None:
            self._finish_note(last)

    def _cancel(self) -> None:
        try:
            self.session.cancel()
        except APIError as exc:
            self._say("\n" + explain(exc, new_session_hint=NEW_SESSION_HINT))
            return
        self._say("\n[answer cancelled; it stays in the session's history]")

    def _finish_note(self, last: dict[str, Any]) -> None:
        if last.get("finish_reason") == "abort":
            self._say("[answer cancelled; it stays in the session's history]")
        elif last.get("finish_reason") == "length":
            if int(last.get("tokens") or 0) >= MAX_NEW_TOKENS:
                self._say(f"[the answer stopped at {MAX_NEW_TOKENS} tokens]")
            else:
                self._say(f"[the session is full: {NEW_SESSION_HINT} to start a new one]")

    def _end_session(self, *, restart: bool = False) -> bool:
        """End (or restart) the session on the server; False, with the reason shown, when that failed."""
        try:
            if restart:
                self.session.restart()
            else:
                self.session.end()
        except APIError as exc:
            self._say(explain(exc, new_session_hint=NEW_SESSION_HINT))
            return False
        return True

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    def _say(self, note: str) -> None:
        self._write(note + "\n")


def chat_in_terminal(api_server_url: str, *, api_key: str | None = None, session_id: int | None = None) -> int:
    """`trillm serve api_client`: connect, greet, chat; the exit status (1 when the server cannot be used)."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    with APIClient(api_server_url, api_key=api_key) as client:
        try:
            models = client.available_models
        except APIError as exc:
            print(explain(exc, new_session_hint=NEW_SESSION_HINT), file=sys.stderr)
            return 1
        session = ChatSession(client, session_id)
        print(f"trillm api_client: {', '.join(models) or 'no model'} at {client.api_server_url}, session "
              f"{session.session_id}.\nEnd a message with an empty line. `end` starts a new session, `exit` quits; "
              "Ctrl-C stops an answer.", flush=True)
        return TerminalChat(session).run()
