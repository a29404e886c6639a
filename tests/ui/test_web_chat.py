"""`trillm serve gradio`: the web chat driven in headless Chromium against a live FakeEngine server.

Runs where the `ui` extra (gradio), the playwright package and Debian's Chromium are installed; skipped otherwise,
with the command that installs what is missing. Chromium is driven through Playwright's bundled driver with
`executable_path`, since downloading a browser does not work here.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.http.http_fakes import SCRIPT, FakeEngine
from tests.http.http_live import LiveServer
from tests.served import free_port
from tests.ui.conftest import LONG_STEP_S, STEP_S

pytest.importorskip("gradio", reason="the `ui` extra is not installed: .venv/bin/pip install -e '.[ui]'")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed: .venv/bin/pip install -e '.[dev]'")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed: `make browser` installs "
                                                           "Debian's chromium package"),
]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def web_chat_url(slow_server: LiveServer) -> Iterator[str]:
    """`trillm serve gradio` in a child process, on a free loopback port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "trillm", "serve", "gradio", slow_server.url, "--server-name", "127.0.0.1",
         "--server-port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the web chat did not start"
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def page(web_chat_url: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 950})
            tab.goto(web_chat_url)
            tab.wait_for_function("document.querySelector('#status')?.innerText.startsWith('Session')",
                                  timeout=WAIT_MS)
            yield tab
        finally:
            browser.close()


def status(page: Any) -> str:
    return str(page.inner_text("#status"))


def answers(page: Any) -> list[str]:
    """The assistant bubbles' texts, oldest first."""
    return [str(t).strip() for t in page.locator("#chat [data-testid='bot']").all_inner_texts()]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def send(page: Any, message: str) -> None:
    page.fill("#message textarea", message)
    page.press("#message textarea", "Enter")


def wait_done(page: Any) -> None:
    """Until the handler's last update (the status leaves "Answering...")."""
    page.wait_for_function("!document.querySelector('#status').innerText.includes('Answering')", timeout=WAIT_MS)


# Records the length of the newest answer bubble at every change of the chat, in the page itself: a poll from
# here could miss the steps of a stream on a busy machine.
RECORD_LENGTHS = """() => {
    window.answerLengths = [];
    new MutationObserver(() => {
        const bubbles = document.querySelectorAll("#chat [data-testid='bot']");
        if (bubbles.length) window.answerLengths.push(bubbles[bubbles.length - 1].innerText.trim().length);
    }).observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true});
}"""


def session_id_shown(page: Any) -> int:
    return int(status(page).split()[1].rstrip("."))


def test_send_stream_cancel_and_reset_in_chromium(page: Any, slow_server: LiveServer, slow_engine: FakeEngine,
                                                   tmp_path: Path) -> None:
    server, engine = slow_server, slow_engine
    def sessions() -> dict[int, int]:
        return server.call(lambda: {k: len(v.history) for k, v in engine.sessions.items()})

    session_id = session_id_shown(page)
    # a message sent with Enter is answered, and the answer grows on the page while it is generated
    page.evaluate(RECORD_LENGTHS)
    send(page, "hi, what's your name?")
    wait_until(lambda: answers(page)[-1:] == [SCRIPT], "the first answer")
    wait_done(page)
    seen = set(page.evaluate("window.answerLengths"))
    assert len(seen - {0, len(SCRIPT)}) >= 3, f"the answer did not stream: lengths seen {sorted(seen)}"
    assert set(sessions()) == {session_id}
    first_sampling = engine.requests[-1].sampling
    assert (first_sampling.max_tokens, first_sampling.top_p, first_sampling.temperature) == (512, 0.8, 0.8)

    # Cancel stops a long answer; the partial answer stays on the page and in the server's session
    history_before = sessions()[session_id]
    server.call(setattr, engine, "step_s", LONG_STEP_S)
    try:
        send(page, "tell me more")
        wait_until(lambda: len(answers(page)) == 2 and len(answers(page)[-1]) >= 8, "the second answer to start")
        page.click("#cancel")
        page.wait_for_function("document.querySelector('#status').innerText.includes('cancelled')",
                               timeout=WAIT_MS)
    finally:
        server.call(setattr, engine, "step_s", STEP_S)
    partial = answers(page)[-1]
    assert SCRIPT.startswith(partial) and len(partial) < len(SCRIPT) - 10
    assert session_id in sessions() and sessions()[session_id] > history_before
    wait_done(page)

    # the sliders reach the server: max new tokens 20 stops the answer there
    page.fill("#max-new-tokens input[type='number']", "20")
    page.press("#max-new-tokens input[type='number']", "Enter")
    send(page, "once more")
    page.wait_for_function("document.querySelector('#status').innerText.includes('stopped at 20 tokens')",
                           timeout=WAIT_MS)
    assert answers(page)[-1] == SCRIPT[:20] and engine.requests[-1].sampling.max_tokens == 20
    page.screenshot(path=str(tmp_path / "web_chat.png"))

    # Reset ends the session on the server and the next message starts a new one
    page.click("#reset")
    page.wait_for_function("document.querySelector('#status').innerText.includes('new session started')",
                           timeout=WAIT_MS)
    assert sessions() == {} and answers(page) == []
    new_session_id = session_id_shown(page)
    assert new_session_id != session_id
    send(page, "hello again")
    wait_until(lambda: answers(page)[-1:] == [SCRIPT[:20]], "the answer after Reset")
    wait_done(page)
    assert set(sessions()) == {new_session_id}

    # a failure is shown in the page with what to do
    server.call(engine.fail, "rank 0 died")
    try:
        send(page, "are you there?")
        page.wait_for_function("document.querySelector('#status').innerText.includes('cannot take requests')",
                               timeout=WAIT_MS)
        assert "rank 0 died" in status(page)
    finally:
        server.call(lambda: setattr(engine, "is_alive", True))
