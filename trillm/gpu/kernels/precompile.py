"""Ahead-of-time compilation: every kernel instantiation a model shape launches, compiled before graph capture.

Runs outside the event loop (inside the rank process). Compiling a kernel cannot be captured in a CUDA graph, so the
runner calls `compile_for_model` (or runs one eager step) before capturing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from trillm.gpu.kernels.arguments import ELEMENT_TYPES
from trillm.gpu.kernels.backend import get_backend
from trillm.gpu.kernels.decode_plan import DECODE_MMA_STAGES, decode_group_tile
from trillm.gpu.kernels.linear import GEMV_MAX_ROWS, gemv_kernel_name

log = logging.getLogger(__name__)


def kernel_names(dtype: torch.dtype, *, head_dim: int, num_heads: int, num_kv_heads: int,
                 cos_sin_dtype: torch.dtype = torch.float32) -> list[tuple[str, str]]:
    """(family, instantiation) of every kernel a model with this shape launches."""
    ctype = ELEMENT_TYPES[dtype]
    cs_type = "float" if cos_sin_dtype == torch.float32 else ctype
    group_tile, _ = decode_group_tile(num_heads, num_kv_heads)
    return [
        ("rms_norm", f"rms_norm_kernel<{ctype}>"),
        ("activation", f"silu_and_mul_kernel<{ctype}>"),
        ("rotary", f"rotary_cache_kernel<{ctype}, {cs_type}>"),
        ("rotary", f"rotary_cache_kernel<{ctype}, float>"),
        ("decode_attention", f"paged_decode_kernel<{ctype}, {head_dim}, {group_tile}>"),
        *[("decode_attention", f"paged_decode_mma_kernel<{ctype}, {head_dim}, {st}>") for st in DECODE_MMA_STAGES],
        ("decode_attention", f"paged_decode_merge_kernel<{ctype}, {head_dim}>"),
        ("prefill_attention", f"paged_prefill_kernel<{ctype}, {head_dim}>"),
        *[
            ("linear", gemv_kernel_name(dtype, rows, norm=norm, swiglu=swiglu))
            for rows in range(1, GEMV_MAX_ROWS + 1)
            for norm, swiglu in ((True, False), (False, False), (True, True))  # qkv; o, down, lm_head; gate_up
        ],
    ]


def compile_kernels(names: Sequence[tuple[str, str]], *, device: torch.device | None = None,
                    max_workers: int = 8) -> None:
    """Compile (or load from CuPy's cache) the given instantiations in parallel threads (NVRTC releases the GIL)."""
    backend = get_backend()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    unique = sorted(set(names))
    compile_one: Callable[[tuple[str, str]], None] = lambda fn: backend.compile(fn[0], fn[1], device)  # noqa: E731
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(unique)))) as pool:
        list(pool.map(compile_one, unique))


def compile_for_model(dtype: torch.dtype, *, head_dim: int, num_heads: int, num_kv_heads: int,
                      cos_sin_dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
    """Compile every kernel a model of this shape needs; call before capturing CUDA graphs."""
    names = kernel_names(dtype, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         cos_sin_dtype=cos_sin_dtype)
    compile_kernels(names, device=device)
