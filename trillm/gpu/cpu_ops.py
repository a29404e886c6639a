"""CPU op set: the reference ops' results with fewer, larger torch calls, for serving on a CPU.

Runs outside the event loop, inside a rank process. `model_builder.select_ops` picks this module on a CPU;
`gpu/reference.py` stays the semantic spec (and the kernel tests' oracle), and each function here has its name and
signature and computes the same thing. Inputs of another dtype than float32 go to the reference op itself, so
only the float32 path is rewritten.

Why a CPU op set at all: at SmolLM2-135M's sizes a decode step is ~2,000 small torch calls, and every call costs
5–20 µs of dispatch on the CPU, more than the arithmetic of most of them. The reference ops favour clarity: rotary
over q and k apart, a boolean mask to skip padding slots, einsum attention with an explicit mask, a Python loop per
prefill sequence over gathered pages. Here:

- batches of up to `cpu_quant.MAX_ROWS` rows (decode steps, short prefill chunks) run C kernels (`cpu_kernels.py`)
  where they are built: decode attention in one call per layer, rotary + KV write in one call (rotating q and k in
  place inside the fused qkv rows), and, where `cpu_quant.pack_model` recovered a weight's GGUF blocks exactly (a
  GGUF model's Q4_1 / Q8_0 weights), the norm and the projection over those blocks; other weights and longer
  prefill chunks keep MKL's sgemm and:
- `rms_norm` is `F.rms_norm` (one fused kernel; bit-identical to the reference in float32 — tests check);
- rotary rotates q and k together when they are neighbouring column ranges of one qkv row (they are, after the
  fused qkv projection's split), with a [cos, cos] / [-sin, sin] table derived once per cos/sin cache;
- KV writes are one `index_put_` per cache, without the padding mask unless a slot is -1;
- prefill attention is `F.scaled_dot_product_attention` over each sequence's gathered pages (GQA through
  `enable_gqa`), causal without a mask tensor when the chunk is its sequence's whole context; decode attention
  multiplies page by page and never copies the gathered pages into one run.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from trillm.gpu import cpu_kernels, cpu_quant, reference

log = logging.getLogger(__name__)

# id(cos/sin cache) → (weak reference to that cache, its [rows, 2, cols] table). Keyed by the tensor object, not its
# address: a freed runner's cache and a new one (another rope scaling) can share an address and a shape.
_ROTARY_TABLES: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
MAX_ROTARY_TABLES = 4  # a rank has one cos/sin cache; tests build a few


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`reference.rms_norm`: returns (norm(x + residual) * weight, x + residual)."""
    if x.dtype != torch.float32:
        return reference.rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
        residual = x
    return F.rms_norm(x, weight.shape, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * ffn] -> [num_tokens, ffn]
    """`reference.silu_and_mul`, multiplying into silu's fresh output instead of a third tensor."""
    gate, up = x.chunk(2, dim=-1)  # [num_tokens, ffn] each
    return F.silu(gate).mul_(up)


def fused_linear(
    x: torch.Tensor,  # [num_tokens, in_features]
    weight: torch.Tensor,  # [out_rows, in_features]
    bias: torch.Tensor | None = None,  # [out_rows]
    norm_weight: torch.Tensor | None = None,  # [in_features]
    eps: float = 0.0,
    residual: torch.Tensor | None = None,  # [num_tokens, in_features]
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`reference.fused_linear`: rms_norm (with the residual add) → projection → SwiGLU, each part optional."""
    if residual is not None and norm_weight is None:
        raise ValueError("residual is added in front of the norm: pass norm_weight with it")
    summed = None
    blocks = cpu_quant.block_weight(weight) if _is_decode_rows(x) else None
    if blocks is not None:  # the weight's GGUF blocks (5.6× fewer bytes), the norm in C too
        if norm_weight is not None:
            x, summed = cpu_kernels.rms_norm(x.contiguous(), norm_weight, eps, _contiguous(residual))
        y = cpu_quant.matmul(x, blocks)
        if bias is not None:
            y.add_(bias)
        return (cpu_kernels.silu_and_mul(y) if silu_mul else y), summed
    if norm_weight is not None:
        x, summed = rms_norm(x, norm_weight, eps, residual)
    y = F.linear(x, weight, bias)
    return (silu_and_mul(y) if silu_mul else y), summed


def _is_decode_rows(x: torch.Tensor) -> bool:
    """A float32 [num_rows, features] batch small enough for the C decode kernels (which are built here)."""
    return (
        x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= cpu_quant.MAX_ROWS
        and cpu_kernels.library() is not None
    )


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def _rotary_table(cos_sin_cache: torch.Tensor) -> torch.Tensor:  # [max_positions, 2, rotary_dim]
    """[cos, cos] and [-sin, sin] per position, so that rotate-half becomes x * c + roll(x) * s."""
    cached = _ROTARY_TABLES.get(id(cos_sin_cache))
    if cached is not None and cached[0]() is cos_sin_cache:
        return cached[1]
    if len(_ROTARY_TABLES) >= MAX_ROTARY_TABLES:
        _ROTARY_TABLES.clear()
    cos, sin = cos_sin_cache.float().chunk(2, dim=-1)  # [max_positions, rot/2] each
    table = torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), dim=1).contiguous()
    _ROTARY_TABLES[id(cos_sin_cache)] = (weakref.ref(cos_sin_cache), table)
    return table


def _joint_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q's and k's heads as one [num_tokens, num_heads + num_kv_heads, head_dim] view, if their storage allows."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    if q.stride(2) != 1 or q.stride(1) != head_dim or k.stride() != (q.stride(0), head_dim, 1):
        return None
    if k.data_ptr() != q.data_ptr() + num_heads * head_dim * q.element_size():
        return None
    return q.as_strided((q.shape[0], num_heads + k.shape[1], head_dim), q.stride())


def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The [num_tokens, row] tensor whose rows hold q's, k's and v's heads back to back, if their storage is one."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    row_stride = q.stride(0) if num_tokens > 1 else width  # a lone row's stride is whatever reshape chose
    for x in (q, k, v):
        if x.stride(2) != 1 or x.stride(1) != head_dim or (num_tokens > 1 and x.stride(0) != row_stride):
            return None
    step = num_heads * head_dim * q.element_size()
    if k.data_ptr() != q.data_ptr() + step or v.data_ptr() != k.data_ptr() + num_kv_heads * head_dim * k.element_size():
        return None
    return q.as_strided((num_tokens, width), (row_stride, 1))  # [num_tokens, (heads + 2 kv heads) * head_dim]


def _is_c_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, cos_sin_cache: torch.Tensor | None = None) -> bool:
    """Whether the C decode kernels take these caches (float32, contiguous, head_dim a multiple of 8 up to 128)
    and this rotary table (float32, contiguous, rotating whole heads)."""
    head_dim = k_cache.shape[3]
    if cos_sin_cache is not None and not (
        cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous() and cos_sin_cache.shape[-1] == head_dim
    ):
        return False
    return (
        k_cache.dtype == v_cache.dtype == torch.float32 and k_cache.is_contiguous() and v_cache.is_contiguous()
        and head_dim % 8 == 0 and head_dim <= cpu_kernels.MAX_HEAD_DIM and cpu_kernels.library() is not None
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * [cos, cos] + rotate_half(x) * [sin, sin], the reference's products and sums in its order."""
    half = x.shape[-1] // 2
    out = x * cos  # [num_tokens, heads, head_dim]
    return out.add_(x.roll(half, dims=-1).mul_(sin))


def apply_rotary(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]
) -> torch.Tensor:
    """`reference.apply_rotary` (rotate-half rotary over whole heads) from the derived table."""
    if x.dtype != torch.float32 or cos_sin_cache.shape[-1] != x.shape[-1]:
        return reference.apply_rotary(x, positions, cos_sin_cache)
    cos, sin = _rotary_table(cos_sin_cache).index_select(0, positions.long()).unsqueeze(2).unbind(1)
    return _rotate(x, cos, sin)


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> None:
    """`reference.write_kv_cache`: one index_put per cache; the padding mask only when a slot is -1."""
    slots = slot_mapping.long()
    if slots.numel() and int(slots.min()) < 0:
        valid = slots >= 0
        slots, k, v = slots[valid], k[valid], v[valid]
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)


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
    """`reference.rotary_cache_write`: returns (rotated q, rotated k), stores rotated k and v at their slots."""
    if q.dtype != torch.float32 or cos_sin_cache.shape[-1] != q.shape[-1]:
        return reference.rotary_cache_write(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    fused = _fused_qkv(q, k, v)
    if fused is not None and q.shape[0] <= cpu_quant.MAX_ROWS and _is_c_cache(k_cache, v_cache, cos_sin_cache):
        cpu_kernels.rotary_cache_write(fused, q.shape[1], k.shape[1], positions.long(), cos_sin_cache, k_cache,
                                       v_cache, slot_mapping.long())  # fmt: skip
        return q, k  # rotated in place
    cos, sin = _rotary_table(cos_sin_cache).index_select(0, positions.long()).unsqueeze(2).unbind(1)
    # cos, sin: [num_tokens, 1, head_dim] each
    joint = _joint_heads(q, k)
    if joint is None:
        q_rot, k_rot = _rotate(q, cos, sin), _rotate(k, cos, sin)
    else:
        rotated = _rotate(joint, cos, sin)  # [num_tokens, num_heads + num_kv_heads, head_dim]
        q_rot, k_rot = rotated[:, : q.shape[1]], rotated[:, q.shape[1] :]
    write_kv_cache(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot, k_rot


def _gather_pages(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[num_seqs, num_kv_heads, max_blocks * block_size, head_dim]: each row's pages in order, one copy."""
    num_seqs, max_blocks = tables.shape
    _, num_kv_heads, block_size, head_dim = cache.shape
    pages = cache.index_select(0, tables.reshape(-1))  # [num_seqs * max_blocks, num_kv_heads, block_size, head_dim]
    pages = pages.view(num_seqs, max_blocks, num_kv_heads, block_size, head_dim)
    return pages.transpose(1, 2).reshape(num_seqs, num_kv_heads, max_blocks * block_size, head_dim)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, each >= 1
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """`reference.paged_decode_attention` over the gathered pages as they lie, block by block.

    The pages are gathered once (one index_select per cache) and never transposed into one [heads, positions] run:
    the scores are batched matrix products per (sequence, page, KV head), the softmax runs over all pages of a
    sequence, and the page-wise products with V are summed. 2-10 % faster per decode step at batch 8 than SDPA
    over transposed copies (docs/perf.md, CPU).
    """
    if q.dtype != torch.float32:
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    if (q.stride(2) == 1 and q.stride(1) == q.shape[2] and _is_c_cache(k_cache, v_cache)
            and q.shape[1] // k_cache.shape[1] <= cpu_kernels.MAX_GROUP):
        tables = block_tables.to(torch.int32).contiguous()  # [num_seqs, max_blocks_per_seq]
        return cpu_kernels.decode_attention(q, k_cache, v_cache, tables, context_lens.to(torch.int32).contiguous(),
                                            scale)  # fmt: skip
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_pages = -(-int(context_lens.max()) // block_size)
    width = num_pages * block_size
    tables = block_tables[:, :num_pages].reshape(-1)  # [num_seqs * num_pages]; index_select takes int32
    page_shape = (num_seqs, num_pages, num_kv_heads, block_size, head_dim)
    keys = k_cache.index_select(0, tables).view(page_shape)
    values = v_cache.index_select(0, tables).view(page_shape)
    qg = q.view(num_seqs, 1, num_kv_heads, group, head_dim)  # [num_seqs, 1, num_kv_heads, group, head_dim]
    scores = torch.matmul(qg, keys.transpose(-1, -2))  # [num_seqs, num_pages, num_kv_heads, group, block_size]
    scores = scores.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, group, width).mul_(scale)
    if width != int(context_lens.min()):  # positions past a sequence's context (its last page's tail) get -inf
        is_past = torch.arange(width) >= context_lens[:, None]  # [num_seqs, width]
        scores.masked_fill_(is_past[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(num_seqs, num_kv_heads, group, num_pages, block_size)
    probs = probs.permute(0, 3, 1, 2, 4)  # [num_seqs, num_pages, num_kv_heads, group, block_size]
    out = torch.matmul(probs, values).sum(dim=1)  # [num_seqs, num_kv_heads, group, head_dim]
    return out.reshape(num_seqs, num_heads, head_dim)


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences packed back to back
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32: cached positions including this chunk's
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """`reference.paged_prefill_attention` with SDPA per sequence: causal, or masked when the chunk follows cached KV."""
    if q.dtype != torch.float32:
        return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
    block_size = k_cache.shape[2]
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for s, context_len in enumerate(context_lens.tolist()):
        start, end = bounds[s], bounds[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        table = block_tables[s : s + 1, : -(-context_len // block_size)]  # [1, num_blocks]
        keys = _gather_pages(k_cache, table)[:, :, :context_len]  # [1, num_kv_heads, context_len, head_dim]
        values = _gather_pages(v_cache, table)[:, :, :context_len]
        qs = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, num_heads, q_len, head_dim]
        if q_len == context_len:
            o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:  # query row i sits at position context_len - q_len + i
            q_pos = torch.arange(context_len - q_len, context_len)
            mask = torch.arange(context_len)[None, :] <= q_pos[:, None]  # [q_len, context_len]
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)  # [q_len, num_heads, head_dim]
    return out
