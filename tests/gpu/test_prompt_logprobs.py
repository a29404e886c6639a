"""Prompt logprobs from the runner vs Hugging Face transformers' log-softmax on the same SmolLM2 weights (CPU)."""

from __future__ import annotations

import pytest
import torch

from trillm.config import RunnerConfig
from trillm.gpu.runner import ModelRunner
from trillm.protocol.api import SamplingParams
from trillm.protocol.step import PromptLogprobsSpec, SampleSpec, SeqStep, StepPlan

PROMPT_TEXT = "The capital of France is Paris. The capital of Italy is Rome, and"
TABLE = tuple(range(8))  # 8 blocks of 16 positions: enough for every prompt here


@pytest.fixture(scope="module")
def runner(smollm2_folder: str) -> ModelRunner:
    return ModelRunner(RunnerConfig(
        model_path=smollm2_folder, rank=0, world_size=1, dist_init_method="", device="cpu", dtype="float32",
        block_size=16, max_model_len=256, max_batch_size=4, max_prefill_token_num=256, cache_max_entry_count=1.0,
        cpu_memory_budget_bytes=1 << 29, enable_cuda_graph=False))


@pytest.fixture(scope="module")
def expected(smollm2_folder: str) -> tuple[list[int], torch.Tensor]:
    """The prompt's ids and transformers' log-softmax of every position: [prompt_len, vocab]."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    ids = AutoTokenizer.from_pretrained(smollm2_folder)(PROMPT_TEXT)["input_ids"]
    model = LlamaForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return list(ids), logits.log_softmax(dim=-1)


def _chunk(ids: list[int], start: int, end: int, num_top: int, seq_id: int = 0) -> SeqStep:
    last = min(end, len(ids) - 1)
    spec = PromptLogprobsSpec(num_top=num_top, first_pos=start, target_ids=tuple(ids[start + 1 : last + 1]))
    sample = SampleSpec(sampling=SamplingParams(temperature=0.0), output_index=0) if end == len(ids) else None
    return SeqStep(seq_id=seq_id, token_ids=tuple(ids[start:end]), start_pos=start, block_table=TABLE,
                   sample=sample, prompt_logprobs=spec if start < last else None)


@pytest.mark.slow
def test_chunked_prompt_logprobs_equal_transformers_log_softmax(
    runner: ModelRunner, expected: tuple[list[int], torch.Tensor]
) -> None:
    ids, reference = expected
    split = 7  # the first chunk's last row predicts the second chunk's first token
    first = runner.step(StepPlan(step_id=0, seqs=(_chunk(ids, 0, split, num_top=3),)))
    second = runner.step(StepPlan(step_id=1, seqs=(_chunk(ids, split, len(ids), num_top=3),)))
    (a,), (b,) = first.prompt_logprobs, second.prompt_logprobs
    assert (a.first_pos, b.first_pos) == (1, split + 1)
    entries = a.logprobs + b.logprobs
    assert [e.token_id for e in entries] == ids[1:]
    ours = torch.tensor([e.logprob for e in entries], dtype=torch.float32)
    theirs = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    for row, entry in enumerate(entries):
        top_ids = reference[row].topk(3).indices.tolist()
        assert [t for t, _ in entry.top[:3]] == top_ids
        assert entry.token_id in {t for t, _ in entry.top} and len(entry.top) <= 4


def test_plans_without_prompt_logprobs_return_none(runner: ModelRunner, expected: tuple[list[int], torch.Tensor]) -> None:
    ids, _ = expected
    plain = SeqStep(seq_id=3, token_ids=tuple(ids), start_pos=0, block_table=TABLE,
                    sample=SampleSpec(sampling=SamplingParams(temperature=0.0), output_index=0))
    assert runner.step(StepPlan(step_id=2, seqs=(plain,))).prompt_logprobs == ()
