"""FairShares: the waiting queue of the Scheduler, kept per client request ("share"), and the order shares are served.

Plain Python, like the Scheduler that owns it. A share is every sequence of one client request: the `n` choices of a
chat request, or the `len(prompt) * n` choices of a /v1/completions request with a list of prompts (the Engine puts
them under one key). Without shares, one request with n=128 filled every batch slot and the whole prefill budget
for as long as its choices ran, and a one-token request that came after it waited minutes for its first token.

The policy (the Scheduler applies it each step):

- Batch slots. While the batch is full and a share waits with no sequence running, the newest sequence of the share
  holding the most slots is preempted by recompute (only while that share holds more than one), so every request in
  flight runs at least one sequence whenever there are at least as many slots as requests. Admission keeps one free
  slot for each such share, so the freed slot goes to the share that had none, whatever the order below.
- Prefill budget and admission order: shares are served in order of their *virtual deadline*: the step the share
  arrived at plus the steps its remaining prefill needs at the full budget (`ceil(tokens / max_prefill_token_num)`),
  ties in arrival order. A request whose prompts fit in one step therefore goes before a request that still needs
  many, and equal requests are served first come first served (64 single prompts of 1,000 tokens: exactly as
  before). The deadline only falls as a share waits (its arrival is fixed, its remaining work shrinks), and newer
  shares get later deadlines, so a big request is overtaken only by requests that arrived before its deadline:
  nothing starves. Within a share, sequences keep their order (a preempted one goes back to the front), and a head
  that does not fit the KV pool is never skipped: admission stops for that step.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Hashable, Iterable, Iterator

import attrs

from trillm.policy.sequence import Sequence

log = logging.getLogger(__name__)

MAX_COUNTED_STEPS = 1 << 10  # a share's remaining prefill is counted up to this many full-budget steps


@attrs.define(eq=False, kw_only=True)
class Share:
    """One client request's sequences as the Scheduler sees them (mutable, owned by FairShares)."""

    key: Hashable
    arrival_step: int  # the Scheduler's step count when its first sequence was added
    order: int  # arrival order among shares (the tie-break)
    waiting: collections.deque[Sequence] = attrs.Factory(collections.deque)  # the front is admitted first
    num_running: int = 0


class FairShares:
    """Waiting sequences per share, the running count of every share, and the order shares are served in."""

    def __init__(self) -> None:
        self._shares: dict[Hashable, Share] = {}  # every share with a live sequence (waiting or running)
        self._orders = itertools.count()
        self._num_waiting = 0

    def __len__(self) -> int:
        """Sequences waiting, over all shares."""
        return self._num_waiting

    def __iter__(self) -> Iterator[Sequence]:
        for share in self._shares.values():
            yield from share.waiting

    @property
    def num_shares(self) -> int:
        return len(self._shares)

    # -- queue changes (the Scheduler calls these as sequences move) --------------------------------------------------

    def add(self, seq: Sequence, step: int) -> None:
        """A new sequence waits at the back of its share (a new share arrives at `step`)."""
        share = self._shares.get(seq.share)
        if share is None:
            share = self._shares[seq.share] = Share(key=seq.share, arrival_step=step, order=next(self._orders))
        share.waiting.append(seq)
        self._num_waiting += 1

    def requeue(self, seq: Sequence) -> None:
        """A preempted sequence waits again, at the front of its share; it no longer runs."""
        share = self._shares[seq.share]
        share.num_running -= 1
        share.waiting.appendleft(seq)
        self._num_waiting += 1

    def admitted(self, seq: Sequence) -> None:
        """The head of its share now runs."""
        share = self._shares[seq.share]
        assert share.waiting and share.waiting[0] is seq, "only a share's head is admitted"
        share.waiting.popleft()
        share.num_running += 1
        self._num_waiting -= 1

    def finished(self, seq: Sequence, *, was_running: bool) -> None:
        """A sequence left for good (finished or aborted), waiting or running; an empty share is forgotten."""
        share = self._shares[seq.share]
        if was_running:
            share.num_running -= 1
        else:
            share.waiting.remove(seq)
            self._num_waiting -= 1
        if not share.waiting and share.num_running == 0:
            del self._shares[seq.share]

    # -- policy ------------------------------------------------------------------------------------------------------

    def num_starved(self) -> int:
        """Shares with sequences waiting and none running (each is owed a batch slot)."""
        return sum(1 for share in self._shares.values() if share.waiting and share.num_running == 0)

    def largest(self) -> Share | None:
        """The share running the most sequences (the earliest of equals), if it runs more than one."""
        best = max(self._shares.values(), key=lambda share: (share.num_running, -share.order), default=None)
        return best if best is not None and best.num_running > 1 else None

    def share_of(self, seq: Sequence) -> Share:
        return self._shares[seq.share]

    def in_order(self, prefilling: Iterable[Sequence], step: int, budget: int) -> list[Share]:
        """Shares with prefill work (running sequences still prefilling, or sequences waiting), by virtual deadline.

        `prefilling`: running sequences with more than one uncomputed token; `budget`: the step's prefill budget.
        """
        remaining: dict[Hashable, int] = collections.defaultdict(int)
        for seq in prefilling:
            remaining[seq.share] += seq.num_uncomputed_tokens
        limit = budget * MAX_COUNTED_STEPS
        for share in self._shares.values():
            for seq in share.waiting:  # counted up to `limit`: a long queue costs one pass over its first entries
                if remaining[share.key] > limit:
                    break
                remaining[share.key] += len(seq.token_ids) - seq.num_computed_tokens
        candidates = [self._shares[key] for key, tokens in remaining.items() if tokens > 0]

        def deadline(share: Share) -> tuple[int, int]:
            num_steps = -(-min(remaining[share.key], limit) // budget)
            return share.arrival_step + num_steps, share.order

        return sorted(candidates, key=deadline)
