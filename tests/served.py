"""ServedProcess: `python -m trillm serve api_server ...` in a child process, for tests of the real command line."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

READY_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServedProcess:
    """The server on 127.0.0.1:<free port>; `output` collects its stdout and stderr line by line."""

    def __init__(self, model: str, *flags: str, cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output: list[str] = []
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trillm", "serve", "api_server", model, "--server_name", "127.0.0.1",
             "--server-port", str(self.port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
        )
        threading.Thread(target=self._read_output, daemon=True).start()

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("trillm: serving"):
                self._ready.set()

    def wait_ready(self) -> None:
        assert self._ready.wait(READY_TIMEOUT_S), "".join(self.output)

    def stop(self) -> None:
        """Kill the server if it is still running (a test that failed midway)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
