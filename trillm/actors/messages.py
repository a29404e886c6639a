"""Engine → Batcher commands: the messages of the BatcherActor's inbox (Trio-typed: they carry channels).

    Engine / RequestStream ──Submit / Abort──▶ BatcherActor
    SessionActor ──ReleaseSession──▶ BatcherActor

Everything that crosses into policy/ or gpu/ lives in `trillm.protocol`; these three stay in actors/ because a
`Submit` carries the sequence's own `trio.MemorySendChannel`, which only the serving process has.
"""

from __future__ import annotations

from typing import Union

import attrs
import trio

from trillm.protocol.api import FinishReason, SamplingParams
from trillm.protocol.step import TokenEvent


@attrs.frozen(kw_only=True)
class Submit:
    """Engine → Batcher, once per sequence: admit it to the waiting queue.

    `events` is the sequence's own TokenEvent channel; the Batcher sends with `send_nowait` (the buffer is bounded by
    the sequence's token budget) and treats a closed channel as an abort.
    """

    seq_id: int
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # seed already resolved to an int
    max_new_tokens: int  # resolved: min(max_tokens, window - prompt)
    events: trio.MemorySendChannel[TokenEvent]
    session_id: int | None = None
    keep_kv: bool = False


@attrs.frozen(kw_only=True)
class Abort:
    """Engine → Batcher: stop a sequence (client gone, stop string found, cancel); its blocks are freed next step."""

    seq_id: int
    reason: FinishReason = FinishReason.ABORT


@attrs.frozen(kw_only=True)
class ReleaseSession:
    """SessionActor → Batcher, when a session ends: free the KV blocks parked under `session_id`."""

    session_id: int


BatcherInbox = Union[Submit, Abort, ReleaseSession]
