"""`--deterministic` on the GPU: 64 requests give the same tokens and logprobs, bit for bit, however they are served.

Issue 16's check, in bf16 on a random Llama-2-7B-shaped model (TRILLM_DET_TEST_MODEL overrides; the tokenizer is
the default model's, or TRILLM_TEST_TOKENIZER's): 64 requests, half greedy and half at temperature 1 with a fixed
seed each, prompts in 8 groups that share long prefixes, run
  - alone, one after another (each request the only one in the engine),
  - in batches of 8 and all 64 at once, arrivals staggered so prompts join running decodes,
  - with prefix caching on and off,
  - and on an engine whose KV cache is too small for them all (preemptions forced and counted).
Every run must reproduce the first one's token ids and every logprob (sampled and top-2) exactly: `==` on floats.
A second test checks the mode is not a no-op: without it, the same runs differ somewhere (bf16 GEMMs and attention
pick their reduction order by batch shape), so the equality above is not an accident of this model.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import trio

from engine_thread import EngineThread
from trillm.actors.engine import Engine
from trillm.config import EngineConfig
from trillm.protocol.api import GenerateRequest, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODEL = os.environ.get("TRILLM_DET_TEST_MODEL", "random:llama2-7b")
NUM_REQUESTS, MAX_TOKENS = 64, 24
Result = tuple[tuple[int, ...], tuple[tuple[float, tuple[tuple[int, float], ...]], ...]]


def det_config(**fields: Any) -> EngineConfig:
    base: dict[str, Any] = dict(model=MODEL, deterministic=True, session_len=2048, max_batch_size=64,
                                max_prefill_token_num=2048, tokenizer=os.environ.get("TRILLM_TEST_TOKENIZER"))  # fmt: skip
    return EngineConfig(**{**base, **fields})


def make_requests(vocab: int) -> list[GenerateRequest]:
    rng = random.Random(16)
    prefixes = [[rng.randrange(10, vocab) for _ in range(rng.randrange(260, 700))] for _ in range(8)]
    requests = []
    for i in range(NUM_REQUESTS):
        prompt = prefixes[i % 8] + [rng.randrange(10, vocab) for _ in range(rng.randrange(1, 60))]
        sampling = SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, seed=1000 + i, max_tokens=MAX_TOKENS,
                                  ignore_eos=True, logprobs=2)  # fmt: skip
        requests.append(GenerateRequest(request_id=f"det-{i}", prompt_token_ids=tuple(prompt), sampling=sampling))
    return requests


async def run_one(engine: Engine, request: GenerateRequest) -> Result:
    tokens: list[int] = []
    logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = []
    async with engine.generate(request) as outputs:
        async for out in outputs:
            tokens += out.token_ids
            logprobs += [(lp.logprob, lp.top) for lp in out.logprobs]
    assert len(tokens) == MAX_TOKENS
    return tuple(tokens), tuple(logprobs)


async def run_alone(engine: Engine, requests: Sequence[GenerateRequest]) -> list[Result]:
    return [await run_one(engine, r) for r in requests]


async def run_batched(engine: Engine, requests: Sequence[GenerateRequest], batch: int) -> list[Result]:
    """`batch` requests at a time; within a batch they arrive one engine step apart, in groups of 4."""
    results: dict[int, Result] = {}

    async def one(index: int, first_step: int) -> None:
        while engine.statistics().steps < first_step + (index % batch) // 4:
            await trio.sleep(0.001)
        results[index] = await run_one(engine, requests[index])

    for start in range(0, len(requests), batch):
        first_step = engine.statistics().steps
        async with trio.open_nursery() as nursery:
            for index in range(start, min(start + batch, len(requests))):
                nursery.start_soon(one, index, first_step)
    return [results[i] for i in range(len(requests))]


def _vocab(engine: Engine) -> int:
    return min(engine.tokenizer.vocab_size, 32000)


async def _requests(engine: Engine) -> list[GenerateRequest]:
    return make_requests(_vocab(engine))


async def _preemptions(engine: Engine) -> int:
    return engine.statistics().num_preemptions


def first_difference(a: list[Result], b: list[Result]) -> str | None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x[0] != y[0]:
            return f"request {i}: tokens {x[0]} vs {y[0]}"
        if x[1] != y[1]:
            step = next(k for k, (p, q) in enumerate(zip(x[1], y[1], strict=True)) if p != q)
            return f"request {i}: logprobs at token {step}: {x[1][step]} vs {y[1][step]}"
    return None


def serve_every_way(config: EngineConfig, label: str) -> dict[str, list[Result]]:
    thread = EngineThread(config).start()
    try:
        requests = thread.call(_requests)
        runs = {f"{label} alone": thread.call(run_alone, requests)}
        for batch in (8, 64):
            runs[f"{label} batch {batch}"] = thread.call(run_batched, requests, batch)
        return runs
    finally:
        thread.stop()


def test_tokens_and_logprobs_are_bitwise_equal_alone_batched_cached_and_preempted() -> None:
    runs = serve_every_way(det_config(), "prefix cache on")
    runs |= serve_every_way(det_config(enable_prefix_caching=False), "prefix cache off")
    # a KV cache of ~3k tokens for 64 requests of ~500: running all 64 at once must preempt
    thread = EngineThread(det_config(cache_max_entry_count=0.03)).start()
    try:
        requests = thread.call(_requests)
        runs["tiny cache batch 64"] = thread.call(run_batched, requests, 64)
        preemptions = thread.call(_preemptions)
    finally:
        thread.stop()
    print(f"deterministic: {len(runs)} runs of {NUM_REQUESTS} requests x {MAX_TOKENS} tokens; "
          f"{preemptions} preemptions in the tiny-cache run")  # fmt: skip
    assert preemptions > 0, "the tiny KV cache did not force a preemption"
    reference_label = "prefix cache on alone"
    for label, results in runs.items():
        difference = first_difference(runs[reference_label], results)
        print(f"  {label}: {'identical' if difference is None else difference}")
        assert difference is None, f"{label} differs from {reference_label}: {difference}"


def test_without_the_mode_the_same_runs_differ() -> None:
    """The control: the ordinary kernels give batch-dependent bits here, so the equality above means something."""
    runs = serve_every_way(det_config(deterministic=False), "ordinary")
    differences = {label: first_difference(runs["ordinary alone"], r) for label, r in runs.items()}
    print("ordinary kernels:", {label: d is not None for label, d in differences.items()})
    assert any(d is not None for d in differences.values())
