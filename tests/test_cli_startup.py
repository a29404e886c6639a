"""Start-up and failure of `trillm serve api_server` (issues 12, 13): a taken port fails before the model loads,
naming the port; hypercorn's lines are logged once; a failed engine stops the server with exit status 1."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import hypercorn.logging
import pytest

from served import ServedProcess, free_port
from trillm.cli import main
from trillm.config import ServerConfig
from trillm.http.listening import check_port_free, hypercorn_settings


def test_a_port_in_use_fails_at_once_naming_the_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        start = time.monotonic()
        # The model does not exist: the port is checked first, so that error never comes.
        code = main(["serve", "api_server", "/no/such/model.gguf", "--server-name", "127.0.0.1",
                     "--server-port", str(port)])
        assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert code == 1
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--server-port" in err
    assert "model" not in err.lower()


def test_a_free_port_passes() -> None:
    check_port_free("127.0.0.1", free_port())  # and leaves it free
    port = free_port()
    check_port_free("127.0.0.1", port)
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_hypercorn_lines_are_logged_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("hypercorn.error"), "handlers", [])  # other tests' servers added theirs
    settings = hypercorn_settings(ServerConfig())
    with caplog.at_level(logging.INFO):
        hypercorn_logger = hypercorn.logging.Logger(settings)
        assert hypercorn_logger.error_logger is logging.getLogger("hypercorn.error")
        assert not logging.getLogger("hypercorn.error").handlers  # no second handler of its own
        hypercorn_logger.error_logger.info("Running on http://127.0.0.1:1 (CTRL + C to quit)")
    assert [r.getMessage() for r in caplog.records].count("Running on http://127.0.0.1:1 (CTRL + C to quit)") == 1


class _FailingState:
    """What `_wait_for_shutdown` reads of ServerState: an engine that fails after a while, no request in flight."""

    def __init__(self) -> None:
        self.is_alive = True
        self.is_drained = False

    def failure_reason(self) -> str:
        return "rank 0 died"

    async def wait_idle(self) -> None:
        return

    def drain(self) -> None:
        self.is_drained = True


async def test_the_server_stops_soon_after_its_engine_fails(caplog: pytest.LogCaptureFixture) -> None:
    import trio

    from trillm.cli import _wait_for_shutdown

    state = _FailingState()

    async def fail_later() -> None:
        await trio.sleep(0.2)
        state.is_alive = False

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail_later)
        with trio.fail_after(5):
            await _wait_for_shutdown(state, 30.0)  # returns: hypercorn stops, serve() raises, main() returns 1
    assert 1.0 <= trio.current_time() - start < 3.0  # /health answered 503 for a moment first
    assert not state.is_drained and "the engine failed (rank 0 died)" in caplog.text


def _rank_children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return [child for child in children if b"trillm.gpu.rank" in Path(f"/proc/{child}/cmdline").read_bytes()]


@pytest.mark.slow
def test_a_killed_rank_ends_streams_turns_health_503_and_exits_non_zero(smollm2_folder: str, tmp_path: Path) -> None:
    served = ServedProcess(smollm2_folder, "--session-len", "256", "--model-name", "smol", cwd=tmp_path)
    try:
        served.wait_ready()
        with httpx.Client(base_url=served.url, timeout=60) as http:
            body = {"model": "smol", "prompt": "Count:", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = (line for line in response.iter_lines() if line)
                next(lines)
                (rank_pid,) = _rank_children(served.process.pid)
                os.kill(rank_pid, signal.SIGKILL)
                killed = time.monotonic()
                rest = list(lines)
            assert rest[-1] == "data: [DONE]"
            error = json.loads(rest[-2].removeprefix("data: "))["error"]
            assert error["code"] == "engine_failed" and "rank 0" in error["message"]
            health = http.get("/health")
            assert health.status_code == 503 and time.monotonic() - killed < 2.0
        assert served.process.wait(timeout=30) == 1
        assert any("trillm: the engine failed while serving" in line for line in served.output), served.output
    finally:
        served.stop()
