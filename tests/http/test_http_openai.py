"""OpenAI-compatible routes over a FakeEngine: the openai SDK (sync, async, streaming) and the raw wire format."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from http_live import LiveServer
from http_fakes import SCRIPT, FakeEngine

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": " provide three suggestions about time management"}]


@pytest.fixture(scope="module")
def client(fake_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key="YOUR_API_KEY", base_url=f"{fake_server.url}/v1", max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(fake_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_server.url, timeout=30) as raw:
        yield raw


def sse_events(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    assert body.endswith("data: [DONE]\n\n")
    events = body.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event
        payloads.append(event.removeprefix("data: "))
    assert payloads.count("[DONE]") == 1
    return payloads


def test_lmdeploy_guide_sync_chat(client: openai.OpenAI) -> None:
    model_name = client.models.list().data[0].id
    response = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0.8, top_p=0.8)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == SCRIPT  # the whole script, then EOS
    assert response.choices[0].finish_reason == "stop"
    assert response.id.startswith("chatcmpl-") and response.model == "fake-model"
    usage = response.usage
    assert usage is not None and usage.completion_tokens == len(SCRIPT.encode()) + 1  # + EOS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_lmdeploy_guide_async_chat(fake_server: LiveServer) -> None:
    async def main() -> str | None:
        sdk = openai.AsyncOpenAI(api_key="YOUR_API_KEY", base_url=f"{fake_server.url}/v1", max_retries=0)
        model_cards = await sdk.models.list()._get_page()
        response = await sdk.chat.completions.create(model=model_cards.data[0].id, messages=MESSAGES,
                                                     temperature=0.8, top_p=0.8, max_tokens=5)
        await sdk.close()
        return response.choices[0].message.content

    assert asyncio.run(main()) == SCRIPT[:5]


def test_streamed_chat_with_n_streams_each_choice_with_role_first(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=6, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    by_index: dict[int, list[str]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        if not by_index[choice.index]:
            assert choice.delta.role == "assistant"
        by_index[choice.index].append(choice.delta.content or "")
        if choice.finish_reason is not None:
            assert choice.finish_reason == "length" and choice.delta.content  # the last content chunk
    assert {i: "".join(parts) for i, parts in by_index.items()} == {0: SCRIPT[:6], 1: SCRIPT[:6]}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_completions_sync_and_stream(client: openai.OpenAI) -> None:
    response = client.completions.create(model="fake-model", prompt="hi", max_tokens=4)
    assert response.choices[0].text == SCRIPT[:4] and response.choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in client.completions.create(model="fake-model", prompt="hi",
                                                                        max_tokens=4, stream=True) if c.choices)
    assert text == SCRIPT[:4]


def test_list_prompts_give_one_choice_per_prompt_and_n(client: openai.OpenAI, fake_engine: FakeEngine) -> None:
    response = client.completions.create(model="fake-model", prompt=["a", "bc"], n=2, max_tokens=3, echo=True)
    assert [(c.index, c.text) for c in response.choices] == [
        (0, "aHel"), (1, "aHel"), (2, "bcHel"), (3, "bcHel")]
    assert response.usage is not None and response.usage.prompt_tokens == 3
    assert response.usage.completion_tokens == 12


def test_token_id_prompts(client: openai.OpenAI, fake_engine: FakeEngine) -> None:
    response = client.completions.create(model="fake-model", prompt=[[3 + ord("x")], [3 + ord("y"), 3 + ord("z")]],
                                         max_tokens=2, echo=True)
    assert [c.text for c in response.choices] == ["xHe", "yzHe"]
    assert fake_engine.requests[-1].prompt_token_ids == (3 + ord("y"), 3 + ord("z"))


def test_stop_string_cuts_before_the_match(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="fake-model", messages=MESSAGES, stop=["fake model"])
    assert response.choices[0].message.content == "Hello! I am a "
    assert response.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="fake-model", messages=MESSAGES, stop="am a", stream=True) if c.choices)
    assert streamed == "Hello! I "


def test_chat_logprobs_carry_token_text_bytes_and_alternatives(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2, logprobs=True,
                                              top_logprobs=2)
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [(e.token, e.logprob, e.bytes) for e in logprobs.content] == [("H", -0.25, [72]), ("e", -0.25, [101])]
    assert [t.token for t in logprobs.content[0].top_logprobs] == ["H", "I"]


def test_completion_logprobs_legacy_layout(http: httpx.Client) -> None:
    body = http.post("/v1/completions", json={"prompt": "q", "max_tokens": 3, "logprobs": 1}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["H", "e", "l"] and logprobs["text_offset"] == [0, 1, 2]
    assert logprobs["top_logprobs"][0] == {"H": -0.25}


def test_sse_framing_and_include_usage_chunk(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={
        "messages": "hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    payloads = sse_events(response.text)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]] == ["H", "e", "l"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1


def test_streamed_completion_echo_comes_first(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "stream": True, "echo": True})
    chunks = [json.loads(p) for p in sse_events(response.text)[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["ab", "H", "e"]


def test_max_tokens_zero_answers_without_generating(http: httpx.Client, fake_engine: FakeEngine) -> None:
    before = len(fake_engine.requests)
    body = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 0, "echo": True}).json()
    assert body["choices"][0] == {"index": 0, "text": "abc", "logprobs": None, "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert len(fake_engine.requests) == before


def test_sampling_fields_reach_the_engine(http: httpx.Client, fake_engine: FakeEngine) -> None:
    response = http.post("/v1/chat/completions", json={
        "messages": "x", "max_completion_tokens": 2, "temperature": 0, "top_k": -1, "seed": 7, "min_new_tokens": 1,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1, "logit_bias": {"5": -100},
        "stop_token_ids": [9], "ignore_eos": True, "n": 1})
    assert response.status_code == 200
    sampling = fake_engine.requests[-1].sampling
    assert (sampling.temperature, sampling.top_k, sampling.seed, sampling.min_tokens) == (0.0, 0, 7, 1)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, -0.5, 1.1)
    assert sampling.logit_bias == ((5, -100.0),) and sampling.stop_token_ids == (9,) and sampling.ignore_eos
    assert sampling.max_tokens == 2 and sampling.logprobs is None


def test_unset_sampling_values_come_from_generation_defaults(fake_engine: FakeEngine, http: httpx.Client) -> None:
    fake_engine.tokenizer.generation_defaults.update(temperature=0.3, top_p=0.9, top_k=50)
    try:
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "top_p": 0.5})
        sampling = fake_engine.requests[-1].sampling
        assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.3, 0.5, 50)
    finally:
        fake_engine.tokenizer.generation_defaults.clear()
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    sampling = fake_engine.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty) == (1.0, 1.0, 0, 1.0)


def test_do_preprocess_false_sends_the_bare_text(http: httpx.Client, fake_engine: FakeEngine) -> None:
    http.post("/v1/chat/completions", json={"messages": "raw text", "do_preprocess": False, "max_tokens": 1})
    assert fake_engine.tokenizer.decode(fake_engine.requests[-1].prompt_token_ids) == "raw text"
    http.post("/v1/chat/completions", json={"messages": "raw text", "max_tokens": 1})
    assert fake_engine.tokenizer.decode(fake_engine.requests[-1].prompt_token_ids, skip_special_tokens=False) == (
        "<|im_start|>user\nraw text<|im_end|>\n<|im_start|>assistant\n")


def test_encode(http: httpx.Client) -> None:
    assert http.post("/v1/encode", json={"input": "ab"}).json() == {"input_ids": [100, 101], "length": 2}
    assert http.post("/v1/encode", json={"input": ["a", "bc"]}).json() == {
        "input_ids": [[100], [101, 102]], "length": [1, 2]}
    preprocessed = http.post("/v1/encode", json={"input": "a", "do_preprocess": True}).json()
    assert preprocessed["input_ids"][0] == 1 and preprocessed["length"] > 1  # <|im_start|> of the template


def test_models_and_health(http: httpx.Client) -> None:
    (card,) = http.get("/v1/models").json()["data"]
    assert card["id"] == "fake-model" and card["owned_by"] == "trillm" and card["max_model_len"] == 512
    assert http.get("/health").json() == {"status": "ok"}


def test_metrics_count_requests_and_expose_engine_gauges(http: httpx.Client) -> None:
    http.post("/v1/chat/completions", json={"messages": "x", "max_tokens": 3})
    text = http.get("/metrics").text
    assert 'trillm:http_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    for name in ("trillm:time_to_first_token_seconds_count", "trillm:e2e_request_latency_seconds_count",
                 "trillm:time_per_output_token_seconds_count", "trillm:generation_tokens_total",
                 "trillm:num_requests_waiting", "trillm:kv_cache_usage_perc", "trillm:num_sessions",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert f"\n{name}" in text, name


def test_lmdeploy_api_client_payloads_are_accepted(http: httpx.Client) -> None:
    """LMDeploy's APIClient posts its keyword defaults verbatim, `kwargs: {}` and `suffix: None` included."""
    chat = {"model": "fake-model", "messages": "Say this is a test!", "temperature": 0.7, "top_p": 1.0, "n": 1,
            "max_tokens": 4, "stop": None, "stream": False, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "user": None, "repetition_penalty": 1.0, "session_id": -1, "ignore_eos": False, "kwargs": {}}
    response = http.post("/v1/chat/completions", json=chat)
    assert response.status_code == 200 and "\n" not in response.text  # APIClient parses line by line
    assert response.json()["choices"][0]["message"]["content"] == SCRIPT[:4]
    completion = {"model": "fake-model", "prompt": "hi", "suffix": None, "temperature": 0.7, "n": 1,
                  "max_tokens": 4, "stream": True, "stop": None, "top_p": 1.0, "top_k": 40, "user": None,
                  "repetition_penalty": 1.0, "session_id": -1, "ignore_eos": False, "kwargs": {}}
    lines = [line for line in http.post("/v1/completions", json=completion).text.split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])
    interactive = {"prompt": "hi", "session_id": 77, "interactive_mode": True, "stream": False, "stop": None,
                   "request_output_len": 3, "top_p": 0.8, "top_k": 40, "temperature": 0.8,
                   "repetition_penalty": 1.0, "ignore_eos": False, "kwargs": {}}
    assert http.post("/v1/chat/interactive", json=interactive).json()["text"] == SCRIPT[:3]
    end = {"prompt": "", "session_id": 77, "request_output_len": 0, "interactive_mode": False, "kwargs": {}}
    assert http.post("/v1/chat/interactive", json=end).json()["finish_reason"] == "stop"
