"""BlockManager: the paged KV cache's block pool, with reference counts and the prefix cache's hash matching.

Plain Python, no Trio and no torch: the Scheduler owns one and is its only caller.

A block holds the KV of `block_size` consecutive positions of one sequence. Every block is in exactly one of three
states:

- free: reference count 0, no hash; in `_free` (FIFO).
- used: reference count > 0; owned by one or more sequences (or by a session's parked KV). Blocks are shared when
  several sequences reuse the same prefix-cached block.
- evictable: reference count 0 but still registered in the prefix cache under its hash; in `_evictable` in LRU order.
  A new sequence with the same prefix takes it back with `acquire`; `allocate` reuses the least recently freed one
  when the free list is empty, dropping its hash.

So `num_free_blocks` (free + evictable) + used == total at all times, and reference counts never go negative.

Prefix caching keys each *full* block by a chained hash: `hash((parent_hash, block's token ids))`, the parent being the
hash of the previous block of the same sequence (`ROOT_HASH` for the first). Equal hashes mean equal prefixes up to
and including that block (a 64-bit collision is the accepted risk, as in vLLM's default). Only blocks whose every
position has been computed are registered, and a registered block is never written again: the Scheduler never reuses
a cached block for the position that must be recomputed to produce logits.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Sequence

import attrs

log = logging.getLogger(__name__)

ROOT_HASH = 0  # parent hash of a sequence's first block


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """The prefix-cache key of a full block whose predecessor's key is `parent_hash`."""
    return hash((parent_hash, tuple(token_ids)))


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many blocks hold `num_tokens` positions."""
    return -(-num_tokens // block_size)


@attrs.frozen(kw_only=True)
class BlockManagerStats:
    """BlockManager.statistics(): a snapshot of the pool."""

    num_total_blocks: int
    block_size: int  # tokens per block
    num_free_blocks: int  # free + evictable: what `allocate` can hand out
    num_used_blocks: int
    num_cached_blocks: int  # registered in the prefix cache (used or evictable)
    num_evictable_blocks: int
    prefix_cache_queries: int  # full blocks looked up
    prefix_cache_hits: int  # full blocks found

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks if self.num_total_blocks else 0.0


class BlockManager:
    """The KV block pool of one engine: allocate, share, free, and (optionally) cache full blocks by prefix hash."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        # Insertion order = LRU order: the first key is evicted first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._hash_of_block: dict[int, int] = {}
        self._block_of_hash: dict[int, int] = {}
        self._num_queries = 0
        self._num_hits = 0

    # -- accounting --------------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0-1); evictable cached blocks count as free."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of_block

    def statistics(self) -> BlockManagerStats:
        num_free = self.num_free_blocks
        return BlockManagerStats(
            num_total_blocks=self.num_blocks,
            block_size=self.block_size,
            num_free_blocks=num_free,
            num_used_blocks=self.num_blocks - num_free,
            num_cached_blocks=len(self._block_of_hash),
            num_evictable_blocks=len(self._evictable),
            prefix_cache_queries=self._num_queries,
            prefix_cache_hits=self._num_hits,
        )

    # -- allocation --------------------------------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks with reference count 1: free ones first, then the least recently used evictable.

        Raises:
            ValueError: fewer than `num_blocks` blocks are free (callers check `can_allocate` first).
        """
        if not self.can_allocate(num_blocks):
            raise ValueError(f"cannot allocate {num_blocks} KV blocks: {self.num_free_blocks} free")
        block_ids = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                self._forget_hash(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block: one sequence starts sharing blocks another holds or the cache keeps."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                assert block_id in self._evictable, f"block {block_id} is free, not cached"
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. A block that reaches 0 becomes free, or evictable if it is cached.

        Blocks are released last to first, so a sequence's tail blocks are evicted before its head blocks (heads are
        the prefixes other requests are most likely to share).
        """
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            assert count > 0, f"block {block_id} freed more often than allocated"
            self._ref_counts[block_id] = count - 1
            if count == 1:
                if block_id in self._hash_of_block:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    # -- prefix cache ------------------------------------------------------------------------------------------------

    def cached_block(self, block_hash: int) -> int | None:
        """The block registered under `block_hash`, if any (a lookup: it takes no reference)."""
        self._num_queries += 1
        block_id = self._block_of_hash.get(block_hash)
        if block_id is not None:
            self._num_hits += 1
        return block_id

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Cached full blocks that hold a prefix of `token_ids`, each acquired: (block ids, their hashes).

        Never the block holding the last token: its position must be computed to produce logits. Empty when prefix
        caching is off.
        """
        if not self.enable_prefix_caching:
            return [], []
        size = self.block_size
        block_ids: list[int] = []
        hashes: list[int] = []
        parent = ROOT_HASH
        for index in range((len(token_ids) - 1) // size):
            block_hash = hash_block(parent, token_ids[index * size : (index + 1) * size])
            block_id = self.cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
            hashes.append(block_hash)
            parent = block_hash
        self.acquire(block_ids)
        return block_ids, hashes

    def register_full_blocks(
        self, token_ids: Sequence[int], block_table: Sequence[int], block_hashes: list[int], num_known_tokens: int
    ) -> None:
        """Register every full block among the first `num_known_tokens` positions that `block_hashes` lacks yet.

        `block_hashes` (one sequence's chain of keys, leading blocks first) is extended in place. Only positions whose
        token and KV are both known may be counted in `num_known_tokens`: a registered block is never written again.
        """
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for index in range(len(block_hashes), num_known_tokens // size):
            parent = block_hashes[-1] if block_hashes else ROOT_HASH
            block_hash = hash_block(parent, token_ids[index * size : (index + 1) * size])
            self.register(block_table[index], block_hash)
            block_hashes.append(block_hash)

    def is_shared(self, block_id: int) -> bool:
        """Whether writing into `block_id` could change what someone else reads: another holder or a cache entry."""
        return self._ref_counts[block_id] > 1 or block_id in self._hash_of_block

    def register(self, block_id: int, block_hash: int) -> None:
        """Record that `block_id` holds the full block keyed `block_hash` (no-op when prefix caching is off).

        If another block already holds the same key (two sequences computed the same prefix at once), the first one
        stays the cached copy and `block_id` remains a private block.
        """
        if not self.enable_prefix_caching or block_hash in self._block_of_hash:
            return
        assert self._ref_counts[block_id] > 0, f"block {block_id} registered while free"
        assert block_id not in self._hash_of_block, f"block {block_id} registered twice"
        self._block_of_hash[block_hash] = block_id
        self._hash_of_block[block_id] = block_hash

    def _forget_hash(self, block_id: int) -> None:
        block_hash = self._hash_of_block.pop(block_id)
        del self._block_of_hash[block_hash]

    def check_invariants(self) -> None:
        """Assert the pool's invariants (tests and debugging; O(num_blocks))."""
        assert all(count >= 0 for count in self._ref_counts)
        zero = {b for b, count in enumerate(self._ref_counts) if count == 0}
        assert zero == set(self._free) | set(self._evictable), "a block with references is free, or vice versa"
        assert not set(self._free) & set(self._evictable)
        assert len(self._free) + len(self._evictable) == len(zero)
        assert all(b in self._hash_of_block for b in self._evictable)
        assert all(self._block_of_hash[h] == b for b, h in self._hash_of_block.items())
