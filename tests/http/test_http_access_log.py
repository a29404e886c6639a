"""The access log: one line per request, a 4xx included; streamed answers logged when their stream ends; off by flag."""

from __future__ import annotations

import logging
import re

import httpx
import pytest
from http_fakes import FakeEngine
from http_live import LiveServer, server_config

from trillm.http.app import create_app


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trillm.access"]


def test_each_request_gets_one_line_with_status_id_and_tokens(fake_server: LiveServer,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trillm.access")
    with httpx.Client(base_url=fake_server.url, timeout=30) as http:
        http.post("/v1/embeddings", json={"input": "x"})
        http.post("/v1/chat/completions", json={"messages": "hi", "max_tokens": 3})
        http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "stream": True}).read()
    lines = access_lines(caplog)
    assert len(lines) == 3, lines
    assert re.fullmatch(r"POST /v1/embeddings 404 \d+\.\d{3}s", lines[0])
    assert re.fullmatch(r"POST /v1/chat/completions 200 \d+\.\d{3}s id=chatcmpl-\w+ prompt_tokens=\d+ "
                        r"completion_tokens=3", lines[1])
    assert re.fullmatch(r"POST /v1/completions 200 \d+\.\d{3}s id=cmpl-\w+ prompt_tokens=2 completion_tokens=2",
                        lines[2])


def test_disable_access_log_turns_it_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trillm.access")
    server = LiveServer(create_app(server_config(disable_access_log=True), engine=FakeEngine())).start()
    try:
        httpx.get(f"{server.url}/v1/models", timeout=30)
    finally:
        server.stop()
    assert access_lines(caplog) == []
