"""Projection wrapper: `fused_linear`, RMSNorm (+ residual add) → linear → SwiGLU with the parts fused (linear.cu).

Runs outside the event loop (inside the rank process). Same name and signature as `gpu/reference.py`. Up to
`GEMV_MAX_ROWS` rows (a decode step of a small batch) the whole chain is one launch of the matrix-vector kernel;
above that, cuBLAS does the projection (a real GEMM wins there) beside the rms_norm and silu_and_mul kernels. The
environment variable TRILLM_GEMV_MAX_ROWS overrides the limit (0 turns the kernel off: benchmarks compare the two).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
import logging
import math
import os

import torch
import torch.nn.functional as F

from trillm.gpu.kernels import arguments
from trillm.gpu.kernels.arguments import check_devices, check_dtype, check_shape, element_type, f32, i32, ptr
from trillm.gpu.kernels.backend import get_backend
from trillm.gpu.kernels.elementwise import rms_norm, silu_and_mul

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 2  # measured on the H100 (bench.kernels): at 4 and 8 rows cuBLAS streams the weights faster
GEMV_WARPS = 4  # must equal linear.cu's LIN_WARPS
GEMV_ROWS_PER_WARP = 4  # linear.cu's LIN_ROWS: weight rows per warp (2 gate/up column pairs with SwiGLU)
GEMV_MAX_SMEM_BYTES = 160 * 1024  # the normalised input staged in shared memory (rows x in_features)


@functools.cache
def gemv_row_limit() -> int:
    """GEMV_MAX_ROWS, or the environment's override (read once per process)."""
    override = os.environ.get("TRILLM_GEMV_MAX_ROWS")
    return min(GEMV_MAX_ROWS, int(override)) if override else GEMV_MAX_ROWS


def gemv_kernel_name(dtype: torch.dtype, rows: int, *, norm: bool, swiglu: bool) -> str:
    return f"gemv_kernel<{arguments.ELEMENT_TYPES[dtype]}, {rows}, {int(norm)}, {int(swiglu)}>"


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

    Returns (y, x + residual), the second None without `residual`; see reference.fused_linear for the roundings.
    """
    if residual is not None and norm_weight is None:
        raise ValueError("residual is added in front of the norm: pass norm_weight with it")
    backend = get_backend()
    device = check_devices(backend, x=x, weight=weight, bias=bias, norm_weight=norm_weight, residual=residual)
    element_type(x, "x")  # bf16 or fp16
    check_shape(x, "x", (None, None))
    num_tokens, k = x.shape
    check_shape(weight, "weight", (None, k))
    out_rows = weight.shape[0]
    if silu_mul and out_rows % 2:
        raise ValueError(f"with silu_mul the weight holds gate and up rows: an even count, got {out_rows}")
    n_out = out_rows // 2 if silu_mul else out_rows
    for name, t in (("weight", weight), ("bias", bias), ("norm_weight", norm_weight), ("residual", residual)):
        if t is not None:
            check_dtype(t, name, (x.dtype,))
    if bias is not None:
        check_shape(bias, "bias", (out_rows,))
    if norm_weight is not None:
        check_shape(norm_weight, "norm_weight", (k,))
    if residual is not None:
        check_shape(residual, "residual", (num_tokens, k))
    smem_bytes = num_tokens * k * x.element_size() if norm_weight is not None else 0
    if (num_tokens == 0 or num_tokens > gemv_row_limit() or smem_bytes > GEMV_MAX_SMEM_BYTES
            or not _fits_gemv(x, weight, residual, k)):
        return composed_linear(x, weight, bias, norm_weight, eps, residual, silu_mul)
    out = arguments.empty((num_tokens, n_out), x.dtype, device)
    residual_out = None if residual is None else arguments.empty((num_tokens, k), x.dtype, device)
    name = gemv_kernel_name(x.dtype, num_tokens, norm=norm_weight is not None, swiglu=silu_mul)
    args = (ptr(out), ptr(residual_out), ptr(x), ptr(residual), ptr(norm_weight), ptr(weight), ptr(bias),
            i32(n_out), i32(k), i32(x.stride(0)), f32(eps))  # fmt: skip
    columns_per_cta = GEMV_WARPS * (GEMV_ROWS_PER_WARP // 2 if silu_mul else GEMV_ROWS_PER_WARP)
    backend.launch("linear", name, (math.ceil(n_out / columns_per_cta), 1, 1), (GEMV_WARPS * 32, 1, 1), smem_bytes,
                   args, device)  # fmt: skip
    return out, residual_out


def _fits_gemv(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, k: int) -> bool:
    """16-byte vectors along k: rows packed and aligned (a strided x the kernel cannot read goes the composed way)."""
    if k % 8 or not weight.is_contiguous() or weight.data_ptr() % 16:
        return False
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        return False
    return residual is None or (residual.stride() == x.stride() and residual.data_ptr() % 16 == 0)


def composed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    silu_mul: bool,
    project: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = F.linear,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unfused chain: rms_norm kernel, `project` (cuBLAS; deterministic.det_linear there), silu_and_mul kernel."""
    summed = None
    if norm_weight is not None:
        x, summed = rms_norm(x.contiguous(), norm_weight, eps, None if residual is None else residual.contiguous())
    y = project(x, weight, bias)
    if silu_mul:
        ffn = y.shape[1] // 2
        y = silu_and_mul(y) if ffn % 8 == 0 else F.silu(y[:, :ffn]) * y[:, ffn:]  # the kernel takes 16-byte rows
    return y, summed
