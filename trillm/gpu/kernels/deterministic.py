"""Batch-invariant kernels (`--deterministic`): a projection and a paged attention whose result for one token never
depends on the rest of the batch (deterministic.cu says how; docs/deterministic.md says what the mode promises).

Runs outside the event loop (inside the rank process). `fused_linear`, `paged_decode_attention` and
`paged_prefill_attention` have the reference's names and signatures, so `gpu/deterministic_ops.py` can put them in an
op set beside the ordinary kernels' per-token ops (RMSNorm, SwiGLU, rotary, cache writes already compute each token on
its own). `det_linear` and `det_attention` take the launch shape as an argument for tests and benches: every shape
must give the same bits.
"""

from __future__ import annotations

import logging
import math

import torch

from trillm.gpu.kernels import arguments
from trillm.gpu.kernels.arguments import (
    LOG2E,
    check_attention,
    check_contiguous,
    check_devices,
    check_dtype,
    check_shape,
    element_type,
    f32,
    i32,
    i64,
    ptr,
)
from trillm.gpu.kernels.backend import get_backend
from trillm.gpu.kernels.linear import composed_linear

log = logging.getLogger(__name__)

# GEMM tile shapes: (MT, NT, WM, WN, BK, STAGES) = mma tiles per warp (16 rows x 8 columns each), warps, k per stage,
# pipeline depth. Decode sizes stream the weights through many narrow CTAs; prefill sizes use 128 x 128 tiles.
GEMM_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "s": (1, 2, 1, 2, 64, 8),  # 16 x 32 per CTA, 2 warps
    "m": (2, 4, 2, 2, 32, 4),  # 64 x 64, 4 warps
    "l": (4, 4, 2, 4, 32, 4),  # 128 x 128, 8 warps
}
SMALL_M, MEDIUM_M = 16, 64  # rows up to which "s", then "m", are picked
ATTN_WARPS, ATTN_CHUNK = 4, 256  # deterministic.cu's DA_WARPS, DA_CHUNK


def gemm_config(num_rows: int) -> str:
    """The tile shape the wrapper picks for M rows (speed only: all give the same bits)."""
    return "s" if num_rows <= SMALL_M else "m" if num_rows <= MEDIUM_M else "l"


def gemm_kernel_name(dtype: torch.dtype, config: str) -> str:
    mt, nt, wm, wn, bk, stages = GEMM_CONFIGS[config]
    return f"det_gemm_kernel<{arguments.ELEMENT_TYPES[dtype]}, {mt}, {nt}, {wm}, {wn}, {bk}, {stages}>"


def gemm_smem_bytes(config: str) -> int:
    mt, nt, wm, wn, bk, stages = GEMM_CONFIGS[config]
    return stages * (16 * mt * wm + 8 * nt * wn) * (bk + 8) * 2


def attention_kernel_names(dtype: torch.dtype, head_dim: int, group: int) -> list[str]:
    ctype = arguments.ELEMENT_TYPES[dtype]
    return [f"det_attention_kernel<{ctype}, {head_dim}, {group}, {split}>" for split in (0, 1)] + [
        f"det_attention_merge_kernel<{ctype}, {head_dim}>"
    ]


def kernel_names(dtype: torch.dtype, *, head_dim: int, num_heads: int, num_kv_heads: int) -> list[tuple[str, str]]:
    """(family, instantiation) of every deterministic kernel a model of this shape launches."""
    names = [("deterministic", gemm_kernel_name(dtype, c)) for c in GEMM_CONFIGS]
    names += [("deterministic", n) for n in attention_kernel_names(dtype, head_dim, num_heads // num_kv_heads)]
    return names


def det_linear(
    x: torch.Tensor,  # [num_tokens, in_features], rows packed, 16-byte aligned
    weight: torch.Tensor,  # [out_features, in_features], contiguous (row-major)
    bias: torch.Tensor | None = None,  # [out_features]
    *,
    config: str | None = None,  # tile shape; None: gemm_config(num_tokens)
) -> torch.Tensor:  # [num_tokens, out_features]
    """x · weightᵀ (+ bias) with one fixed summation order per output element, whatever the number of rows."""
    backend = get_backend()
    device = check_devices(backend, x=x, weight=weight, bias=bias)
    element_type(x, "x")
    check_shape(x, "x", (None, None))
    num_tokens, k = x.shape
    check_shape(weight, "weight", (None, k))
    n = weight.shape[0]
    check_dtype(weight, "weight", (x.dtype,))
    check_contiguous(weight, "weight (deterministic mode keeps projection weights row-major)")
    if bias is not None:
        check_shape(bias, "bias", (n,))
        check_dtype(bias, "bias", (x.dtype,))
        check_contiguous(bias, "bias")
    if k % 8 or n % 8:
        raise ValueError(f"in and out features must be multiples of 8, got {k} and {n}")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    out = arguments.empty((num_tokens, n), x.dtype, device)
    if num_tokens == 0:
        return out
    config = config or gemm_config(num_tokens)
    mt, nt, wm, wn, _, _ = GEMM_CONFIGS[config]
    grid = (math.ceil(n / (8 * nt * wn)), math.ceil(num_tokens / (16 * mt * wm)), 1)
    args = (ptr(out), ptr(x), ptr(weight), ptr(bias), i32(num_tokens), i32(n), i32(k), i32(x.stride(0)))
    backend.launch("deterministic", gemm_kernel_name(x.dtype, config), grid, (wm * wn * 32, 1, 1),
                   gemm_smem_bytes(config), args, device)  # fmt: skip
    return out


def fused_linear(
    x: torch.Tensor,  # [num_tokens, in_features]
    weight: torch.Tensor,  # [out_rows, in_features]; out_rows = 2 * out_features with silu_mul (gate rows, up rows)
    bias: torch.Tensor | None = None,  # [out_rows]
    norm_weight: torch.Tensor | None = None,  # [in_features]: RMSNorm x (+ residual) first
    eps: float = 0.0,
    residual: torch.Tensor | None = None,  # [num_tokens, in_features]; only with norm_weight
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """reference.fused_linear from per-token kernels: rms_norm (one CTA per row), det_linear, silu_and_mul."""
    if residual is not None and norm_weight is None:
        raise ValueError("residual is added in front of the norm: pass norm_weight with it")
    return composed_linear(x, weight, bias, norm_weight, eps, residual, silu_mul, project=det_linear)


def det_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_index: torch.Tensor | None,  # [num_tokens] int32: each token's block-table row (None: row t)
    token_context: torch.Tensor,  # [num_tokens] int32: keys each token attends to (positions 0 .. n-1), >= 1
    scale: float,
    *,
    split: bool,  # one CTA per 256-position chunk, merged after (decode), or one CTA per token (prefill)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Paged attention with fixed 256-position chunks folded in order: the same bits for a token either way."""
    backend = get_backend()
    device = check_devices(backend, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                           seq_index=seq_index, token_context=token_context)  # fmt: skip
    num_tokens, num_heads, head_dim = q.shape
    ctype, block_log2 = check_attention(q, k_cache, v_cache, block_tables, block_tables.shape[0])
    for name, t in (("seq_index", seq_index), ("token_context", token_context)):
        if t is not None:
            check_shape(t, name, (num_tokens,))
            check_dtype(t, name, (torch.int32,))
            check_contiguous(t, name)
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = arguments.empty((num_tokens, num_heads, head_dim), q.dtype, device)
    if num_tokens == 0:
        return out
    max_chunks = max(1, math.ceil(block_tables.shape[1] * k_cache.shape[2] / ATTN_CHUNK)) if split else 1
    part_acc = part_ml = None
    if split:
        part_acc = arguments.empty((num_tokens, num_heads, max_chunks, head_dim), torch.float32, device)
        part_ml = arguments.empty((num_tokens, num_heads, max_chunks, 2), torch.float32, device)
    args = (
        ptr(out), ptr(part_acc), ptr(part_ml), ptr(q), i64(q.stride(0)), ptr(k_cache), ptr(v_cache),
        ptr(block_tables), i32(block_tables.shape[1]), ptr(seq_index), ptr(token_context), i32(num_heads),
        i32(num_kv_heads), i32(block_log2), f32(scale * LOG2E), i32(max_chunks),
    )  # fmt: skip
    name = f"det_attention_kernel<{ctype}, {head_dim}, {group}, {int(split)}>"
    grid = (max_chunks if split else 1, num_kv_heads, num_tokens)
    backend.launch("deterministic", name, grid, (ATTN_WARPS * 32, 1, 1), 0, args, device)
    if split:
        backend.launch("deterministic", f"det_attention_merge_kernel<{ctype}, {head_dim}>", (num_heads, num_tokens, 1),
                       (head_dim, 1, 1), 0, (ptr(out), ptr(part_acc), ptr(part_ml), ptr(token_context),
                                             i32(num_heads), i32(max_chunks)), device)  # fmt: skip
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, each >= 1
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """reference.paged_decode_attention, batch-invariant (chunks in parallel, then merged in order)."""
    return det_attention(q, k_cache, v_cache, block_tables, None, context_lens, scale, split=True)


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences packed back to back
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32: sequence s owns query rows cu[s] .. cu[s+1]
    context_lens: torch.Tensor,  # [num_seqs] int32: cached positions including this chunk's
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """reference.paged_prefill_attention, each query token computed exactly as a decode step at its position would."""
    num_tokens = q.shape[0]
    cu = cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]  # [num_seqs]
    seq_index = torch.repeat_interleave(torch.arange(q_lens.shape[0], device=q.device), q_lens,
                                        output_size=num_tokens)  # fmt: skip
    tokens = torch.arange(num_tokens, device=q.device)
    # token j of sequence s sits at position context_len[s] - (cu[s + 1] - j) and sees that many keys plus itself
    token_context = context_lens.long()[seq_index] - (cu[1:][seq_index] - tokens) + 1
    return det_attention(q, k_cache, v_cache, block_tables, seq_index.to(torch.int32).contiguous(),
                         token_context.to(torch.int32).contiguous(), scale, split=False)  # fmt: skip
