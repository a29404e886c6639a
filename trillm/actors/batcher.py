"""BatcherActor: the continuous-batching loop that owns the Scheduler and drives every rank, one step at a time.

Each iteration: drain the inbox without blocking (Submit / Abort / ReleaseSession), ask the Scheduler for a plan,
send it to every worker, await every worker's StepResult (rank 0's carries the samples, the others are
acknowledgements), apply rank 0's result, and deliver the new tokens. Requests therefore join and leave the batch at
step boundaries. With nothing to run it sleeps on its inbox.

Delivery never waits on a client: each sequence's TokenEvent channel is buffered for every event it can produce
(the Engine sizes it from the token budget), so `send_nowait` suffices. A channel whose receiver is closed means the
client is gone: the sequence is aborted and its blocks are freed at once, before the next plan.

Step overlap (`enable_overlap`, the default): at most two plans are in flight. The loop dispatches plan N+1 before
it collects plan N — dispatch N, schedule and dispatch N+1, collect and apply N, schedule and dispatch N+2, collect
N+1, ... — so the ranks find their next plan waiting when they finish a step and never idle on the serving process
(pickling, the socket, Trio wake-ups, scheduling, delivery). The Scheduler plans ahead with `PREVIOUS_TOKEN`
placeholders (scheduler.py says how it reconciles). When nothing can be planned ahead (idle, or only sequences with
penalties) it collects first, which is the lockstep loop; `enable_overlap=False` always runs lockstep.

When the loop ends — its inbox closed (engine shutdown) or an exception, typically a rank's EngineDeadError
cancelling it — every live sequence gets a final TokenEvent with `error` set and its channel is closed.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence

import attrs
import trio

from trillm.protocol.step import StepPlan, StepResult, TokenEvent
from trillm.actors.messages import Abort, BatcherInbox, ReleaseSession, Submit
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
        enable_overlap: bool = True,
    ) -> None:
        assert plan_channels and len(plan_channels) == len(result_channels)
        self._scheduler = scheduler
        self._inbox = inbox
        self._plan_channels = list(plan_channels)  # rank order
        self._result_channels = list(result_channels)
        self._events: dict[int, trio.MemorySendChannel[TokenEvent]] = {}  # live seq id → its TokenEvent channel
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
                self._events[message.seq_id] = message.events
                event = self._scheduler.add(
                    message.seq_id,
                    message.prompt_token_ids,
                    message.sampling,
                    message.max_new_tokens,
                    session_id=message.session_id,
                    keep_kv=message.keep_kv,
                )
                self._deliver([event] if event is not None else [])
            case Abort():
                event = self._scheduler.abort(message.seq_id, message.reason)
                self._deliver([event] if event is not None else [])
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
        """Send events without waiting; a closed receiver aborts its sequence (the client is gone)."""
        for event in events:
            channel = self._events.get(event.seq_id)
            if channel is None:
                continue
            try:
                channel.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("seq %d: its receiver is gone, aborting", event.seq_id)
                self._scheduler.abort(event.seq_id)
                self._close(event.seq_id)
                continue
            except trio.WouldBlock:  # pragma: no cover - the Engine buffers every event a sequence can produce
                log.error("seq %d: its event buffer is full, aborting", event.seq_id)
                self._scheduler.abort(event.seq_id)
                self._close(event.seq_id)
                continue
            if event.finish_reason is not None:
                self._close(event.seq_id)

    def _close(self, seq_id: int) -> None:
        channel = self._events.pop(seq_id, None)
        if channel is not None:
            channel.close()

    def _fail_all(self, error: str) -> None:
        """Give every live sequence a final error event and close its channel (the requests fail with 503)."""
        for seq_id, channel in self._events.items():
            try:
                channel.send_nowait(TokenEvent(seq_id=seq_id, error=error))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                pass  # gone or full: closing the channel below ends the stream just the same
            channel.close()
        self._events.clear()
