"""Scheduler: admission, chunked prefill, preemption, finishing, parked session KV and the prefix cache.

Plans are executed by `FakeRunner`, which pages tokens through a simulated KV cache and derives each next token from
the context it reads back, so every test that compares outputs with `reference_tokens` also checks block tables and
positions.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import FakeRunner, hash_next_token, reference_tokens
from trillm.policy.kv_blocks import BlockManager
from trillm.protocol.api import FinishReason, SamplingParams
from trillm.protocol.step import PREVIOUS_TOKEN, SampleSpec, StepPlan, StepResult, TokenEvent
from trillm.policy.scheduler import Scheduler
from trillm.policy.sequence import SeqStatus

EOS = 2
GREEDY = SamplingParams(temperature=0.0)


def make(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_batch_size: int = 8,
    max_prefill_token_num: int = 64,
    max_model_len: int | None = None,
    prefix_caching: bool = False,
    next_token=None,  # type: ignore[no-untyped-def]
) -> tuple[Scheduler, FakeRunner]:
    runner = FakeRunner(num_blocks=num_blocks, block_size=block_size, next_token=next_token)
    manager = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(
        manager,
        max_batch_size=max_batch_size,
        max_prefill_token_num=max_prefill_token_num,
        max_model_len=max_model_len or num_blocks * block_size,
        eos_token_ids=(EOS,),
    )
    _IN_FLIGHT.pop(id(scheduler), None)
    return scheduler, runner


class Outputs:
    """Tokens and finish reasons per seq id, collected from events."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = collections.defaultdict(list)
        self.finish: dict[int, FinishReason] = {}
        self.events: list[TokenEvent] = []

    def add(self, events: Sequence[TokenEvent | None]) -> None:
        for event in events:
            if event is None:
                continue
            self.events.append(event)
            assert event.seq_id not in self.finish, f"event after the end of seq {event.seq_id}"
            self.tokens[event.seq_id] += event.token_ids
            if event.finish_reason is not None:
                self.finish[event.seq_id] = event.finish_reason


OVERLAP = {"on": False}  # set by the `mode` fixture: drive the Scheduler as the overlapping Batcher does
_IN_FLIGHT: dict[int, collections.deque[StepResult]] = {}  # id(scheduler) → results of dispatched, unapplied plans


@pytest.fixture(params=[False, True], ids=["lockstep", "overlap"], autouse=True)
def mode(request: pytest.FixtureRequest) -> Iterator[bool]:
    OVERLAP["on"] = request.param
    _IN_FLIGHT.clear()
    yield request.param
    OVERLAP["on"] = False
    _IN_FLIGHT.clear()


def step(scheduler: Scheduler, runner: FakeRunner, outputs: Outputs) -> StepPlan | None:
    """One Batcher iteration. Lockstep: schedule, run, apply. Overlap: schedule (planning ahead while the previous
    plan is in flight; with none in flight, dispatch and plan the next one ahead at once), then apply the oldest
    plan in flight. The FakeRunner runs each plan when it is dispatched: ranks run plans in dispatch order, and
    results come back later. Returns the plan scheduled first (or, with nothing scheduled, the oldest result's
    stand-in `True` while plans are still in flight; None when nothing ran)."""
    if not OVERLAP["on"]:
        plan = scheduler.schedule()
        if plan is not None:
            outputs.add(scheduler.apply(runner.step(plan)))
        return plan
    in_flight = _IN_FLIGHT.setdefault(id(scheduler), collections.deque())
    plan = scheduler.schedule()
    if plan is not None:
        in_flight.append(runner.step(plan))
        if len(in_flight) < 2 and (ahead := scheduler.schedule()) is not None:
            in_flight.append(runner.step(ahead))
    if not in_flight:
        return None
    outputs.add(scheduler.apply(in_flight.popleft()))
    return plan if plan is not None else True  # type: ignore[return-value]


def drain(scheduler: Scheduler, runner: FakeRunner, outputs: Outputs | None = None, max_steps: int = 2000) -> Outputs:
    outputs = outputs or Outputs()
    for _ in range(max_steps):
        if step(scheduler, runner, outputs) is None:
            break
    assert not scheduler.has_unfinished
    assert scheduler.num_in_flight == 0
    return outputs


def expected(prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams = GREEDY) -> list[int]:
    spec = SampleSpec(sampling=sampling, output_index=0)
    return reference_tokens(prompt, spec, max_new_tokens, hash_next_token(1000), eos_token_ids=(EOS,))


def prompt_of(length: int, start: int = 100) -> tuple[int, ...]:
    return tuple(range(start, start + length))


def assert_all_free(scheduler: Scheduler) -> None:
    scheduler.block_manager.check_invariants()
    stats = scheduler.statistics().blocks
    assert stats.num_free_blocks == stats.num_total_blocks


# -- one sequence ----------------------------------------------------------------------------------------------------


def test_prefill_then_decode_plans_positions_and_block_tables(mode: bool) -> None:
    scheduler, runner = make(block_size=4)
    scheduler.add(1, prompt_of(6), GREEDY, 3)
    outputs = drain(scheduler, runner)
    first, second, third = runner.plans
    (seq,) = first.seqs
    assert (seq.start_pos, seq.token_ids, len(seq.block_table)) == (0, prompt_of(6), 2)
    assert seq.sample is not None and seq.sample.output_index == 0 and seq.sample.eos_token_ids == (EOS,)
    (seq,) = second.seqs
    # Planned ahead, the first output is not known yet: the rank substitutes what it sampled for seq 1 in `first`.
    assert (seq.start_pos, seq.token_ids) == (6, (PREVIOUS_TOKEN,) if mode else (outputs.tokens[1][0],))
    assert seq.sample is not None and seq.sample.output_index == 1
    (seq,) = third.seqs
    assert (seq.start_pos, len(seq.block_table)) == (7, 2)
    assert outputs.tokens[1] == expected(prompt_of(6), 3)
    assert outputs.finish[1] is FinishReason.LENGTH
    assert_all_free(scheduler)


def test_schedule_returns_none_when_idle() -> None:
    scheduler, _ = make()
    assert scheduler.schedule() is None


def test_decode_crossing_a_block_boundary_gets_a_new_block() -> None:
    scheduler, runner = make(block_size=4)
    scheduler.add(1, prompt_of(4), GREEDY, 2)
    drain(scheduler, runner)
    assert [len(plan.seqs[0].block_table) for plan in runner.plans] == [1, 2]


def test_max_new_tokens_zero_finishes_at_once_without_a_step() -> None:
    scheduler, _ = make()
    event = scheduler.add(1, prompt_of(3), GREEDY, 0)
    assert event == TokenEvent(seq_id=1, finish_reason=FinishReason.LENGTH, num_prompt_tokens=3)
    assert scheduler.schedule() is None and not scheduler.has_unfinished


def test_generation_is_capped_at_the_window() -> None:
    scheduler, runner = make(num_blocks=4, block_size=4)  # window 16
    scheduler.add(1, prompt_of(13), GREEDY, 100)
    outputs = drain(scheduler, runner)
    assert len(outputs.tokens[1]) == 3 and outputs.finish[1] is FinishReason.LENGTH


def test_add_asserts_what_the_engine_admitted() -> None:
    scheduler, _ = make(num_blocks=4, block_size=4)
    with pytest.raises(AssertionError, match="unadmitted prompt of 16 tokens"):
        scheduler.add(1, prompt_of(16), GREEDY, 1)
    with pytest.raises(AssertionError, match="unadmitted prompt of 0 tokens"):
        scheduler.add(1, (), GREEDY, 1)
    scheduler.add(1, prompt_of(3), GREEDY, 1)
    with pytest.raises(AssertionError, match="seq_id 1 is already live"):
        scheduler.add(1, prompt_of(3), GREEDY, 1)


def test_window_larger_than_the_kv_cache_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_model_len 17 exceeds the KV cache"):
        Scheduler(BlockManager(4, 4), max_batch_size=1, max_prefill_token_num=8, max_model_len=17)


# -- finishing -------------------------------------------------------------------------------------------------------


def always(token_id: int):  # type: ignore[no-untyped-def]
    return lambda context, spec: token_id


def test_eos_finishes_with_stop_including_the_eos_token() -> None:
    scheduler, runner = make(next_token=always(EOS))
    scheduler.add(1, prompt_of(3), GREEDY, 10)
    outputs = drain(scheduler, runner)
    assert outputs.tokens[1] == [EOS] and outputs.finish[1] is FinishReason.STOP


def test_eos_is_ignored_before_min_tokens() -> None:
    scheduler, runner = make(next_token=always(EOS))
    scheduler.add(1, prompt_of(3), SamplingParams(temperature=0.0, min_tokens=3), 10)
    outputs = drain(scheduler, runner)
    assert outputs.tokens[1] == [EOS] * 4 and outputs.finish[1] is FinishReason.STOP


def test_ignore_eos_runs_to_the_budget() -> None:
    scheduler, runner = make(next_token=always(EOS))
    scheduler.add(1, prompt_of(3), SamplingParams(temperature=0.0, ignore_eos=True), 5)
    outputs = drain(scheduler, runner)
    assert outputs.tokens[1] == [EOS] * 5 and outputs.finish[1] is FinishReason.LENGTH


def test_stop_token_ids_finish_with_stop() -> None:
    scheduler, runner = make(next_token=always(42))
    scheduler.add(1, prompt_of(3), SamplingParams(temperature=0.0, stop_token_ids=(42,)), 5)
    outputs = drain(scheduler, runner)
    assert outputs.tokens[1] == [42] and outputs.finish[1] is FinishReason.STOP


def test_abort_of_waiting_and_running_sequences_frees_everything() -> None:
    scheduler, runner = make(max_batch_size=1)
    scheduler.add(1, prompt_of(5), GREEDY, 50)
    scheduler.add(2, prompt_of(5, 300), GREEDY, 50)
    outputs = Outputs()
    step(scheduler, runner, outputs)
    assert scheduler.sequence(1).status is SeqStatus.RUNNING  # type: ignore[union-attr]
    assert scheduler.sequence(2).status is SeqStatus.WAITING  # type: ignore[union-attr]
    outputs.add([scheduler.abort(2), scheduler.abort(1, FinishReason.STOP)])
    assert outputs.finish == {1: FinishReason.STOP, 2: FinishReason.ABORT}
    assert scheduler.abort(1) is None
    assert scheduler.schedule() is None
    assert_all_free(scheduler)


def test_tokens_of_a_sequence_aborted_during_its_step_are_dropped() -> None:
    scheduler, runner = make()
    scheduler.add(1, prompt_of(5), GREEDY, 50)
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.abort(1)
    assert scheduler.apply(runner.step(plan)) == []
    assert_all_free(scheduler)


def test_missing_sample_from_the_rank_is_a_protocol_error() -> None:
    scheduler, _ = make()
    scheduler.add(1, prompt_of(5), GREEDY, 5)
    plan = scheduler.schedule()
    from trillm.protocol.step import StepResult

    with pytest.raises(AssertionError, match=r"returned no token for seqs \[1\]"):
        scheduler.apply(StepResult(step_id=plan.step_id, sampled=()))  # type: ignore[union-attr]


# -- batching, chunked prefill, admission ------------------------------------------------------------------------------


def test_chunked_prefill_respects_the_budget_while_decodes_continue() -> None:
    scheduler, runner = make(max_prefill_token_num=4)
    scheduler.add(1, prompt_of(3), GREEDY, 10)
    outputs = Outputs()
    step(scheduler, runner, outputs)  # seq 1 prefilled
    scheduler.add(2, prompt_of(10, 500), GREEDY, 2)
    plans = [step(scheduler, runner, outputs) for _ in range(3)]
    for plan in plans:
        assert plan is not None
        by_seq = {s.seq_id: s for s in plan.seqs}
        assert by_seq[1].num_tokens == 1  # seq 1 decodes every step
        assert by_seq[2].num_tokens <= 4
    chunks = [{s.seq_id: s for s in p.seqs}[2] for p in plans]  # type: ignore[union-attr]
    assert [(c.start_pos, c.num_tokens) for c in chunks] == [(0, 4), (4, 4), (8, 2)]
    assert [c.sample is None for c in chunks] == [True, True, False]
    drain(scheduler, runner, outputs)
    assert outputs.tokens[2] == expected(prompt_of(10, 500), 2)
    assert outputs.tokens[1] == expected(prompt_of(3), 10)


def test_prefill_budget_is_shared_first_come_first_served() -> None:
    scheduler, runner = make(max_prefill_token_num=6)
    scheduler.add(1, prompt_of(4), GREEDY, 1)
    scheduler.add(2, prompt_of(4, 200), GREEDY, 1)
    scheduler.add(3, prompt_of(4, 300), GREEDY, 1)
    plan = scheduler.schedule()
    assert plan is not None
    assert [(s.seq_id, s.num_tokens) for s in plan.seqs] == [(1, 4), (2, 2)]
    assert plan.num_tokens == 6


def test_max_batch_size_admits_at_step_boundaries(mode: bool) -> None:
    scheduler, runner = make(max_batch_size=2)
    for seq_id, max_new in ((1, 2), (2, 5), (3, 3)):
        scheduler.add(seq_id, prompt_of(3, 100 * seq_id), GREEDY, max_new)
    outputs = drain(scheduler, runner)
    batches = [sorted(s.seq_id for s in plan.seqs) for plan in runner.plans]
    assert batches[0] == [1, 2] and batches[1] == [1, 2]
    if mode:  # step 3 was planned before step 2's result: seq 1 (its last token in flight) still held its slot
        assert batches[2] == [2] and batches[3] == [2, 3]
    else:
        assert batches[2] == [2, 3]  # seq 1 left after step 2, seq 3 joined at the next step
    assert all(len(batch) <= 2 for batch in batches)
    for seq_id, max_new in ((1, 2), (2, 5), (3, 3)):
        assert outputs.tokens[seq_id] == expected(prompt_of(3, 100 * seq_id), max_new)


def test_head_of_queue_that_does_not_fit_blocks_later_arrivals() -> None:
    scheduler, runner = make(num_blocks=6, block_size=4)
    scheduler.add(1, prompt_of(12), GREEDY, 4)  # 3 blocks, up to 4 with its outputs
    outputs = Outputs()
    step(scheduler, runner, outputs)
    scheduler.add(2, prompt_of(12, 200), GREEDY, 1)  # needs 3 blocks: 2-3 free
    scheduler.add(3, prompt_of(2, 400), GREEDY, 1)  # would fit, but must not overtake seq 2
    plan = step(scheduler, runner, outputs)
    assert plan is not None and [s.seq_id for s in plan.seqs] == [1]
    drain(scheduler, runner, outputs)
    assert outputs.tokens[2] == expected(prompt_of(12, 200), 1)
    assert outputs.tokens[3] == expected(prompt_of(2, 400), 1)


def test_history_is_sent_only_when_penalties_are_on() -> None:
    scheduler, _ = make()
    scheduler.add(1, prompt_of(3), GREEDY, 2)
    scheduler.add(2, prompt_of(3), SamplingParams(temperature=0.0, repetition_penalty=1.2), 2)
    plan = scheduler.schedule()
    specs = {s.seq_id: s.sample for s in plan.seqs}  # type: ignore[union-attr]
    assert specs[1].history_token_ids == ()  # type: ignore[union-attr]
    assert specs[2].history_token_ids == prompt_of(3) and specs[2].num_prompt_tokens == 3  # type: ignore[union-attr]


# -- preemption ------------------------------------------------------------------------------------------------------


def test_preemption_by_recompute_keeps_exact_tokens() -> None:
    scheduler, runner = make(num_blocks=6, block_size=4)
    scheduler.add(1, prompt_of(6), GREEDY, 12)
    scheduler.add(2, prompt_of(6, 200), GREEDY, 12)
    outputs = drain(scheduler, runner)
    stats = scheduler.statistics()
    assert stats.num_preemptions > 0
    assert outputs.tokens[1] == expected(prompt_of(6), 12)
    assert outputs.tokens[2] == expected(prompt_of(6, 200), 12)
    recomputes = [s for p in runner.plans for s in p.seqs if s.seq_id == 2 and s.start_pos == 0][1:]
    assert recomputes, "seq 2 was never recomputed"
    # The recompute feeds prompt + the outputs so far and samples the next output index.
    chunk = recomputes[0]
    assert chunk.token_ids[:6] == prompt_of(6, 200) and chunk.sample is not None
    assert chunk.sample.output_index == chunk.num_tokens - 6
    assert_all_free(scheduler)


def test_the_newest_sequence_is_preempted_and_requeued_first() -> None:
    scheduler, runner = make(num_blocks=3, block_size=2)
    for seq_id in (1, 2, 3):
        scheduler.add(seq_id, prompt_of(2, 100 * seq_id), GREEDY, 4)
    outputs = Outputs()
    step(scheduler, runner, outputs)  # all three prefilled, one block each, pool full
    step(scheduler, runner, outputs)  # seq 1 needs a block: seq 3 (newest) goes
    assert scheduler.sequence(3).status is SeqStatus.PREEMPTED  # type: ignore[union-attr]
    assert scheduler.statistics().num_preemptions >= 1
    drain(scheduler, runner, outputs)
    for seq_id in (1, 2, 3):
        assert outputs.tokens[seq_id] == expected(prompt_of(2, 100 * seq_id), 4)


def test_a_preempted_sequence_is_readmitted_before_later_arrivals() -> None:
    scheduler, runner = make(num_blocks=4, block_size=2, max_batch_size=2)
    scheduler.add(1, prompt_of(2, 100), GREEDY, 6)
    scheduler.add(2, prompt_of(2, 200), GREEDY, 6)
    scheduler.add(3, prompt_of(2, 300), GREEDY, 1)  # waits for a batch slot; it would fit in one free block
    outputs = drain(scheduler, runner)
    # Seq 2 is preempted when seq 1 needs a block for position 4. Back at the front of the queue, seq 2 (prompt +
    # 3 outputs: 3 blocks) holds up seq 3 until it fits again.
    admissions = [(s.seq_id, s.num_tokens) for plan in runner.plans for s in plan.seqs if s.start_pos == 0]
    assert admissions == [(1, 2), (2, 2), (2, 5), (3, 2)]
    assert scheduler.statistics().num_preemptions == 1
    for seq_id, max_new in ((1, 6), (2, 6), (3, 1)):
        assert outputs.tokens[seq_id] == expected(prompt_of(2, 100 * seq_id), max_new)


def test_a_step_that_preempts_admits_nothing() -> None:
    scheduler, runner = make(num_blocks=6, block_size=2, prefix_caching=True)
    # The same prompt: seq 2 shares seq 1's first block but computes private copies of the later ones (seq 1
    # registered them first). Preempted, seq 2 frees those copies and would fit again at once by matching seq 1's.
    scheduler.add(1, prompt_of(4), GREEDY, 8)
    scheduler.add(2, prompt_of(4), GREEDY, 8)
    outputs = Outputs()
    for _ in range(3):  # driven in lockstep whatever the mode: a preempted sequence with a sample in flight waits
        outputs.add(scheduler.apply(runner.step(scheduler.schedule())))  # type: ignore[arg-type]
    plan = scheduler.schedule()  # seq 1 needs a block for position 6 and the pool is full: seq 2 is preempted
    assert plan is not None and scheduler.statistics().num_preemptions == 1
    assert [(s.seq_id, s.start_pos) for s in plan.seqs] == [(1, 6)]
    assert scheduler.sequence(2).status is SeqStatus.PREEMPTED  # type: ignore[union-attr]
    outputs.add(scheduler.apply(runner.step(plan)))
    plan = scheduler.schedule()
    assert plan is not None and [(s.seq_id, s.start_pos) for s in plan.seqs] == [(1, 7), (2, 6)]
    outputs.add(scheduler.apply(runner.step(plan)))
    while (plan := scheduler.schedule()) is not None:
        outputs.add(scheduler.apply(runner.step(plan)))
    assert scheduler.statistics().num_preemptions == 2
    assert outputs.tokens[1] == outputs.tokens[2] == expected(prompt_of(4), 8)
    assert_all_free(scheduler)


# -- parked session KV -------------------------------------------------------------------------------------------------


def run_turn(
    scheduler: Scheduler, runner: FakeRunner, seq_id: int, prompt: tuple[int, ...], max_new: int, session_id: int = 7
) -> list[int]:
    scheduler.add(seq_id, prompt, GREEDY, max_new, session_id=session_id, keep_kv=True)
    outputs = drain(scheduler, runner)
    assert outputs.tokens[seq_id] == expected(prompt, max_new)
    return outputs.tokens[seq_id]


def test_next_turn_starts_after_the_parked_tokens() -> None:
    scheduler, runner = make(block_size=4)
    first = prompt_of(6)
    out = run_turn(scheduler, runner, 1, first, 3)
    stats = scheduler.statistics()
    assert stats.num_parked_sessions == 1
    assert stats.blocks.num_used_blocks == 2  # 6 + 3 - 1 = 8 computed positions
    second = first + tuple(out) + prompt_of(5, 900)
    scheduler.add(2, second, GREEDY, 3, session_id=7, keep_kv=True)
    plan = scheduler.schedule()
    (seq,) = plan.seqs  # type: ignore[union-attr]
    # The last output of turn 1 was never fed to the model: it is the first token computed now.
    assert seq.start_pos == 8 and seq.token_ids == (out[-1],) + prompt_of(5, 900)
    outputs = Outputs()
    outputs.add(scheduler.apply(runner.step(plan)))  # type: ignore[arg-type]
    drain(scheduler, runner, outputs)
    assert outputs.tokens[2] == expected(second, 3)
    assert outputs.events[0].num_cached_tokens == 8
    assert scheduler.statistics().num_computed_prompt_tokens == 6 + 6


def test_parked_kv_is_reused_only_up_to_the_common_prefix() -> None:
    scheduler, runner = make(block_size=4)
    first = prompt_of(10)
    run_turn(scheduler, runner, 1, first, 2)
    diverging = first[:6] + prompt_of(7, 700)
    scheduler.add(2, diverging, GREEDY, 3, session_id=7, keep_kv=True)
    plan = scheduler.schedule()
    assert plan.seqs[0].start_pos == 6  # type: ignore[union-attr]
    outputs = Outputs()
    outputs.add(scheduler.apply(runner.step(plan)))  # type: ignore[arg-type]
    drain(scheduler, runner, outputs)
    assert outputs.tokens[2] == expected(diverging, 3)


def test_a_turn_diverging_inside_a_prefix_cached_block_leaves_the_cached_kv_intact() -> None:
    scheduler, runner = make(block_size=4, prefix_caching=True)
    first = prompt_of(10)
    run_turn(scheduler, runner, 1, first, 2)  # parks 11 computed tokens; blocks 0 and 1 are full and prefix-cached
    diverging = first[:6] + (700,)  # the common prefix ends at position 6, inside cached block 1
    scheduler.add(2, diverging, GREEDY, 1, session_id=7, keep_kv=True)
    plan = scheduler.schedule()
    # Block 1 is shared with the prefix cache: the turn recomputes positions 4-6 into a private block instead of
    # writing position 6 of block 1.
    assert plan is not None and (plan.seqs[0].start_pos, plan.seqs[0].token_ids) == (4, (104, 105, 700))
    assert plan.seqs[0].block_table[1] != runner.plans[0].seqs[0].block_table[1]
    outputs = Outputs()
    outputs.add(scheduler.apply(runner.step(plan)))
    drain(scheduler, runner, outputs)
    assert outputs.tokens[2] == expected(diverging, 1)
    # Another request with turn 1's prompt reads blocks 0 and 1 from the cache: their KV is still turn 1's.
    scheduler.add(3, first, GREEDY, 3)
    outputs = drain(scheduler, runner)
    assert outputs.events[0].num_cached_tokens == 8
    assert outputs.tokens[3] == expected(first, 3)


def test_resubmitting_the_same_prompt_recomputes_its_last_token() -> None:
    scheduler, runner = make(block_size=4)
    run_turn(scheduler, runner, 1, prompt_of(6), 3)  # parks 8 computed tokens
    scheduler.add(2, prompt_of(6), GREEDY, 2, session_id=7, keep_kv=True)
    plan = scheduler.schedule()
    assert (plan.seqs[0].start_pos, plan.seqs[0].token_ids) == (5, (105,))  # type: ignore[union-attr]
    outputs = Outputs()
    outputs.add(scheduler.apply(runner.step(plan)))  # type: ignore[arg-type]
    drain(scheduler, runner, outputs)
    assert outputs.tokens[2] == expected(prompt_of(6), 2)


def test_release_session_frees_parked_blocks() -> None:
    scheduler, runner = make()
    run_turn(scheduler, runner, 1, prompt_of(9), 3)
    assert scheduler.statistics().blocks.num_used_blocks > 0
    scheduler.release_session(7)
    scheduler.release_session(7)  # idempotent
    assert scheduler.statistics().num_parked_sessions == 0
    assert_all_free(scheduler)


def test_release_session_stops_a_live_sequence_from_parking() -> None:
    scheduler, runner = make()
    scheduler.add(1, prompt_of(5), GREEDY, 3, session_id=7, keep_kv=True)
    step(scheduler, runner, Outputs())
    scheduler.release_session(7)
    drain(scheduler, runner)
    assert scheduler.statistics().num_parked_sessions == 0
    assert_all_free(scheduler)


def test_aborted_turn_parks_what_was_computed() -> None:
    scheduler, runner = make(block_size=4)
    scheduler.add(1, prompt_of(6), GREEDY, 10, session_id=7, keep_kv=True)
    outputs = Outputs()
    step(scheduler, runner, outputs)
    step(scheduler, runner, outputs)
    scheduler.abort(1)
    assert scheduler.statistics().num_parked_sessions == 1
    history = prompt_of(6) + tuple(outputs.tokens[1]) + prompt_of(2, 800)
    scheduler.add(2, history, GREEDY, 2, session_id=7, keep_kv=True)
    plan = scheduler.schedule()
    assert plan.seqs[0].start_pos == 7  # type: ignore[union-attr]


def test_parked_sessions_are_evicted_before_running_sequences_are_preempted() -> None:
    scheduler, runner = make(num_blocks=6, block_size=4)
    first = prompt_of(10)
    out = run_turn(scheduler, runner, 1, first, 2, session_id=7)  # parks 3 blocks
    scheduler.add(2, prompt_of(12, 300), GREEDY, 8)  # needs 3 blocks, then 2 more while decoding
    drain(scheduler, runner)
    stats = scheduler.statistics()
    assert stats.num_evicted_sessions == 1 and stats.num_preemptions == 0 and stats.num_parked_sessions == 0
    # The evicted session's next turn recomputes from its tokens and answers exactly.
    second = first + tuple(out) + prompt_of(3, 900)
    scheduler.add(3, second, GREEDY, 4, session_id=7, keep_kv=True)
    plan = scheduler.schedule()
    assert plan.seqs[0].start_pos == 0  # type: ignore[union-attr]
    outputs = Outputs()
    outputs.add(scheduler.apply(runner.step(plan)))  # type: ignore[arg-type]
    drain(scheduler, runner, outputs)
    assert outputs.tokens[3] == expected(second, 4)


def test_failed_admission_keeps_the_session_parked() -> None:
    scheduler, runner = make(num_blocks=6, block_size=4)
    first = prompt_of(5)
    out = run_turn(scheduler, runner, 1, first, 2, session_id=7)  # parks 2 blocks
    scheduler.add(2, prompt_of(9, 300), GREEDY, 3)  # holds 3 blocks
    step(scheduler, runner, Outputs())
    second = first + tuple(out) + prompt_of(9, 900)  # 16 tokens: 2 parked blocks + 2 new, only 1 free
    scheduler.add(3, second, GREEDY, 1, session_id=7, keep_kv=True)
    step(scheduler, runner, Outputs())
    assert scheduler.sequence(3).status is SeqStatus.WAITING  # type: ignore[union-attr]
    assert scheduler.statistics().num_parked_sessions == 1
    outputs = drain(scheduler, runner)
    assert outputs.tokens[3] == expected(second, 1)


# -- prefix caching ----------------------------------------------------------------------------------------------------


def test_prefix_cache_reuses_full_blocks_of_an_identical_prefix() -> None:
    scheduler, runner = make(block_size=4, prefix_caching=True)
    shared = prompt_of(8)
    scheduler.add(1, shared + (1000 - 5,), GREEDY, 2)
    drain(scheduler, runner)
    scheduler.add(2, shared + (1000 - 6, 1000 - 7), GREEDY, 3)
    plan = scheduler.schedule()
    assert plan.seqs[0].start_pos == 8  # type: ignore[union-attr]
    outputs = Outputs()
    outputs.add(scheduler.apply(runner.step(plan)))  # type: ignore[arg-type]
    drain(scheduler, runner, outputs)
    assert outputs.tokens[2] == expected(shared + (1000 - 6, 1000 - 7), 3)
    assert outputs.events[0].num_cached_tokens == 8
    stats = scheduler.statistics()
    assert stats.num_cached_prompt_tokens == 8 and stats.blocks.prefix_cache_hits == 2
    assert_all_free(scheduler)  # cached blocks are evictable, hence free


def test_prefix_cache_never_covers_the_last_prompt_token() -> None:
    scheduler, runner = make(block_size=4, prefix_caching=True)
    scheduler.add(1, prompt_of(8), GREEDY, 1)
    drain(scheduler, runner)
    scheduler.add(2, prompt_of(8), GREEDY, 2)
    plan = scheduler.schedule()
    assert plan.seqs[0].start_pos == 4 and plan.seqs[0].num_tokens == 4  # type: ignore[union-attr]
    outputs = Outputs()
    outputs.add(scheduler.apply(runner.step(plan)))  # type: ignore[arg-type]
    drain(scheduler, runner, outputs)
    assert outputs.tokens[2] == expected(prompt_of(8), 2)


def test_prefix_cache_off_recomputes_everything() -> None:
    scheduler, runner = make(block_size=4)
    scheduler.add(1, prompt_of(9), GREEDY, 1)
    drain(scheduler, runner)
    scheduler.add(2, prompt_of(9), GREEDY, 1)
    assert scheduler.schedule().seqs[0].start_pos == 0  # type: ignore[union-attr]


# -- properties --------------------------------------------------------------------------------------------------------


def block_holders(scheduler: Scheduler) -> collections.Counter[int]:
    """How many references each block should have: live sequences' tables plus parked tables."""
    holders: collections.Counter[int] = collections.Counter()
    for seq in scheduler._seqs.values():
        holders.update(seq.block_table)
    for block_table in scheduler._parked.block_tables():
        holders.update(block_table)
    return holders


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 7), st.integers(0, 6), st.sampled_from([None, 1, 2, 2])),
        st.tuples(st.just("abort"), st.integers(0, 200)),
        st.tuples(st.just("release"), st.sampled_from([1, 2])),
        st.tuples(st.just("step"), st.integers(1, 8)),
    ),
    min_size=15,
    max_size=50,
)
NUM_BLOCKS, BLOCK_SIZE = 10, 2  # a 20-token window


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(ops=OPS, prefix_caching=st.booleans(), max_prefill=st.sampled_from([3, 8, 64]))
def test_random_workloads_keep_block_accounting_exact_and_outputs_correct(
    ops: list[tuple], prefix_caching: bool, max_prefill: int  # type: ignore[type-arg]
) -> None:
    scheduler, runner = make(
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        max_batch_size=3,
        max_prefill_token_num=max_prefill,
        prefix_caching=prefix_caching,
    )
    outputs = Outputs()
    prompts: dict[int, tuple[int, ...]] = {}
    budgets: dict[int, int] = {}
    sessions: dict[int, tuple[int, ...]] = {}  # session id -> its token history so far
    session_of: dict[int, int] = {}
    next_id = 0

    def check() -> None:
        scheduler.block_manager.check_invariants()
        holders = block_holders(scheduler)
        for block in range(NUM_BLOCKS):
            assert scheduler.block_manager.ref_count(block) == holders[block]

    def close_turns() -> None:
        for seq_id, session_id in list(session_of.items()):
            if seq_id in outputs.finish:
                sessions[session_id] = prompts[seq_id] + tuple(outputs.tokens[seq_id])
                del session_of[seq_id]

    for op in ops:
        close_turns()
        if op[0] == "submit":
            _, length, max_new, session_id = op
            prompt = prompt_of(length, 100 + 17 * next_id)
            if session_id is not None:
                if session_id in session_of.values():
                    continue  # a session runs one turn at a time
                history = sessions.get(session_id, ())
                prompt = history + prompt if len(history) + length < NUM_BLOCKS * BLOCK_SIZE else prompt
                session_of[next_id] = session_id
            prompts[next_id], budgets[next_id] = prompt, max_new
            outputs.add([scheduler.add(next_id, prompt, GREEDY, max_new, session_id=session_id, keep_kv=True)])
            next_id += 1
        elif op[0] == "abort" and next_id:
            outputs.add([scheduler.abort(op[1] % next_id)])
        elif op[0] == "release":
            scheduler.release_session(op[1])
        elif op[0] == "step":
            for _ in range(op[1]):
                step(scheduler, runner, outputs)
        check()
    drain(scheduler, runner, outputs, max_steps=500)  # bounded: nothing starves
    check()
    for seq_id, prompt in prompts.items():
        want = expected(prompt, min(budgets[seq_id], NUM_BLOCKS * BLOCK_SIZE - len(prompt)))
        got = outputs.tokens[seq_id]
        assert got == want[: len(got)]
        if outputs.finish[seq_id] is not FinishReason.ABORT:
            assert got == want
    scheduler.release_session(1)
    scheduler.release_session(2)
    check()
    assert_all_free(scheduler)


# -- step overlap ------------------------------------------------------------------------------------------------------


def eos_at_context(length: int):  # type: ignore[no-untyped-def]
    """EOS when the context read back has `length` tokens, the hash token otherwise."""
    fallback = hash_next_token(1000)
    return lambda context, spec: EOS if len(context) == length else fallback(context, spec)


def test_a_sequence_finishing_while_its_next_step_is_in_flight_frees_at_once_and_drops_the_sample() -> None:
    scheduler, runner = make(num_blocks=3, block_size=4, next_token=eos_at_context(8))
    scheduler.add(1, prompt_of(6), GREEDY, 5)
    outputs = Outputs()
    results = collections.deque([runner.step(scheduler.schedule())])  # type: ignore[arg-type]
    for _ in range(3):  # plan ahead, then apply the oldest: steps 2, 3, 4 each carry a placeholder
        plan = scheduler.schedule()
        assert plan is not None and plan.seqs[0].token_ids == (PREVIOUS_TOKEN,)
        results.append(runner.step(plan))
        outputs.add(scheduler.apply(results.popleft()))
    # Step 3 sampled EOS (output index 2); step 4, in flight, already sampled output index 3 speculatively.
    want = reference_tokens(prompt_of(6), SampleSpec(sampling=GREEDY, output_index=0), 5, eos_at_context(8),
                            eos_token_ids=(EOS,))  # fmt: skip
    assert outputs.tokens[1] == want and len(want) == 3 and want[-1] == EOS
    assert outputs.finish[1] is FinishReason.STOP
    assert runner.plans[-1].seqs[0].sample.output_index == 3  # type: ignore[union-attr]
    assert results[0].sampled and results[0].sampled[0].seq_id == 1
    # Its blocks are free while step 4 (which writes position 8 into one of them) is still in flight: safe, because
    # any plan that hands them out again is scheduled after step 4 and ranks run plans in order.
    assert_all_free(scheduler)
    assert scheduler.schedule() is None
    assert scheduler.apply(results.popleft()) == []  # the speculative token never reaches the client
    assert outputs.tokens[1] == want
    assert scheduler.num_in_flight == 0


def test_blocks_freed_with_a_step_in_flight_are_reused_by_the_next_plan_without_corruption() -> None:
    scheduler, runner = make(num_blocks=3, block_size=4, max_model_len=12, next_token=eos_at_context(8))
    scheduler.add(1, prompt_of(6), GREEDY, 5)
    outputs = Outputs()
    results = collections.deque([runner.step(scheduler.schedule())])  # type: ignore[arg-type]
    for _ in range(3):
        results.append(runner.step(scheduler.schedule()))  # type: ignore[arg-type]
        outputs.add(scheduler.apply(results.popleft()))
    assert outputs.finish[1] is FinishReason.STOP  # seq 1 held all 3 blocks; step 4 still writes into them
    speculative = runner.plans[-1].seqs[0]
    scheduler.add(2, prompt_of(9, 500), GREEDY, 3)  # needs 3 blocks: only seq 1's freed ones exist
    plan = scheduler.schedule()
    assert plan is not None and plan.seqs[0].seq_id == 2
    assert set(plan.seqs[0].block_table) & set(speculative.block_table)
    results.append(runner.step(plan))  # runs after step 4, as a rank would: seq 2 overwrites what step 4 wrote
    drain_results = Outputs()
    while results:
        drain_results.add(scheduler.apply(results.popleft()))
        if (ahead := scheduler.schedule()) is not None:
            results.append(runner.step(ahead))
    assert drain_results.tokens[2] == expected(prompt_of(9, 500), 3)  # read back through the reused blocks
    assert 1 not in drain_results.tokens
    assert_all_free(scheduler)


def test_penalised_sequences_are_never_planned_ahead(mode: bool) -> None:
    scheduler, runner = make()
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    scheduler.add(1, prompt_of(3), penalised, 6)
    scheduler.add(2, prompt_of(3, 300), GREEDY, 6)
    outputs = drain(scheduler, runner)
    steps = {seq_id: [s for p in runner.plans for s in p.seqs if s.seq_id == seq_id] for seq_id in (1, 2)}
    assert all(PREVIOUS_TOKEN not in s.token_ids for s in steps[1])
    assert all(s.sample.history_token_ids for s in steps[1])  # type: ignore[union-attr]
    assert any(PREVIOUS_TOKEN in s.token_ids for s in steps[2]) == mode
    assert outputs.tokens[1] == expected(prompt_of(3), 6)
    assert outputs.tokens[2] == expected(prompt_of(3, 300), 6)
    assert_all_free(scheduler)


def test_planning_ahead_never_exceeds_the_token_budget_or_the_window(mode: bool) -> None:
    scheduler, runner = make(num_blocks=4, block_size=4)  # a 16-token window
    scheduler.add(1, prompt_of(5), GREEDY, 4)
    scheduler.add(2, prompt_of(12, 300), GREEDY, 100)  # capped at 4 by the window
    outputs = drain(scheduler, runner)
    for seq_id, budget in ((1, 4), (2, 4)):
        indexes = [s.sample.output_index for p in runner.plans for s in p.seqs if s.seq_id == seq_id and s.sample]
        assert indexes == list(range(budget))  # no speculative step past the last allowed token
    assert outputs.tokens[2] == expected(prompt_of(12, 300), 4)
    assert_all_free(scheduler)
