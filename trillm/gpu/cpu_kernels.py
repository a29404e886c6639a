"""CPU decode kernels: the C library of `cpu_kernels.c`, built once per source, and typed calls into it.

Runs outside the event loop, inside a rank process. At SmolLM2-135M's sizes a float32 decode step on the CPU was
mostly torch call overhead and streaming float32 weights; these kernels do one layer's norm, rotary + KV write and
attention in one call each, and the projections over GGUF blocks (`cpu_quant.py`). `cpu_ops` calls them for decode
batches and keeps torch for prefill; `decode_forward` runs every layer of a decode step in one call
(`cpu_decode.py`).

The library is compiled with the system C compiler (`cc`/`gcc`; AVX2 + FMA) into ~/.cache/trillm/cpu-kernels/, keyed
by a hash of the source and flags; where there is no compiler, no AVX2 or no x86-64, `library()` is None and
`cpu_ops` stays on torch. OpenMP regions run on torch's own libgomp (already loaded), so they share its threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
COMPILE_FLAGS: tuple[str, ...] = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
MAX_HEAD_DIM = 128  # the attention kernel's accumulators (cpu_kernels.c)
MAX_GROUP = 64  # query heads per KV head the attention kernel takes (cpu_kernels.c)

_P, _L, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
SIGNATURES: dict[str, list[type]] = {
    "trillm_q4_1_matmul": [_P, _L, _L, _P, _L, _P],
    "trillm_q8_0_matmul": [_P, _L, _L, _P, _L, _P],
    "trillm_rms_norm": [_P, _P, _P, _P, _F, _L, _L, _P],
    "trillm_rotary_cache_write": [_P, _L, _L, _L, _L, _L, _P, _P, _P, _P, _P, _L],
    "trillm_decode_attention": [_P, _L, _P, _P, _P, _L, _P, _L, _L, _L, _L, _L, _F, _P],
    "trillm_silu_and_mul": [_P, _L, _L, _P],
    "trillm_decode_forward": [_P, _L, _L, _L, _L, _L, _L, _L, _F, _P, _P, _P, _P, _L, _P, _L, _F, _P, _P, _P],
}

_library: ctypes.CDLL | None = None
_library_tried = False


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (None where they cannot run here; said once in the log)."""
    global _library, _library_tried
    if not _library_tried:
        _library_tried = True
        try:
            _library = _load()
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("CPU decode kernels unavailable (%s): torch ops and dense float32 projections", e)
    return _library


def _load() -> ctypes.CDLL | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() not in ("x86_64", "AMD64") or capability not in ("AVX2", "AVX512"):
        log.info("CPU decode kernels need x86-64 with AVX2 (this CPU: %s %s)", platform.machine(), capability)
        return None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("CPU decode kernels need a C compiler (cc or gcc on PATH): torch ops instead")
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    target = Path.home() / ".cache" / "trillm" / "cpu-kernels" / f"cpu_kernels-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *COMPILE_FLAGS, "-o", str(built), str(SOURCE), "-lm"], check=True,
                           capture_output=True)
            os.replace(built, target)  # atomic: ranks and tests may build at once
    loaded = ctypes.CDLL(str(target))  # torch is imported: its libgomp serves the OpenMP regions
    for name, argtypes in SIGNATURES.items():
        fn = getattr(loaded, name)
        fn.argtypes, fn.restype = argtypes, None
    loaded.trillm_decode_scratch_floats.argtypes = [_L] * 6
    loaded.trillm_decode_scratch_floats.restype = _L
    return loaded


def _lib() -> ctypes.CDLL:
    loaded = library()
    assert loaded is not None, "CPU decode kernels called where library() is None"
    return loaded


def block_matmul(x: torch.Tensor, kind: str, packed: torch.Tensor, rows: int) -> torch.Tensor:
    """x [num_rows, cols] float32 contiguous → x Wᵀ [num_rows, rows] over W's packed blocks (cpu_quant.py)."""
    out = torch.empty(x.shape[0], rows)
    fn = _lib().trillm_q4_1_matmul if kind == "q4_1" else _lib().trillm_q8_0_matmul
    fn(x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(), rows, out.data_ptr())
    return out


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden] float32 contiguous
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None,  # [num_tokens, hidden] float32 contiguous
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`reference.rms_norm` in one call: (norm(x + residual) * weight, x + residual); sums of squares in double."""
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else None
    _lib().trillm_rms_norm(
        x.data_ptr(), residual.data_ptr() if residual is not None else None,
        summed.data_ptr() if summed is not None else None, weight.data_ptr(), eps, x.shape[0], x.shape[1],
        out.data_ptr(),
    )
    return out, summed


def rotary_cache_write(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] float32, rows contiguous
    num_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32 contiguous
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim] float32 contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Rotates q's and k's heads inside `qkv` in place and writes k and v at their slots."""
    head_dim = k_cache.shape[3]
    _lib().trillm_rotary_cache_write(
        qkv.data_ptr(), qkv.shape[0], qkv.stride(0), num_heads, num_kv_heads, head_dim, positions.data_ptr(),
        cos_sin_cache.data_ptr(), slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2],
    )


def decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim] float32, heads and dims contiguous
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim] float32 contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32 contiguous
    context_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """`reference.paged_decode_attention` in one call (one task per sequence and KV head)."""
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    out = torch.empty(num_seqs, num_heads, head_dim)
    _lib().trillm_decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), max_blocks,
        context_lens.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, out.data_ptr(),
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_rows, 2 * ffn] float32 contiguous -> [num_rows, ffn]
    """`reference.silu_and_mul` in one call (silu as g / (1 + exp(-g)), exp within 2 ulp)."""
    out = torch.empty(x.shape[0], x.shape[1] // 2)
    _lib().trillm_silu_and_mul(x.data_ptr(), x.shape[0], x.shape[1] // 2, out.data_ptr())
    return out


def decode_scratch_floats(num_rows: int, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                          ffn: int) -> int:
    """Floats of scratch `decode_forward` needs for up to `num_rows` rows (residual stream first)."""
    return int(_lib().trillm_decode_scratch_floats(num_rows, hidden, num_heads, num_kv_heads, head_dim, ffn))


def decode_forward(
    layers: torch.Tensor,  # [num_layers, 12] int64: cpu_kernels.c's layer table (gpu/cpu_decode.py builds it)
    num_rows: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, ffn: int, eps: float,
    positions: torch.Tensor,  # [num_rows] int64
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32 contiguous
    slot_mapping: torch.Tensor,  # [num_rows] int64, -1 = write nothing
    block_tables: torch.Tensor,  # [num_rows, max_blocks] int32 contiguous
    context_lens: torch.Tensor,  # [num_rows] int32
    block_size: int,
    scale: float,
    hidden: torch.Tensor,  # [num_rows, hidden_size] float32 contiguous: the embeddings
    scratch: torch.Tensor,  # decode_scratch_floats(...) float32; its first num_rows × hidden_size: the residual stream
    out: torch.Tensor,  # [num_rows, hidden_size] float32: the last layer's output
) -> None:
    """Every layer of a decode step in one parallel region (`trillm_decode_forward`); the final norm is the caller's."""
    _lib().trillm_decode_forward(
        layers.data_ptr(), layers.shape[0], num_rows, hidden_size, num_heads, num_kv_heads, head_dim, ffn, eps,
        positions.data_ptr(), cos_sin_cache.data_ptr(), slot_mapping.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), block_size, scale, hidden.data_ptr(), scratch.data_ptr(),
        out.data_ptr(),
    )
