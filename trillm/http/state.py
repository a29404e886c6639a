"""ServerState: what one app holds between requests — the Engine, the drain flag, in-flight requests, metrics.

The Engine is either injected (tests, embedding) or opened by the app: `run_engine` enters `Engine.open` in the
app's nursery at startup and leaves it at shutdown. An Engine context that fails while serving does not take the
app's nursery down with it: the failure is recorded, /health turns 503 and every request gets 503.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import cast

import trio
from quart import current_app
from quart_trio import QuartTrio

from trillm.config import ServerConfig
from trillm.errors import EngineDeadError, EngineDrainingError, ModelNotFoundError
from trillm.http.limits import RequestLimits
from trillm.http.listening import ListenQueueWatch
from trillm.http.metrics import ServerMetrics
from trillm.http.schemas import encode
from trillm.http.streams import ChoiceStream, OutputSource
from trillm.protocol.api import EngineClient, EngineStats

log = logging.getLogger(__name__)

END_FLUSH_S = 2.0  # how long ended requests get to send their last events at the drain deadline


class ServerState:
    """Per-app server state; views reach it with `current_state()`."""

    def __init__(self, config: ServerConfig, engine: EngineClient | None = None) -> None:
        self.config = config
        self.engine = engine  # the Engine, or any EngineClient (tests inject a FakeEngine)
        self.is_engine_owned = engine is None
        self.failure: str | None = None  # why the Engine context ended while serving (a detail for error bodies)
        self.num_in_flight = 0
        self._streams: set[ChoiceStream] = set()  # every open request's stream (the drain deadline ends them)
        self._idle = trio.Event()
        self._idle.set()
        self._closing = trio.Event()
        self._closed = trio.Event()
        self.listen_watch = ListenQueueWatch(config.backlog)
        self.limits = RequestLimits.from_config(config)
        self.metrics = ServerMetrics(self._read_stats, self._model_name, lambda: self.listen_watch.num_dropped)

    # ---------------------------------------------------------------- engine lifetime

    async def run_engine(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the Engine, report ready, and hold it open until `close_engine` (runs in the app's nursery).

        Raises:
            whatever `Engine.open` raises before the engine is ready (startup then fails loudly).
        """
        from trillm.actors.engine import Engine  # imported late: building an app (tests, docs) needs no engine

        is_started = False
        try:
            async with Engine.open(self.config.engine) as engine:
                self.engine = engine
                log.info("engine ready: %s (max_model_len %d) on %s", engine.model_name, engine.max_model_len,
                         engine.device_name)
                task_status.started()
                is_started = True
                await self._closing.wait()
        except Exception as exc:
            if not is_started:
                raise
            self.failure = f"engine stopped: {exc!r}"
            log.exception("engine failed while serving")
        finally:
            self._closed.set()

    async def close_engine(self) -> None:
        """Ask `run_engine` to leave the Engine context and wait until it has."""
        self._closing.set()
        if self.is_engine_owned and self.engine is not None:
            await self._closed.wait()

    def _read_stats(self) -> EngineStats | None:
        return self.engine.statistics() if self.engine is not None else None

    def _model_name(self) -> str:
        return self.engine.model_name if self.engine is not None else ""

    @property
    def is_alive(self) -> bool:
        return self.engine is not None and self.engine.is_alive  # liveness is the engine's, as is draining

    def failure_reason(self) -> str:
        if self.engine is None:
            return "The engine is not running"
        return self.failure or self.engine.failure or "The engine has failed"

    def engine_for_request(self, model: str | None = None) -> EngineClient:
        """The engine, checked for a new request.

        Raises:
            EngineDrainingError: the server is shutting down (503).
            EngineDeadError: the engine failed (503).
            ModelNotFoundError: `model` is set and is not the served model (404).
        """
        if self.is_draining:
            raise EngineDrainingError("The server is shutting down and accepts no new requests")
        if not self.is_alive or self.engine is None:
            raise EngineDeadError(self.failure_reason())
        if model is not None and model != self.engine.model_name:
            raise ModelNotFoundError(model)
        return self.engine

    def engine_for_control(self) -> EngineClient:
        """The engine for a session cancel or end, which are always accepted (also while draining).

        Raises:
            EngineDeadError: there is no engine at all (503).
        """
        if self.engine is None:
            raise EngineDeadError(self.failure_reason())
        return self.engine

    # ---------------------------------------------------------------- in-flight requests and draining

    async def open_stream(self, sources: list[tuple[int, OutputSource]]) -> ChoiceStream:
        """Start the Engine requests of one HTTP request in the app's nursery; counted until the stream closes."""
        app = cast(QuartTrio, current_app)
        stream = await ChoiceStream.open(app.nursery, sources)
        self.num_in_flight += 1
        self._streams.add(stream)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        stream.on_close = partial(self._request_done, stream)
        return stream

    def _request_done(self, stream: ChoiceStream) -> None:
        self._streams.discard(stream)
        self.num_in_flight -= 1
        if self.num_in_flight == 0:
            self._idle.set()

    @property
    def is_draining(self) -> bool:
        return self.engine is not None and self.engine.is_draining

    def drain(self) -> None:
        """Refuse new requests with 503 from now on (the engine's drain); requests in flight run to completion."""
        if self.engine is not None and not self.engine.is_draining:
            log.info("draining: %d request(s) in flight", self.num_in_flight)
            self.engine.drain()

    def truncate_for_log(self, value: object) -> str:
        """A prompt (text, messages or token ids) as log text, cut to --max-log-len characters."""
        text = value if isinstance(value, str) else encode(value).decode()
        limit = self.config.max_log_len
        if limit is None or len(text) <= limit:
            return repr(text)
        return f"{text[:limit]!r}... ({len(text)} chars)"

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()

    async def end_in_flight(self, reason: str, *, flush_s: float = END_FLUSH_S) -> int:
        """The drain deadline: end every request still in flight, then give their answers `flush_s` to go out.

        Their sequences are aborted; a streamed response ends with finish_reason `abort` for each unfinished choice,
        an error event (503 `server_draining`) and `[DONE]`; a non-streamed one is answered with that 503 body.
        Returns how many requests were ended.
        """
        streams = list(self._streams)
        if streams:
            log.warning("drain deadline: ending %d request(s) still in flight", len(streams))
        for stream in streams:
            stream.fail(EngineDrainingError(reason))
        with trio.move_on_after(flush_s):
            await self.wait_idle()
        return len(streams)


def current_state() -> ServerState:
    """The ServerState of the app handling the current request."""
    state: ServerState = current_app.extensions["trillm"]
    return state
