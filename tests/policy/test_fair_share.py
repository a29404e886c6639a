"""Fair shares (issue 13): one request's choices cannot hold every batch slot or the whole prefill budget while
another request waits for its first token, and a long request is not starved by short ones.

Driven as test_scheduler.py drives the Scheduler (lockstep and overlap), over the FakeRunner, so every test also
checks that preempted and interleaved sequences still produce their exact tokens.
"""

from __future__ import annotations

from test_scheduler import (  # noqa: F401  (mode: the autouse lockstep/overlap fixture)
    GREEDY,
    Outputs,
    assert_all_free,
    drain,
    expected,
    make,
    mode,
    prompt_of,
    step,
)

from trillm.policy.fair_share import FairShares


def first_token_step(outputs: Outputs, seq_id: int) -> bool:
    return bool(outputs.tokens.get(seq_id))


def test_a_new_request_gets_a_slot_from_the_request_holding_the_whole_batch(mode: bool) -> None:
    scheduler, runner = make(max_batch_size=4)
    for seq_id in range(1, 9):  # one request, n=8: twice the batch
        scheduler.add(seq_id, prompt_of(3, 100 * seq_id), GREEDY, 12, share="big")
    outputs = Outputs()
    for _ in range(3):
        step(scheduler, runner, outputs)
    assert scheduler.statistics().num_running == 4
    scheduler.add(100, prompt_of(3, 50), GREEDY, 2, share="small")
    num_steps = 0
    while not first_token_step(outputs, 100):
        step(scheduler, runner, outputs)
        num_steps += 1
    assert num_steps <= 2  # the plan in flight (overlap), then its own: not after the big request's choices
    assert scheduler.statistics().num_fair_share_preemptions == 1
    drain(scheduler, runner, outputs)
    for seq_id in range(1, 9):
        assert outputs.tokens[seq_id] == expected(prompt_of(3, 100 * seq_id), 12)
    assert outputs.tokens[100] == expected(prompt_of(3, 50), 2)
    assert_all_free(scheduler)


def test_requests_of_one_sequence_each_are_never_preempted_for_fairness() -> None:
    scheduler, runner = make(max_batch_size=2)
    for seq_id in (1, 2, 3):
        scheduler.add(seq_id, prompt_of(3, 100 * seq_id), GREEDY, 4)
    outputs = drain(scheduler, runner)
    assert scheduler.statistics().num_preemptions == 0
    admissions = [s.seq_id for plan in runner.plans for s in plan.seqs if s.start_pos == 0]
    assert admissions == [1, 2, 3]  # first come first served, as before
    assert outputs.tokens[3] == expected(prompt_of(3, 300), 4)


def test_the_largest_request_gives_up_slots_but_keeps_one() -> None:
    scheduler, runner = make(max_batch_size=4)
    for seq_id in range(1, 5):
        scheduler.add(seq_id, prompt_of(3, 100 * seq_id), GREEDY, 20, share="big")
    outputs = Outputs()
    step(scheduler, runner, outputs)
    for seq_id in range(11, 16):  # five one-sequence requests for the four slots
        scheduler.add(seq_id, prompt_of(3, 100 * seq_id), GREEDY, 20)
    step(scheduler, runner, outputs)
    running = [s.seq_id for s in runner.plans[-1].seqs]
    assert sum(1 for seq_id in running if seq_id < 10) == 1  # the big request keeps one sequence running
    assert scheduler.statistics().num_fair_share_preemptions == 3
    drain(scheduler, runner, outputs)
    assert_all_free(scheduler)


def test_a_short_request_is_prefilled_before_a_long_requests_remaining_chunks(mode: bool) -> None:
    scheduler, runner = make(max_prefill_token_num=8, max_batch_size=8)
    for seq_id in range(1, 5):  # 4 x 12 prompt tokens: six steps of prefill at 8 per step
        scheduler.add(seq_id, prompt_of(12, 100 * seq_id), GREEDY, 2, share="long")
    outputs = Outputs()
    step(scheduler, runner, outputs)
    scheduler.add(100, prompt_of(3, 50), GREEDY, 1, share="short")
    plan = step(scheduler, runner, outputs)
    assert plan is not None and plan is not True
    assert [s.seq_id for s in plan.seqs if s.seq_id == 100 or s.sample is None][0] == 100  # served first
    drain(scheduler, runner, outputs)
    assert outputs.tokens[100] == expected(prompt_of(3, 50), 1)
    for seq_id in range(1, 5):
        assert outputs.tokens[seq_id] == expected(prompt_of(12, 100 * seq_id), 2)


def test_a_long_request_is_not_starved_by_a_stream_of_short_ones() -> None:
    scheduler, runner = make(max_prefill_token_num=8, num_blocks=256)
    scheduler.add(1, prompt_of(40), GREEDY, 1, share="long")  # five full-budget steps
    outputs = Outputs()
    for index in range(40):  # a new 6-token request every step: they alone would take 6 of the 8 tokens
        scheduler.add(100 + index, prompt_of(6, 1000 + 10 * index), GREEDY, 1, share=f"short-{index}")
        step(scheduler, runner, outputs)
        if outputs.tokens.get(1):
            break
    assert outputs.tokens.get(1), "the long request never got its token"
    assert index <= 12  # its deadline (arrival + 5 steps) comes before later arrivals' within a few steps
    drain(scheduler, runner, outputs)
    assert outputs.tokens[1] == expected(prompt_of(40), 1)


def test_shares_are_forgotten_when_their_last_sequence_leaves() -> None:
    scheduler, runner = make(max_batch_size=2)
    for seq_id in (1, 2, 3):
        scheduler.add(seq_id, prompt_of(3, 100 * seq_id), GREEDY, 3, share="a")
    step(scheduler, runner, Outputs())
    scheduler.abort(3)  # waiting
    scheduler.abort(1)  # running
    drain(scheduler, runner)
    shares: FairShares = scheduler._waiting  # noqa: SLF001 - the queue's own bookkeeping
    assert shares.num_shares == 0 and len(shares) == 0
    assert_all_free(scheduler)
