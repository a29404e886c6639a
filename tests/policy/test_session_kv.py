"""ParkedSessions: park, claim (longest common prefix, the shared-partial-block guard), unclaim, LRU eviction."""

from __future__ import annotations

from trillm.policy.kv_blocks import BlockManager, hash_block
from trillm.policy.session_kv import ClaimedKV, ParkedSessions

SIZE = 4
TOKENS = tuple(range(100, 110))  # 10 tokens: blocks 0 and 1 full, block 2 holds 2


def parked(*, prefix_caching: bool = False) -> tuple[BlockManager, ParkedSessions, list[int]]:
    """A session 7 parked with TOKENS in 3 freshly allocated blocks."""
    manager = BlockManager(8, SIZE, enable_prefix_caching=prefix_caching)
    sessions = ParkedSessions(manager)
    blocks = manager.allocate(3)
    sessions.park(7, TOKENS, blocks)
    return manager, sessions, blocks


def test_claim_reuses_the_common_prefix_and_frees_the_rest() -> None:
    manager, sessions, blocks = parked()
    claimed = sessions.claim(7, TOKENS[:6] + (700, 701))
    assert claimed == ClaimedKV(block_table=tuple(blocks[:2]), num_reused_tokens=6)
    assert [manager.ref_count(b) for b in blocks] == [1, 1, 0]
    assert 7 not in sessions and sessions.claim(7, TOKENS) is None


def test_claim_always_leaves_the_last_token_to_compute() -> None:
    _, sessions, blocks = parked()
    assert sessions.claim(7, TOKENS) == ClaimedKV(block_table=tuple(blocks), num_reused_tokens=9)


def test_claim_stops_at_the_block_boundary_when_the_partial_block_is_cached() -> None:
    manager, sessions, blocks = parked(prefix_caching=True)
    manager.register(blocks[1], hash_block(hash_block(0, TOKENS[:4]), TOKENS[4:8]))
    claimed = sessions.claim(7, TOKENS[:6] + (700, 701))
    assert claimed == ClaimedKV(block_table=(blocks[0],), num_reused_tokens=4)  # block 1 is never written again
    assert [manager.ref_count(b) for b in blocks] == [1, 0, 0]
    assert manager.is_cached(blocks[1])


def test_claim_stops_at_the_block_boundary_when_another_sequence_holds_the_partial_block() -> None:
    manager, sessions, blocks = parked()
    manager.acquire([blocks[1]])  # a live sequence reads block 1 too
    claimed = sessions.claim(7, TOKENS[:6] + (700, 701))
    assert claimed == ClaimedKV(block_table=(blocks[0],), num_reused_tokens=4)
    assert [manager.ref_count(b) for b in blocks] == [1, 1, 0]


def test_claim_ending_on_a_block_boundary_keeps_shared_blocks() -> None:
    manager, sessions, blocks = parked(prefix_caching=True)
    manager.register(blocks[1], hash_block(hash_block(0, TOKENS[:4]), TOKENS[4:8]))
    claimed = sessions.claim(7, TOKENS[:8] + (700,))
    assert claimed == ClaimedKV(block_table=tuple(blocks[:2]), num_reused_tokens=8)  # written from block 2 on


def test_unclaim_parks_the_claimed_prefix_again() -> None:
    _, sessions, blocks = parked()
    tokens = TOKENS[:6] + (700, 701)
    claimed = sessions.claim(7, tokens)
    assert claimed is not None
    sessions.unclaim(7, tokens, claimed)
    assert sessions.claim(7, tokens) == claimed


def test_evict_lru_frees_the_least_recently_parked_session_first() -> None:
    manager, sessions, blocks = parked()
    other = manager.allocate(1)
    sessions.park(8, (1, 2), other)
    assert sessions.evict_lru() and 7 not in sessions and 8 in sessions
    assert [manager.ref_count(b) for b in blocks + other] == [0, 0, 0, 1]
    assert sessions.evict_lru() and not sessions.evict_lru()
    assert sessions.num_evicted == 2 and manager.num_free_blocks == 8


def test_idle_blocks_are_those_only_parked_sessions_hold() -> None:
    manager, sessions, blocks = parked()
    assert sessions.num_idle_blocks() == 3
    manager.acquire(blocks[:1])  # a running sequence shares the first block (a common prefix): that one is load
    assert sessions.num_idle_blocks() == 2
    shared = manager.allocate(1)
    sessions.park(8, (1, 2), shared)
    manager.acquire(shared)
    sessions.park(9, (1, 2), shared)  # two sessions park the same block: still only parked references
    assert sessions.num_idle_blocks() == 3
    claimed = sessions.claim(7, TOKENS[:6] + (700, 701))  # a turn starts: its KV is load again
    assert claimed is not None and sessions.num_idle_blocks() == 1
    sessions.release(8)
    assert sessions.num_idle_blocks() == 1
    assert sessions.evict_lru() and not sessions.evict_lru() and sessions.num_idle_blocks() == 0
