"""LiveServer for HTTP tests: hypercorn serving an app on a free loopback port, in a thread with its own Trio run.

Live servers are module-scoped fixtures (conftest.py), so tests are plain synchronous functions that talk HTTP to
it with httpx or the openai SDK. `LiveServer.call(fn, *args)` runs a synchronous function inside the server's
event loop (to read `engine.statistics()` or flip the engine's state without racing it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import hypercorn.config
import hypercorn.trio
import trio

from trillm.config import EngineConfig, ServerConfig

T = TypeVar("T")
API_KEY = "sk-test-key"


class LiveServer:
    """One app served by hypercorn on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.url = ""
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.extensions["trillm"]

    def start(self, timeout_s: float = 300.0) -> LiveServer:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("live server did not start")
        if self._error is not None:
            raise RuntimeError("live server failed to start") from self._error
        return self

    def _thread_main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.graceful_timeout = 2.0
        config.startup_timeout = 300.0  # a real engine loads its model at startup: slow on a busy CPU machine
        config.accesslog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn.trio.serve, self.app, config,
                                                shutdown_trigger=self._stop.wait))
            self.url = binds[0]
            self._ready.set()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._token is not None
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def run(self, async_fn: Callable[..., Any], *args: Any) -> Any:
        """Run `async_fn(*args)` in the server's event loop and return its result."""
        assert self._token is not None
        return trio.from_thread.run(async_fn, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                self.call(self._stop.set)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=30)


def server_config(**fields: Any) -> ServerConfig:
    return ServerConfig(engine=EngineConfig(), server_name="127.0.0.1", server_port=1, **fields)


@contextmanager
def engine_server(model: str, **engine_fields: Any) -> Iterator[LiveServer]:
    """A live server over a real Engine of `model` (model id "smol"), stopped on exit."""
    from trillm.http.app import create_app

    engine = EngineConfig(model=model, model_name="smol", **engine_fields)
    live = LiveServer(create_app(ServerConfig(engine=engine, server_name="127.0.0.1", server_port=1))).start()
    try:
        yield live
    finally:
        live.stop()


class InProcessEngineServer(LiveServer):
    """A live server over a real Engine (Batcher, Scheduler, core thread) whose rank is an in-process runner, or
    with `rank_target` a spawned stand-in rank process ("module:function", e.g. tests/actors/fake_rank.py).

    The Engine is opened inside the server's own Trio run, before hypercorn starts, and closed after it stops.
    """

    def __init__(self, config: ServerConfig, runner: Any, tokenizer: Any, rank_target: str | None = None) -> None:
        super().__init__(app=None)
        self._config = config
        self._runner = runner
        self._tokenizer = tokenizer
        self._rank_target = rank_target

    async def _serve(self) -> None:
        from trillm.actors.engine import Engine
        from trillm.http.app import create_app

        runner_factory = None if self._runner is None else (lambda _: self._runner)
        async with Engine.open(self._config.engine, runner_factory=runner_factory, tokenizer=self._tokenizer,
                               rank_target=self._rank_target) as engine:
            self.app = create_app(self._config, engine=engine)
            await super()._serve()
