"""Wire: the one framing of the rank socket, used by both ends (sans-IO: it never touches a socket itself).

A frame is an 8-byte little-endian unsigned payload length, then `pickle.dumps(message, protocol=5)`. The serving
process (`actors/gpu_worker.py`, Trio streams) and the rank process (`gpu/rank.py`, a blocking socket) each do their
own I/O and call `encode_frame` to write and a `FrameDecoder` to read, so the format is written down exactly once.
Both ends are the same trusted program (the rank is our own child process over a private socket pair): pickle is
safe here and carries the frozen attrs messages of `protocol/step.py` and `config.RunnerConfig` as they are.
"""

from __future__ import annotations

import operator
import pickle
import struct
from typing import Any, TypeVar

import attrs

T = TypeVar("T")
HEADER = struct.Struct("<Q")
READ_CHUNK_BYTES = 1 << 16  # how much a reader asks its stream for at a time (at least what the frame still needs)


def compact_pickle(cls: type[T]) -> type[T]:
    """Pickle a frozen attrs class as the tuple of its fields (apply above `@attrs.frozen`).

    attrs pickles slotted classes through a dict built field by field in Python; a StepPlan of 256 sequences holds
    about 800 such objects, and the serving process encodes one every step while holding the GIL. `attrgetter` of
    every field is one C call: encoding such a plan takes about a third less time, and the frames are half the size.
    """
    names = tuple(field.name for field in attrs.fields(cls))  # type: ignore[arg-type]
    assert len(names) > 1, "a one-field class pickles its value, not a tuple: leave it to attrs"
    state_of = operator.attrgetter(*names)

    def getstate(self: object) -> tuple[Any, ...]:
        return state_of(self)

    def setstate(self: object, state: tuple[Any, ...]) -> None:
        for name, value in zip(names, state, strict=True):
            object.__setattr__(self, name, value)

    setattr(cls, "__getstate__", getstate)
    setattr(cls, "__setstate__", setstate)
    return cls


def encode_frame(message: Any) -> bytes:
    """The bytes of one frame holding `message`."""
    payload = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Turns received bytes back into messages: `feed` what arrived, then `next_message` until it returns None."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._length: int | None = None  # payload length of the frame being read, once its header is in

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    @property
    def num_missing_bytes(self) -> int:
        """How many more bytes the frame being read needs at least (a reader's hint for its next receive)."""
        if self._length is None:
            return max(HEADER.size - len(self._buffer), 0) or 1
        return max(HEADER.size + self._length - len(self._buffer), 1)

    def next_message(self) -> Any | None:
        """The next complete message, or None until more bytes are fed. (A message is never None itself.)"""
        if self._length is None:
            if len(self._buffer) < HEADER.size:
                return None
            (self._length,) = HEADER.unpack_from(self._buffer)
        end = HEADER.size + self._length
        if len(self._buffer) < end:
            return None
        message = pickle.loads(memoryview(self._buffer)[HEADER.size : end])
        del self._buffer[:end]
        self._length = None
        return message
