"""BatcherActor: the continuous-batching loop that owns the Scheduler and drives every rank, one step at a time.

Each iteration: drain the inbox without blocking (Submit / Abort / ReleaseSession), ask the Scheduler for a plan,
send it to every worker, await every worker's StepResult (rank 0's carries the samples, the others are
acknowledgements), apply rank 0's result, and deliver the new tokens. Requests therefore join and leave the batch at
step boundaries. With nothing to run it sleeps on its inbox.

Delivery never waits on a client: the Batcher hands each step's TokenEvents, all at once, to `deliver` (the Engine's
EventRouter, reached from the core's thread through `run_sync_soon`), which puts them in the sequences' channels
without waiting; a client that is gone comes back as an Abort in the inbox.

Step overlap (`enable_overlap`, the default): at most two plans are in flight. The loop dispatches plan N+1 before
it collects plan N — dispatch N, schedule and dispatch N+1, collect and apply N, schedule and dispatch N+2, collect
N+1, ... — so the ranks find their next plan waiting when they finish a step and never idle on the serving process
(pickling, the socket, Trio wake-ups, scheduling, delivery). The Scheduler plans ahead with `PREVIOUS_TOKEN`
placeholders (scheduler.py says how it reconciles). When nothing can be planned ahead (idle, or only sequences with
penalties) it collects first, which is the lockstep loop; `enable_overlap=False` always runs lockstep.

When the loop ends — its inbox closed (engine shutdown) or an exception, typically a rank's EngineDeadError
cancelling it — every live sequence gets a final TokenEvent with `error` set.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence

import attrs
import trio

from trillm.protocol.step import StepPlan, StepResult, TokenEvent
from trillm.actors.messages import Abort, AbortMany, BatcherInbox, ReleaseSession, Submit
from trillm.policy.scheduler import Scheduler, SchedulerStats
from trillm.errors import EngineDeadError

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class BatcherStats:
    """BatcherActor.statistics(): the Scheduler's snapshot plus step timing."""

    scheduler: SchedulerStats
    num_steps: int
    busy_s: float  # wall time spent with at least one step in flight
    last_step_s: float


class BatcherActor:
    """The engine's step loop: Scheduler in, StepPlans out to the workers, TokenEvents out to the requests."""

    def __init__(
        self,
        scheduler: Scheduler,
        inbox: trio.MemoryReceiveChannel[BatcherInbox],
        plan_channels: Sequence[trio.MemorySendChannel[StepPlan]],
        result_channels: Sequence[trio.MemoryReceiveChannel[StepResult]],
        *,
        deliver: Callable[[Sequence[TokenEvent]], None],
        enable_overlap: bool = True,
    ) -> None:
        assert plan_channels and len(plan_channels) == len(result_channels)
        self._scheduler = scheduler
        self._inbox = inbox
        self._plan_channels = list(plan_channels)  # rank order
        self._result_channels = list(result_channels)
        self._deliver_events = deliver
        self._live: set[int] = set()  # seq ids submitted and not finished
        self._max_in_flight = 2 if enable_overlap else 1
        self._in_flight: collections.deque[StepPlan] = collections.deque()  # dispatched, not collected; oldest first
        self._busy_since = 0.0
        self._num_steps = 0
        self._busy_s = 0.0
        self._last_step_s = 0.0

    def statistics(self) -> BatcherStats:
        return BatcherStats(
            scheduler=self._scheduler.statistics(),
            num_steps=self._num_steps,
            busy_s=self._busy_s,
            last_step_s=self._last_step_s,
        )

    def num_idle_session_blocks(self) -> int:
        """KV blocks only idle sessions hold (read from the serving loop for gauges; see ParkedSessions)."""
        return self._scheduler.num_idle_session_blocks()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Loop until the inbox closes; on the way out, fail every live sequence and close the plan channels."""
        try:
            async with self._inbox:
                task_status.started()
                await self._loop()
        finally:
            self._fail_all("the engine stopped")
            for plans in self._plan_channels:
                plans.close()
            for results in self._result_channels:
                results.close()

    async def _loop(self) -> None:
        while True:
            if not self._drain_inbox():
                await self._settle()
                return
            plan = self._scheduler.schedule() if len(self._in_flight) < self._max_in_flight else None
            if plan is not None:
                if not self._in_flight:
                    self._busy_since = time.perf_counter()
                self._in_flight.append(plan)
                await self._dispatch(plan)
                if len(self._in_flight) < self._max_in_flight:
                    continue  # plan the next step ahead before collecting this one
            if not self._in_flight:
                try:
                    message = await self._inbox.receive()
                except trio.EndOfChannel:
                    return
                self._handle(message)
                continue
            oldest = self._in_flight[0]
            result = await self._collect(oldest)
            self._in_flight.popleft()
            # Only this task touches the Scheduler, so nothing changed it while we awaited the ranks; messages that
            # arrived meanwhile wait in the inbox until the next drain.
            now = time.perf_counter()
            self._last_step_s = now - self._busy_since  # since the previous collection (or the first dispatch)
            self._busy_s += self._last_step_s
            self._busy_since = now
            self._num_steps += 1
            self._deliver(self._scheduler.apply(result))

    async def _settle(self) -> None:
        """Collect the plans still in flight (the inbox closed): the workers must not answer into a closed channel."""
        while self._in_flight:
            await self._collect(self._in_flight.popleft())

    def _drain_inbox(self) -> bool:
        """Handle every message already in the inbox; False once the inbox is closed and empty."""
        while True:
            try:
                message = self._inbox.receive_nowait()
            except trio.WouldBlock:
                return True
            except trio.EndOfChannel:
                return False
            self._handle(message)

    def _handle(self, message: BatcherInbox) -> None:
        match message:
            case Submit():
                self._live.add(message.seq_id)
                event = self._scheduler.add(
                    message.seq_id,
                    message.prompt_token_ids,
                    message.sampling,
                    message.max_new_tokens,
                    session_id=message.session_id,
                    keep_kv=message.keep_kv,
                    share=message.share or None,
                )
                self._deliver([event] if event is not None else [])
            case Abort():
                event = self._scheduler.abort(message.seq_id, message.reason)
                self._deliver([event] if event is not None else [])
            case AbortMany():
                events = (self._scheduler.abort(seq_id) for seq_id in message.seq_ids)
                self._deliver([event for event in events if event is not None])
            case ReleaseSession():
                self._scheduler.release_session(message.session_id)
            case _:  # pragma: no cover
                raise AssertionError(f"unexpected batcher message {message!r}")

    async def _dispatch(self, plan: StepPlan) -> None:
        """Send the plan to every rank (each worker owns its rank's pipe and answers in order)."""
        for rank, channel in enumerate(self._plan_channels):
            try:
                await channel.send(plan)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise EngineDeadError(f"rank {rank}'s worker has stopped") from None

    async def _collect(self, plan: StepPlan) -> StepResult:
        """Await every rank's answer to `plan`; rank 0's carries the samples."""
        results = []
        for rank, channel in enumerate(self._result_channels):
            try:
                result = await channel.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise EngineDeadError(f"rank {rank}'s worker has stopped") from None
            assert result.step_id == plan.step_id, f"rank {rank} answered step {result.step_id} for {plan.step_id}"
            results.append(result)
        return results[0]

    def _deliver(self, events: Sequence[TokenEvent]) -> None:
        """Hand events to the requests (one call for a whole step); finished sequences leave the live set."""
        if not events:
            return
        for event in events:
            if event.finish_reason is not None:
                self._live.discard(event.seq_id)
        self._deliver_events(events)

    def _fail_all(self, error: str) -> None:
        """Give every live sequence a final error event (the requests fail with 503)."""
        if self._live:
            self._deliver_events([TokenEvent(seq_id=seq_id, error=error) for seq_id in sorted(self._live)])
        self._live.clear()
