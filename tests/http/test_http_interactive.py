"""/v1/chat/interactive over a FakeEngine: LMDeploy's wire format and the session semantics the route maps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from http_live import LiveServer
from http_fakes import SCRIPT, FakeEngine


@pytest.fixture(scope="module")
def http(fake_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_server.url, timeout=30) as client:
        yield client


def turn(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = http.post("/v1/chat/interactive", json=fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_lmdeploy_guide_four_turns_grow_the_history(http: httpx.Client, fake_engine: FakeEngine) -> None:
    messages = ["hi, what's your name?", "who developed you?", "Tell me more about your developers",
                "Summarize the information we've talked so far"]
    history = 0
    for i, message in enumerate(messages):
        before = fake_engine.statistics().computed_prompt_tokens_total
        answer = turn(http, prompt=message, session_id=1, interactive_mode=True, stream=False, request_output_len=8)
        assert set(answer) == {"text", "tokens", "input_tokens", "history_tokens", "finish_reason", "session_id"}
        assert answer["history_tokens"] == history and answer["session_id"] == 1
        assert answer["text"] == SCRIPT[:8] and answer["tokens"] == 8 and answer["finish_reason"] == "length"
        assert fake_engine.statistics().computed_prompt_tokens_total - before == answer["input_tokens"]
        if i > 0:  # later turns add no system prompt or BOS: only the bridge and the new user turn
            assert answer["input_tokens"] < len(fake_engine.tokenizer.encode_chat(
                [{"role": "user", "content": message}])) + 3
        history += answer["input_tokens"] + answer["tokens"]
    assert len(fake_engine.sessions[1].history) == history


def test_end_session_resets_and_answers_zeros(http: httpx.Client, fake_engine: FakeEngine) -> None:
    turn(http, prompt="hello", session_id=2, interactive_mode=True, request_output_len=3)
    assert 2 in fake_engine.sessions
    assert turn(http, prompt="", session_id=2, request_output_len=0, interactive_mode=False) == {
        "text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop", "session_id": 2}
    assert 2 not in fake_engine.sessions
    assert turn(http, prompt="hello", session_id=2, interactive_mode=True, request_output_len=3)[
        "history_tokens"] == 0


def test_non_interactive_turn_ends_the_session(http: httpx.Client, fake_engine: FakeEngine) -> None:
    answer = turn(http, prompt="one shot", session_id=3, request_output_len=2)
    assert answer["text"] == SCRIPT[:2] and 3 not in fake_engine.sessions


def test_minus_one_assigns_a_session_id(http: httpx.Client, fake_engine: FakeEngine) -> None:
    answer = turn(http, prompt="new", session_id=-1, interactive_mode=True, request_output_len=2)
    assert answer["session_id"] > 0 and answer["session_id"] in fake_engine.sessions
    again = turn(http, prompt="more", session_id=answer["session_id"], interactive_mode=True, request_output_len=2)
    assert again["history_tokens"] == answer["input_tokens"] + answer["tokens"]


def test_stream_is_ndjson_with_deltas_and_cumulative_tokens(http: httpx.Client) -> None:
    response = http.post("/v1/chat/interactive", json={"prompt": "hi", "session_id": 4, "stream": True,
                                                       "request_output_len": 4})
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.text.endswith("}\n") and "data:" not in response.text and "[DONE]" not in response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["text"] for line in lines] == list(SCRIPT[:4])
    assert [line["tokens"] for line in lines] == [1, 2, 3, 4]
    assert [line["finish_reason"] for line in lines] == [None, None, None, "length"]
    assert {line["session_id"] for line in lines} == {4}


def test_busy_session_gets_409_and_cancel_keeps_the_partial_answer(fake_server: LiveServer, http: httpx.Client,
                                                                   fake_engine: FakeEngine) -> None:
    first = turn(http, prompt="start", session_id=5, interactive_mode=True, request_output_len=2)
    history = first["input_tokens"] + first["tokens"]
    body = {"prompt": "long one", "session_id": 5, "interactive_mode": True, "stream": True, "ignore_eos": True,
            "request_output_len": 5000}
    with httpx.Client(base_url=fake_server.url, timeout=30) as other:
        with other.stream("POST", "/v1/chat/interactive", json=body) as streaming:
            lines = streaming.iter_lines()
            assert json.loads(next(lines))["finish_reason"] is None
            busy = http.post("/v1/chat/interactive", json={"prompt": "x", "session_id": 5, "interactive_mode": True})
            assert busy.status_code == 409
            assert busy.json()["error"]["code"] == "session_busy" and busy.json()["error"]["param"] == "session_id"
            cancelled = turn(http, prompt="", session_id=5, cancel=True)
            assert cancelled["session_id"] == 5
            rest = [json.loads(line) for line in lines]
    assert rest[-1]["finish_reason"] == "abort"
    partial = rest[-1]["tokens"]
    assert 0 < partial < 5000
    after = turn(http, prompt="next", session_id=5, interactive_mode=True, request_output_len=1)
    assert after["history_tokens"] == history + rest[-1]["input_tokens"] + partial


def test_stateless_request_on_an_occupied_session_is_400(http: httpx.Client) -> None:
    turn(http, prompt="keep me", session_id=6, interactive_mode=True, request_output_len=1)
    response = http.post("/v1/chat/completions", json={"messages": "x", "session_id": 6, "max_tokens": 1})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "session_id 6 is occupied", "type": "invalid_request_error",
                                        "param": "session_id", "code": "session_occupied"}


def test_a_continuing_turn_of_an_unknown_session_is_a_404_not_a_new_session(
    http: httpx.Client, fake_engine: FakeEngine
) -> None:
    """x-session-continue: the session must already be here (a client behind replicas learns its replica went away)."""
    continues = {"x-session-continue": "true"}
    response = http.post("/v1/chat/interactive", headers=continues,
                         json={"prompt": "where were we?", "session_id": 4404, "interactive_mode": True})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "session_not_found" and error["param"] == "session_id"
    assert "new session" in error["message"] and 4404 not in fake_engine.sessions  # nothing was started
    first = turn(http, prompt="hello", session_id=4404, interactive_mode=True, request_output_len=3)
    response = http.post("/v1/chat/interactive", headers=continues,
                         json={"prompt": "and then?", "session_id": 4404, "interactive_mode": True,
                               "request_output_len": 3})
    assert response.status_code == 200, response.text
    assert response.json()["history_tokens"] == first["input_tokens"] + first["tokens"]
    turn(http, prompt="", session_id=4404, request_output_len=0, interactive_mode=False)
