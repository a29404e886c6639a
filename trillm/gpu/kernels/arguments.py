"""Kernel arguments: every launch's checks (device, dtype, shape, layout), output buffers, pointers and scalars.

Checks cover device, dtype, shape, contiguity and 16-byte alignment and raise ValueError naming the argument. Every
output and workspace comes from `empty`; wrappers call it as `arguments.empty`, so a test that replaces it here
(poisoning buffers with NaN) reaches them all. Pointers and scalars are packed as the numpy types the kernels'
parameters have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from trillm.gpu.kernels.backend import KernelBackend

log = logging.getLogger(__name__)

ELEMENT_TYPES = {torch.bfloat16: "bf16_t", torch.float16: "fp16_t"}
ATTENTION_HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634  # the attention kernels take scale * log2(e) and use exp2


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and workspace comes from here (tests poison them by replacing this function)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def i32(x: int) -> np.int32:
    return np.int32(x)


def i64(x: int) -> np.int64:
    return np.int64(x)


def f32(x: float) -> np.float32:
    return np.float32(x)


# ---------------------------------------------------------------------------------------------------------------
# Checks


def element_type(t: torch.Tensor, name: str) -> str:
    if t.dtype not in ELEMENT_TYPES:
        raise ValueError(f"{name} must be bfloat16 or float16, got {t.dtype}")
    return ELEMENT_TYPES[t.dtype]


def check_devices(backend: KernelBackend, **tensors: torch.Tensor | None) -> torch.device:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    device = named[0][1].device
    backend.check_device(device)
    for n, t in named:
        if t.device != device:
            raise ValueError(f"{n} is on {t.device}, expected {device} like {named[0][0]}")
    return device


def check_shape(t: torch.Tensor, name: str, shape: Sequence[int | None]) -> None:
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        dims = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{dims}], got {list(t.shape)}")


def check_dtype(t: torch.Tensor, name: str, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")


def check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.data_ptr() % 16:
        raise ValueError(f"{name} must be 16-byte aligned")


def check_token_rows(t: torch.Tensor, name: str) -> int:
    """A [tokens, heads, dim] tensor whose heads and dims are packed; returns its token stride (elements)."""
    if t.dim() != 3 or t.stride(2) != 1 or t.stride(1) != t.shape[2]:
        raise ValueError(f"{name} must be [tokens, heads, head_dim] with heads and head_dim packed")
    if t.stride(0) % 8 or t.data_ptr() % 16:
        raise ValueError(f"{name}'s rows must be 16-byte aligned (token stride {t.stride(0)})")
    return t.stride(0)


def block_size_log2(k_cache: torch.Tensor) -> int:
    block_size = k_cache.shape[2]
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return block_size.bit_length() - 1


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> None:
    check_shape(k_cache, "k_cache", (None, None, None, None))
    check_shape(v_cache, "v_cache", tuple(k_cache.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(t, name, (dtype,))
        check_contiguous(t, name)


def check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    num_seqs: int) -> tuple[str, int]:
    ctype = element_type(q, "q")
    check_token_rows(q, "q")
    check_cache_pair(k_cache, v_cache, q.dtype)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    if head_dim not in ATTENTION_HEAD_DIMS or k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim must be 64 or 128 and match k_cache's; got q {head_dim}, k_cache {k_cache.shape[3]}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    check_shape(block_tables, "block_tables", (num_seqs, None))
    check_dtype(block_tables, "block_tables", (torch.int32,))
    check_contiguous(block_tables, "block_tables")
    return ctype, block_size_log2(k_cache)
