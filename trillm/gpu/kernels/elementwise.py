"""Elementwise kernel wrappers: the per-token ops, one launch each (RMSNorm: rms_norm.cu, SwiGLU: activation.cu).

Runs outside the event loop (inside the rank process). Same names and signatures as `gpu/reference.py`.
"""

from __future__ import annotations

import logging
import math

import torch

from trillm.gpu.kernels import arguments
from trillm.gpu.kernels.arguments import (
    check_contiguous,
    check_devices,
    check_dtype,
    check_shape,
    element_type,
    f32,
    i32,
    ptr,
)
from trillm.gpu.kernels.backend import get_backend

log = logging.getLogger(__name__)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm with an optional fused residual add: returns (norm(x + residual) * weight, x + residual)."""
    backend = get_backend()
    device = check_devices(backend, x=x, weight=weight, residual=residual)
    ctype = element_type(x, "x")
    check_shape(x, "x", (None, None))
    num_tokens, hidden = x.shape
    check_shape(weight, "weight", (hidden,))
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None:
            check_dtype(t, name, (x.dtype,))
            check_contiguous(t, name)
    if residual is not None:
        check_shape(residual, "residual", (num_tokens, hidden))
    if hidden % 8 or hidden > 24576:
        raise ValueError(f"hidden must be a multiple of 8 and at most 24576, got {hidden}")
    out = arguments.empty((num_tokens, hidden), x.dtype, device)
    residual_out = None if residual is None else arguments.empty((num_tokens, hidden), x.dtype, device)
    if num_tokens:
        threads = min(256, 32 * math.ceil(hidden // 8 / 32))
        args = (ptr(out), ptr(residual_out), ptr(x), ptr(residual), ptr(weight), i32(hidden), f32(eps))
        backend.launch("rms_norm", f"rms_norm_kernel<{ctype}>", (num_tokens, 1, 1), (threads, 1, 1), hidden * 2, args,
                       device)
    return out, residual_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * ffn] -> [num_tokens, ffn]
    """SwiGLU activation: silu(gate) * up, with gate the first half of the last dim and up the second."""
    backend = get_backend()
    device = check_devices(backend, x=x)
    ctype = element_type(x, "x")
    check_shape(x, "x", (None, None))
    check_contiguous(x, "x")
    num_tokens, width = x.shape
    if width % 16:
        raise ValueError(f"x's last dim must be 2 * ffn with ffn a multiple of 8, got {width}")
    ffn = width // 2
    out = arguments.empty((num_tokens, ffn), x.dtype, device)
    if num_tokens:
        threads = min(256, 32 * math.ceil(ffn // 8 / 32))
        grid = (num_tokens, math.ceil(ffn // 8 / threads), 1)
        backend.launch("activation", f"silu_and_mul_kernel<{ctype}>", grid, (threads, 1, 1), 0,
                       (ptr(out), ptr(x), i32(ffn)), device)
    return out
