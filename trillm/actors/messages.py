"""Engine → Batcher commands: the messages of the BatcherActor's inbox.

    Engine / RequestStream ──Submit / Abort / AbortMany──▶ BatcherActor
    SessionActor ──ReleaseSession──▶ BatcherActor

Everything that crosses into policy/ or gpu/ lives in `trillm.protocol`; these four are the engine's own commands,
sent from the serving loop to the engine core's loop (`core.py`).
"""

from __future__ import annotations

from typing import Union

import attrs

from trillm.protocol.api import FinishReason, SamplingParams


@attrs.frozen(kw_only=True)
class Submit:
    """Engine → Batcher, once per sequence: admit it to the waiting queue (its events go back by `seq_id`)."""

    seq_id: int
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # seed already resolved to an int
    max_new_tokens: int  # resolved: min(max_tokens, window - prompt)
    session_id: int | None = None
    keep_kv: bool = False
    share: str = ""  # the client request it belongs to, for fair scheduling (policy/fair_share.py); "": its own


@attrs.frozen(kw_only=True)
class Abort:
    """Engine → Batcher: stop a sequence (client gone, stop string found, cancel); its blocks are freed next step."""

    seq_id: int
    reason: FinishReason = FinishReason.ABORT


@attrs.frozen(kw_only=True)
class AbortMany:
    """Engine → Batcher: stop all these sequences at once (a client with many prompts left), with `abort`."""

    seq_ids: tuple[int, ...]


@attrs.frozen(kw_only=True)
class ReleaseSession:
    """SessionActor → Batcher, when a session ends: free the KV blocks parked under `session_id`."""

    session_id: int


BatcherInbox = Union[Submit, Abort, AbortMany, ReleaseSession]
