"""ChoiceStream: the merged outputs of the Engine requests that serve one HTTP request.

One HTTP request may need several Engine requests (a completion with a list of prompts), and a streamed response
is produced by an async generator that Quart iterates after the view has returned. A nursery inside that
generator would be unsafe (a generator suspended at `yield` inside a nursery, or finalized by the garbage
collector, breaks Trio's cancel-scope nesting), so each Engine request runs in a pump task in the app's nursery:

    view ──nursery.start(pump)──▶ pump: async with engine.generate(req) ─┐  admission errors (400/409/503) are
                                                                          │  raised by nursery.start in the view
    body generator ◀──(choice_index, CompletionOutput)── channel ◀────────┘  outputs, or an exception, after that

`ChoiceStream.close()` is synchronous (abort the sources' sequences, cancel the pumps' scopes, close the receive
end), so it is safe from a generator's `finally` in any task. It aborts every source's sequences itself, at once
(`AbortableOutputs.abort_nowait`, where the engine's stream has it), rather than leaving that to each pump's exit:
a completion with 800 prompts has 800 pumps, and the serving loop takes a third of a second to unwind them, while
the engine would go on stepping the sequences not aborted yet. Their KV blocks are freed at the next engine step.
Pumps never let an exception escape into the app's nursery: after admission, every exception goes through the
channel to the consumer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from trillm.protocol.api import AbortableOutputs, CompletionOutput

log = logging.getLogger(__name__)

OutputSource = Callable[[], AbstractAsyncContextManager[AsyncIterator[CompletionOutput]]]
Item = tuple[int, CompletionOutput]


class ChoiceStream:
    """(choice_index, CompletionOutput) pairs of several Engine requests, in arrival order.

    Each source's `CompletionOutput.index` is offset by that source's base index (prompt index × n).
    """

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Item | BaseException](0)
        self._scopes: list[trio.CancelScope] = []
        self._outputs: list[AbortableOutputs] = []  # the sources' iterators that can abort synchronously
        self._is_closed = False
        self._failure: BaseException | None = None  # set by `fail`: raised to the consumer once the pumps stop
        self.on_close: Callable[[], None] | None = None

    @classmethod
    async def open(cls, nursery: trio.Nursery, sources: Sequence[tuple[int, OutputSource]]) -> ChoiceStream:
        """Start one pump per (base index, source); returns once every source has admitted its request.

        Raises:
            whatever a source raises on entry (ContextLengthExceededError, SessionBusyError, EngineDrainingError,
            ...); the pumps already started are cancelled first.
        """
        stream = cls()
        try:
            async with stream._send:  # each pump holds a clone; the receive end ends when the last one closes
                for base_index, source in sources:
                    scope = trio.CancelScope()
                    stream._scopes.append(scope)
                    await nursery.start(stream._pump, base_index, source, scope, stream._send.clone())
        except BaseException:
            stream.close()
            raise
        return stream

    async def _pump(self, base_index: int, source: OutputSource, scope: trio.CancelScope,
                    send: trio.MemorySendChannel[Item | BaseException],
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope, send:
            is_started = False
            try:
                async with source() as outputs:
                    if isinstance(outputs, AbortableOutputs):
                        self._outputs.append(outputs)
                    task_status.started()
                    is_started = True
                    async for output in outputs:
                        await send.send((base_index + output.index, output))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if not is_started:
                    raise
            except Exception as exc:
                if not is_started:
                    raise
                log.debug("request failed after admission: %r", exc)
                try:
                    await send.send(exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the consumer is gone; nothing to report to

    def __aiter__(self) -> ChoiceStream:
        return self

    async def __anext__(self) -> Item:
        """The next output.

        Raises:
            the exception a pump hit after admission (e.g. EngineDeadError).
        """
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self.close()
            if self._failure is not None:
                raise self._failure from None
            raise StopAsyncIteration from None
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    async def collect(self) -> list[Item]:
        """Every output until all sources finish (closes the stream, also when cancelled)."""
        try:
            return [item async for item in self]
        finally:
            self.close()

    def fail(self, exc: BaseException) -> None:
        """End the stream early with `exc` (the drain deadline): the pumps abort their sequences, and the consumer
        gets `exc` once they have stopped, instead of the rest of the outputs. Synchronous; no-op once closed."""
        if self._is_closed or self._failure is not None:
            return
        self._failure = exc
        self._abort_and_cancel()

    def _abort_and_cancel(self) -> None:
        batch: list[Any] = []  # every sequence stops at the same engine step, not as each pump unwinds
        for outputs in self._outputs:
            outputs.abort_nowait(batch)
        if batch:
            self._outputs[0].send_batch_nowait(batch)  # the sources of one request share one engine
        for scope in self._scopes:
            scope.cancel()

    def close(self) -> None:
        """Cancel the pumps (aborting their sequences) and stop receiving. Idempotent and synchronous."""
        if self._is_closed:
            return
        self._is_closed = True
        self._abort_and_cancel()
        self._receive.close()
        if self.on_close is not None:
            self.on_close()

