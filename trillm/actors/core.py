"""EngineCore: where the engine's step loop runs — its own thread and Trio loop, or (tests) the serving loop itself.

The step loop (BatcherActor + GPUWorkerActors) is on the critical path of every token: a rank's answer must be read,
applied, and the next plan written before the rank runs out of work. In the serving loop that path is several task
hops, and each hop waits its turn behind every runnable HTTP task. With 256 streams that is hundreds of tasks per
step (request streams, SSE generators, socket sends), and on a slow host CPU the steps stretched from 25 ms to 140 ms
(bench/host_path.py, null rank, 2-core VM: 0.25x of the engine alone). So the core runs in a thread of its own with
its own Trio loop, where the only tasks are the Batcher and its workers: a step's hops take microseconds, and the
serving loop's load can slow the streams' delivery but not the engine. Both loops are Python, so they share the GIL;
a waiting thread gets it within the switch interval (lowered to `SWITCH_INTERVAL_S` while a core thread runs).

The loops talk only through `run_sync_soon`, thread-safe and non-blocking both ways:
- serving → core (`call`): the Batcher's inbox commands (Submit, Abort, ReleaseSession);
- core → serving (`to_serving`): each step's TokenEvents for the EventRouter, readiness, and the end of the core.
Plain reads of the core's counters (`statistics()`) cross without a hop: each field is read atomically under the GIL.

`InLoopCore` has the same interface and runs everything in the serving loop (the step loop of tests with fake
runners, which rely on Trio's deterministic scheduling in one loop).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.001  # GIL hand-over bound while the core thread runs (CPython's default is 5 ms)
CoreMain = Callable[..., Awaitable[None]]  # async (*, task_status) -> None: runs the actors until they stop


class EngineCore(Protocol):
    """Runs the engine's step loop and carries calls between it and the serving loop."""

    async def start(self, main: CoreMain) -> None: ...

    def call(self, function: Callable[..., None], *args: Any) -> None: ...

    def to_serving(self, function: Callable[..., None], *args: Any) -> None: ...

    def cancel(self) -> None: ...

    async def wait_stopped(self) -> None: ...


class ThreadCore:
    """The step loop in a thread of its own, with its own `trio.run` (module docstring)."""

    def __init__(self) -> None:
        self._serving_token = trio.lowlevel.current_trio_token()
        self._core_token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._is_started = False
        self._settled = trio.Event()  # serving loop: started, or stopped before that
        self._stopped = trio.Event()  # serving loop: the core's trio.run has returned
        self._previous_switch_interval = sys.getswitchinterval()

    async def start(self, main: CoreMain) -> None:
        """Start `main` in the core thread; return once it reports started, or raise what it raised before that."""
        sys.setswitchinterval(min(SWITCH_INTERVAL_S, self._previous_switch_interval))
        thread = threading.Thread(target=self._thread_main, args=(main,), name="trillm-engine-core", daemon=True)
        thread.start()
        await self._settled.wait()
        if not self._is_started:
            assert self._error is not None
            raise self._error

    def call(self, function: Callable[..., None], *args: Any) -> None:
        """Run `function(*args)` soon in the core loop; it must not raise. RunFinishedError once the core stopped."""
        if self._core_token is None:
            raise trio.RunFinishedError("the engine core is not running")
        self._core_token.run_sync_soon(function, *args)

    def to_serving(self, function: Callable[..., None], *args: Any) -> None:
        """From the core thread: run `function(*args)` soon in the serving loop (dropped once that loop has ended)."""
        try:
            self._serving_token.run_sync_soon(function, *args)
        except trio.RunFinishedError:
            pass

    def cancel(self) -> None:
        """Cancel the core's actors (shutdown that took too long)."""
        try:
            self.call(self._cancel_in_core)
        except trio.RunFinishedError:
            pass

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- the core thread ---------------------------------------------------------------------------------------------

    def _thread_main(self, main: CoreMain) -> None:
        try:
            trio.run(self._core_main, main)
        except BaseException as exc:  # reported to the serving loop: a start-up failure is raised by `start`
            self._error = exc
        finally:
            self._core_token = None
            self.to_serving(self._on_stopped)

    async def _core_main(self, main: CoreMain) -> None:
        self._core_token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(main)
                self.to_serving(self._on_started)

    def _cancel_in_core(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    # -- serving-loop callbacks --------------------------------------------------------------------------------------

    def _on_started(self) -> None:
        self._is_started = True
        self._settled.set()

    def _on_stopped(self) -> None:
        sys.setswitchinterval(self._previous_switch_interval)
        self._settled.set()
        self._stopped.set()


class InLoopCore:
    """The step loop as tasks of the serving loop itself (tests with fake runners: one deterministic loop)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    async def start(self, main: CoreMain) -> None:
        await self._nursery.start(self._run, main)

    async def _run(self, main: CoreMain, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                await main(task_status=task_status)
        finally:
            self._stopped.set()

    def call(self, function: Callable[..., None], *args: Any) -> None:
        if self._stopped.is_set():
            raise trio.RunFinishedError("the engine core is not running")
        function(*args)

    def to_serving(self, function: Callable[..., None], *args: Any) -> None:
        function(*args)

    def cancel(self) -> None:
        self._scope.cancel()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
