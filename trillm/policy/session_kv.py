"""ParkedSessions: the KV of finished interactive turns, kept under their session id for the session's next turn.

Plain Python, no Trio and no torch; the Scheduler owns one, over the same BlockManager its sequences use.

A turn that finishes with `keep_kv` parks the tokens whose KV is computed and the blocks holding them. The session's
next sequence claims them: it reuses the longest common token prefix of the parked tokens and its own, always leaving
at least one token to compute (the last position must produce logits), and the blocks past that prefix are freed.
Parked KV holds references like a running sequence, so under memory pressure the Scheduler evicts it, least recently
parked first; the session's next turn then simply recomputes from its token history. `release` frees it for good.

The one subtle rule (the shared-partial-block guard): a claim that ends inside a block continues writing that block
from the first differing position. If the block is shared — another sequence holds it, or the prefix cache has
registered it — writing into it would corrupt what the other reader sees, so the claim stops at the previous block
boundary instead and recomputes the rest into a private block.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence

import attrs

from trillm.policy.kv_blocks import BlockManager, blocks_for

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class ParkedKV:
    """A finished session turn's KV: the tokens whose KV is computed, and the blocks that hold it."""

    token_ids: tuple[int, ...]
    block_table: tuple[int, ...]


@attrs.frozen(kw_only=True)
class ClaimedKV:
    """What a new sequence of a session starts from: its first blocks and how many of its tokens they hold."""

    block_table: tuple[int, ...]
    num_reused_tokens: int


class ParkedSessions:
    """Parked session KV over one BlockManager: park, claim, evict (LRU), release."""

    def __init__(self, block_manager: BlockManager) -> None:
        self._blocks = block_manager
        self._parked: collections.OrderedDict[int, ParkedKV] = collections.OrderedDict()  # LRU first
        self._refs: collections.Counter[int] = collections.Counter()  # block id -> parked references to it
        self.num_evicted = 0

    def __len__(self) -> int:
        return len(self._parked)

    def __contains__(self, session_id: int) -> bool:
        return session_id in self._parked

    def num_idle_blocks(self) -> int:
        """Blocks that only parked sessions hold: idle sessions' KV, evictable under pressure, not load.

        Safe to call from another thread while the Scheduler runs (a gauge): the reference table is copied in one
        C-level call, and a block whose count changes meanwhile is off by one for one scrape at most.
        """
        refs = list(self._refs.items())
        return sum(1 for block_id, count in refs if self._blocks.ref_count(block_id) <= count)

    def _hold(self, parked: ParkedKV) -> ParkedKV:
        self._refs.update(parked.block_table)
        return parked

    def _drop(self, parked: ParkedKV) -> ParkedKV:
        self._refs.subtract(parked.block_table)
        for block_id in parked.block_table:
            if self._refs[block_id] <= 0:
                del self._refs[block_id]
        return parked

    def block_tables(self) -> list[tuple[int, ...]]:
        """Every parked block table (each holds one reference per block): for accounting checks."""
        return [parked.block_table for parked in self._parked.values()]

    def park(self, session_id: int, token_ids: Sequence[int], block_table: Sequence[int]) -> None:
        """Keep the KV of `token_ids` (held by the leading blocks of `block_table`); frees the rest and any older park.

        The caller hands its references over: the parked blocks are freed by `release`, `evict_lru` or a later park.
        """
        self.release(session_id)
        num_kept = blocks_for(len(token_ids), self._blocks.block_size)
        self._blocks.free(block_table[num_kept:])
        self._parked[session_id] = self._hold(
            ParkedKV(token_ids=tuple(token_ids), block_table=tuple(block_table[:num_kept])))

    def claim(self, session_id: int, token_ids: Sequence[int]) -> ClaimedKV | None:
        """Take the session's parked KV for a sequence of `token_ids`: the reusable prefix, or None if none is parked.

        The claimed blocks' references pass to the caller; parked blocks past the reused prefix are freed.
        """
        parked = self._parked.pop(session_id, None)
        if parked is None:
            return None
        self._drop(parked)
        size = self._blocks.block_size
        limit = min(len(parked.token_ids), len(token_ids) - 1)
        num_reused = 0
        while num_reused < limit and parked.token_ids[num_reused] == token_ids[num_reused]:
            num_reused += 1
        num_kept = blocks_for(num_reused, size)
        if num_reused % size and self._blocks.is_shared(parked.block_table[num_kept - 1]):
            num_kept -= 1  # the shared-partial-block guard (module docstring): never write into a shared block
            num_reused = num_kept * size
        self._blocks.free(parked.block_table[num_kept:])
        return ClaimedKV(block_table=parked.block_table[:num_kept], num_reused_tokens=num_reused)

    def unclaim(self, session_id: int, token_ids: Sequence[int], claimed: ClaimedKV) -> None:
        """Put back a claim whose sequence could not be admitted (its tokens' prefix still matches the claim)."""
        self._parked[session_id] = self._hold(ParkedKV(
            token_ids=tuple(token_ids[: claimed.num_reused_tokens]), block_table=claimed.block_table
        ))

    def evict_lru(self) -> bool:
        """Free the least recently parked session KV; False if none is parked."""
        if not self._parked:
            return False
        session_id, parked = self._parked.popitem(last=False)
        self._drop(parked)
        log.debug("evicting the parked KV of session %d (%d blocks)", session_id, len(parked.block_table))
        self._blocks.free(parked.block_table)
        self.num_evicted += 1
        return True

    def release(self, session_id: int) -> None:
        """Free the KV parked under `session_id`, if any."""
        parked = self._parked.pop(session_id, None)
        if parked is not None:
            self._drop(parked)
            self._blocks.free(parked.block_table)
