"""The soak (bench/soak.py) against `trillm serve` on the default model: mixed streams with disconnects, sessions with
cancels, and bad requests for a bounded time; no 5xx, every surviving request complete, the KV pool all free after."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from bench.soak import run
from served import ServedProcess


@pytest.mark.slow
def test_soak_leaves_the_server_whole(smollm2_folder: str, tmp_path: Path) -> None:
    served = ServedProcess(smollm2_folder, "--session-len", "256", "--log-level", "warning", cwd=tmp_path)
    try:
        served.wait_ready()
        result = trio.run(run, served.url, 8.0, 4, 0, 60.0)  # seconds of load, workers, seed, settle time
    finally:
        served.stop()
    assert result["failures"] == [], result
    counts = result["counts"]
    # Each kind ran (the counts depend on the machine's speed: a busy 2-core machine manages a few of each).
    assert counts["streams"] >= 1 and counts["sessions"] >= 1 and counts["bad_requests"] >= 1, counts
    assert all(value == 0 for value in result["end"].values()), result["end"]
    assert "Traceback" not in "".join(served.output), "".join(served.output)
