"""End to end over the real Engine and the default model (SmolLM2-135M-Instruct on CPU): HTTP ⇄ actors ⇄ rank.

One live server for the module; every request is kept to a few tokens (CPU decoding is the cost here).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from http_live import LiveServer

from trillm.protocol.api import GenerateRequest, SamplingParams
from trillm.config import EngineConfig, ServerConfig
from trillm.http.app import create_app

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_folder: str) -> Iterator[LiveServer]:
    engine = EngineConfig(model=smollm2_folder, model_name=MODEL, session_len=256, max_batch_size=8,
                          enable_prefix_caching=True)
    live = LiveServer(create_app(ServerConfig(engine=engine, server_name="127.0.0.1", server_port=1))).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def engine_of(server: LiveServer) -> Any:
    return server.state.engine


def test_greedy_chat_over_http_equals_the_engines_greedy_output(server: LiveServer) -> None:
    engine = engine_of(server)
    prompt_ids = tuple(engine.tokenizer.encode_chat(MESSAGES))

    async def direct() -> tuple[str, int]:
        request = GenerateRequest(request_id="direct", prompt_token_ids=prompt_ids,
                                  sampling=SamplingParams(temperature=0.0, max_tokens=6))
        texts, num_tokens = [], 0
        async with engine.generate(request) as outputs:
            async for output in outputs:
                texts.append(output.text)
                num_tokens = output.num_output_tokens
        return "".join(texts), num_tokens

    expected_text, expected_tokens = server.run(direct)
    with openai.OpenAI(api_key="none", base_url=f"{server.url}/v1", max_retries=0) as client:
        assert client.models.list().data[0].id == MODEL
        response = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6)
    assert response.choices[0].message.content == expected_text
    assert response.usage is not None and response.usage.completion_tokens == expected_tokens
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert expected_text.strip()  # the model said something


def test_streamed_completion_with_usage(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                                  "max_tokens": 3, "temperature": 0, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_client_disconnect_frees_blocks_within_a_step(server: LiveServer, http: httpx.Client) -> None:
    engine = engine_of(server)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = (line for line in response.iter_lines() if line)
        for _ in range(3):  # the role chunk and two tokens
            next(lines)
        held = server.call(engine.statistics)
        assert held.num_running == 1 and held.num_free_blocks < held.num_total_blocks
    deadline = time.monotonic() + 30
    while (stats := server.call(engine.statistics)).num_free_blocks < stats.num_total_blocks:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # One step may be running when the server notices the disconnect; the abort frees the blocks after it.
    assert stats.steps - held.steps <= 2 and stats.num_running == 0


def test_interactive_session_prefills_only_new_tokens(server: LiveServer, http: httpx.Client) -> None:
    engine = engine_of(server)
    history = 0
    for i, prompt in enumerate(["hi, what's your name?", "who developed you?", "Tell me more",
                                "Summarize what we said"]):
        before = server.call(engine.statistics).computed_prompt_tokens_total
        answer = http.post("/v1/chat/interactive", json={"prompt": prompt, "session_id": 7, "interactive_mode": True,
                                                        "request_output_len": 3, "temperature": 0}).json()
        assert answer["history_tokens"] == history, (i, answer)
        assert answer["tokens"] == 3 and answer["session_id"] == 7
        computed = server.call(engine.statistics).computed_prompt_tokens_total - before
        if i > 0:
            # Nothing of the history is recomputed, except the previous answer's last token: generation stopped
            # right after sampling it, so its KV was never computed.
            assert answer["input_tokens"] <= computed <= answer["input_tokens"] + 1
        history += answer["input_tokens"] + answer["tokens"]
    end = http.post("/v1/chat/interactive", json={"prompt": "", "session_id": 7, "request_output_len": 0,
                                                  "interactive_mode": False}).json()
    assert (end["tokens"], end["finish_reason"]) == (0, "stop")
    fresh = http.post("/v1/chat/interactive", json={"prompt": "hello", "session_id": 7, "request_output_len": 1,
                                                    "interactive_mode": True}).json()
    assert fresh["history_tokens"] == 0
    http.post("/v1/chat/interactive", json={"prompt": "", "session_id": 7, "request_output_len": 0})


def test_busy_session_cancel_and_overlong_turn(server: LiveServer, http: httpx.Client) -> None:
    first = http.post("/v1/chat/interactive", json={"prompt": "Count to ten.", "session_id": 8,
                                                    "interactive_mode": True, "request_output_len": 2}).json()
    history = first["input_tokens"] + first["tokens"]
    body = {"prompt": "Go on, slowly.", "session_id": 8, "interactive_mode": True, "stream": True,
            "request_output_len": 100, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=300) as other, other.stream(
            "POST", "/v1/chat/interactive", json=body) as streaming:
        lines = (json.loads(line) for line in streaming.iter_lines() if line)
        assert next(lines)["finish_reason"] is None
        busy = http.post("/v1/chat/interactive", json={"prompt": "x", "session_id": 8, "interactive_mode": True})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
        assert http.post("/v1/chat/interactive", json={"prompt": "", "session_id": 8, "cancel": True}).status_code == 200
        rest = list(lines)
    assert rest[-1]["finish_reason"] == "abort" and 0 < rest[-1]["tokens"] < 100
    after = http.post("/v1/chat/interactive", json={"prompt": "ok", "session_id": 8, "interactive_mode": True,
                                                    "request_output_len": 1}).json()
    assert after["history_tokens"] == history + rest[-1]["input_tokens"] + rest[-1]["tokens"]
    too_long = http.post("/v1/chat/interactive", json={"prompt": "word " * 300, "session_id": 8,
                                                       "interactive_mode": True})
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "end this session" in error["message"] and "session_id -1" in error["message"]
    http.post("/v1/chat/interactive", json={"prompt": "", "session_id": 8, "request_output_len": 0})


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_repeated_prompt_reports_its_prefix_cache_hit_in_usage_and_metrics(http: httpx.Client) -> None:
    prompt = [1000 + (i * 37) % 5000 for i in range(150)]  # 150 tokens: 2 full blocks of 64 can be reused
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    hits_before = metric(http, "trillm:prefix_cache_hits_total")
    queries_before = metric(http, "trillm:prefix_cache_queries_total")
    first = http.post("/v1/completions", json=body).json()
    second = http.post("/v1/completions", json=body).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 128}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert metric(http, "trillm:prefix_cache_hits_total") - hits_before == 128
    # the first lookup stops at its first miss (1 block); the second finds both blocks
    assert metric(http, "trillm:prefix_cache_queries_total") - queries_before == 64 + 128
