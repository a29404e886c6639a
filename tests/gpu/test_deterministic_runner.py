"""`--deterministic` through the whole model, on the CPU: the deterministic op set's kernels run in the emulator
(TRILLM_KERNEL_EMULATOR=1; the same .cu sources the GPU compiles) on a tiny bf16 Llama, and a sequence's tokens and
logprobs come out bit-identical whatever else shares its steps.

The ModelRunner is driven by StepPlans built here (as in tests/models/test_llama_vs_hf.py), so every way the Batcher
can serve a sequence is reproduced on purpose: alone; in a batch with others (other GEMM tile shapes, other rows);
with its prompt prefilled in chunks; and recomputed by a prefill of prompt + output after a "preemption" instead of
the decode step that first produced the token. Emulated kernels are slow, so prompts are short (test_deterministic_
kernels.py covers contexts across several 256-position attention chunks). The GPU version of this check (64 requests
through the Engine) is tests/actors/test_engine_deterministic.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from tests.gpu.test_kernels import EmulatorBackend, emulator_build_dir  # noqa: F401 - fixture
from trillm.config import RunnerConfig
from trillm.gpu import deterministic_ops, kernels
from trillm.gpu import runner as runner_module
from trillm.gpu.runner import ModelRunner
from trillm.protocol.api import SamplingParams
from trillm.protocol.step import SampleSpec, SeqStep, StepPlan

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TRILLM_KERNEL_EMULATOR") != "1", reason="set TRILLM_KERNEL_EMULATOR=1"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator needs g++"),
]

BLOCK_SIZE, MAX_LEN, NEW_TOKENS = 16, 64, 3
PROMPTS = [[(7 * i + 3) % 250 + 1 for i in range(40)], [5, 17, 42, 99, 7, 3, 200, 11], [77] * 9 + [78, 79, 80]]
Run = list[list[tuple[int, float, tuple[tuple[int, float], ...]]]]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=256, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(4.0)  # spread the logits, as test_llama_vs_hf does
    folder = tmp_path_factory.mktemp("det-tiny")
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def runner(tiny_folder: str, emulator_build_dir: Path) -> Iterator[ModelRunner]:  # noqa: F811
    previous = kernels.set_backend(EmulatorBackend(emulator_build_dir))
    warm_up_tokens, runner_module.WARM_UP_TOKENS = runner_module.WARM_UP_TOKENS, 8  # a short start-up warm-up
    config = RunnerConfig(model_path=tiny_folder, rank=0, world_size=1, dist_init_method="", device="cpu",
                          dtype="bfloat16", block_size=BLOCK_SIZE, max_model_len=MAX_LEN, max_batch_size=8,
                          max_prefill_token_num=4096, cache_max_entry_count=1.0, cpu_memory_budget_bytes=64 << 20,
                          enable_cuda_graph=False, deterministic=True)  # fmt: skip
    try:
        yield ModelRunner(config, ops=deterministic_ops)
    finally:
        kernels.set_backend(previous)
        runner_module.WARM_UP_TOKENS = warm_up_tokens


class Driver:
    """Step plans for a set of sequences, each owning a fixed run of blocks (a trivial allocator)."""

    def __init__(self, runner: ModelRunner, first_block: int) -> None:
        self.runner, self.first_block, self.step_id = runner, first_block, 0

    def table(self, index: int) -> tuple[int, ...]:
        per_seq = MAX_LEN // BLOCK_SIZE
        start = self.first_block + index * per_seq
        return tuple(range(start, start + per_seq))

    def step(self, seqs: Sequence[SeqStep]) -> dict[int, tuple[int, float, tuple[tuple[int, float], ...]]]:
        result = self.runner.step(StepPlan(step_id=self.step_id, seqs=tuple(seqs)))
        self.step_id += 1
        out = {}
        for s in result.sampled:
            assert s.logprob is not None
            out[s.seq_id] = (s.token_id, s.logprob.logprob, s.logprob.top)
        return out


def spec(output_index: int) -> SampleSpec:
    return SampleSpec(sampling=SamplingParams(temperature=0.0, logprobs=3), output_index=output_index)


def generate(driver: Driver, prompts: Sequence[Sequence[int]], *, chunk: int | None = None) -> Run:
    """Prompts prefilled together (in `chunk`-token pieces), then NEW_TOKENS - 1 decode steps together."""
    outputs: Run = [[] for _ in prompts]
    done = [0] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        seqs = []
        for i, prompt in enumerate(prompts):
            if done[i] < len(prompt):
                end = len(prompt) if chunk is None else min(len(prompt), done[i] + chunk)
                seqs.append(SeqStep(seq_id=i, token_ids=tuple(prompt[done[i] : end]), start_pos=done[i],
                                    block_table=driver.table(i), sample=spec(0) if end == len(prompt) else None))
                done[i] = end
        for seq_id, sampled in driver.step(seqs).items():
            outputs[seq_id].append(sampled)
    for n in range(1, NEW_TOKENS):
        seqs = [SeqStep(seq_id=i, token_ids=(outputs[i][-1][0],), start_pos=len(prompts[i]) + n - 1,
                        block_table=driver.table(i), sample=spec(n)) for i in range(len(prompts))]  # fmt: skip
        for seq_id, sampled in driver.step(seqs).items():
            outputs[seq_id].append(sampled)
    return outputs


def test_tokens_and_logprobs_are_bit_identical_alone_batched_chunked_and_recomputed(runner: ModelRunner) -> None:
    blocks_per_run = len(PROMPTS) * (MAX_LEN // BLOCK_SIZE)
    alone = [generate(Driver(runner, 0), [prompt])[0] for prompt in PROMPTS]
    batched = generate(Driver(runner, blocks_per_run), PROMPTS)
    chunked = generate(Driver(runner, 0), PROMPTS, chunk=16)
    assert batched == alone, "a sequence batched with others differs from the same sequence alone"
    assert chunked == alone, "a prompt prefilled in 16-token chunks differs from the prompt prefilled whole"
    # "preemption": recompute prompt + all but the last output token in one prefill; its sample is the last token's
    recomputed = Driver(runner, blocks_per_run)
    seqs = [SeqStep(seq_id=i, token_ids=tuple(p) + tuple(t for t, _, _ in alone[i][:-1]), start_pos=0,
                    block_table=recomputed.table(i), sample=spec(NEW_TOKENS - 1)) for i, p in enumerate(PROMPTS)]
    again = recomputed.step(seqs)
    for i in range(len(PROMPTS)):
        assert again[i] == alone[i][-1], f"sequence {i}: the decoded token differs from its recomputation"
    assert len({t for run in alone for t, _, _ in run}) > 1  # not a degenerate model that always says the same


def test_the_runner_refuses_the_mode_where_its_kernels_cannot_run(tiny_folder: str) -> None:
    from trillm.errors import ModelLoadError

    config = RunnerConfig(model_path=tiny_folder, rank=0, world_size=1, dist_init_method="", device="cpu",
                          dtype="float32", block_size=BLOCK_SIZE, max_model_len=64, max_batch_size=2,
                          max_prefill_token_num=256, cache_max_entry_count=1.0, cpu_memory_budget_bytes=8 << 20,
                          enable_cuda_graph=False, deterministic=True)  # fmt: skip
    with pytest.raises(ModelLoadError, match="--deterministic needs the CUDA kernels"):
        ModelRunner(config)
