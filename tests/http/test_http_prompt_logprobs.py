"""Prompt logprobs over HTTP on the real engine (SmolLM2, float32 CPU) vs Hugging Face transformers.

`/v1/completions` with `echo` and `logprobs` the way evaluation harnesses call it (lm-eval-harness's
`loglikelihood`: `echo: true, logprobs: 1, max_tokens: 0`, token-id prompts, then the sum of the continuation's
logprobs and whether each continuation token was the greedy one), checked against transformers' log-softmax.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch
from http_live import LiveServer, engine_server


pytestmark = pytest.mark.slow

QUESTION = "Question: What is the capital of France?\nAnswer:"
CHOICES = [" Paris", " London", " Berlin", " a banana"]


@pytest.fixture(scope="module")
def server(smollm2_folder: str) -> Iterator[LiveServer]:
    with engine_server(smollm2_folder, session_len=256, max_batch_size=8, dtype="float32") as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def hf(smollm2_folder: str) -> tuple[object, object]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = LlamaForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    return tokenizer, model


def hf_log_softmax(model: object, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(dim=-1)  # type: ignore[operator, no-any-return]


def test_echo_logprobs_of_a_string_prompt_equal_transformers(http: httpx.Client, hf: tuple[object, object]) -> None:
    tokenizer, model = hf
    ids = tokenizer(QUESTION)["input_ids"]  # type: ignore[operator, index]
    reference = hf_log_softmax(model, ids)
    body = http.post("/v1/completions", json={"prompt": QUESTION, "echo": True, "logprobs": 2,
                                                "max_tokens": 0}).json()
    (choice,) = body["choices"]
    assert choice["text"] == QUESTION and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(ids)
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) and "".join(logprobs["tokens"]) == QUESTION
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"][:3] == [0, len(logprobs["tokens"][0]), len("".join(logprobs["tokens"][:2]))]
    expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"][1:]), expected, atol=2e-4, rtol=0)
    for row, top in enumerate(logprobs["top_logprobs"][1:]):
        best = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(int(reference[row].argmax()))])
        assert best in top and 2 <= len(top) <= 3


def test_multiple_choice_loglikelihood_scores_like_transformers(http: httpx.Client, hf: tuple[object, object]) -> None:
    """lm-eval-harness's loglikelihood requests: token-id prompts (context + continuation), echo, logprobs 1."""
    tokenizer, model = hf
    context = tokenizer(QUESTION)["input_ids"]  # type: ignore[operator, index]
    ours, theirs = [], []
    for choice in CHOICES:
        continuation = tokenizer(choice)["input_ids"]  # type: ignore[operator, index]
        ids = context + continuation
        body = http.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0,
                                                    "temperature": 0}).json()
        logprobs = body["choices"][0]["logprobs"]
        n = len(continuation)
        score = sum(logprobs["token_logprobs"][-n:])
        is_greedy = all(max(top.values()) == value
                        for top, value in zip(logprobs["top_logprobs"][-n:], logprobs["token_logprobs"][-n:]))
        ours.append((score, is_greedy))
        reference = hf_log_softmax(model, ids)
        rows = torch.arange(len(context) - 1, len(ids) - 1)
        target = torch.tensor(continuation)
        theirs.append((float(reference[rows, target].sum()), bool((reference[rows].argmax(-1) == target).all())))
    for (score, is_greedy), (expected, expected_greedy) in zip(ours, theirs, strict=True):
        assert score == pytest.approx(expected, abs=1e-3) and is_greedy == expected_greedy
    assert max(range(len(CHOICES)), key=lambda i: ours[i][0]) == 0  # " Paris" wins, as with transformers


def test_prefix_cache_hit_does_not_skip_prompt_logprobs(http: httpx.Client) -> None:
    prompt = QUESTION * 3  # several full blocks: a second request would hit the prefix cache
    plain = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0}).json()
    assert plain["choices"][0]["finish_reason"] == "length"
    first = http.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 1,
                                                 "temperature": 0}).json()
    again = http.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 1,
                                                 "temperature": 0}).json()
    for body in (first, again):
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["choices"][0]["logprobs"]["token_logprobs"] == again["choices"][0]["logprobs"]["token_logprobs"]
    assert first["choices"][0]["text"].startswith(prompt) and len(first["choices"][0]["logprobs"]["tokens"]) == (
        first["usage"]["prompt_tokens"] + 1)


def test_streamed_echo_logprobs_equal_the_non_streamed(http: httpx.Client) -> None:
    request = {"prompt": QUESTION, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}
    whole = http.post("/v1/completions", json=request).json()["choices"][0]
    response = http.post("/v1/completions", json={**request, "stream": True})
    chunks = [json.loads(line.removeprefix("data: ")) for line in response.text.split("\n\n")
              if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    values = [v for c in chunks for v in (c["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    assert text == whole["text"] and tokens == whole["logprobs"]["tokens"]
    assert values == whole["logprobs"]["token_logprobs"] and values[0] is None
