"""Scheduler: prompt-logprob specs of prefill chunks, and the grammar replay a constrained sequence's sample carries."""

from __future__ import annotations

from trillm.policy.kv_blocks import BlockManager
from trillm.policy.scheduler import Scheduler
from trillm.protocol.api import SamplingParams, TokenLogprob
from trillm.protocol.step import PromptLogprobs, SampledToken, StepPlan, StepResult

EOS = 2


def make(*, num_blocks: int = 32, prefix_caching: bool = False, chunk: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4, enable_prefix_caching=prefix_caching), max_batch_size=4,
                     max_prefill_token_num=chunk, max_model_len=num_blocks * 4, eos_token_ids=(EOS,))


def answer(plan: StepPlan, token_id: int = 7) -> StepResult:
    """A rank's answer: `token_id` for every sample, and a logprob of -p for each scored prompt position p."""
    scored = tuple(
        PromptLogprobs(seq_id=s.seq_id, first_pos=s.prompt_logprobs.first_pos + 1, logprobs=tuple(
            TokenLogprob(token_id=t, logprob=-float(s.prompt_logprobs.first_pos + 1 + i))
            for i, t in enumerate(s.prompt_logprobs.target_ids)))
        for s in plan.seqs if s.prompt_logprobs is not None)
    sampled = tuple(SampledToken(seq_id=s.seq_id, token_id=token_id) for s in plan.seqs if s.sample is not None)
    return StepResult(step_id=plan.step_id, sampled=sampled, prompt_logprobs=scored)


def test_chunked_prompt_logprobs_cover_every_prompt_token_once_and_come_with_the_first_token() -> None:
    scheduler = make(chunk=5)
    prompt = tuple(range(10, 23))  # 13 tokens: chunks of 5, 5, 3
    scheduler.add(0, prompt, SamplingParams(temperature=0.0, prompt_logprobs=1), 3)
    events = []
    targets: list[int] = []
    while scheduler.has_unfinished and not events:
        plan = scheduler.schedule()
        assert plan is not None
        (seq,) = plan.seqs
        if seq.prompt_logprobs is not None:
            assert seq.prompt_logprobs.first_pos == seq.start_pos and seq.prompt_logprobs.num_top == 1
            targets += seq.prompt_logprobs.target_ids
        events = scheduler.apply(answer(plan))
    assert targets == list(prompt[1:])  # the first chunk's last row predicts the second chunk's first token
    (event,) = events
    assert event.prompt_logprobs is not None
    assert [(e.token_id, e.logprob) for e in event.prompt_logprobs] == [(t, -float(p)) for p, t in
                                                                          enumerate(prompt) if p > 0]
    plan = scheduler.schedule()
    assert plan is not None and plan.seqs[0].prompt_logprobs is None  # decodes score nothing
    assert scheduler.apply(answer(plan))[0].prompt_logprobs is None  # sent once


def test_prompt_logprobs_bypass_the_prefix_cache() -> None:
    scheduler = make(prefix_caching=True)
    prompt = tuple(range(10, 26))  # 4 full blocks
    for seq_id, wanted in ((0, None), (1, None), (2, 0)):
        scheduler.add(seq_id, prompt, SamplingParams(temperature=0.0, prompt_logprobs=wanted), 1)
        plan = scheduler.schedule()
        assert plan is not None
        (seq,) = plan.seqs
        if seq_id == 1:
            assert seq.start_pos > 0  # a plain request reuses the cached blocks
        if seq_id == 2:
            assert seq.start_pos == 0 and seq.prompt_logprobs is not None
            assert seq.prompt_logprobs.target_ids == prompt[1:]
        scheduler.apply(answer(plan))


def test_a_constrained_sequence_replays_its_outputs_after_each_admission() -> None:
    scheduler = make()
    scheduler.add(0, (10, 11, 12), SamplingParams(temperature=0.0, grammar="start: /a+/"), 8)
    scheduler.add(1, (10, 11, 12), SamplingParams(temperature=0.0), 8)
    plan = scheduler.schedule()
    assert plan is not None
    specs = {s.seq_id: s.sample for s in plan.seqs}
    assert specs[0] is not None and specs[0].grammar_replay == ()  # a fresh matcher
    assert specs[1] is not None and specs[1].grammar_replay is None  # unconstrained
    scheduler.apply(answer(plan, token_id=7))
    plan = scheduler.schedule()
    assert plan is not None and all(s.sample is not None and s.sample.grammar_replay is None for s in plan.seqs)
    scheduler.apply(answer(plan, token_id=8))
    seq = scheduler.sequence(0)
    assert seq is not None
    scheduler._preempt(seq)  # as under memory pressure
    plan = scheduler.schedule()
    assert plan is not None
    (readmitted,) = [s for s in plan.seqs if s.seq_id == 0]
    assert readmitted.sample is not None and readmitted.sample.grammar_replay == (7, 8)
