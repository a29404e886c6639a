"""Constrained decoding on the rank: grammar matchers, the bitmask in the sampler, a mixed batch on SmolLM2 (CPU)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from trillm.config import RunnerConfig
from trillm.gpu.runner import ModelRunner
from trillm.gpu.sampling import apply_token_bitmask, sample
from trillm.protocol.api import SamplingParams
from trillm.protocol.step import PREVIOUS_TOKEN, SampleSpec, SeqStep, StepPlan
from trillm.structured.grammar import choice_grammar, json_schema_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 31}, "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90}},
                  "required": ["lat"],
                  "additionalProperties": False},
    },
    "required": ["city", "unit", "days", "where"],
    "additionalProperties": False,
}
EOS = 2  # <|im_end|>


def test_bitmask_keeps_exactly_the_allowed_tokens_of_the_listed_rows() -> None:
    logits = torch.randn(3, 70)
    bits = torch.zeros(1, 3, dtype=torch.int32)
    bits[0, 0] = (1 << 5) | (1 << 31) - (1 << 31) * 2  # tokens 5 and 31 (the sign bit)
    bits[0, 2] = 1 << 1  # token 65
    masked = logits.clone()
    apply_token_bitmask(masked, torch.tensor([1]), bits)
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])  # unlisted rows untouched
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [5, 31, 65]
    every = logits[1:2].clone()  # one row, all of them constrained: the in-place path
    apply_token_bitmask(every, torch.tensor([0]), bits)
    assert torch.equal(every, masked[1:2])


@pytest.fixture(scope="module")
def runner(smollm2_folder: str) -> ModelRunner:
    return ModelRunner(RunnerConfig(
        model_path=smollm2_folder, rank=0, world_size=1, dist_init_method="", device="cpu", dtype="float32",
        block_size=16, max_model_len=512, max_batch_size=4, max_prefill_token_num=512, cache_max_entry_count=1.0,
        cpu_memory_budget_bytes=1 << 29, enable_cuda_graph=False))


def generate(runner: ModelRunner, prompts: list[list[int]], samplings: list[SamplingParams], max_new: int,
             first_step: int) -> list[list[int]]:
    """All prompts in one batch, overlapped like the Batcher: each decode carries PREVIOUS_TOKEN."""
    tables = [tuple(range(i * 32, (i + 1) * 32)) for i in range(len(prompts))]
    seq_ids = [first_step * 10 + i for i in range(len(prompts))]
    outputs: list[list[int]] = [[] for _ in prompts]
    live = set(range(len(prompts)))
    steps = [SeqStep(seq_id=seq_ids[i], token_ids=tuple(p), start_pos=0, block_table=tables[i],
                     sample=SampleSpec(sampling=samplings[i], output_index=0, eos_token_ids=(EOS,),
                                       grammar_replay=() if samplings[i].grammar else None))
             for i, p in enumerate(prompts)]
    for step_id in range(first_step, first_step + max_new):
        result = runner.step(StepPlan(step_id=step_id, seqs=tuple(steps)))
        by_seq = {t.seq_id: t.token_id for t in result.sampled}
        for i in list(live):
            token = by_seq[seq_ids[i]]
            outputs[i].append(token)
            if token == EOS:
                live.discard(i)
        steps = [SeqStep(seq_id=seq_ids[i], token_ids=(PREVIOUS_TOKEN,),
                         start_pos=len(prompts[i]) + len(outputs[i]) - 1, block_table=tables[i],
                         sample=SampleSpec(sampling=samplings[i], output_index=len(outputs[i]), eos_token_ids=(EOS,)))
                 for i in sorted(live)]
        if not steps:
            break
    return outputs


@pytest.mark.slow
def test_constrained_rows_follow_the_schema_and_free_rows_are_unchanged(runner: ModelRunner) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runner.config.model_path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Weather in Paris as JSON?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    greedy = SamplingParams(temperature=0.0)
    (alone,) = generate(runner, [prompt], [greedy], 16, first_step=0)
    constrained = SamplingParams(temperature=1.0, seed=7, grammar=json_schema_grammar(SCHEMA, strict=True))
    choice = SamplingParams(temperature=0.0, grammar=choice_grammar(["sunny", "rainy"]))
    mixed = generate(runner, [prompt, prompt, prompt], [constrained, greedy, choice], 48, first_step=100)
    assert mixed[1][:16] == alone  # the free row's greedy tokens do not change next to constrained ones
    assert mixed[0][-1] == EOS and mixed[2][-1] == EOS
    jsonschema.validate(json.loads(tokenizer.decode(mixed[0][:-1])), SCHEMA)
    assert tokenizer.decode(mixed[2][:-1]) in {"sunny", "rainy"}


def test_a_replayed_matcher_continues_where_the_outputs_left_off(runner: ModelRunner) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runner.config.model_path)
    grammar = choice_grammar(["yes please", "no thanks"])
    spec = SampleSpec(sampling=SamplingParams(temperature=0.0, grammar=grammar), output_index=1, eos_token_ids=(EOS,),
                      grammar_replay=tuple(tokenizer.encode("no")))  # as after a preemption
    logits = torch.zeros(1, runner.vocab_size)
    assert runner.grammars is not None
    mask = runner.grammars.fill([999], [spec])
    ((token_id, _),) = sample(logits, [spec], mask)
    assert tokenizer.decode([token_id]).strip() == "thanks"
