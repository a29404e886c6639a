"""Sequence: the Scheduler's mutable state of one request's sequence, from waiting to finished.

Plain Python. Only the Scheduler (inside the BatcherActor) holds these; ranks get frozen `SeqStep` snapshots of them
in each `StepPlan`, never the objects themselves.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable

import attrs

from trillm.protocol.api import SamplingParams, TokenLogprob


class SeqStatus(enum.Enum):
    """Where a sequence is in its life: waiting → running ⇄ preempted (waiting again) → finished."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@attrs.define(eq=False, kw_only=True)
class Sequence:
    """The Scheduler's mutable state of one sequence (never leaves the Batcher; plans carry snapshots)."""

    seq_id: int
    num_prompt_tokens: int
    sampling: SamplingParams
    max_new_tokens: int
    share: Hashable  # the client request it belongs to (fair_share.py): its n choices, or all of its prompts
    session_id: int | None = None
    keep_kv: bool = False
    token_ids: list[int]  # prompt + outputs so far
    block_table: list[int] = attrs.Factory(list)
    block_hashes: list[int] = attrs.Factory(list)  # prefix-cache keys of the leading full, computed blocks
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused (parked or prefix-cached KV) at first admission
    status: SeqStatus = SeqStatus.WAITING
    is_admitted: bool = False  # admitted at least once
    num_pending: int = 0  # samples in flight for it (planned, not applied yet): 0 in lockstep between steps
    prompt_logprobs: list[TokenLogprob] = attrs.Factory(list)  # of prompt tokens 1, 2, ... (asked for, computed)
    is_prompt_logprobs_sent: bool = False  # they go out once, on the sequence's first event
    needs_grammar_replay: bool = True  # a grammar-constrained sequence's next sample must resend its outputs

    @property
    def num_tokens(self) -> int:
        """Known tokens plus the ones sampled by plans in flight (their ids are not known yet)."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def output_token_ids(self) -> tuple[int, ...]:
        return tuple(self.token_ids[self.num_prompt_tokens :])
