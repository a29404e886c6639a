"""Server life cycle over a FakeEngine: client disconnects, draining, engine failure, CORS, docs switches."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from http_live import LiveServer, server_config
from http_fakes import FakeEngine

from trillm.http.app import create_app

LONG_CHAT = {"messages": "go on", "stream": True, "ignore_eos": True, "max_tokens": 100_000}


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture
def server() -> Iterator[tuple[LiveServer, FakeEngine]]:
    engine = FakeEngine(step_s=0.002)
    live = LiveServer(create_app(server_config(allow_origins=("http://ui.example",)), engine=engine)).start()
    yield live, engine
    live.stop()


@pytest.mark.slow
def test_client_disconnect_aborts_and_frees_blocks(server: tuple[LiveServer, FakeEngine]) -> None:
    live, engine = server
    with httpx.Client(base_url=live.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=LONG_CHAT) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert live.call(engine.statistics).num_running == 1
        # leaving the block closed the connection mid-stream
        wait_until(lambda: live.call(engine.statistics).num_running == 0)
    stats = live.call(engine.statistics)
    assert stats.num_free_blocks == stats.num_total_blocks
    assert engine.aborted == [engine.requests[-1].request_id]
    assert live.state.num_in_flight == 0
    disconnects = live.state.metrics.client_disconnects.labels(endpoint="chat")._value.get()
    assert disconnects == 1  # counted (and logged) as a dropped connection, not as a finished request


@pytest.mark.slow
def test_drain_refuses_new_requests_while_streams_finish(server: tuple[LiveServer, FakeEngine]) -> None:
    live, engine = server
    with httpx.Client(base_url=live.url, timeout=30) as http:
        body = {"messages": "x", "stream": True, "max_tokens": 30}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            live.call(live.state.drain)
            refused = http.post("/v1/chat/completions", json={"messages": "x"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_draining"
            assert http.get("/health").status_code == 503
            end = {"prompt": "", "session_id": 3, "request_output_len": 0, "interactive_mode": False}
            assert http.post("/v1/chat/interactive", json=end).status_code == 200  # always accepted
            assert http.post("/v1/chat/interactive", json={"prompt": "", "session_id": 3,
                                                           "cancel": True}).status_code == 200
            turn = http.post("/v1/chat/interactive", json={"prompt": "x", "session_id": 3})
            assert turn.status_code == 503
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert engine.is_draining and live.state.num_in_flight == 0


@pytest.mark.slow
def test_engine_failure_turns_health_and_requests_to_503(server: tuple[LiveServer, FakeEngine]) -> None:
    live, engine = server
    with httpx.Client(base_url=live.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "x", **LONG_CHAT}) as response:
            lines = response.iter_lines()
            next(lines)
            live.call(engine.fail, "rank 0 died")
            rest = [line for line in lines if line]
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["code"] == "engine_failed" and error["message"] == "rank 0 died"
        assert rest[-1] == "data: [DONE]"
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["message"] == "rank 0 died"
        refused = http.post("/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"


def test_cors_preflight_and_headers(server: tuple[LiveServer, FakeEngine]) -> None:
    live, _ = server
    with httpx.Client(base_url=live.url, timeout=30) as http:
        preflight = http.options("/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-headers"] == "content-type, authorization"
        answer = http.get("/v1/models", headers={"Origin": "http://ui.example"})
        assert answer.headers["access-control-allow-origin"] == "http://ui.example"
        other = http.get("/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_disable_docs_removes_the_docs_routes() -> None:
    app = create_app(server_config(disable_docs=True), engine=FakeEngine())
    rules = {rule.rule for rule in app.url_map.iter_rules()}
    assert "/" not in rules and "/openapi.json" not in rules and "/docs/<path:filename>" not in rules
    assert {"/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/health"} <= rules
