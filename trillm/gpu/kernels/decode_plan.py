"""Decode plan: the decode-attention launch a shape gets (kernel, shared memory, split-KV count from a cost model).

Pure functions of shapes (no tensors, no device): the decode wrapper, ahead-of-time compilation, the kernel tests
and bench/kernels.py all ask here. Which kernel runs when is in the package docstring.
"""

from __future__ import annotations

import logging
import math

import attrs
import torch

from trillm.gpu.kernels.arguments import ELEMENT_TYPES

log = logging.getLogger(__name__)

# decode_attention.cu constants (keep in sync with DecodeLayout / DecodeMmaLayout there)
DECODE_WARPS, DECODE_TILE, DECODE_STAGES, DECODE_MAX_GROUP, DECODE_MMA_ROWS = 4, 16, 3, 8, 16
DECODE_MMA_STAGES = (3, 6)  # ring depths: two CTAs per SM, or one CTA per SM with deep prefetch (small grids)
# GQA groups this large use the tensor-core decode kernel, smaller ones the CUDA-core one. Measured on the H100
# (bench/results/h100-kernels-2026-11-24.json, graph replay): group 1 (Llama-2-7B, b32 x 1k) CUDA-core 189 us vs mma
# 192 us; group 3 (SmolLM2, b32 x 1k) 16.2 vs 15.8 us; group 4 (b32 x 1k, 32/8 heads) 57.1 vs 54.4 us.
MMA_MIN_GROUP = 3

# Split-KV cost model (see plan_decode_splits), in units of "tokens one CTA streams".
SPLIT_OVERHEAD_TOKENS = 48  # per CTA: launch, q load, pipeline fill, the 4-warp merge and the write-out
SPLIT_MERGE_TOKENS = 32  # the merge kernel's launch and its pass over the partial rows
MAX_DECODE_SPLITS = 32
# At least two tiles per warp per split: batch 1 x 1k on 8 kv heads measured 9.4 us with 16 splits, 8.8 us with 8
MIN_SPLIT_TOKENS = 8 * DECODE_TILE


def decode_group_tile(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(query heads per CTA, CTAs per kv head) of the CUDA-core decode kernel for this GQA shape."""
    group = num_heads // num_kv_heads
    tile = min(group, DECODE_MAX_GROUP)
    return tile, math.ceil(group / tile)


def decode_smem_bytes(head_dim: int, group_tile: int) -> int:
    """Dynamic shared memory of paged_decode_kernel (DecodeLayout::BYTES in decode_attention.cu)."""
    q_bytes = group_tile * (head_dim + 8) * 4
    pipe = DECODE_WARPS * DECODE_STAGES * DECODE_TILE * ((head_dim + 8) + head_dim) * 2
    merge = DECODE_WARPS * group_tile * (head_dim + 2) * 4
    return q_bytes + max(pipe, merge)


def decode_mma_smem_bytes(head_dim: int, stages: int) -> int:
    """Dynamic shared memory of paged_decode_mma_kernel (DecodeMmaLayout::BYTES in decode_attention.cu)."""
    pipe = DECODE_WARPS * stages * 2 * DECODE_TILE * (head_dim + 8) * 2
    merge = DECODE_WARPS * DECODE_MMA_ROWS * (head_dim + 2) * 4
    return max(pipe, merge)


@attrs.frozen(kw_only=True)
class DecodePlan:
    """How paged_decode_attention runs for one shape: which kernel, CTAs per kv head, splits, ring depth."""

    kernel: str  # instantiation name
    head_chunks: int
    num_splits: int
    smem_bytes: int
    num_ctas: int


def plan_decode(
    dtype: torch.dtype,
    *,
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_context: int,
    num_sms: int,
    impl: str | None = None,
    num_splits: int | None = None,
    stages: int | None = None,
) -> DecodePlan:
    """The decode launch for a shape (None: the default choice for impl "simt"/"mma", splits and mma ring depth)."""
    ctype = ELEMENT_TYPES[dtype]
    group = num_heads // num_kv_heads
    impl = impl or ("mma" if group >= MMA_MIN_GROUP else "simt")
    if impl == "simt":
        rows, head_chunks = decode_group_tile(num_heads, num_kv_heads)
    elif impl == "mma":
        rows, head_chunks = DECODE_MMA_ROWS, math.ceil(group / DECODE_MMA_ROWS)
    else:
        raise ValueError(f"impl must be 'simt' or 'mma', got {impl!r}")
    units = num_seqs * num_kv_heads * head_chunks
    if num_splits is None:
        num_splits = plan_decode_splits(units, max_context, num_sms)
    if not 1 <= num_splits <= 1024:
        raise ValueError(f"num_splits must be in 1..1024, got {num_splits}")
    if impl == "simt":
        kernel, smem = f"paged_decode_kernel<{ctype}, {head_dim}, {rows}>", decode_smem_bytes(head_dim, rows)
    else:
        if stages is None:  # a CTA alone on its SM needs the deep ring to keep enough bytes in flight
            stages = DECODE_MMA_STAGES[1] if units * num_splits <= num_sms else DECODE_MMA_STAGES[0]
        if stages not in DECODE_MMA_STAGES:
            raise ValueError(f"stages must be one of {DECODE_MMA_STAGES}, got {stages}")
        kernel, smem = f"paged_decode_mma_kernel<{ctype}, {head_dim}, {stages}>", decode_mma_smem_bytes(head_dim, stages)
    return DecodePlan(kernel=kernel, head_chunks=head_chunks, num_splits=num_splits, smem_bytes=smem,
                      num_ctas=units * num_splits)


def plan_decode_splits(num_units: int, max_context: int, num_sms: int) -> int:
    """How many splits of the context each (sequence, kv-head chunk) gets in the decode kernel.

    Cost model (decode attention is bound by reading K and V): a CTA's time is the tokens it streams plus a fixed
    SPLIT_OVERHEAD_TOKENS; one CTA per SM already has enough copies in flight to take that SM's share of bandwidth, so
    CTAs sharing an SM slow each other down and the busiest SM sets the time:
        time(P) = ceil(num_units * P / num_sms) * (ceil(max_context / P) rounded up to a tile + SPLIT_OVERHEAD_TOKENS)
                  + (P > 1) * SPLIT_MERGE_TOKENS
    The smallest P minimising it wins, with P <= MAX_DECODE_SPLITS and at least MIN_SPLIT_TOKENS per split. So many
    sequences x kv heads (>= the SM count) never split; batch 1 on 32 kv heads splits ~4 ways. Checked against forced
    splits on the H100 (batch 1 x 1k, 32 kv heads: 1/2/4/8/16 splits took 20.2/14.9/13.4/13.6/16.5 us; 8 kv heads:
    20.7/13.7/9.9/8.8/9.4 us), where the model picks 4 and 8.
    """
    best_splits, best_time = 1, math.inf
    max_splits = max(1, min(MAX_DECODE_SPLITS, max_context // MIN_SPLIT_TOKENS))
    for splits in range(1, max_splits + 1):
        tokens = math.ceil(max_context / splits / DECODE_TILE) * DECODE_TILE
        time = math.ceil(num_units * splits / num_sms) * (tokens + SPLIT_OVERHEAD_TOKENS)
        time += SPLIT_MERGE_TOKENS if splits > 1 else 0
        if time < best_time:
            best_splits, best_time = splits, time
    return best_splits
