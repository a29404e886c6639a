"""Faults of the server's own parts, over HTTP (issue 13): the device runs out of memory during a step.

The rank is tests/actors/fake_rank.py's "oom-at-step-N": the real rank loop (`trillm.gpu.rank.rank_main`) over a
fake runner whose step N raises `torch.cuda.OutOfMemoryError`. The rank reports it and exits 1, the engine fails,
the request streaming at that moment ends with an error event and [DONE], the one waiting behind it gets a 503
OpenAI error body, and /health answers 503 (`trillm serve` then stops and exits 1: tests/test_cli_startup.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_live import InProcessEngineServer

from fakes import FakeTokenizer
from trillm.actors import engine as engine_module
from trillm.config import EngineConfig, ServerConfig

pytestmark = pytest.mark.slow  # a rank process is spawned

ACTORS_TESTS = str(Path(__file__).parent.parent / "actors")  # where fake_rank lives


@pytest.fixture
def oom_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessEngineServer]:
    monkeypatch.syspath_prepend(ACTORS_TESTS)  # the rank process inherits sys.path
    monkeypatch.setattr(engine_module, "_resolve_model", lambda spec, cache_dir: spec)
    engine = EngineConfig(model="fake:oom-at-step-8", cache_block_seq_len=4, max_batch_size=1)
    config = ServerConfig(engine=engine, server_name="127.0.0.1", server_port=1)
    live = InProcessEngineServer(config, None, FakeTokenizer(), rank_target="fake_rank:main").start()
    yield live
    live.stop()


def test_out_of_device_memory_in_a_step_gives_503s_and_an_error_event(oom_server: InProcessEngineServer) -> None:
    waiting: dict[str, Any] = {}

    def post_waiting() -> None:  # queued behind the stream (max_batch_size 1) when the step fails
        with httpx.Client(base_url=oom_server.url, timeout=30) as client:
            response = client.post("/v1/completions", json={"prompt": "second", "max_tokens": 30})
            waiting.update(status=response.status_code, body=response.json())

    with httpx.Client(base_url=oom_server.url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        thread: threading.Thread | None = None
        events = []
        body = {"prompt": "first", "max_tokens": 30, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line.removeprefix("data: "))
                if thread is None:
                    thread = threading.Thread(target=post_waiting)
                    thread.start()
        assert thread is not None
        thread.join(timeout=30)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_failed" and "OutOfMemoryError" in error["message"]
        assert "--max-batch-size" in error["message"]
        assert waiting["status"] == 503 and waiting["body"]["error"]["code"] == "engine_failed"
        health = client.get("/health")
        assert health.status_code == 503
