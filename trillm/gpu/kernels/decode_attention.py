"""Decode attention wrapper: one query token per sequence over its paged KV (decode_attention.cu), split-KV merged.

Runs outside the event loop (inside the rank process). `paged_decode_attention` has the reference's name and
signature; `paged_decode_attention_splits` forces the plan for tests and benches. The context bound its split count
assumes, and what that means for eager and graph callers, is in the package docstring.
"""

from __future__ import annotations

import logging

import torch

from trillm.gpu.kernels import arguments
from trillm.gpu.kernels.arguments import (
    LOG2E,
    check_attention,
    check_contiguous,
    check_devices,
    check_dtype,
    check_shape,
    f32,
    i32,
    i64,
    ptr,
)
from trillm.gpu.kernels.backend import get_backend
from trillm.gpu.kernels.decode_plan import DECODE_WARPS, plan_decode

log = logging.getLogger(__name__)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, each >= 1
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """One query token per sequence attending to all of its `context_len` cached positions (GQA-aware)."""
    return paged_decode_attention_splits(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None)


def paged_decode_attention_splits(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None,
    impl: str | None = None,
    stages: int | None = None,
) -> torch.Tensor:
    """paged_decode_attention with the plan forced (None: the default choice; see plan_decode); tests and benches."""
    backend = get_backend()
    device = check_devices(backend, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                           context_lens=context_lens)
    num_seqs, num_heads, head_dim = q.shape
    ctype, block_log2 = check_attention(q, k_cache, v_cache, block_tables, num_seqs)
    check_shape(context_lens, "context_lens", (num_seqs,))
    check_dtype(context_lens, "context_lens", (torch.int32,))
    check_contiguous(context_lens, "context_lens")
    num_kv_heads = k_cache.shape[1]
    out = arguments.empty((num_seqs, num_heads, head_dim), q.dtype, device)
    if num_seqs == 0:
        return out
    plan = plan_decode(q.dtype, num_seqs=num_seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       max_context=block_tables.shape[1] * k_cache.shape[2], num_sms=backend.num_sms(device),
                       impl=impl, num_splits=num_splits, stages=stages)
    num_splits = plan.num_splits
    part_out = part_ml = None
    if num_splits > 1:
        part_out = arguments.empty((num_seqs, num_heads, num_splits, head_dim), torch.float32, device)
        part_ml = arguments.empty((num_seqs, num_heads, num_splits, 2), torch.float32, device)
    args = (
        ptr(out), ptr(part_out), ptr(part_ml), ptr(q), i64(q.stride(0)), ptr(k_cache), ptr(v_cache),
        ptr(block_tables), i32(block_tables.shape[1]), ptr(context_lens), i32(num_heads), i32(num_kv_heads),
        i32(plan.head_chunks), i32(block_log2), f32(scale * LOG2E), i32(num_splits),
    )  # fmt: skip
    grid = (num_splits, num_kv_heads * plan.head_chunks, num_seqs)
    backend.launch("decode_attention", plan.kernel, grid, (DECODE_WARPS * 32, 1, 1), plan.smem_bytes, args, device)
    if num_splits > 1:
        merge = f"paged_decode_merge_kernel<{ctype}, {head_dim}>"
        backend.launch("decode_attention", merge, (num_heads, num_seqs, 1), (head_dim, 1, 1), 0,
                       (ptr(out), ptr(part_out), ptr(part_ml), i32(num_heads), i32(num_splits)), device)
    return out
