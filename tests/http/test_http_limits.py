"""Defaults and limits at the edge (issues 12 and 13): completions' 16 tokens, the server's per-request limits (each a
400 naming its flag), invalid Unicode and logit_bias keys (never a 500), 405 with Allow, and what the logs hold."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from http_fakes import SCRIPT, FakeEngine
from http_live import LiveServer, server_config

from trillm.http.app import create_app
from trillm.http.openapi import build_document

SECRET = "tell-nobody-this-prompt"


@pytest.fixture(scope="module")
def http(fake_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def capped() -> Iterator[httpx.Client]:
    """A server with small limits of every kind."""
    config = server_config(max_new_tokens=8, max_n=4, max_prompts=3, max_choices=6, max_stop=2, max_stop_chars=10,
                           max_prompt_bytes=100)
    server = LiveServer(create_app(config, engine=FakeEngine())).start()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    server.stop()


# ------------------------------------------------------------------------------------------- defaults (issue 12.1)


def test_completions_default_to_16_tokens(http: httpx.Client) -> None:
    assert len(SCRIPT) > 16
    body = http.post("/v1/completions", json={"prompt": "Once upon a time"}).json()
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == SCRIPT[:16]
    # null keeps "up to the window" (the fake's whole script, then EOS); chat has no default either
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": None}).json()["choices"][0][
        "finish_reason"] == "stop"
    assert http.post("/v1/chat/completions", json={"messages": "x"}).json()["choices"][0]["finish_reason"] == "stop"


def test_swagger_examples_carry_a_small_max_tokens() -> None:
    paths = build_document(is_auth_required=False)["paths"]
    for path, field in (("/v1/chat/completions", "max_tokens"), ("/v1/completions", "max_tokens"),
                        ("/v1/chat/interactive", "request_output_len")):
        example = paths[path]["post"]["requestBody"]["content"]["application/json"]["example"]
        assert 0 < example[field] <= 32, path


def test_max_new_tokens_caps_and_defaults(capped: httpx.Client) -> None:
    chat = capped.post("/v1/chat/completions", json={"messages": "x"}).json()
    assert chat["usage"]["completion_tokens"] == 8 and chat["choices"][0]["finish_reason"] == "length"
    turn = capped.post("/v1/chat/interactive", json={"prompt": "x"}).json()
    assert turn["tokens"] == 8
    for path, body, param in (("/v1/chat/completions", {"messages": "x", "max_tokens": 9}, "max_tokens"),
                              ("/v1/completions", {"prompt": "x", "max_completion_tokens": 9}, "max_completion_tokens"),
                              ("/v1/chat/interactive", {"prompt": "x", "request_output_len": 9}, "request_output_len")):
        error = capped.post(path, json=body).json()["error"]
        assert error["param"] == param and error["code"] == "limit_exceeded"
        assert "limit of 8 (--max-new-tokens)" in error["message"]


# ------------------------------------------------------------------------------------------------ limits (issue 13)

OVER_LIMITS = [
    ("/v1/chat/completions", {"messages": "x", "n": 5}, "n", "--max-n"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt", "--max-prompts"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, "n", "--max-choices"),
    ("/v1/completions", {"prompt": "a", "stop": ["1", "2", "3"]}, "stop", "--max-stop"),
    ("/v1/chat/completions", {"messages": "a", "stop_token_ids": [5, 6, 7]}, "stop_token_ids", "--max-stop"),
    ("/v1/completions", {"prompt": "a", "stop": ["123456", "123456"]}, "stop", "--max-stop-chars"),
    ("/v1/completions", {"prompt": "é" * 51}, "prompt", "--max-prompt-bytes"),  # 102 bytes, 51 characters
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 101}]}, "messages", "--max-prompt-bytes"),
    ("/v1/chat/interactive", {"prompt": "x" * 101}, "prompt", "--max-prompt-bytes"),
    ("/v1/encode", {"input": ["x" * 60, "y" * 60]}, "input", "--max-prompt-bytes"),
]


@pytest.mark.parametrize(("path", "body", "param", "flag"), OVER_LIMITS, ids=lambda v: str(v)[:30])
def test_a_request_over_a_limit_gets_a_400_naming_it(capped: httpx.Client, path: str, body: dict[str, Any],
                                                     param: str, flag: str) -> None:
    response = capped.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "limit_exceeded" and f"({flag})" in error["message"]


def test_requests_at_the_limits_pass(capped: httpx.Client) -> None:
    assert capped.post("/v1/completions", json={"prompt": ["a", "b"], "n": 3, "stop": ["12345", "12345"],
                                                "max_tokens": 1}).status_code == 200
    assert capped.post("/v1/completions", json={"prompt": "é" * 50, "max_tokens": 1}).status_code == 200


def test_the_document_states_the_servers_limits(capped: httpx.Client) -> None:
    schemas = capped.get("/openapi.json").json()["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["n"]["maximum"] == 4 and completion["max_tokens"]["anyOf"][0]["maximum"] == 8
    arrays = [m for m in completion["prompt"]["anyOf"] if m.get("type") == "array"]
    assert [m.get("maxItems") for m in arrays] == [3, None, 3]  # strings, one token-id prompt, token-id prompts
    assert schemas["InteractiveRequest"]["properties"]["stop"]["anyOf"][1]["maxItems"] == 2


def test_a_million_stop_strings_are_refused_before_decoding(http: httpx.Client) -> None:
    body = json.dumps({"prompt": "x", "stop": ["s"] * 1_000_000}).encode()
    start = time.perf_counter()
    response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON strings" in response.json()["error"]["message"]
    assert time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------------- hygiene: never a 500 (issue 13.1)

SURROGATE = "\ud800"
STRING_FIELDS = [  # (path, body with {} where the bad string goes)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "{}"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "{}"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "{}"}]}),
    ("/v1/chat/completions", {"messages": "{}"}),
    ("/v1/chat/completions", {"messages": "x", "model": "{}"}),
    ("/v1/chat/completions", {"messages": "x", "stop": "{}"}),
    ("/v1/chat/completions", {"messages": "x", "user": "{}"}),
    ("/v1/completions", {"prompt": "{}"}),
    ("/v1/completions", {"prompt": ["ok", "{}"]}),
    ("/v1/completions", {"prompt": "x", "stop": ["{}"]}),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"{}": 1}}),
    ("/v1/chat/interactive", {"prompt": "{}"}),
    ("/v1/chat/interactive", {"prompt": [{"role": "user", "content": "{}"}]}),
    ("/v1/encode", {"input": "{}"}),
    ("/v1/encode", {"input": ["{}"]}),
]


def _with(body: dict[str, Any], text: str) -> bytes:
    """`body` as JSON with `text` (escaped as JSON escapes it) where its "{}" string is."""
    return json.dumps(body, ensure_ascii=True).replace('"{}"', json.dumps(text, ensure_ascii=True)).encode()


@pytest.mark.parametrize(("path", "body"), STRING_FIELDS, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize("bad", [SURROGATE, "a\udfff", "\udc00\ud800", "x\ud83d"])
def test_invalid_unicode_in_any_string_field_is_a_400(http: httpx.Client, path: str, body: dict[str, Any],
                                                      bad: str) -> None:
    raw = _with(body, bad)
    assert b"\\ud" in raw  # sent as a JSON escape, the only way a lone surrogate fits in UTF-8 JSON
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_unicode"


def test_a_surrogate_pair_is_a_character_and_passes(http: httpx.Client) -> None:
    raw = _with({"prompt": "{}", "max_tokens": 1}, "\U0001f600")
    assert b"\\ud83d\\ude00" in raw
    assert http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}).status_code == 200


@pytest.mark.parametrize("key", ["²", "١", "-1", "1.0", " 1", "+1", "99999999999"])
def test_logit_bias_keys_are_ascii_token_ids(http: httpx.Client, key: str) -> None:
    response = http.post("/v1/completions", json={"prompt": "x", "logit_bias": {key: 1}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"


def test_integral_floats_are_integers_as_the_document_says(http: httpx.Client) -> None:
    body = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2.0, "n": 2.0}).json()
    assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] == 4
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2.5}).status_code == 400


def test_stream_options_need_stream(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"messages": "x", "stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/v1/chat/completions", "OPTIONS, POST"), ("PUT", "/v1/models", "GET, HEAD, OPTIONS"),
    ("TRACE", "/health", "GET, HEAD, OPTIONS"), ("DELETE", "/v1/encode", "OPTIONS, POST"),
])
def test_405_lists_the_allowed_methods(http: httpx.Client, method: str, path: str, allow: str) -> None:
    response = http.request(method, path)
    assert response.status_code == 405 and response.headers["Allow"] == allow
    assert response.json()["error"]["code"] == "method_not_allowed"


# --------------------------------------------------------------------------------- int64 in the document (12.3)


def test_every_integer_that_can_pass_int32_is_declared_int64() -> None:
    """By construction: ids the server assigns start at 2^31, so session_id must not become a generated i32."""
    from trillm.actors.engine import FIRST_SESSION_ID

    document = build_document(is_auth_required=False)
    integers: list[tuple[str, dict[str, Any]]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer":
                integers.append((where, node))
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(document, "$")
    assert len(integers) > 20
    for where, node in integers:
        assert node.get("format") == "int64" or node.get("maximum", 2**31) < 2**31, where
    schemas = document["components"]["schemas"]
    for schema in ("InteractiveRequest", "InteractiveResponse", "ChatCompletionRequest"):
        session_id = schemas[schema]["properties"]["session_id"]
        forms = session_id.get("anyOf", [session_id])
        assert any(f.get("format") == "int64" for f in forms), schema
    assert FIRST_SESSION_ID >= 2**31  # the reason


def test_an_assigned_session_id_round_trips(http: httpx.Client) -> None:
    first = http.post("/v1/chat/interactive", json={"prompt": "hi", "interactive_mode": True,
                                                     "request_output_len": 2}).json()
    session_id = first["session_id"]
    again = http.post("/v1/chat/interactive", json={"prompt": "more", "session_id": session_id,
                                                     "interactive_mode": True, "request_output_len": 2}).json()
    assert again["session_id"] == session_id and again["history_tokens"] > 0
    http.post("/v1/chat/interactive", json={"prompt": "", "session_id": session_id, "request_output_len": 0})


# ---------------------------------------------------------------------------------------------------- logs (12.5)


def test_prompts_stay_out_of_the_info_log(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        http.post("/v1/completions", json={"prompt": SECRET, "max_tokens": 1})
        http.post("/v1/chat/completions", json={"messages": SECRET, "max_tokens": 1})
        http.post("/v1/chat/interactive", json={"prompt": SECRET, "request_output_len": 1})
    assert caplog.records and SECRET not in caplog.text
    with caplog.at_level(logging.DEBUG, logger="trillm"):
        http.post("/v1/completions", json={"prompt": SECRET, "max_tokens": 1})
    assert SECRET in caplog.text


@pytest.mark.parametrize("stream", [True, False])
def test_a_disconnect_is_logged_once_with_its_request_id(caplog: pytest.LogCaptureFixture, stream: bool) -> None:
    server = LiveServer(create_app(server_config(), engine=FakeEngine(step_s=0.05))).start()
    body = {"prompt": "x", "max_tokens": None, "stream": True}
    with caplog.at_level(logging.INFO, logger="trillm"):
        if not stream:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
            request_id = "cmpl-"
        else:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                with client.stream("POST", "/v1/completions", json=body) as response:
                    first = next(response.iter_lines())
                    request_id = json.loads(first.removeprefix("data: "))["id"]
        deadline = time.monotonic() + 10
        while "disconnected" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
    server.stop()
    lines = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 1 and request_id in lines[0] and "(completions)" in lines[0], lines
