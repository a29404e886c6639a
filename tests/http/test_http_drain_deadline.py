"""The drain deadline (issue 13.4): requests still running when --graceful-timeout passes are ended in-band — every
open stream with finish_reason `abort`, an error event and `[DONE]`; every waiting non-streamed request with a 503
body — and their sequences are aborted."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
from http_fakes import FakeEngine
from http_live import LiveServer, server_config

from trillm.http.app import create_app


def test_the_deadline_ends_every_request_with_an_answer() -> None:
    engine = FakeEngine(step_s=0.2)  # slow: nothing finishes before the deadline
    server = LiveServer(create_app(server_config(), engine=engine)).start()
    results: dict[str, Any] = {}

    def stream(name: str, path: str, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with client.stream("POST", path, json=body) as response:
                results[name] = (response.status_code, [line for line in response.iter_lines() if line])

    def whole(name: str, path: str, body: dict[str, Any]) -> None:
        response = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        results[name] = (response.status_code, response.json())

    calls = [
        (stream, "chat", "/v1/chat/completions", {"messages": "x", "n": 2, "stream": True}),
        (stream, "completions", "/v1/completions", {"prompt": "x", "max_tokens": None, "stream": True}),
        (stream, "interactive", "/v1/chat/interactive", {"prompt": "x", "stream": True}),
        (whole, "whole", "/v1/chat/completions", {"messages": "x"}),
    ]
    threads = [threading.Thread(target=call, args=args) for call, *args in calls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while server.state.num_in_flight < len(calls):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # a few tokens out
    server.call(server.state.drain)
    assert server.run(server.state.end_in_flight, "the drain deadline passed") == len(calls)
    for thread in threads:
        thread.join(timeout=10)
    server.stop()

    for name in ("chat", "completions"):
        status, lines = results[name]
        assert status == 200 and lines[-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert events[-1]["error"]["code"] == "server_draining" and "deadline" in events[-1]["error"]["message"]
        finished = {c["index"] for e in events[:-1] for c in e["choices"] if c["finish_reason"] == "abort"}
        assert finished == ({0, 1} if name == "chat" else {0})
    status, lines = results["interactive"]
    assert status == 200
    assert json.loads(lines[-2])["finish_reason"] == "abort" and json.loads(lines[-1])["error"]["code"] == \
        "server_draining"
    status, body = results["whole"]
    assert status == 503 and body["error"]["code"] == "server_draining"
    assert len(engine.aborted) >= 3  # the engine's work stopped too
    assert server.state.num_in_flight == 0
