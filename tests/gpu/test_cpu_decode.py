"""The fused CPU decode step (gpu/cpu_decode.py, `trillm_decode_forward` in cpu_kernels.c) against the per-op path.

Its stages run the per-op kernels' own code in one parallel region, so its hidden states must equal the per-op
path's to the bit, for any batch of decode rows and any context lengths (pages crossed, partial last pages); the
runner must pick it for a GGUF-block model and keep the per-op path where it cannot serve. Greedy tokens against
transformers through it: tests/gpu/test_cpu_kernels.py (tiny block Llama) and tests/models/test_llama_vs_hf.py
(SmolLM2).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gpu.test_cpu_kernels import block_llama as make_block_llama
from tests.models.test_llama_vs_hf import BLOCK_SIZE, MAX_MODEL_LEN, make_runner
from trillm.gpu import cpu_kernels, cpu_quant
from trillm.gpu.cpu_decode import CpuDecodeStep
from trillm.gpu.runner import ModelRunner
from trillm.protocol.api import SamplingParams
from trillm.protocol.step import SampleSpec, SeqStep, StepPlan

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="the CPU decode kernels cannot be built here")
GREEDY = SampleSpec(sampling=SamplingParams(temperature=0.0), output_index=0)
MAX_ROWS = cpu_quant.MAX_ROWS


@pytest.fixture(scope="module")
def block_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 3-layer Llama of Q4_1 / Q8_0 blocks (test_cpu_kernels.block_llama), saved."""
    folder = tmp_path_factory.mktemp("block-llama")
    make_block_llama(num_layers=3, seed=1).save_pretrained(folder)
    return str(folder)


def _prefilled(runner: ModelRunner, lengths: list[int], rng: random.Random) -> list[tuple[int, tuple[int, ...]]]:
    """One sequence per length, prefilled; returns (context length, block table) per sequence."""
    blocks_per_seq = MAX_MODEL_LEN // BLOCK_SIZE
    seqs = []
    for i, length in enumerate(lengths):
        table = tuple(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        prompt = tuple(rng.randrange(320) for _ in range(length))
        runner.step(StepPlan(step_id=i, seqs=(SeqStep(seq_id=i, token_ids=prompt, start_pos=0, block_table=table,
                                                          sample=GREEDY),)))  # fmt: skip
        seqs.append((length, table))
    return seqs


@pytest.mark.parametrize("num_rows", [1, 3, 8, 13, MAX_ROWS])
def test_fused_decode_hidden_states_equal_the_per_op_path_bit_for_bit(block_llama: str, num_rows: int) -> None:
    runner = make_runner(block_llama, max_batch_size=MAX_ROWS)
    fused = runner._cpu_decode  # noqa: SLF001 - the step under test
    assert fused is not None, "a model of GGUF blocks on one CPU rank runs the fused decode step"
    rng = random.Random(num_rows)
    lengths = [rng.choice([1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE + 5, 70]) for _ in
               range(num_rows)]  # fmt: skip
    seqs = _prefilled(runner, lengths, rng)
    for step in range(3):  # the fused step's own KV writes feed the next step's attention
        plan = StepPlan(step_id=100 + step, seqs=tuple(
            SeqStep(seq_id=i, token_ids=(rng.randrange(320),), start_pos=length + step, block_table=table,
                    sample=GREEDY) for i, (length, table) in enumerate(seqs)))  # fmt: skip
        inputs = runner.prepare(plan)
        with torch.inference_mode():
            ours = fused.forward(inputs.input_ids, inputs.positions, inputs.meta)
            per_op = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta)
        assert ours is not None
        assert torch.equal(ours, per_op), f"step {step}: max difference {(ours - per_op).abs().max().item()}"


def test_the_runner_steps_through_the_fused_forward(block_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = make_runner(block_llama)
    assert runner._cpu_decode is not None  # noqa: SLF001
    calls: list[int] = []
    original = cpu_kernels.decode_forward

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(args[1])
        original(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "decode_forward", counted)
    rng = random.Random(0)
    seqs = _prefilled(runner, [5, 9], rng)
    assert calls == [], "prefill steps keep the per-op path"
    plan = StepPlan(step_id=50, seqs=tuple(SeqStep(seq_id=i, token_ids=(7,), start_pos=n, block_table=t,
                                                   sample=GREEDY) for i, (n, t) in enumerate(seqs)))  # fmt: skip
    assert len(runner.step(plan).sampled) == 2
    assert calls == [2]


def test_rows_past_the_limit_and_prefills_fall_back(block_llama: str) -> None:
    runner = make_runner(block_llama, max_batch_size=MAX_ROWS + 1)
    fused = runner._cpu_decode  # noqa: SLF001
    assert fused is not None and fused.max_rows == MAX_ROWS
    seqs = _prefilled(runner, [4] * (MAX_ROWS + 1), random.Random(1))
    plan = StepPlan(step_id=60, seqs=tuple(SeqStep(seq_id=i, token_ids=(3,), start_pos=n, block_table=t,
                                                   sample=GREEDY) for i, (n, t) in enumerate(seqs)))  # fmt: skip
    inputs = runner.prepare(plan)
    assert fused.forward(inputs.input_ids, inputs.positions, inputs.meta) is None
    prefill = runner.prepare(StepPlan(step_id=61, seqs=(SeqStep(seq_id=99, token_ids=(1, 2, 3), start_pos=0,
                                                                block_table=seqs[0][1], sample=GREEDY),)))  # fmt: skip
    assert fused.forward(prefill.input_ids, prefill.positions, prefill.meta) is None


def test_it_stays_off_where_it_cannot_serve(block_llama: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    runner = make_runner(block_llama)
    assert CpuDecodeStep.build(runner.model, runner.kv_caches, world_size=2) is None  # all-reduces between stages
    monkeypatch.setenv("TRILLM_CPU_DECODE_STEP", "0")
    assert CpuDecodeStep.build(runner.model, runner.kv_caches, world_size=1) is None
    monkeypatch.delenv("TRILLM_CPU_DECODE_STEP")
    assert CpuDecodeStep.build(runner.model, runner.kv_caches, world_size=1) is not None
    dense = make_runner("random:tiny")  # random weights are not blocks
    assert dense._cpu_decode is None  # noqa: SLF001


def test_groups_past_the_kernels_limit_keep_the_per_op_path(block_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = make_runner(block_llama)  # 4 query heads per 2 KV heads: groups of 2
    monkeypatch.setattr(cpu_kernels, "MAX_GROUP", 1)
    assert CpuDecodeStep.build(runner.model, runner.kv_caches, world_size=1) is None


def test_the_stage_timing_build_gives_the_same_bits_and_counts_every_stage(
    block_llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/cpu_stages.py's build (-DTRILLM_STAGE_TIMING: explicit barriers, clocks read) computes what the normal one
    does, and its counters see one call and every stage."""
    from bench.cpu_stages import STAGES, read_counters

    monkeypatch.setattr(cpu_kernels, "COMPILE_FLAGS", (*cpu_kernels.COMPILE_FLAGS, "-DTRILLM_STAGE_TIMING"))
    timing = cpu_kernels._load()  # noqa: SLF001 - a second library beside the normal one
    assert timing is not None and hasattr(timing, "trillm_stage_calls")
    runner = make_runner(block_llama, max_batch_size=8)
    fused = runner._cpu_decode  # noqa: SLF001
    assert fused is not None
    rng = random.Random(7)
    seqs = _prefilled(runner, [5, BLOCK_SIZE + 3, 70], rng)
    plan = StepPlan(step_id=50, seqs=tuple(
        SeqStep(seq_id=i, token_ids=(rng.randrange(320),), start_pos=length, block_table=table, sample=GREEDY)
        for i, (length, table) in enumerate(seqs)))  # fmt: skip
    inputs = runner.prepare(plan)
    with torch.inference_mode():
        normal = fused.forward(inputs.input_ids, inputs.positions, inputs.meta)  # rewrites the same KV rows below
        monkeypatch.setattr(cpu_kernels, "_library", timing)
        timed = fused.forward(inputs.input_ids, inputs.positions, inputs.meta)
    assert normal is not None and timed is not None and torch.equal(normal, timed)
    calls, wall, busy = read_counters(timing)
    assert calls == 1 and len(wall) == len(STAGES)
    assert all(w > 0 for w in wall), wall
    assert all(b > 0 for b in busy[0]), busy[0]  # every stage ends at its STAGE_END on thread 0
