"""ModelRunner on CUDA: kernels and decode graphs against the CPU reference runner, graph replay vs eager, chunking.

Every test loads the same tiny head_dim-64 model (random:tiny-gpu's shape, weights drawn on the CPU and saved as a
folder), so the CPU and CUDA runners hold identical weights. Decode inputs are teacher-forced (fixed token ids), so
two runners see the same inputs even where their samples would differ; tokens are compared where the reference's
top-2 margin is clear of bf16 noise (random weights give nearly flat logits, with occasional near-ties).

What each test proves:
- float32 on CUDA (the reference ops on the GPU, with the CUDA input path: pinned int32 uploads, static decode
  buffers) computes the CPU runner's logits to 1e-4;
- bf16 and fp16 with the CUDA kernels and graphs stay within their dtype's error of the float32 CPU runner over
  mixed prefill/decode steps, chunked prefill, and decode batches of 1, 2, 3, 5 and 8 (3 and 5 padded);
- each graph replay equals an eager forward of the same padded inputs, and replays see fresh inputs every step;
- chunked prefill then decode gives the same logits and greedy tokens as one-shot prefill (decode teacher-forced
  with the one-shot run's tokens, so a near-tie cannot derail the rest of the comparison).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from trillm.protocol.api import SamplingParams
from trillm.protocol.step import SampleSpec, SeqStep, StepPlan
from trillm.config import RunnerConfig
from trillm.gpu.runner import ModelRunner

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GREEDY = SampleSpec(sampling=SamplingParams(temperature=0.0), output_index=0)
WITH_LOGPROBS = SampleSpec(sampling=SamplingParams(temperature=0.0, logprobs=2), output_index=0)
BLOCK_SIZE = 16
BLOCKS_PER_SEQ = 12  # 192 tokens per sequence
NUM_SEQS = 8
# Relative L2 error of the logits against the float32 CPU runner, by dtype (2 layers; the kernels' own tests bound
# each op at 1.2e-2 / 2e-3).
REL_TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}


def make_runner(model_path: str, **overrides: Any) -> ModelRunner:
    fields: dict[str, Any] = dict(
        model_path=model_path,
        rank=0,
        world_size=1,
        dist_init_method="",
        device="cuda",
        dtype="bfloat16",
        block_size=BLOCK_SIZE,
        max_model_len=BLOCKS_PER_SEQ * BLOCK_SIZE,
        max_batch_size=NUM_SEQS,
        max_prefill_token_num=1024,
        cache_max_entry_count=0.05,
        cpu_memory_budget_bytes=256 << 20,
        enable_cuda_graph=True,
    )
    fields.update(overrides)
    return ModelRunner(RunnerConfig(**fields))


@pytest.fixture(scope="module")
def tiny_gpu_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """random:tiny-gpu's shape with weights drawn on the CPU, saved as an HF folder that every runner loads."""
    from safetensors.torch import save_file

    from trillm.models.llama import LlamaArgs, checkpoint_shapes
    from trillm.models.presets import preset_config, random_weights

    folder = tmp_path_factory.mktemp("tiny-gpu")
    config = preset_config("random:tiny-gpu")
    (folder / "config.json").write_text(json.dumps(config))
    shapes = checkpoint_shapes(LlamaArgs.from_hf_config(config))
    weights = dict(random_weights(shapes, device=torch.device("cpu"), dtype=torch.float32, seed=5))
    save_file(weights, str(folder / "model.safetensors"))
    return str(folder)


def tables() -> list[tuple[int, ...]]:
    """Each sequence's block table: scattered, non-contiguous block ids (sequence i owns ids ≡ i mod NUM_SEQS)."""
    return [tuple(NUM_SEQS * b + i for b in reversed(range(BLOCKS_PER_SEQ))) for i in range(NUM_SEQS)]


def token(step: int, seq: int) -> int:
    return (37 * step + 101 * seq + 11) % 1024


def scenario() -> Iterator[StepPlan]:
    """Mixed prefill (one chunked, one exactly 4 blocks), a mixed prefill+decode step, then decode batches."""
    table = tables()
    prompt_lens = [37, 50, 1, 64, 15, 23, 9, 40]
    prompts = [tuple(token(p, s) for p in range(n)) for s, n in enumerate(prompt_lens)]
    first = [SeqStep(seq_id=1, token_ids=prompts[1][:20], start_pos=0, block_table=table[1])]
    first += [
        SeqStep(seq_id=s, token_ids=prompts[s], start_pos=0, block_table=table[s], sample=GREEDY)
        for s in (0, 2, 3, 4, 5, 6, 7)
    ]
    yield StepPlan(step_id=0, seqs=tuple(first))
    lengths = list(prompt_lens)
    lengths[1] = 20
    mixed = (
        SeqStep(seq_id=1, token_ids=prompts[1][20:], start_pos=20, block_table=table[1], sample=WITH_LOGPROBS),
        SeqStep(seq_id=0, token_ids=(token(99, 0),), start_pos=37, block_table=table[0], sample=GREEDY),
    )
    yield StepPlan(step_id=1, seqs=mixed)
    lengths[1], lengths[0] = 50, 38
    step = 2
    for batch in ([0], [0, 1], [2, 0, 1], [0, 1, 2, 3, 4], list(range(8)), [7, 5, 3]):
        for _ in range(3):
            seqs = tuple(
                SeqStep(seq_id=s, token_ids=(token(step, s),), start_pos=lengths[s], block_table=table[s],
                        sample=GREEDY)
                for s in batch
            )  # fmt: skip
            yield StepPlan(step_id=step, seqs=seqs)
            for s in batch:
                lengths[s] += 1
            step += 1


def run_logits(runner: ModelRunner, plans: Iterator[StepPlan]) -> list[torch.Tensor]:
    """Each plan's sampled-row logits, float32 on the CPU."""
    out = []
    for plan in plans:
        logits = runner.forward_logits(runner.prepare(plan))
        assert logits is not None
        out.append(logits.float().cpu())
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_tokens_agree(ours: torch.Tensor, ref: torch.Tensor, *, min_margin: float, what: str) -> None:
    """argmax(ours) == argmax(ref) on every row where ref's top-2 margin exceeds min_margin."""
    top2 = ref.topk(2, dim=-1).values  # [rows, 2]
    clear = (top2[:, 0] - top2[:, 1]) > min_margin
    mismatch = clear & (ours.argmax(-1) != ref.argmax(-1))
    assert not mismatch.any(), f"{what}: greedy tokens differ on clear rows {mismatch.nonzero().flatten().tolist()}"


@pytest.fixture(scope="module")
def cpu_logits(tiny_gpu_folder: str) -> list[torch.Tensor]:
    runner = make_runner(tiny_gpu_folder, device="cpu", dtype="float32", enable_cuda_graph=False)
    return run_logits(runner, scenario())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_runner_matches_the_cpu_runner(tiny_gpu_folder: str, cpu_logits: list[torch.Tensor], dtype: str) -> None:
    runner = make_runner(tiny_gpu_folder, dtype=dtype)
    assert runner.model.model.embed_tokens.weight.device.type == "cuda"
    if dtype == "float32":
        assert runner.graph_batch_sizes == ()  # reference ops on the GPU: eager
    else:
        assert runner.graph_batch_sizes == (1, 2, 4, 8)
    cuda_logits = run_logits(runner, scenario())
    errors = [rel_error(c, r) for c, r in zip(cuda_logits, cpu_logits, strict=True)]
    print(f"{dtype}: max relative L2 error per step {max(errors):.2e}")
    assert max(errors) < REL_TOL[dtype], errors
    assert_tokens_agree(torch.cat(cuda_logits), torch.cat(cpu_logits), min_margin=0.05, what=dtype)


def test_step_returns_tokens_and_logprobs_on_cuda(tiny_gpu_folder: str, cpu_logits: list[torch.Tensor]) -> None:
    runner = make_runner(tiny_gpu_folder)
    plans = list(scenario())
    runner.step(plans[0])
    result = runner.step(plans[1])  # seq 1 asked for 2 logprobs
    assert [s.seq_id for s in result.sampled] == [1, 0]
    logprob = result.sampled[0].logprob
    assert logprob is not None and logprob.token_id == result.sampled[0].token_id
    assert len(logprob.top) >= 2 and all(-1e9 < v <= 0.0 for _, v in logprob.top)
    assert result.sampled[1].logprob is None


def test_graph_replay_equals_eager_on_the_same_padded_inputs(tiny_gpu_folder: str) -> None:
    runner = make_runner(tiny_gpu_folder)
    plans = list(scenario())
    for plan in plans:
        inputs = runner.prepare(plan)
        if inputs.graph_rows:
            # The eager forward rewrites the same K/V at the same slots (padding rows write nothing): harmless.
            with torch.inference_mode():
                eager = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta).clone()
                graph = runner._graphs.replay(inputs.graph_rows)  # type: ignore[union-attr]
            torch.testing.assert_close(graph, eager, msg=f"step {plan.step_id}, {inputs.graph_rows} rows")
            assert inputs.graph_rows == {1: 1, 2: 2, 3: 4, 5: 8, 8: 8}[len(plan.seqs)]
        runner.forward_logits(inputs)


def test_graphs_and_eager_runners_agree(tiny_gpu_folder: str) -> None:
    graphs = run_logits(make_runner(tiny_gpu_folder), scenario())
    eager = run_logits(make_runner(tiny_gpu_folder, enable_cuda_graph=False), scenario())
    errors = [rel_error(g, e) for g, e in zip(graphs, eager, strict=True)]
    assert max(errors) < 1e-2, errors  # same kernels and weights; only the padding and the split-KV count differ
    assert_tokens_agree(torch.cat(graphs), torch.cat(eager), min_margin=0.02, what="graphs vs eager")


def prefill_and_decode(
    runner: ModelRunner, prompt: tuple[int, ...], *, chunk: int, new_tokens: int, feed: list[int] | None = None
) -> tuple[list[int], torch.Tensor]:
    """Prefill `prompt` in chunks of `chunk` tokens, then decode: greedy tokens and their logits [new_tokens, vocab].

    Decode steps feed back the runner's own tokens, or `feed` (teacher forcing) when given.
    """
    table = tables()[0]
    logits = None
    for start in range(0, len(prompt), chunk):
        is_last = start + chunk >= len(prompt)
        seq = SeqStep(seq_id=0, token_ids=prompt[start : start + chunk], start_pos=start, block_table=table,
                      sample=GREEDY if is_last else None)  # fmt: skip
        logits = runner.forward_logits(runner.prepare(StepPlan(step_id=start, seqs=(seq,))))
    rows = []
    for i in range(new_tokens):
        assert logits is not None
        rows.append(logits.float().cpu())
        tokens = [int(r.argmax()) for r in rows] if feed is None else feed
        seq = SeqStep(seq_id=0, token_ids=(tokens[i],), start_pos=len(prompt) + i, block_table=table, sample=GREEDY)
        logits = runner.forward_logits(runner.prepare(StepPlan(step_id=1000 + i, seqs=(seq,))))
    all_logits = torch.cat(rows)  # [new_tokens, vocab]
    return all_logits.argmax(-1).tolist(), all_logits


def test_chunked_prefill_then_decode_gives_the_same_tokens(tiny_gpu_folder: str) -> None:
    runner = make_runner(tiny_gpu_folder)
    prompt = tuple(token(p, 3) for p in range(150))  # crosses 10 blocks; 40-token chunks end mid-block
    whole_tokens, whole = prefill_and_decode(runner, prompt, chunk=150, new_tokens=24)
    chunked_tokens, chunked = prefill_and_decode(runner, prompt, chunk=40, new_tokens=24, feed=whole_tokens)
    assert rel_error(chunked, whole) < 5e-3
    assert_tokens_agree(chunked, whole, min_margin=0.02, what="chunked vs whole prefill")
    agree = sum(a == b for a, b in zip(chunked_tokens, whole_tokens, strict=True))
    print(f"chunked prefill: {agree}/24 greedy tokens equal to one-shot prefill's")
