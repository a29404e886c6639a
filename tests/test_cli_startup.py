"""Start-up of `trillm serve api_server` (issue 12): a taken port fails before the model loads, naming the port;
hypercorn's lines are logged once."""

from __future__ import annotations

import logging
import socket
import time

import hypercorn.logging
import pytest

from served import free_port
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
