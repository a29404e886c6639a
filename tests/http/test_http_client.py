"""trillm.APIClient against a live server over a FakeEngine: the LMDeploy guide's examples, streams, errors, keys.

Lives under tests/http (not tests/test_client.py) to share the `fake_server` and `fake_engine` fixtures.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from http_fakes import SCRIPT, FakeEngine
from http_live import API_KEY, LiveServer, server_config

import trillm
from trillm.client import APIClient, APIError
from trillm.http.app import create_app


HOT: Any = "hot"  # a field of the wrong type, past the client's annotations


@pytest.fixture(scope="module")
def api_client(fake_server: LiveServer) -> Iterator[APIClient]:
    with trillm.APIClient(fake_server.url) as client:
        yield client


# -- the LMDeploy guide's examples, unchanged but for the import --

def test_guide_chat_completions(api_client: APIClient) -> None:
    model_name = api_client.available_models[0]
    messages = [{"role": "user", "content": "Say this is a test!"}]
    items = list(api_client.chat_completions_v1(model=model_name, messages=messages))
    assert model_name == "fake-model" and len(items) == 1
    assert items[0]["object"] == "chat.completion"
    assert items[0]["choices"][0]["message"]["content"] and items[0]["choices"][0]["finish_reason"] == "stop"


def test_guide_completions_send_lmdeploy_defaults(api_client: APIClient, fake_engine: FakeEngine) -> None:
    model_name = api_client.available_models[0]
    items = list(api_client.completions_v1(model=model_name, prompt="hi"))
    assert len(items) == 1 and items[0]["object"] == "text_completion"
    # LMDeploy's completions_v1 defaults: max_tokens 16, temperature 0.7, top_k 40
    assert items[0]["usage"]["completion_tokens"] == 16 and items[0]["choices"][0]["finish_reason"] == "length"
    sampling = fake_engine.requests[-1].sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_k) == (16, 0.7, 40)


def test_guide_four_interactive_turns_grow_the_history(api_client: APIClient, fake_engine: FakeEngine) -> None:
    messages = ["hi, what's your name?", "who developed you?", "Tell me more about your developers",
                "Summarize the information we've talked so far"]
    history = 0
    for message in messages:
        items = list(api_client.chat_interactive_v1(prompt=message, session_id=1, interactive_mode=True,
                                                    stream=False))
        assert len(items) == 1
        answer = items[0]
        assert answer["session_id"] == 1 and answer["history_tokens"] == history
        assert answer["text"] and answer["finish_reason"] == "stop"
        history += answer["input_tokens"] + answer["tokens"]
    assert len(fake_engine.sessions[1].history) == history
    api_client.end_session(1)
    assert 1 not in fake_engine.sessions


# -- streaming --

def test_chat_stream_yields_chunks_without_done(api_client: APIClient) -> None:
    chunks = list(api_client.chat_completions_v1(model="fake-model", messages="hi", stream=True, temperature=0,
                                                 max_tokens=6, stream_options={"include_usage": True}))
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == SCRIPT[:6]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_completions_stream_matches_the_whole_answer(api_client: APIClient) -> None:
    whole = next(api_client.completions_v1(model="fake-model", prompt="hi", temperature=0, max_tokens=5))
    chunks = list(api_client.completions_v1(model="fake-model", prompt="hi", temperature=0, max_tokens=5,
                                            stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"] == SCRIPT[:5]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_interactive_stream_is_ndjson_deltas(api_client: APIClient) -> None:
    lines = list(api_client.chat_interactive_v1(prompt="hello", stream=True, temperature=0, request_output_len=4))
    assert "".join(line["text"] for line in lines) == SCRIPT[:4]
    assert [line["tokens"] for line in lines][-1] == 4 and lines[-1]["finish_reason"] == "length"
    assert lines[0]["session_id"] != -1  # the server assigned one


def test_chat_yields_lmdeploy_tuples_and_keeps_the_session(api_client: APIClient, fake_engine: FakeEngine) -> None:
    outputs = list(api_client.chat("hello", session_id=7, request_output_len=3, stream=True))
    assert "".join(text for text, _, _ in outputs) and outputs[-1][1:] == (3, "length")
    assert 7 in fake_engine.sessions
    api_client.end_session(7)
    assert 7 not in fake_engine.sessions


def test_chat_refuses_session_minus_one(api_client: APIClient) -> None:
    with pytest.raises(ValueError, match="session_id must not be -1"):
        next(api_client.chat("hello", session_id=-1))


# -- fields --

def test_extra_keyword_arguments_are_top_level_fields(api_client: APIClient, fake_engine: FakeEngine) -> None:
    next(api_client.chat_completions_v1(model="fake-model", messages="hi", max_tokens=2, seed=1234, min_p=0.05))
    assert fake_engine.requests[-1].sampling.seed == 1234 and fake_engine.requests[-1].sampling.min_p == 0.05
    next(api_client.chat_interactive_v1(prompt="hi", request_output_len=2, seed=99))
    assert fake_engine.requests[-1].sampling.seed == 99


def test_encode(api_client: APIClient, fake_engine: FakeEngine) -> None:
    ids, length = api_client.encode("hi")
    assert ids == fake_engine.tokenizer.encode("hi") and length == len(ids)
    ids, lengths = api_client.encode(["a", "bc"], add_bos=False)
    assert ids == [[ord("a") + 3], [ord("b") + 3, ord("c") + 3]] and lengths == [1, 2]


# -- errors --

def test_unknown_model_raises_api_error_with_the_server_error(api_client: APIClient) -> None:
    with pytest.raises(APIError) as info:
        next(api_client.chat_completions_v1(model="no-such-model", messages="hi"))
    assert info.value.status_code == 404
    assert info.value.error is not None and info.value.error["code"] == "model_not_found"
    assert info.value.error["message"] in str(info.value)


def test_bad_field_raises_api_error_even_when_streaming(api_client: APIClient) -> None:
    with pytest.raises(APIError) as info:
        list(api_client.completions_v1(model="fake-model", prompt="hi", stream=True, temperature=HOT))
    assert info.value.status_code == 400
    assert info.value.error is not None and info.value.error["param"] == "temperature"
    assert str(info.value) == (f"400 Bad Request from {api_client.api_server_url}/v1/completions: "
                               '1 invalid field: temperature: expected a number or null, got string "hot"')


def test_server_down_raises_api_error() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = APIClient(url)
    with pytest.raises(APIError, match=f"cannot reach the server at {url}") as info:
        client.available_models
    assert info.value.status_code is None and info.value.error is None
    with pytest.raises(APIError, match="cannot reach the server"):
        next(client.chat_interactive_v1(prompt="hi"))


def test_api_key_is_sent_as_bearer() -> None:
    server = LiveServer(create_app(server_config(api_keys=(API_KEY,)), engine=FakeEngine())).start()
    try:
        with pytest.raises(APIError) as info:
            APIClient(server.url).available_models
        assert info.value.status_code == 401 and info.value.error is not None
        assert info.value.error["code"] == "invalid_api_key"
        with APIClient(server.url, api_key=API_KEY) as client:
            assert client.available_models == ["fake-model"]
            assert next(client.chat_completions_v1(model="fake-model", messages="hi", max_tokens=1))["choices"]
    finally:
        server.stop()


def test_importing_trillm_loads_neither_torch_nor_trio() -> None:
    code = "import trillm, sys; print('torch' in sys.modules, 'trio' in sys.modules, trillm.APIClient.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "APIClient"]


def test_a_session_lost_by_the_server_is_an_error_on_the_next_turn(api_client: APIClient,
                                                                   fake_engine: FakeEngine) -> None:
    """After a kept turn the client says its next turns continue the session: a server that lost it answers 404."""
    list(api_client.chat_interactive_v1(prompt="remember 42", session_id=5150, interactive_mode=True,
                                        request_output_len=2))
    del fake_engine.sessions[5150]  # the replica restarted, or the session expired
    with pytest.raises(APIError) as caught:
        list(api_client.chat_interactive_v1(prompt="what number?", session_id=5150, interactive_mode=True,
                                            request_output_len=2))
    assert caught.value.status_code == 404 and (caught.value.error or {}).get("code") == "session_not_found"
    assert 5150 not in fake_engine.sessions
    api_client.end_session(5150)  # ending is fine whatever the server holds
    first = list(api_client.chat_interactive_v1(prompt="fresh start", session_id=5150, interactive_mode=True,
                                                request_output_len=2))  # a first turn again: no header
    assert first[0]["history_tokens"] == 0
    api_client.end_session(5150)
