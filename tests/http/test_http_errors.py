"""A catalogue of bad requests: each gets its status and an OpenAI error body naming the bad field; never a 500.

The server has an API key, a 4 KiB body limit and a 64-token window; after the whole catalogue it still serves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs
import httpx
import pytest
from http_live import API_KEY, LiveServer, server_config
from http_fakes import FakeEngine

from trillm.http.app import create_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK_CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@attrs.frozen(kw_only=True)
class Bad:
    name: str
    path: str
    body: Any = None  # JSON-encoded unless `raw` is set
    raw: bytes | None = None
    headers: dict[str, str] = attrs.field(factory=lambda: dict(AUTH))
    method: str = "POST"
    status: int = 400
    param: str | None = None
    code: str | None = None
    message_has: str = ""


def chat(**fields: Any) -> dict[str, Any]:
    return {**OK_CHAT, **fields}


CATALOGUE = [
    Bad(name="malformed JSON", path="/v1/chat/completions", raw=b'{"messages": [', code="invalid_json"),
    Bad(name="empty body", path="/v1/chat/completions", raw=b"", code="invalid_json"),
    Bad(name="body is an array", path="/v1/chat/completions", body=[OK_CHAT], message_has="JSON object"),
    Bad(name="body is a string", path="/v1/completions", body="prompt", message_has="JSON object"),
    Bad(name="NaN", path="/v1/chat/completions", raw=b'{"messages": "x", "temperature": NaN}', code="invalid_json"),
    Bad(name="invalid UTF-8", path="/v1/completions", raw=b'{"prompt": "\xff\xfe"}', code="invalid_json"),
    Bad(name="messages missing", path="/v1/chat/completions", body={"model": "fake-model"}, param="messages",
        message_has="required field missing"),
    Bad(name="max_tokens as string", path="/v1/chat/completions", body=chat(max_tokens="5"), param="max_tokens"),
    Bad(name="stream as string", path="/v1/chat/completions", body=chat(stream="false"), param="stream"),
    Bad(name="temperature as string", path="/v1/chat/completions", body=chat(temperature="0.1"),
        param="temperature"),
    Bad(name="max_tokens float", path="/v1/completions", body={"prompt": "x", "max_tokens": 3.9},
        param="max_tokens"),
    Bad(name="n as bool", path="/v1/chat/completions", body=chat(n=True), param="n"),
    Bad(name="prompt as object", path="/v1/completions", body={"prompt": {"text": "x"}}, param="prompt"),
    Bad(name="prompt mixes kinds", path="/v1/completions", body={"prompt": ["a", 1]}, param="prompt"),
    Bad(name="messages as number", path="/v1/chat/completions", body=chat(messages=5), param="messages"),
    Bad(name="bad role", path="/v1/chat/completions", body=chat(messages=[{"role": "robot", "content": "x"}]),
        param="messages[0].role"),
    Bad(name="image content part", path="/v1/chat/completions",
        body=chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
        param="messages[0].content[0].type"),
    Bad(name="temperature too high", path="/v1/chat/completions", body=chat(temperature=2.5), param="temperature"),
    Bad(name="top_p negative", path="/v1/completions", body={"prompt": "x", "top_p": -0.5}, param="top_p"),
    Bad(name="n zero", path="/v1/chat/completions", body=chat(n=0), param="n"),
    Bad(name="n too large", path="/v1/chat/completions", body=chat(n=1000), param="n"),
    Bad(name="chat max_tokens zero", path="/v1/chat/completions", body=chat(max_tokens=0), param="max_tokens"),
    Bad(name="negative max_tokens", path="/v1/completions", body={"prompt": "x", "max_tokens": -1},
        param="max_tokens"),
    Bad(name="penalty out of range", path="/v1/chat/completions", body=chat(frequency_penalty=-3),
        param="frequency_penalty"),
    Bad(name="repetition penalty zero", path="/v1/chat/completions", body=chat(repetition_penalty=0),
        param="repetition_penalty"),
    Bad(name="top_logprobs without logprobs", path="/v1/chat/completions", body=chat(top_logprobs=2),
        param="top_logprobs"),
    Bad(name="completion logprobs too many", path="/v1/completions", body={"prompt": "x", "logprobs": 50},
        param="logprobs"),
    Bad(name="logit_bias key not an id", path="/v1/chat/completions", body=chat(logit_bias={"hello": 1}),
        param="logit_bias"),
    Bad(name="logit_bias id outside vocab", path="/v1/chat/completions", body=chat(logit_bias={"99999": 1}),
        param="logit_bias"),
    Bad(name="token id outside vocab", path="/v1/completions", body={"prompt": [1, 99999]}, param="prompt"),
    Bad(name="too many choices", path="/v1/completions", body={"prompt": ["a"] * 9, "n": 128}, param="n",
        message_has="1152 choices, over this server's limit of 1024 (--max-choices)"),
    Bad(name="empty prompt", path="/v1/completions", body={"prompt": ""}, param="prompt", message_has="empty"),
    Bad(name="several bad fields", path="/v1/chat/completions", body=chat(temperature=9, top_p="x", n=-1),
        param="temperature", message_has="3 invalid fields"),
    Bad(name="unknown model", path="/v1/chat/completions", body=chat(model="gpt-17"), status=404, param="model",
        code="model_not_found"),
    Bad(name="prompt longer than the window", path="/v1/completions", body={"prompt": "x" * 100}, param="prompt",
        code="context_length_exceeded", message_has="maximum context length is 64 tokens, but the request has 100"),
    Bad(name="chat longer than the window", path="/v1/chat/completions",
        body=chat(messages=[{"role": "user", "content": "y" * 80}]), param="messages",
        code="context_length_exceeded"),
    Bad(name="body too large", path="/v1/completions", body={"prompt": "z" * 8000}, status=413,
        code="request_too_large"),
    Bad(name="missing API key", path="/v1/chat/completions", body=OK_CHAT, headers={}, status=401,
        code="invalid_api_key"),
    Bad(name="wrong API key", path="/v1/chat/completions", body=OK_CHAT, headers={"Authorization": "Bearer nope"},
        status=401, code="invalid_api_key"),
    Bad(name="not a bearer key", path="/v1/models", method="GET", headers={"Authorization": API_KEY}, status=401,
        code="invalid_api_key"),
    Bad(name="interactive cancel with -1", path="/v1/chat/interactive", body={"prompt": "", "cancel": True},
        param="session_id"),
    Bad(name="interactive session_id as string", path="/v1/chat/interactive",
        body={"prompt": "x", "session_id": "3"}, param="session_id"),
    Bad(name="interactive turn too long", path="/v1/chat/interactive",
        body={"prompt": "w" * 70, "session_id": 11, "interactive_mode": True}, param="prompt",
        code="context_length_exceeded", message_has="End the session"),
    Bad(name="encode input as number", path="/v1/encode", body={"input": 3}, param="input"),
    Bad(name="unknown route", path="/v1/embeddings", body={"input": "x"}, status=404, code="not_found"),
    Bad(name="wrong method", path="/v1/chat/completions", method="GET", status=405, code="method_not_allowed"),
]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    app = create_app(server_config(api_keys=(API_KEY, "sk-second"), max_body_bytes=4096),
                     engine=FakeEngine(max_model_len=64))
    live = LiveServer(app).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_catalogue_is_large_enough() -> None:
    assert len(CATALOGUE) >= 30
    assert len({bad.name for bad in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("bad", CATALOGUE, ids=lambda bad: bad.name)
def test_bad_request_gets_an_openai_error(http: httpx.Client, bad: Bad) -> None:
    content = bad.raw if bad.raw is not None else (json.dumps(bad.body).encode() if bad.body is not None else None)
    headers = {**bad.headers, "Content-Type": "application/json"}
    response = http.request(bad.method, bad.path, content=content, headers=headers)
    assert response.status_code == bad.status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("authentication_error" if bad.status == 401 else "invalid_request_error")
    assert error["param"] == bad.param
    if bad.code is not None:
        assert error["code"] == bad.code
    assert bad.message_has in error["message"]


def test_server_keeps_serving_after_the_catalogue(http: httpx.Client) -> None:
    for bad in CATALOGUE[:5]:
        http.post(bad.path, content=bad.raw or b"{}", headers=AUTH)
    response = http.post("/v1/chat/completions", json=OK_CHAT, headers={"Authorization": "Bearer sk-second"})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "He"
    text = http.get("/metrics").text
    assert "status=\"500\"" not in text


def test_unprotected_routes_need_no_key(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/metrics").status_code == 200
    assert http.get("/openapi.json").status_code == 200
