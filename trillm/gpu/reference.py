"""Reference ops: plain-torch implementations of every hot kernel, the CPU path and the test oracle.

Each function has the same signature as its CuPy wrapper in `gpu/kernels/`. They compute in float32 (or float64
when given float64 inputs, which is how kernel tests use them) and return the input dtype.

Layouts shared with the CUDA kernels:
- KV cache, per layer: `k_cache`, `v_cache` of shape [num_blocks, num_kv_heads, block_size, head_dim].
- A slot is `block_id * block_size + offset`; slot -1 means "padding, write nothing".
- `block_tables` [num_seqs, max_blocks_per_seq] int32, rows padded with any valid block id (0) past their length.
- `cos_sin_cache` [max_positions, rotary_dim]: cos in the first half of the last dim, sin in the second half
  (rotate-half / "neox" rotary, the layout Hugging Face Llama checkpoints use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm with an optional fused residual add: returns (norm(x + residual) * weight, x + residual).

    Without `residual` the second result is None. The sum is rounded to the input dtype before normalising, as a
    separate add-then-norm would do, so the residual stream is bit-identical to the unfused model's.
    """
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.to(_compute_dtype(x.dtype))
    variance = xf.pow(2).mean(dim=-1, keepdim=True)
    out = xf * torch.rsqrt(variance + eps)
    return (out.to(x.dtype) * weight).to(x.dtype), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * ffn] -> [num_tokens, ffn]
    """SwiGLU activation: silu(gate) * up, with gate the first half of the last dim and up the second."""
    gate, up = x.chunk(2, dim=-1)  # [num_tokens, ffn] each
    return F.silu(gate) * up


def fused_linear(
    x: torch.Tensor,  # [num_tokens, in_features]
    weight: torch.Tensor,  # [out_rows, in_features]; out_rows = 2 * out_features with silu_mul (gate rows, up rows)
    bias: torch.Tensor | None = None,  # [out_rows]
    norm_weight: torch.Tensor | None = None,  # [in_features]: RMSNorm x (+ residual) first
    eps: float = 0.0,
    residual: torch.Tensor | None = None,  # [num_tokens, in_features]; only with norm_weight
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection with its neighbours fused: `rms_norm` (with the residual add) in front, SwiGLU behind.

    Returns (y, x + residual): y = silu_and_mul?(linear(rms_norm(x + residual)?, weight, bias)), each step rounded
    to the input dtype as the separate ops would round it; the second result is None without `residual`.
    """
    if residual is not None and norm_weight is None:
        raise ValueError("residual is added in front of the norm: pass norm_weight with it")
    summed = None
    if norm_weight is not None:
        x, summed = rms_norm(x, norm_weight, eps, residual)
    y = F.linear(x, weight, bias)
    if silu_mul:
        y = silu_and_mul(y)
    return y, summed


def apply_rotary(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]
) -> torch.Tensor:
    """Rotate-half rotary embedding on the first `rotary_dim` features of every head."""
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.long()].to(_compute_dtype(x.dtype)).chunk(2, dim=-1)  # [num_tokens, rot/2]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [num_tokens, 1, rot/2]
    xf = x.to(_compute_dtype(x.dtype))
    x_rot, x_pass = xf[..., :rotary_dim], xf[..., rotary_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)  # [num_tokens, num_heads, rot/2] each
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, x_pass), dim=-1).to(x.dtype)


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> None:
    """Store each token's K and V at its slot (in place); tokens with slot -1 are skipped."""
    block_size = k_cache.shape[2]
    slots = slot_mapping.long()
    valid = slots >= 0
    slots = slots[valid]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = k[valid].to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v[valid].to(v_cache.dtype)


def rotary_cache_write(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RoPE + KV-cache write: returns (rotated q, rotated k) and stores rotated k and v at their slots."""
    q_rot = apply_rotary(q, positions, cos_sin_cache)
    k_rot = apply_rotary(k, positions, cos_sin_cache)
    write_kv_cache(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot, k_rot


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_table: torch.Tensor,  # [num_blocks_of_seq] int
    context_len: int,
) -> torch.Tensor:  # [num_kv_heads, context_len, head_dim]
    """One sequence's first `context_len` cached positions, in order."""
    num_blocks = -(-context_len // cache.shape[2])
    blocks = cache[block_table[:num_blocks].long()]  # [n, num_kv_heads, block_size, head_dim]
    kv = blocks.permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])  # [num_kv_heads, n*bs, head_dim]
    return kv[:, :context_len]


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, each >= 1
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """One query token per sequence attending to all of its `context_len` cached positions (GQA-aware)."""
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, num_kv_heads, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    cdt = _compute_dtype(q.dtype)
    max_blocks = -(-int(context_lens.max()) // block_size)
    tables = block_tables[:, :max_blocks].long()  # [num_seqs, max_blocks]
    # [num_seqs, max_blocks, num_kv_heads, block_size, head_dim] -> [num_seqs, num_kv_heads, max_ctx, head_dim]
    keys = k_cache[tables].permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, -1, head_dim).to(cdt)
    values = v_cache[tables].permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, -1, head_dim).to(cdt)
    qg = q.to(cdt).view(num_seqs, num_kv_heads, group, head_dim)  # [num_seqs, num_kv_heads, group, head_dim]
    scores = torch.einsum("skgd,sktd->skgt", qg, keys) * scale  # [num_seqs, num_kv_heads, group, max_ctx]
    positions = torch.arange(keys.shape[2], device=q.device)
    mask = positions[None, :] >= context_lens.long()[:, None]  # [num_seqs, max_ctx]
    scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("skgt,sktd->skgd", probs, values)  # [num_seqs, num_kv_heads, group, head_dim]
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


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

    Query row i of sequence s sits at position `context_len - q_len + i` and sees KV positions up to and including
    its own. The chunk's own K and V must already be in the cache.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    cdt = _compute_dtype(q.dtype)
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for s, context_len in enumerate(context_lens.tolist()):
        start, end = bounds[s], bounds[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        keys = gather_kv(k_cache, block_tables[s], context_len).to(cdt)  # [num_kv_heads, ctx, head_dim]
        values = gather_kv(v_cache, block_tables[s], context_len).to(cdt)
        qs = q[start:end].to(cdt).view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        # qs: [num_kv_heads, group, q_len, head_dim]
        scores = torch.einsum("kgqd,ktd->kgqt", qs, keys) * scale  # [num_kv_heads, group, q_len, ctx]
        q_pos = torch.arange(context_len - q_len, context_len, device=q.device)
        kv_pos = torch.arange(context_len, device=q.device)
        scores = scores.masked_fill(kv_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("kgqt,ktd->kgqd", probs, values)  # [num_kv_heads, group, q_len, head_dim]
        out[start:end] = o.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim).to(q.dtype)
    return out
