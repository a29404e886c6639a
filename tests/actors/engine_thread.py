"""EngineThread: an Engine served by its own Trio loop in a background thread, so several tests can share one.

pytest-trio runs each test in a fresh `trio.run`, so an Engine (whose rank process takes seconds to start) cannot be
a module-scoped async fixture. This helper opens it once in a thread; tests are synchronous and run coroutines in
the Engine's loop with `call` (like tests/http's LiveServer).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from trillm.actors.engine import Engine
from trillm.config import EngineConfig

T = TypeVar("T")


class EngineThread:
    """Engine.open(config) in a background thread until `stop`."""

    def __init__(self, config: EngineConfig, **open_options: Any) -> None:
        self._config = config
        self._options = open_options
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.engine: Engine | None = None
        self._thread = threading.Thread(target=self._main, name="engine-thread", daemon=True)

    def start(self, timeout_s: float = 300.0) -> EngineThread:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the engine did not start")
        if self._error is not None:
            raise RuntimeError("the engine failed to start") from self._error
        return self

    def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `function(engine, *args)` in the engine's loop and return its result."""
        assert self._token is not None and self.engine is not None
        return trio.from_thread.run(function, self.engine, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=60)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with Engine.open(self._config, **self._options) as engine:
            self.engine = engine
            self._ready.set()
            await self._stop.wait()
