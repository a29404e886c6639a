"""BatcherActor driven directly: delivery, a consumer that drops its channel, shutdown, idling.

The Batcher hands each step's events to `deliver`; here that is an EventRouter in the same loop (the Engine's
arrangement when its core runs in the serving loop), whose per-sequence channels the tests read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from fakes import FakeRunner
from trillm.actors.batcher import BatcherActor
from trillm.actors.gpu_worker import InProcessWorkerActor
from trillm.policy.kv_blocks import BlockManager
from trillm.protocol.api import FinishReason, SamplingParams
from trillm.protocol.step import StepPlan, StepResult, TokenEvent
from trillm.actors.event_router import EventRouter
from trillm.actors.messages import Abort, BatcherInbox, ReleaseSession, Submit
from trillm.policy.scheduler import Scheduler
from trillm.config import RunnerConfig

pytestmark = pytest.mark.usefixtures("overlap")  # every test runs in lockstep and with step overlap

GREEDY = SamplingParams(temperature=0.0)
RUNNER_CONFIG = RunnerConfig(
    model_path="fake",
    rank=0,
    world_size=1,
    dist_init_method="",
    device="cpu",
    dtype="float32",
    block_size=4,
    max_model_len=64,
    max_batch_size=4,
    max_prefill_token_num=64,
    cache_max_entry_count=0.5,
    cpu_memory_budget_bytes=1 << 20,
    enable_cuda_graph=False,
)


Running = tuple[BatcherActor, trio.MemorySendChannel[BatcherInbox], FakeRunner, Scheduler, EventRouter]


def router_for(inbox: trio.MemorySendChannel[BatcherInbox]) -> EventRouter:
    """A router that sends the Batcher an Abort when a sequence's receiver is gone, as the Engine does."""
    return EventRouter(abort=lambda seq_id: inbox.send_nowait(Abort(seq_id=seq_id)))


@asynccontextmanager
async def running_batcher(*, use_thread: bool = False) -> AsyncIterator[Running]:
    runner = FakeRunner(num_blocks=16, block_size=4)
    scheduler = Scheduler(BlockManager(16, 4), max_batch_size=4, max_prefill_token_num=64, max_model_len=64)
    inbox_send, inbox_receive = trio.open_memory_channel[BatcherInbox](8)
    plans_send, plans_receive = trio.open_memory_channel[StepPlan](1)
    results_send, results_receive = trio.open_memory_channel[StepResult](1)
    worker = InProcessWorkerActor(lambda _: runner, RUNNER_CONFIG, plans_receive, results_send, use_thread=use_thread)
    router = router_for(inbox_send)
    batcher = BatcherActor(scheduler, inbox_receive, [plans_send], [results_receive], deliver=router.deliver)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await nursery.start(batcher.run)
        yield batcher, inbox_send, runner, scheduler, router
        inbox_send.close()


def submit(
    router: EventRouter,
    seq_id: int,
    events: trio.MemorySendChannel[TokenEvent],
    max_new_tokens: int = 5,
    **fields: Any,
) -> Submit:
    """A Submit whose events `router` sends to `events` (as Engine._open_request arranges)."""
    router.register(seq_id, events)
    return Submit(seq_id=seq_id, prompt_token_ids=(100, 101, 102), sampling=GREEDY, max_new_tokens=max_new_tokens,
                  **fields)


async def test_events_are_delivered_and_the_channel_closed_at_the_end() -> None:
    async with running_batcher() as (batcher, inbox, _, _, router):
        send, receive = trio.open_memory_channel[TokenEvent](10)
        await inbox.send(submit(router, 1, send, 3))
        events = [event async for event in receive]  # ends: the Batcher closed the channel after the last event
        assert [len(e.token_ids) for e in events] == [1, 1, 1]
        assert [e.finish_reason for e in events] == [None, None, FinishReason.LENGTH]
        assert batcher.statistics().num_steps == 3


async def test_an_idle_batcher_sleeps_on_its_inbox() -> None:
    async with running_batcher() as (batcher, _, runner, _, router):
        await trio.testing.wait_all_tasks_blocked()
        assert runner.plans == [] and batcher.statistics().num_steps == 0


async def test_a_dropped_channel_aborts_the_sequence_and_frees_its_blocks() -> None:
    async with running_batcher() as (batcher, inbox, _, scheduler, router):
        send, receive = trio.open_memory_channel[TokenEvent](100)
        await inbox.send(submit(router, 1, send, 50))
        await receive.receive()
        receive.close()  # the consumer is gone mid-stream
        await trio.testing.wait_all_tasks_blocked()
        stats = batcher.statistics().scheduler
        assert stats.num_running == 0 and stats.blocks.num_free_blocks == 16
        assert stats.num_generated_tokens < 50
        assert scheduler.sequence(1) is None


async def test_release_session_reaches_the_scheduler() -> None:
    async with running_batcher() as (batcher, inbox, _, _, router):
        send, receive = trio.open_memory_channel[TokenEvent](10)
        await inbox.send(submit(router, 1, send, 2, session_id=7, keep_kv=True))
        assert [e async for e in receive][-1].finish_reason is FinishReason.LENGTH
        assert batcher.statistics().scheduler.num_parked_sessions == 1
        await inbox.send(ReleaseSession(session_id=7))
        await trio.testing.wait_all_tasks_blocked()
        stats = batcher.statistics().scheduler
        assert stats.num_parked_sessions == 0 and stats.blocks.num_free_blocks == 16


async def test_closing_the_inbox_fails_live_sequences_and_stops_the_workers() -> None:
    runner = FakeRunner(num_blocks=16, block_size=4)
    scheduler = Scheduler(BlockManager(16, 4), max_batch_size=1, max_prefill_token_num=64, max_model_len=64)
    inbox_send, inbox_receive = trio.open_memory_channel[BatcherInbox](8)
    plans_send, plans_receive = trio.open_memory_channel[StepPlan](1)
    results_send, results_receive = trio.open_memory_channel[StepResult](1)
    worker = InProcessWorkerActor(lambda _: runner, RUNNER_CONFIG, plans_receive, results_send, use_thread=False)
    router = router_for(inbox_send)
    batcher = BatcherActor(scheduler, inbox_receive, [plans_send], [results_receive], deliver=router.deliver)
    send, receive = trio.open_memory_channel[TokenEvent](200)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        inbox_send.send_nowait(submit(router, 1, send.clone(), 50))
        inbox_send.send_nowait(submit(router, 2, send.clone(), 50))  # waits: max_batch_size 1
        inbox_send.close()  # drained first, then the loop ends
        await nursery.start(batcher.run)
    send.close()
    events = [event async for event in receive]
    errors = {e.seq_id: e.error for e in events if e.error is not None}
    assert errors == {1: "the engine stopped", 2: "the engine stopped"}
    assert runner.is_closed  # the worker saw its plan channel close and closed its runner


async def test_closing_the_inbox_mid_generation_collects_the_steps_in_flight_first(overlap: bool) -> None:
    async with running_batcher(use_thread=True) as (batcher, inbox, runner, scheduler, router):
        runner.hold()
        runner.allow(1)
        send, receive = trio.open_memory_channel[TokenEvent](100)
        await inbox.send(submit(router, 1, send, 50))
        first = await receive.receive()
        assert first.token_ids
        await trio.testing.wait_all_tasks_blocked()  # the next step is in flight, held by the runner
        assert scheduler.num_in_flight == (2 if overlap else 1)
        inbox.close()  # engine shutdown with a step in flight: its answer must find an open channel
        await trio.testing.wait_all_tasks_blocked()
        assert scheduler.num_in_flight == (2 if overlap else 1)  # nothing moves until the runner steps
        runner.allow(2)
    events = [first] + [event async for event in receive]
    assert events[-1].error == "the engine stopped"
    assert runner.is_closed
