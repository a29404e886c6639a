"""`hypercorn --worker-class trio trillm.http.app:app` serves the default model, configured by TRILLM_* variables.

Hypercorn's CLI workers are daemonic; rank processes are plain subprocesses, so they start from there too. Both the
plain command (with `--bind`) and the optional config module (`--config python:trillm.http.hypercorn_config`, which
binds from TRILLM_SERVER_NAME/PORT) are checked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

HYPERCORN = str(Path(sys.executable).parent / "hypercorn")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("use_config_module", [False, True], ids=["plain", "config-module"])
def test_hypercorn_cli_serves_the_app_from_env(smollm2_folder: str, tmp_path: Path, use_config_module: bool) -> None:
    port = free_port()
    options = (["--config", "python:trillm.http.hypercorn_config"] if use_config_module
               else ["--bind", f"127.0.0.1:{port}"])
    env = {**os.environ, "TRILLM_MODEL": smollm2_folder, "TRILLM_MODEL_NAME": "smol", "TRILLM_SESSION_LEN": "256",
           "TRILLM_SERVER_NAME": "127.0.0.1", "TRILLM_SERVER_PORT": str(port), "TRILLM_API_KEYS": "k1,k2",
           "TRILLM_LOG_LEVEL": "WARNING"}
    log_path = tmp_path / "hypercorn.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [HYPERCORN, "--worker-class", "trio", *options, "trillm.http.app:app"], env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=120, headers={"Authorization": "Bearer k2"},
                            json={"model": "smol", "messages": "What is 2+2?", "max_tokens": 3, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] <= 3 and answer.json()["model"] == "smol"
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": "x"}).status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()
