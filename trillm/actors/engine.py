"""Engine: starts and supervises the actors, and is the one API the HTTP layer calls (the `EngineClient`).

`Engine.open(config)` resolves the model, loads its tokenizer, spawns one GPUWorkerActor per tensor-parallel rank
(each owns a rank process), builds the Scheduler over the KV layout the ranks report, and starts the BatcherActor —
every actor with `await nursery.start(actor.run)`. Leaving the context shuts everything down.

Two loops. The actors run in the engine core (`core.py`): by default a thread of its own with its own Trio loop, so
the step loop never waits behind the serving loop's HTTP tasks (and tests with fake runners run it in the serving
loop instead: `use_threads=False`). The Engine's methods run in the serving loop. Commands cross to the core with
`EngineCore.call` (the Batcher's inbox); each step's TokenEvents cross back in one `to_serving` call to the
`EventRouter`, which owns every request's event channel.

Supervision. The actors run in a nursery of their own under `_supervise`. The first actor that raises (a rank died,
or a bug) marks the engine dead right there (`is_alive` False, `failure` set) before its exception cancels the
others; the Batcher, on its way out, fails every live sequence, the router then fails whatever is left, and the
request streams raise EngineDeadError with the failure. The Engine context itself stays open, so the HTTP layer keeps
answering /health with 503 and new requests with EngineDeadError until it shuts down. A failure before the engine is
ready is raised by `open`.

Requests. `generate` checks the request once (`_admit`: window, token budget; plus drain, death, occupied sessions),
resolves each choice's seed, registers `n` sequences with the router on one TokenEvent channel, submits them, and
yields a `RequestStream` (`request_stream.py`) that detokenizes and matches stop strings per choice. Leaving the
`generate` context early aborts every sequence. `interactive` runs one turn of a SessionActor, which calls back into
the same request path. Rank configuration (device, dtype and batch-size defaults) is resolved by
`gpu_worker.runner_configs`.
"""

from __future__ import annotations

import itertools
import math
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import attrs
import trio

from trillm.actors.batcher import BatcherActor
from trillm.actors.core import EngineCore, InLoopCore, ThreadCore
from trillm.actors.event_router import EventRouter
from trillm.actors.gpu_worker import (
    GPUWorkerActor,
    InProcessWorkerActor,
    resolve_device,
    runner_configs,
)
from trillm.policy.kv_blocks import BlockManager
from trillm.protocol.api import CompletionOutput, EngineStats, GenerateRequest, InteractiveTurn
from trillm.protocol.step import RankReady, StepPlan, StepResult, StepRunner, TokenEvent
from trillm.actors.messages import Abort, BatcherInbox, ReleaseSession, Submit
from trillm.actors.request_stream import Choice, RequestStream
from trillm.policy.scheduler import Scheduler
from trillm.actors.session import SessionActor
from trillm.config import DEFAULT_MODEL, RANDOM_MODEL_PREFIX, EngineConfig, RunnerConfig
from trillm.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineDrainingError,
    InvalidRequestError,
    SessionLimitError,
    SessionNotFoundError,
    SessionOccupiedError,
)
from trillm.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

log = logging.getLogger(__name__)

# The Batcher's inbox is filled from the serving loop through `run_sync_soon` callbacks, which cannot wait, so it has
# no fixed bound; what bounds it is the requests in flight (each puts at most n Submits, n Aborts and one
# ReleaseSession in it), and the Batcher drains it completely before every step.
INBOX_BUFFER = math.inf
EVENT_SLACK = 2  # per-sequence event buffer = token budget + this (the final or error event)
PLAN_BUFFER = 1  # plans a worker may hold ahead of its rank (room for step overlap, issue 4)
SHUTDOWN_TIMEOUT_S = 30.0  # how long leaving `open` waits for the actors and ranks before cancelling them
SESSION_EXPIRY_CHECK_S = 30.0  # at most this long between two looks for idle sessions
FIRST_SESSION_ID = 1 << 31  # ids `new_session_id` hands out, above those clients usually pick themselves
SEED_RANGE = 1 << 31
RunnerFactory = Callable[[RunnerConfig], StepRunner]


def _sole_exception(exc: BaseException) -> BaseException:
    """The one leaf of nested single-member exception groups (the exception itself otherwise)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextmanager
def _unwrap_single_exception() -> Iterator[None]:
    """Re-raise a group that holds exactly one Exception as that exception (Trio nurseries wrap everything)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = _sole_exception(group)
        if isinstance(leaf, Exception) and not isinstance(leaf, BaseExceptionGroup):
            raise leaf from None
        raise


def _describe(exc: BaseException) -> str:
    """The failure message of an actor's exception: its first leaf's (a group's own text says nothing)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


# -- the engine ------------------------------------------------------------------------------------------------------


def _warm_chat_template(tokenizer: Tokenizer) -> None:
    """Render one message, so the first chat request does not pay for the template's imports (transformers: ~2 s
    on the H100 host) and compilation; a template that rejects it fails later, on a real request, with its 400."""
    try:
        tokenizer.render_chat([{"role": "user", "content": "hello"}])
    except Exception:  # noqa: BLE001 - no template, or one that wants other messages: nothing to warm
        log.debug("chat template warm-up skipped", exc_info=True)


class Engine:
    """The serving engine: the HTTP layer's one entry point. Build it with `Engine.open`."""

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.model_name = config.served_model_name
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.max_model_len = 0  # known once the ranks are ready
        self.device_name = ""
        self.is_alive = True
        self.failure: str | None = None
        self.is_draining = False  # set once by `drain`: the one place that says the engine takes no new requests
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[BatcherInbox](INBOX_BUFFER)
        self._router = EventRouter(abort=self._abort_nowait)
        self._core: EngineCore | None = None
        self._batcher: BatcherActor | None = None
        self._sessions: dict[int, SessionActor] = {}
        self._seq_ids = itertools.count(1)
        self._session_ids = itertools.count(FIRST_SESSION_ID)
        self._seeds = random.Random(config.seed)
        self._num_expired_sessions = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: EngineConfig,
        *,
        runner_factory: RunnerFactory | None = None,
        tokenizer: Tokenizer | None = None,
        rank_target: str | None = None,
        use_threads: bool = True,
    ) -> AsyncIterator[Engine]:
        """Start an engine for `config`; it shuts down when the context is left.

        Args:
            runner_factory: build each rank's runner in this process instead of spawning rank processes
                (tests: a fake runner; `use_threads=False` then steps it inline on the event loop).
            tokenizer: use this tokenizer instead of loading the model's (with a runner_factory, the model is
                then not resolved at all).
            rank_target: "module:function" run as the rank process instead of its own (tests: a stand-in that speaks
                the rank protocol).

        Raises:
            ModelLoadError: the model cannot be resolved.
            EngineDeadError: a rank failed to start.
        """
        model_path = ""
        if tokenizer is None or runner_factory is None:
            model_path = await trio.to_thread.run_sync(_resolve_model, config.model, config.cache_dir)
        if tokenizer is None:
            tokenizer_path = model_path
            tokenizer_spec = config.tokenizer or (DEFAULT_MODEL if model_path.startswith(RANDOM_MODEL_PREFIX) else None)
            if tokenizer_spec is not None:
                tokenizer_path = await trio.to_thread.run_sync(_resolve_model, tokenizer_spec, config.cache_dir)
            load = partial(Tokenizer.from_folder, tokenizer_path, chat_template=config.chat_template)
            tokenizer = await trio.to_thread.run_sync(load)
            await trio.to_thread.run_sync(_warm_chat_template, tokenizer)
        configs = runner_configs(config, model_path, resolve_device(config.device))
        engine = cls(config, tokenizer)
        main = partial(engine._supervise, configs, runner_factory, rank_target, use_threads)
        with _unwrap_single_exception():
            async with trio.open_nursery() as nursery:
                core = ThreadCore() if use_threads else InLoopCore(nursery)
                engine._core = core
                await core.start(main)
                expiry = trio.CancelScope()
                nursery.start_soon(engine._expire_idle_sessions, expiry)
                try:
                    yield engine
                finally:
                    expiry.cancel()
                    try:
                        core.call(engine._inbox_send.close)  # the Batcher ends, then the workers stop their ranks
                    except trio.RunFinishedError:
                        pass  # the core has stopped already (the engine failed)
                    with trio.move_on_after(SHUTDOWN_TIMEOUT_S) as waiting:
                        await core.wait_stopped()
                    if waiting.cancelled_caught:
                        log.error("the engine did not stop within %.0f s: cancelling it", SHUTDOWN_TIMEOUT_S)
                        core.cancel()
                        await core.wait_stopped()

    # -- supervision -------------------------------------------------------------------------------------------------

    async def _supervise(
        self,
        configs: Sequence[RunnerConfig],
        runner_factory: RunnerFactory | None,
        rank_target: str | None,
        use_threads: bool,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run every actor in one nursery; a failure after start-up marks the engine dead instead of propagating."""
        is_started = False
        try:
            async with trio.open_nursery() as actors:
                plan_channels = [trio.open_memory_channel[StepPlan](PLAN_BUFFER) for _ in configs]
                result_channels = [trio.open_memory_channel[StepResult](PLAN_BUFFER) for _ in configs]
                workers = [
                    InProcessWorkerActor(runner_factory, cfg, plans, results, use_thread=use_threads)
                    if runner_factory is not None
                    else GPUWorkerActor(cfg, plans, results, target=rank_target,
                                        step_timeout_s=self.config.step_timeout_s)
                    for cfg, (_, plans), (results, _) in zip(configs, plan_channels, result_channels)
                ]
                readies = await self._start_workers(actors, workers)
                scheduler = self._build_scheduler(readies, configs[0].max_batch_size)
                self._batcher = BatcherActor(
                    scheduler,
                    self._inbox_receive,
                    [send for send, _ in plan_channels],
                    [receive for _, receive in result_channels],
                    deliver=partial(self._to_serving, self._router.deliver),
                    enable_overlap=self.config.enable_overlap,
                )
                await actors.start(self._guarded, self._batcher.run)
                is_started = True
                task_status.started()
        except Exception as exc:  # an ExceptionGroup of Exceptions too; Cancelled is not an Exception
            if not is_started:
                raise
            self._mark_dead(_describe(exc))
        finally:
            self.is_alive = False
            # Requests whose Submit never reached the Batcher have no one else to fail them.
            self._to_serving(self._router.fail_all, self.failure or "the engine stopped")

    async def _start_workers(
        self, actors: trio.Nursery, workers: Sequence[GPUWorkerActor | InProcessWorkerActor]
    ) -> list[RankReady]:
        """Start every worker at once (tensor-parallel ranks rendezvous while loading) and collect their RankReady."""
        readies: list[RankReady | None] = [None] * len(workers)

        async def start_one(index: int) -> None:
            readies[index] = await actors.start(self._guarded, workers[index].run)

        async with trio.open_nursery() as starting:
            for index in range(len(workers)):
                starting.start_soon(start_one, index)
        return [ready for ready in readies if ready is not None]

    def _build_scheduler(self, readies: Sequence[RankReady], max_batch_size: int) -> Scheduler:
        ready = readies[0]
        layout = ready.layout
        capacity = layout.num_blocks * layout.block_size
        self.max_model_len = min(ready.max_model_len, capacity)
        if self.max_model_len < ready.max_model_len and self.config.session_len is not None:
            log.warning("the KV cache holds %d tokens: max_model_len lowered from %d", capacity, ready.max_model_len)
        self.device_name = ready.device_name
        prefix_caching = self.config.enable_prefix_caching
        blocks = BlockManager(layout.num_blocks, layout.block_size, enable_prefix_caching=prefix_caching)
        log.info(
            "engine ready: %s on %s, %d KV blocks of %d tokens, max_model_len %d, max_batch_size %d",
            self.model_name, self.device_name, layout.num_blocks, layout.block_size, self.max_model_len, max_batch_size,
        )
        return Scheduler(
            blocks,
            max_batch_size=max_batch_size,
            max_prefill_token_num=self.config.max_prefill_token_num,
            max_model_len=self.max_model_len,
            eos_token_ids=tuple(self.tokenizer.eos_token_ids),
        )

    async def _guarded(
        self, run: Callable[..., Any], *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run an actor; if it raises, mark the engine dead before the exception cancels the other actors."""
        try:
            await run(task_status=task_status)
        except Exception as exc:
            self._mark_dead(_describe(exc))
            raise

    def _mark_dead(self, failure: str) -> None:
        if self.failure is None:
            log.error("the engine failed: %s", failure)
            self.failure = failure
        self.is_alive = False

    # -- requests ----------------------------------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(self.failure or "the engine has stopped")
        if self.is_draining:
            raise EngineDrainingError("the engine is draining for shutdown and accepts no new requests")

    @asynccontextmanager
    async def generate(self, request: GenerateRequest) -> AsyncIterator[AsyncIterator[CompletionOutput]]:
        """Generate `request.n` choices; yields their outputs (deltas, interleaved by `index`) as they come.

        Leaving the context before every choice finished aborts the rest.

        Raises:
            InvalidRequestError: an empty prompt, or n < 1.
            ContextLengthExceededError: the prompt leaves no room in the window.
            SessionOccupiedError: `request.session_id` names an interactive session with history.
            EngineDeadError: the engine has failed (also raised mid-stream when it fails then).
            EngineDrainingError: the engine is shutting down.
        """
        self._check_accepting()
        if request.session_id is not None:
            session = self._sessions.get(request.session_id)
            if session is not None and (session.has_history or session.is_busy):
                raise SessionOccupiedError(request.session_id)
        async with self._open_request(request) as stream:
            yield stream

    def _admit(self, request: GenerateRequest, *, hint: str = "") -> int:
        """The one admission check of every request (HTTP checks JSON shape only; lower layers assert).

        Returns the sequence's token budget: `max_tokens` capped at the room the window leaves (resolved once, here).

        Raises:
            InvalidRequestError: an empty prompt, or n < 1.
            ContextLengthExceededError: the prompt leaves no room to generate (`hint` is appended to the message).
        """
        num_prompt_tokens = len(request.prompt_token_ids)
        if num_prompt_tokens == 0:
            raise InvalidRequestError(
                f"{request.prompt_field} is empty: there is nothing to continue from", param=request.prompt_field,
                code="empty_prompt",  # the model's tokenizer made no token of it (a BOS-adding one would)
            )
        if request.n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {request.n}", param="n")
        if num_prompt_tokens >= self.max_model_len:
            raise ContextLengthExceededError(
                num_prompt_tokens, self.max_model_len, param=request.prompt_field, hint=hint
            )
        room = self.max_model_len - num_prompt_tokens
        max_tokens = request.sampling.max_tokens
        return room if max_tokens is None else min(max_tokens, room)

    @asynccontextmanager
    async def _open_request(
        self, request: GenerateRequest, *, num_history_tokens: int = 0, hint: str = ""
    ) -> AsyncIterator[RequestStream]:
        """Submit a request's sequences; yields their RequestStream and aborts what is unfinished on exit."""
        max_new_tokens = self._admit(request, hint=hint)
        prompt = request.prompt_token_ids
        sampling = request.sampling
        seed = sampling.seed if sampling.seed is not None else self._seeds.randrange(SEED_RANGE)
        send, receive = trio.open_memory_channel[TokenEvent](request.n * (max_new_tokens + EVENT_SLACK))
        seq_ids = [next(self._seq_ids) for _ in range(request.n)]
        for seq_id in seq_ids:
            self._router.register(seq_id, send.clone())
        choices = {seq_id: self._new_choice(index, request) for index, seq_id in enumerate(seq_ids)}
        submits = [
            Submit(
                seq_id=seq_id,
                prompt_token_ids=prompt,
                sampling=attrs.evolve(sampling, seed=seed + index),
                max_new_tokens=max_new_tokens,
                session_id=request.session_id,
                keep_kv=request.keep_kv,
                share=request.share_key or request.request_id,
            )
            for index, seq_id in enumerate(seq_ids)
        ]
        send.close()  # the router holds a clone per sequence: the channel ends when it has closed them all
        stream = RequestStream(
            receive,
            choices,
            num_history_tokens=num_history_tokens,
            send=self._send,
            send_nowait=self._send_nowait,
            failure=lambda: self.failure,
        )
        async with receive:
            try:
                self._send_many_nowait(submits)  # in one hop: the n choices start at the same step
                yield stream
            finally:
                stream.abort_nowait()
                self._router.unregister(seq_ids)

    def _new_choice(self, index: int, request: GenerateRequest) -> Choice:
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            prompt_token_ids=request.prompt_token_ids,
        )
        return Choice(index=index, detokenizer=detokenizer, stop=StopStringMatcher(request.stop))

    async def _send(self, message: BatcherInbox) -> None:
        """Send to the Batcher's inbox (it never waits: see INBOX_BUFFER); EngineDeadError once the core stopped."""
        self._send_nowait(message)

    def _send_nowait(self, message: BatcherInbox) -> None:
        if not self.is_alive or self._core is None:
            raise EngineDeadError(self.failure or "the engine has stopped")
        try:
            self._core.call(self._put_inbox, message)
        except trio.RunFinishedError:
            raise EngineDeadError(self.failure or "the engine has stopped") from None

    def _send_many_nowait(self, messages: Sequence[BatcherInbox]) -> None:
        """Send several messages in one hop to the core: the Batcher sees all of them before its next step."""
        if not self.is_alive or self._core is None:
            raise EngineDeadError(self.failure or "the engine has stopped")
        try:
            self._core.call(self._put_inbox_many, list(messages))
        except trio.RunFinishedError:
            raise EngineDeadError(self.failure or "the engine has stopped") from None

    def _put_inbox_many(self, messages: list[BatcherInbox]) -> None:
        for message in messages:
            self._put_inbox(message)

    def _put_inbox(self, message: BatcherInbox) -> None:
        """In the core loop: queue a message for the Batcher (never raises: it runs as a `run_sync_soon` callback)."""
        try:
            self._inbox_send.send_nowait(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if isinstance(message, Submit):  # the core is stopping: nothing will ever answer this sequence
                self._to_serving(self._router.fail, [message.seq_id], self.failure or "the engine stopped")

    def _abort_nowait(self, seq_id: int) -> None:
        """The EventRouter found a sequence's receiver gone: abort it (its KV is freed at the next step)."""
        try:
            self._send_nowait(Abort(seq_id=seq_id))
        except EngineDeadError:
            pass

    def _to_serving(self, function: Callable[..., None], *args: Any) -> None:
        assert self._core is not None
        self._core.to_serving(function, *args)

    # -- sessions ----------------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def interactive(self, turn: InteractiveTurn) -> AsyncIterator[AsyncIterator[CompletionOutput]]:
        """One turn of session `turn.session_id` (created on its first turn); outputs carry num_history_tokens.

        Raises:
            SessionBusyError: the session's previous turn is still running (409).
            SessionNotFoundError: `turn.continues` names a session this server does not hold (404).
            ContextLengthExceededError: the turn does not fit in the window; the hint says to end the session.
            InvalidRequestError, EngineDeadError, EngineDrainingError: as for `generate`.
        """
        self._check_accepting()
        session = self._sessions.get(turn.session_id)
        if turn.continues and (session is None or not session.has_history):
            raise SessionNotFoundError(turn.session_id)
        if session is None:
            if len(self._sessions) >= self.config.max_sessions:
                raise SessionLimitError(self.config.max_sessions)
            session = SessionActor(
                turn.session_id,
                tokenizer=self.tokenizer,
                open_request=self._open_request,
                send_control=self._send,
                on_end=self._forget_session,
            )
            self._sessions[turn.session_id] = session
        try:
            async with session.turn(turn) as outputs:
                yield outputs
        finally:
            if not session.has_history and not session.is_busy:
                self._forget_session(session)  # a first turn that was refused leaves nothing behind

    async def end_session(self, session_id: int) -> None:
        """Cancel the session's running turn, free its KV and forget its history (always accepted)."""
        session = self._sessions.get(session_id)
        if session is not None:
            await session.end()
        elif self.is_alive:
            await self._send(ReleaseSession(session_id=session_id))

    async def cancel_session(self, session_id: int) -> None:
        """Stop the session's running turn, if any; its output so far stays in the history (always accepted)."""
        session = self._sessions.get(session_id)
        if session is not None:
            await session.cancel()

    def new_session_id(self) -> int:
        """A session id no session uses (for session_id -1)."""
        while True:
            session_id = next(self._session_ids)
            if session_id not in self._sessions:
                return session_id

    async def _expire_idle_sessions(self, scope: trio.CancelScope) -> None:
        """End every session idle for --session-idle-timeout (checked a few times per timeout; in the serving loop)."""
        timeout_s = self.config.session_idle_timeout_s
        if not timeout_s:
            return
        with scope:
            while True:
                await trio.sleep(min(timeout_s / 4, SESSION_EXPIRY_CHECK_S))
                now = trio.current_time()
                idle = [s for s in self._sessions.values() if not s.is_busy and now - s.last_active_s >= timeout_s]
                for session in idle:  # `end` awaits the Batcher's inbox: a session may start a turn meanwhile
                    if session.is_busy or self._sessions.get(session.session_id) is not session:
                        continue
                    log.info("session %d: idle for %.0f s, ended and its KV freed (--session-idle-timeout)",
                             session.session_id, now - session.last_active_s)
                    self._num_expired_sessions += 1
                    await session.end()

    def _forget_session(self, session: SessionActor) -> None:
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]

    # -- state -------------------------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Refuse new requests (EngineDrainingError) while the ones in flight finish."""
        self.is_draining = True

    def statistics(self) -> EngineStats:
        """A snapshot of queues, KV usage and token counters."""
        assert self._batcher is not None, "statistics() before the engine is ready"
        stats = self._batcher.statistics()
        sched = stats.scheduler
        total = max(sched.blocks.num_total_blocks, 1)
        idle_usage = self._batcher.num_idle_session_blocks() / total
        return EngineStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_sessions=len(self._sessions),
            kv_usage=max(sched.blocks.usage - idle_usage, 0.0),
            session_kv_usage=idle_usage,
            num_expired_sessions=self._num_expired_sessions,
            num_free_blocks=sched.blocks.num_free_blocks,
            num_total_blocks=sched.blocks.num_total_blocks,
            prompt_tokens_total=sched.num_prompt_tokens,
            generation_tokens_total=sched.num_generated_tokens,
            computed_prompt_tokens_total=sched.num_computed_prompt_tokens,
            cached_prompt_tokens_total=sched.num_cached_prompt_tokens,
            prefix_cache_query_tokens_total=sched.blocks.prefix_cache_queries * sched.blocks.block_size,
            prefix_cache_hit_tokens_total=sched.blocks.prefix_cache_hits * sched.blocks.block_size,
            num_preemptions=sched.num_preemptions,
            steps=stats.num_steps,
        )


def _resolve_model(spec: str, cache_dir: str | None) -> str:
    """The model folder for `spec` (runs in a worker thread: GGUF conversion takes seconds the first time)."""
    # Imported here, not at the top: the loader imports torch, which tests with fake runners never need.
    from trillm.models.loader import resolve_model

    return resolve_model(spec, cache_dir=cache_dir)

