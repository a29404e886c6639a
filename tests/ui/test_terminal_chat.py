"""`trillm serve api_client`: the terminal chat through a pseudo-terminal, its error sentences, ChatSession's retry."""

from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.http.http_fakes import SCRIPT, FakeEngine, _Session
from tests.http.http_live import LiveServer, server_config
from tests.served import free_port
from tests.ui.conftest import LONG_STEP_S, STEP_S, serve
from trillm.cli import main
from trillm.client import APIClient, APIError
from trillm.http.app import create_app
from trillm.ui.chat_session import ChatSession
from trillm.ui.terminal import TerminalChat

ROOT = Path(__file__).resolve().parents[2]


def history(server: LiveServer, engine: FakeEngine, session_id: int) -> int | None:
    """The session's token count on the server, None when it has no such session."""
    def read() -> int | None:
        session = engine.sessions.get(session_id)
        return None if session is None else len(session.history)
    return server.call(read)


def test_two_turns_a_ctrl_c_end_and_exit_through_a_pty(slow_server: LiveServer, slow_engine: FakeEngine) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "trillm", "serve", "api_client", slow_server.url], cwd=str(ROOT),
                          encoding="utf-8", timeout=30, dimensions=(50, 250))
    try:
        child.expect(r"session (\d+)\.")
        session_id = int(child.match.group(1))
        child.expect_exact(">>> ")
        # turn 1: two lines, ended by an empty one; the answer streams in full
        child.sendline("hi, what's your name?")
        child.expect_exact("... ")
        child.sendline("answer in one line")
        child.expect_exact("... ")
        child.sendline("")
        child.expect_exact(SCRIPT)
        child.expect_exact(">>> ")
        after_turn_1 = history(slow_server, slow_engine, session_id)
        assert after_turn_1 is not None and after_turn_1 > len(SCRIPT)
        # turn 2: Ctrl-C once the answer has started
        slow_server.call(setattr, slow_engine, "step_s", LONG_STEP_S)
        try:
            child.sendline("tell me more")
            child.sendline("")
            child.expect_exact(SCRIPT[:8])
            child.sendintr()
            child.expect_exact("[answer cancelled; it stays in the session's history]")
        finally:
            slow_server.call(setattr, slow_engine, "step_s", STEP_S)
        shown = SCRIPT[:8] + child.before
        assert "^C" in shown and len(shown.split("^C")[0]) < len(SCRIPT) - 10
        child.expect_exact(">>> ")
        after_turn_2 = history(slow_server, slow_engine, session_id)  # the partial answer stayed
        assert after_turn_2 is not None and after_turn_2 > after_turn_1
        # turn 3, the same message: the session goes on (no 409), and this answer is whole
        child.sendline("tell me more")
        child.sendline("")
        child.expect_exact(SCRIPT)
        child.expect_exact(">>> ")
        after_turn_3 = history(slow_server, slow_engine, session_id)
        assert after_turn_3 is not None and (after_turn_3 - after_turn_2) - (after_turn_2 - after_turn_1) > 10
        # Ctrl-C while typing drops the input, not the chat
        child.send("half a thought")
        child.expect_exact("half a thought")  # echoed: the chat is reading its input line, not still printing
        time.sleep(0.2)
        child.sendintr()
        child.expect_exact("[input dropped; type `exit` to quit]")
        child.expect_exact(">>> ")
        # end: the session is gone from the server, and a new one starts
        child.sendline("end")
        child.expect(r"\[session (\d+) ended; new session (\d+)\]")
        assert int(child.match.group(1)) == session_id
        new_session_id = int(child.match.group(2))
        assert history(slow_server, slow_engine, session_id) is None
        child.expect_exact(">>> ")
        child.sendline("hello again")
        child.sendline("")
        child.expect_exact(SCRIPT)
        child.expect_exact(">>> ")
        assert history(slow_server, slow_engine, new_session_id)
        # exit: ends the session and quits with status 0
        child.sendline("exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert history(slow_server, slow_engine, new_session_id) is None
        assert "Traceback" not in (child.before or "")
    finally:
        child.close(force=True)


def chat(session: ChatSession, *lines: str) -> str:
    """Run a TerminalChat over scripted input lines (then end of input, which exits); its output."""
    script: Iterator[str] = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    assert TerminalChat(session, read_line=read_line, out=out).run() == 0
    return out.getvalue()


def test_a_server_that_is_down_is_named_with_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with APIClient(url) as client:
        text = chat(ChatSession(client), "hi", "")
    assert f"cannot reach the server at {url}" in text
    assert "Is `trillm serve api_server` running there? Start it (or fix the URL) and try again." in text


def test_a_busy_session_says_what_to_do(slow_server: LiveServer, slow_engine: FakeEngine) -> None:
    slow_server.call(slow_engine.sessions.__setitem__, 4242, _Session(is_busy=True))
    try:
        with APIClient(slow_server.url) as client:
            text = chat(ChatSession(client, 4242), "hi", "")
    finally:
        slow_server.call(slow_engine.sessions.pop, 4242, None)  # `exit` may have ended it already
    assert "another client is using the same session id" in text
    assert "or type `end` to start a new session" in text


@pytest.fixture(scope="module")
def small_server() -> Iterator[tuple[LiveServer, FakeEngine]]:
    engine = FakeEngine(max_model_len=80)  # the first turn's answer runs into the window
    server = serve(engine)
    yield server, engine
    server.stop()


def test_a_full_session_says_to_type_end(small_server: tuple[LiveServer, FakeEngine]) -> None:
    server, engine = small_server
    with APIClient(server.url) as client:
        session = ChatSession(client)
        first_id = session.session_id
        text = chat(session, "hi", "", "more", "", "end", "hi", "")
    assert "[the session is full: type `end` to start a new one]" in text
    assert "The conversation no longer fits in the model's context window" in text
    assert "Type `end` to start a new session." in text
    assert f"[session {first_id} ended; new session {session.session_id}]" in text
    assert text.count(SCRIPT[:6]) == 2  # the first turn and the one after `end` answered; the second did not
    assert history(server, engine, first_id) is None


def test_a_turn_right_after_a_cancel_waits_out_the_409(slow_server: LiveServer, slow_engine: FakeEngine) -> None:
    slow_server.call(slow_engine.sessions.__setitem__, 4343, _Session(is_busy=True))
    with APIClient(slow_server.url) as client:
        session = ChatSession(client, 4343)
        with pytest.raises(APIError) as info:  # no cancel of ours in flight: the 409 is the caller's to explain
            list(session.turn("hi"))
        assert info.value.status_code == 409
        session.cancel()  # the fake's busy flag stays: the server is "still finishing" the cancelled turn
        timer = threading.Timer(0.5, lambda: slow_server.call(
            lambda: setattr(slow_engine.sessions[4343], "is_busy", False)))
        timer.start()
        lines = list(session.turn("hi"))
        timer.join()
    assert "".join(line["text"] for line in lines) == SCRIPT and lines[-1]["finish_reason"] == "stop"
    client_end = APIClient(slow_server.url)
    client_end.end_session(4343)
    client_end.close()


def test_a_server_with_keys_says_to_pass_one(capsys: pytest.CaptureFixture[str]) -> None:
    server = LiveServer(create_app(server_config(api_keys=("sk-right",)), engine=FakeEngine())).start()
    try:
        assert main(["serve", "api_client", server.url]) == 1
        assert "The server wants an API key" in capsys.readouterr().err
        with APIClient(server.url, api_key="sk-right") as client:
            assert chat(ChatSession(client), "hi", "").count(SCRIPT) == 1
    finally:
        server.stop()
