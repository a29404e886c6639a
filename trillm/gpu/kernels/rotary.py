"""Rotary kernel wrappers: the three ops that launch rotary.cu's one kernel (RoPE, KV-cache write, both fused).

Runs outside the event loop (inside the rank process). Same names and signatures as `gpu/reference.py`; how
`rotary_cache_write` differs from it (in place) is in the package docstring.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from trillm.gpu.kernels import arguments
from trillm.gpu.kernels.arguments import (
    ELEMENT_TYPES,
    check_cache_pair,
    check_contiguous,
    check_devices,
    check_dtype,
    check_shape,
    check_token_rows,
    element_type,
    i32,
    i64,
    ptr,
)
from trillm.gpu.kernels.backend import get_backend

log = logging.getLogger(__name__)


def _index_flag(t: torch.Tensor, name: str, num_tokens: int) -> int:
    check_shape(t, name, (num_tokens,))
    check_dtype(t, name, (torch.int32, torch.int64))
    check_contiguous(t, name)
    return int(t.dtype == torch.int64)


def _check_cos_sin(cos_sin_cache: torch.Tensor, x: torch.Tensor) -> tuple[str, int]:
    check_shape(cos_sin_cache, "cos_sin_cache", (None, None))
    check_dtype(cos_sin_cache, "cos_sin_cache", (torch.float32, x.dtype))
    check_contiguous(cos_sin_cache, "cos_sin_cache")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 16 or rotary_dim > x.shape[2] or x.shape[2] % 8:
        raise ValueError(
            f"rotary_dim must be a multiple of 16 and at most head_dim (a multiple of 8); got rotary_dim {rotary_dim},"
            f" head_dim {x.shape[2]}"
        )
    ctype = "float" if cos_sin_cache.dtype == torch.float32 else ELEMENT_TYPES[x.dtype]
    return ctype, rotary_dim


ROTARY_TARGET_CTAS = 256  # small batches split each token's work over CTAs until about this many run


def _rotary_launch(
    *,
    device: torch.device,
    q_out: torch.Tensor | None,
    q_in: torch.Tensor | None,
    k_out: torch.Tensor | None,
    k_in: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
    positions: torch.Tensor | None,
    cos_sin_cache: torch.Tensor | None,
    cos_sin_type: str,
    rotate_k: bool,
    dtype: torch.dtype,
) -> None:
    ref = q_in if q_in is not None else k_in
    assert ref is not None
    num_tokens, _, head_dim = ref.shape
    if num_tokens == 0:
        return
    num_heads = 0 if q_in is None else q_in.shape[1]
    num_kv_heads = 0 if k_in is None else k_in.shape[1]
    rotary_dim = 0 if cos_sin_cache is None else cos_sin_cache.shape[1]
    block_size = 1 if k_cache is None else k_cache.shape[2]

    def stride(t: torch.Tensor | None) -> np.int64:
        return i64(0 if t is None else t.stride(0))

    args = (
        ptr(q_out), ptr(q_in), stride(q_out), stride(q_in), i32(num_heads),
        ptr(k_out), ptr(k_in), stride(k_out), stride(k_in), i32(num_kv_heads),
        ptr(v), stride(v), ptr(k_cache), ptr(v_cache),
        ptr(slot_mapping), i32(int(slot_mapping is not None and slot_mapping.dtype == torch.int64)),
        ptr(positions), i32(int(positions is not None and positions.dtype == torch.int64)),
        ptr(cos_sin_cache), i32(rotary_dim), i32(head_dim), i32(block_size),
        i32(int(rotate_k)), i32(int(k_cache is not None)),
    )  # fmt: skip
    name = f"rotary_cache_kernel<{ELEMENT_TYPES[dtype]}, {cos_sin_type}>"
    units = max((num_heads + (num_kv_heads if rotate_k else 0)) * (rotary_dim // 16), num_kv_heads * head_dim // 8)
    splits = max(1, min(math.ceil(units / 128), math.ceil(ROTARY_TARGET_CTAS / num_tokens)))
    get_backend().launch("rotary", name, (num_tokens, splits, 1), (128, 1, 1), 0, args, device)


def apply_rotary(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]
) -> torch.Tensor:
    """Rotate-half rotary embedding on the first `rotary_dim` features of every head (returns a new tensor)."""
    device = check_devices(get_backend(), x=x, positions=positions, cos_sin_cache=cos_sin_cache)
    element_type(x, "x")
    check_token_rows(x, "x")
    _index_flag(positions, "positions", x.shape[0])
    cos_sin_type, _ = _check_cos_sin(cos_sin_cache, x)
    out = arguments.empty(x.shape, x.dtype, device)
    _rotary_launch(device=device, q_out=out, q_in=x, k_out=None, k_in=None, v=None, k_cache=None, v_cache=None,
                   slot_mapping=None, positions=positions, cos_sin_cache=cos_sin_cache, cos_sin_type=cos_sin_type,
                   rotate_k=False, dtype=x.dtype)
    return out


def _check_kv_inputs(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    element_type(k, "k")
    check_token_rows(k, "k")
    check_token_rows(v, "v")
    check_shape(v, "v", tuple(k.shape))
    check_dtype(v, "v", (k.dtype,))
    check_cache_pair(k_cache, v_cache, k.dtype)
    if k_cache.shape[1] != k.shape[1] or k_cache.shape[3] != k.shape[2]:
        raise ValueError(f"k_cache {list(k_cache.shape)} does not match k's kv heads and head_dim {list(k.shape)}")
    _index_flag(slot_mapping, "slot_mapping", k.shape[0])


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
) -> None:
    """Store each token's K and V at its slot (in place); tokens with slot -1 are skipped."""
    device = check_devices(get_backend(), k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _check_kv_inputs(k, v, k_cache, v_cache, slot_mapping)
    _rotary_launch(device=device, q_out=None, q_in=None, k_out=None, k_in=k, v=v, k_cache=k_cache, v_cache=v_cache,
                   slot_mapping=slot_mapping, positions=None, cos_sin_cache=None, cos_sin_type="float",
                   rotate_k=False, dtype=k.dtype)


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
    """Fused RoPE + KV-cache write: rotates q and k IN PLACE, stores rotated k and v at their slots, returns (q, k)."""
    device = check_devices(get_backend(), q=q, k=k, v=v, positions=positions, cos_sin_cache=cos_sin_cache,
                           k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    element_type(q, "q")
    check_token_rows(q, "q")
    check_dtype(k, "k", (q.dtype,))
    _check_kv_inputs(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} disagree on tokens or head_dim")
    _index_flag(positions, "positions", q.shape[0])
    cos_sin_type, _ = _check_cos_sin(cos_sin_cache, q)
    _rotary_launch(device=device, q_out=q, q_in=q, k_out=k, k_in=k, v=v, k_cache=k_cache, v_cache=v_cache,
                   slot_mapping=slot_mapping, positions=positions, cos_sin_cache=cos_sin_cache,
                   cos_sin_type=cos_sin_type, rotate_k=True, dtype=q.dtype)
    return q, k
