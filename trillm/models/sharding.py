"""Tensor-parallel sharding plan: the slice of every split dimension one rank holds, checked against the config once.

Runs outside the event loop (rank processes build their model with it; pure arithmetic, no torch).

Megatron-style splits: attention heads, the FFN's intermediate dimension, and the inputs of o_proj/down_proj are cut
into `world_size` equal, contiguous slices, rank r holding slice r. A dimension the degree does not divide is an
error that names the config key (`num_attention_heads`, `intermediate_size`, ...) rather than a shape mismatch later.

KV heads. With `num_key_value_heads >= tp` they split like the query heads. With fewer KV heads than ranks
(Llama-3-8B's 8 at tp=16, or a 2-KV-head test model at tp=4) each KV head is *replicated* on `tp // num_kv_heads`
consecutive ranks: rank r holds the one KV head its query heads use, r // (tp // num_kv_heads). Query head h uses KV
head h // (num_heads // num_kv_heads), and rank r's query heads are r·H/tp .. (r+1)·H/tp - 1, so they all fall in
that one group exactly when tp is a multiple of num_kv_heads (checked). The replicated K/V projections are computed
on every rank that holds them (cheap: they are the small ones) and each rank caches only its own KV head.
"""

from __future__ import annotations

import logging

import attrs

from trillm.errors import ModelLoadError

log = logging.getLogger(__name__)


@attrs.frozen
class ShardSlice:
    """This rank's part of one dimension: elements start .. start + size of full_size."""

    full_size: int
    start: int
    size: int


def split_evenly(full_size: int, *, rank: int, world_size: int, what: str) -> ShardSlice:
    """Rank `rank`'s equal slice of a dimension (ModelLoadError naming `what` if tp does not divide it)."""
    if full_size % world_size:
        raise ModelLoadError(
            f"tensor parallelism {world_size} does not divide {what} ({full_size}): every rank must hold an equal "
            f"slice; choose a tp that divides {full_size}"
        )
    size = full_size // world_size
    return ShardSlice(full_size=full_size, start=rank * size, size=size)


@attrs.frozen(kw_only=True)
class AttentionShards:
    """Which query and KV heads one rank holds (heads, not elements: multiply by head_dim for rows)."""

    heads: ShardSlice  # query heads
    kv_heads: ShardSlice  # KV heads; size 1 and shared with other ranks when replicated
    kv_replicas: int  # ranks holding each KV head (1: KV heads are split, not replicated)


def attention_shards(*, num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> AttentionShards:
    """The query/KV heads of `rank`: heads split evenly, KV heads split or replicated (module docstring).

    Raises:
        ModelLoadError: tp does not divide num_attention_heads, or num_key_value_heads is neither divisible by tp
            nor a divisor of it.
    """
    heads = split_evenly(num_heads, rank=rank, world_size=world_size, what="num_attention_heads")
    if num_heads % num_kv_heads:
        raise ModelLoadError(f"num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads "
                             f"({num_kv_heads})")  # fmt: skip
    if num_kv_heads >= world_size:
        kv_heads = split_evenly(num_kv_heads, rank=rank, world_size=world_size, what="num_key_value_heads")
        return AttentionShards(heads=heads, kv_heads=kv_heads, kv_replicas=1)
    if world_size % num_kv_heads:
        raise ModelLoadError(
            f"tensor parallelism {world_size} is larger than num_key_value_heads ({num_kv_heads}) and not a multiple "
            f"of it: KV heads can be replicated only when every rank's query heads share one KV head; choose a tp "
            f"that divides {num_kv_heads} or is a multiple of it"
        )
    replicas = world_size // num_kv_heads
    return AttentionShards(heads=heads, kv_heads=ShardSlice(num_kv_heads, rank // replicas, 1), kv_replicas=replicas)


def kv_heads_per_rank(*, num_heads: int, num_kv_heads: int, world_size: int) -> int:
    """How many KV heads each rank caches (the same on every rank)."""
    return attention_shards(num_heads=num_heads, num_kv_heads=num_kv_heads, rank=0, world_size=world_size).kv_heads.size
