"""EventRouter: the TokenEvent channel of every sequence in flight, on the HTTP side of the engine.

The Batcher produces each step's TokenEvents in the engine core's loop (`core.py`); the router hands them to the
requests, in the serving loop where the requests' channels live: once per step, one call carries all of that step's
events (`deliver`), and each goes to its sequence's channel with `send_nowait` (the Engine sizes every channel for
all the events its sequence can produce, so nothing ever waits on a slow client). A sequence's channel is closed after
its final event. A channel whose receiver is gone means the client left: the router drops it and asks the Engine to
abort the sequence, which frees its KV blocks at the Batcher's next step.

Everything here runs in the serving loop, synchronously, and never raises: it is called through
`run_sync_soon` from the core's thread, where an exception would end the Trio run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import trio

from trillm.protocol.step import TokenEvent

log = logging.getLogger(__name__)


class EventRouter:
    """seq_id → the TokenEvent channel of a live sequence; routes each step's events and fails what is left."""

    def __init__(self, abort: Callable[[int], None]) -> None:
        self._channels: dict[int, trio.MemorySendChannel[TokenEvent]] = {}
        self._abort = abort

    def __len__(self) -> int:
        return len(self._channels)

    def register(self, seq_id: int, channel: trio.MemorySendChannel[TokenEvent]) -> None:
        self._channels[seq_id] = channel

    def unregister(self, seq_ids: Iterable[int]) -> None:
        """Forget sequences whose request ended (their channels are closed; late events are dropped)."""
        for seq_id in seq_ids:
            channel = self._channels.pop(seq_id, None)
            if channel is not None:
                channel.close()

    def deliver(self, events: Sequence[TokenEvent]) -> None:
        """Send each event to its sequence's channel; close a channel after its final event."""
        for event in events:
            channel = self._channels.get(event.seq_id)
            if channel is None:
                continue  # the request already ended
            try:
                channel.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("seq %d: its receiver is gone, aborting", event.seq_id)
                self._drop(event.seq_id)
                self._abort(event.seq_id)
                continue
            except trio.WouldBlock:  # pragma: no cover - the Engine buffers every event a sequence can produce
                log.error("seq %d: its event buffer is full, aborting", event.seq_id)
                self._drop(event.seq_id)
                self._abort(event.seq_id)
                continue
            if event.finish_reason is not None or event.error is not None:
                self._drop(event.seq_id)

    def fail(self, seq_ids: Iterable[int], error: str) -> None:
        """Give these sequences a final error event (their requests fail with 503) and close their channels."""
        self.deliver([TokenEvent(seq_id=seq_id, error=error) for seq_id in list(seq_ids)])

    def fail_all(self, error: str) -> None:
        """Fail every sequence still routed (the engine core stopped)."""
        self.fail(self._channels, error)

    def _drop(self, seq_id: int) -> None:
        channel = self._channels.pop(seq_id, None)
        if channel is not None:
            channel.close()
