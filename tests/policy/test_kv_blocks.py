"""BlockManager: allocation, reference counts, prefix-cache registration and LRU eviction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trillm.policy.kv_blocks import ROOT_HASH, BlockManager, blocks_for, hash_block


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_and_free_keep_free_plus_used_equal_total() -> None:
    manager = BlockManager(8, 4)
    first = manager.allocate(3)
    second = manager.allocate(5)
    assert sorted(first + second) == list(range(8))
    assert manager.num_free_blocks == 0 and manager.usage == 1.0
    assert not manager.can_allocate(1) and manager.can_allocate(0)
    manager.free(first)
    stats = manager.statistics()
    assert (stats.num_free_blocks, stats.num_used_blocks, stats.num_total_blocks) == (3, 5, 8)
    assert stats.usage == pytest.approx(5 / 8)
    manager.free(second)
    assert manager.num_free_blocks == 8
    manager.check_invariants()


def test_allocate_more_than_free_raises() -> None:
    manager = BlockManager(2, 4)
    with pytest.raises(ValueError, match="cannot allocate 3 KV blocks: 2 free"):
        manager.allocate(3)


def test_shared_block_is_free_only_after_last_reference() -> None:
    manager = BlockManager(4, 4)
    blocks = manager.allocate(2)
    manager.acquire(blocks)  # a second sequence shares them
    assert manager.ref_count(blocks[0]) == 2
    manager.free(blocks)
    assert manager.num_free_blocks == 2 and manager.ref_count(blocks[0]) == 1
    manager.free(blocks)
    assert manager.num_free_blocks == 4 and manager.ref_count(blocks[0]) == 0
    manager.check_invariants()


def test_double_free_is_an_invariant_error() -> None:
    manager = BlockManager(2, 4)
    blocks = manager.allocate(1)
    manager.free(blocks)
    with pytest.raises(AssertionError, match="freed more often than allocated"):
        manager.free(blocks)


def test_register_is_a_no_op_without_prefix_caching() -> None:
    manager = BlockManager(2, 4)
    (block,) = manager.allocate(1)
    manager.register(block, hash_block(ROOT_HASH, [1, 2, 3, 4]))
    assert not manager.is_cached(block)
    assert manager.cached_block(hash_block(ROOT_HASH, [1, 2, 3, 4])) is None


def test_cached_block_survives_free_as_evictable_and_can_be_reacquired() -> None:
    manager = BlockManager(4, 2, enable_prefix_caching=True)
    (block,) = manager.allocate(1)
    key = hash_block(ROOT_HASH, [7, 8])
    manager.register(block, key)
    manager.free([block])
    stats = manager.statistics()
    assert stats.num_evictable_blocks == 1 and stats.num_free_blocks == 4 and stats.num_cached_blocks == 1
    assert manager.cached_block(key) == block
    manager.acquire([block])
    assert manager.ref_count(block) == 1 and manager.statistics().num_evictable_blocks == 0
    assert manager.statistics().prefix_cache_hits == 1
    manager.check_invariants()


def test_allocate_evicts_least_recently_freed_cached_block_only_when_free_list_is_empty() -> None:
    manager = BlockManager(3, 2, enable_prefix_caching=True)
    blocks = manager.allocate(3)
    keys = [hash_block(ROOT_HASH, [i, i]) for i in range(3)]
    for block, key in zip(blocks, keys):
        manager.register(block, key)
    manager.free([blocks[1]])
    manager.free([blocks[0]])  # LRU order: blocks[1], then blocks[0]
    (taken,) = manager.allocate(1)
    assert taken == blocks[1]
    assert manager.cached_block(keys[1]) is None and manager.cached_block(keys[0]) == blocks[0]
    manager.check_invariants()


def test_duplicate_key_keeps_the_first_block_cached() -> None:
    manager = BlockManager(2, 2, enable_prefix_caching=True)
    first, second = manager.allocate(2)
    key = hash_block(ROOT_HASH, [1, 1])
    manager.register(first, key)
    manager.register(second, key)
    assert manager.cached_block(key) == first and not manager.is_cached(second)
    manager.free([first, second])
    assert manager.statistics().num_evictable_blocks == 1
    manager.check_invariants()


def test_chained_hash_depends_on_the_whole_prefix() -> None:
    a = hash_block(hash_block(ROOT_HASH, [1, 2]), [3, 4])
    b = hash_block(hash_block(ROOT_HASH, [9, 2]), [3, 4])
    assert a != b
    assert a == hash_block(hash_block(ROOT_HASH, (1, 2)), (3, 4))


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "share", "cache"]), st.integers(0, 5)), max_size=60))
def test_random_operations_keep_reference_counts_consistent(ops: list[tuple[str, int]]) -> None:
    manager = BlockManager(6, 2, enable_prefix_caching=True)
    held: list[int] = []  # one entry per reference we hold
    for op, arg in ops:
        if op == "alloc" and manager.can_allocate(arg):
            held += manager.allocate(arg)
        elif op == "free" and held:
            manager.free([held.pop(arg % len(held))])
        elif op == "share" and held:
            block = held[arg % len(held)]
            manager.acquire([block])
            held.append(block)
        elif op == "cache" and held and not manager.is_cached(held[arg % len(held)]):
            manager.register(held[arg % len(held)], hash_block(ROOT_HASH, [arg]))
        manager.check_invariants()
        for block in range(6):
            assert manager.ref_count(block) == held.count(block)
        assert manager.num_free_blocks + len(set(held)) == 6
    manager.free(held)
    assert manager.num_free_blocks == 6
    manager.check_invariants()
