"""Prefill attention wrapper: causal attention of ragged query chunks over paged KV (prefill_attention.cu).

Runs outside the event loop (inside the rank process). Same name and signature as `gpu/reference.py`; serves chunked
prefill and prefix-cache hits alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

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

log = logging.getLogger(__name__)

# prefill_attention.cu constants (keep in sync with PrefillLayout there)
PREFILL_WARPS, PREFILL_BLOCK_M, PREFILL_BLOCK_N = 4, 64, 64


def prefill_smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of paged_prefill_kernel (PrefillLayout::BYTES in prefill_attention.cu)."""
    pitch = head_dim + 8
    return (PREFILL_BLOCK_M * pitch + 2 * 2 * PREFILL_BLOCK_N * pitch) * 2


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences packed back to back
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32: sequence s owns query rows cu[s] .. cu[s+1]
    context_lens: torch.Tensor,  # [num_seqs] int32: cached positions including this chunk's
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention for ragged query chunks over paged KV (chunked prefill and prefix hits alike).

    Rows of `q` outside every sequence's range are left unwritten in the output (as in the reference).
    """
    backend = get_backend()
    device = check_devices(backend, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                           cu_seqlens_q=cu_seqlens_q, context_lens=context_lens)
    num_seqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    ctype, block_log2 = check_attention(q, k_cache, v_cache, block_tables, num_seqs)
    for name, t, n in (("cu_seqlens_q", cu_seqlens_q, num_seqs + 1), ("context_lens", context_lens, num_seqs)):
        check_shape(t, name, (n,))
        check_dtype(t, name, (torch.int32,))
        check_contiguous(t, name)
    num_tokens, num_heads, head_dim = q.shape
    out = arguments.empty((num_tokens, num_heads, head_dim), q.dtype, device)
    max_tiles = (num_tokens + num_seqs * (PREFILL_BLOCK_M - 1)) // PREFILL_BLOCK_M
    if max_tiles == 0 or num_seqs == 0:
        return out
    args = (
        ptr(out), ptr(q), i64(q.stride(0)), ptr(k_cache), ptr(v_cache), ptr(block_tables),
        i32(block_tables.shape[1]), ptr(cu_seqlens_q), ptr(context_lens), i32(num_seqs), i32(num_heads),
        i32(k_cache.shape[1]), i32(block_log2), f32(scale * LOG2E),
    )  # fmt: skip
    backend.launch("prefill_attention", f"paged_prefill_kernel<{ctype}, {head_dim}>", (max_tiles, num_heads, 1),
                   (PREFILL_WARPS * 32, 1, 1), prefill_smem_bytes(head_dim), args, device)
    return out


FRESH_MAX_SEQS = 4  # one SDPA call per prompt: beyond this many prompts the launches cost more than they save
FRESH_MIN_TOKENS = 512  # attention cost grows with the square of the prompt: below this the paged kernel is as quick


def fresh_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], prompts packed back to back, each from position 0
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]: this step's keys (already rotated)
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    lens: Sequence[int],  # the prompts' lengths (host ints), summing to num_tokens
    scale: float,
) -> torch.Tensor | None:  # [num_tokens, num_heads, head_dim]
    """Causal attention of prompts with no cached context over their own k/v: torch SDPA (FlashAttention), per prompt.

    A prefill from position 0 reads no KV cache, so the paged kernel's gathers buy nothing, and torch's flash SDPA is
    2.7x faster than our paged kernel on the 7B shape (bench.kernels: 32 vs 87 us for 1,024 tokens; torch's varlen
    entry point measured 63 us, so it is not used). Returns None where this does not pay or cannot run (CPU tensors,
    more than FRESH_MAX_SEQS prompts, none as long as FRESH_MIN_TOKENS: a batch of short prompts would pay one launch
    each for little work); the caller then runs `paged_prefill_attention`.
    """
    if q.device.type != "cuda" or not 0 < len(lens) <= FRESH_MAX_SEQS or max(lens) < FRESH_MIN_TOKENS:
        return None
    gqa = q.shape[1] != k.shape[1]
    if len(lens) == 1:  # one prompt: SDPA's output, viewed back as [tokens, heads, head_dim] without a copy
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        whole: torch.Tensor = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=gqa)
        return whole[0].transpose(0, 1)
    out = torch.empty_like(q)
    start = 0
    for length in lens:
        rows = slice(start, start + length)
        start += length
        # [1, heads, length, head_dim] views of the packed rows: 4-D, or SDPA takes its slow math path (measured
        # 994 us for 1,024 tokens on 3-D views against 32 us)
        q4, k4, v4 = (t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=gqa)
        out[rows] = attended[0].transpose(0, 1)
    return out
