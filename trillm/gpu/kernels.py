"""CUDA kernel wrappers: the GPU twins of `gpu/reference.py`, compiled at run time by CuPy and launched on torch tensors.

Size (over STYLE's 600 lines): the module mirrors reference.py op for op, and its checks, backend and decode plan are
shared by all the wrappers; the CuPy backend class is the piece to move out first if it grows.

Every public op has the reference's name and signature. The wrappers check device, dtype, layout and shapes (raising
ValueError), allocate outputs and workspaces with torch, and launch the kernels of `gpu/kernels/*.cu` zero-copy on
torch's current stream. CuPy is imported lazily: this module imports on a CPU-only machine, and the ops raise
RuntimeError there. Runs outside the event loop (inside the rank process).

Differences from the reference a caller must know:
- `rotary_cache_write` rotates q and k IN PLACE and returns those same tensors (no copy); `apply_rotary` returns a new
  tensor. q/k/v may be views with a token stride (e.g. slices of a fused qkv projection) as long as heads and
  head_dim are packed; the attention kernels accept such a q too.
- bf16 and fp16 only; fp32 accumulation. head_dim 64 or 128 for attention; block_size a power of two.
- Decode runs one of two kernels (`plan_decode`): CUDA cores for GQA groups below MMA_MIN_GROUP, tensor cores
  (mma.sync, query heads as the M dimension) from there on; both read each KV byte once per kv head.
- `paged_decode_attention` picks a split-KV count from SHAPES only (see `plan_decode_splits`), using
  `block_tables.shape[1] * block_size` as the context bound: in eager mode pass block tables trimmed to the batch's
  longest sequence; under CUDA graphs the padded table is fine (splits over empty ranges cost little).
- CUDA-graph capture: nothing here syncs with the host or allocates outside torch (the split workspace comes from
  torch, sized by shapes alone), but compiling a kernel cannot be captured: call `compile_for_model` (or run one eager
  step) before capturing.

Compilation: one `cupy.RawModule` per kernel instantiation (family, template arguments), built on first use and cached
for the process (CuPy also caches the binary on disk). Options: `-std=c++17` and `-arch=sm_<cc>` of the device, with
the arch-specific `sm_90a` on Hopper. CuPy appends its own `-arch=sm_<cc>` after ours; NVRTC 13 honours the first
(checked: an sm_90a-only instruction compiles that way). Should an NVRTC reject the pair, the module is rebuilt without
ours (no kernel here needs sm_90a-only instructions).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import attrs
import numpy as np
import torch

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).with_name("kernels")
COMPILE_OPTIONS = ("-std=c++17",)
FAMILIES = ("rms_norm", "activation", "rotary", "decode_attention", "prefill_attention")
ELEMENT_TYPES = {torch.bfloat16: "bf16_t", torch.float16: "fp16_t"}
ATTENTION_HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634

# decode_attention.cu constants (keep in sync with DecodeLayout / DecodeMmaLayout there)
DECODE_WARPS, DECODE_TILE, DECODE_STAGES, DECODE_MAX_GROUP, DECODE_MMA_ROWS = 4, 16, 3, 8, 16
DECODE_MMA_STAGES = (3, 6)  # ring depths: two CTAs per SM, or one CTA per SM with deep prefetch (small grids)
# GQA groups this large use the tensor-core decode kernel, smaller ones the CUDA-core one. Measured on the H100
# (bench/results/h100-kernels-2026-11-24.json, graph replay): group 1 (Llama-2-7B, b32 x 1k) CUDA-core 189 us vs mma
# 192 us; group 3 (SmolLM2, b32 x 1k) 16.2 vs 15.8 us; group 4 (b32 x 1k, 32/8 heads) 57.1 vs 54.4 us.
MMA_MIN_GROUP = 3
# prefill_attention.cu constants (keep in sync with PrefillLayout there)
PREFILL_WARPS, PREFILL_BLOCK_M, PREFILL_BLOCK_N = 4, 64, 64

# Split-KV cost model (see plan_decode_splits), in units of "tokens one CTA streams".
SPLIT_OVERHEAD_TOKENS = 48  # per CTA: launch, q load, pipeline fill, the 4-warp merge and the write-out
SPLIT_MERGE_TOKENS = 32  # the merge kernel's launch and its pass over the partial rows
MAX_DECODE_SPLITS = 32
# At least two tiles per warp per split: batch 1 x 1k on 8 kv heads measured 9.4 us with 16 splits, 8.8 us with 8
MIN_SPLIT_TOKENS = 8 * DECODE_TILE


# ---------------------------------------------------------------------------------------------------------------
# Sources, backends, launching


@functools.cache
def kernel_source(family: str) -> str:
    """The full source NVRTC compiles for one family: common.cuh pasted where the .cu includes it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}")
    common = (KERNEL_DIR / "common.cuh").read_text()
    body = (KERNEL_DIR / f"{family}.cu").read_text()
    return body.replace('#include "common.cuh"', common, 1)


class KernelBackend(Protocol):
    """Something that compiles and launches the kernels of `gpu/kernels/`: CuPy, or the CPU emulator of the tests."""

    def check_device(self, device: torch.device) -> None: ...
    def compile(self, family: str, name: str, device: torch.device) -> None: ...
    def launch(
        self,
        family: str,
        name: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        smem_bytes: int,
        args: tuple[Any, ...],
        device: torch.device,
    ) -> None: ...
    def num_sms(self, device: torch.device) -> int: ...


class CupyBackend:
    """Compiles with NVRTC through cupy.RawModule; launches on torch's current stream of the tensors' device."""

    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise RuntimeError(
                "trillm's CUDA kernels need CuPy (cupy-cuda12x or cupy-cuda13x matching the CUDA driver); "
                "on a machine without a GPU use trillm.gpu.reference"
            ) from exc
        self._cupy: Any = cupy
        self._functions: dict[tuple[int, str, str], Any] = {}  # (device index, family, name) -> Function
        self._raw_kernels: dict[tuple[int, str, str], Any] = {}  # the RawKernel behind each Function
        self._smem_limits: dict[tuple[int, str, str], int] = {}
        self._streams: dict[int, Any] = {}
        self._sm_counts: dict[int, int] = {}
        self._lock = threading.Lock()

    def check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"tensors must be on a CUDA device, got {device} (use trillm.gpu.reference on CPU)")

    def _compile_raw_kernel(self, family: str, name: str, device_index: int) -> Any:
        major, minor = torch.cuda.get_device_capability(device_index)
        arch = f"-arch=sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
        for options in (COMPILE_OPTIONS + (arch,), COMPILE_OPTIONS):
            module = self._cupy.RawModule(code=kernel_source(family), options=options, name_expressions=(name,))
            raw = module.get_function(name)
            try:
                raw.kernel  # compiles, or loads from CuPy's disk cache
                return raw
            except self._cupy.cuda.compiler.CompileException:
                if options == COMPILE_OPTIONS:
                    raise
                log.warning("NVRTC rejected %s for %s; compiling with CuPy's default architecture", arch, name)
        raise AssertionError("unreachable")  # pragma: no cover

    def compile(self, family: str, name: str, device: torch.device) -> None:
        key = (device.index or 0, family, name)
        if key in self._functions:
            return
        with self._cupy.cuda.Device(key[0]):
            raw = self._compile_raw_kernel(family, name, key[0])
            function = raw.kernel
        with self._lock:
            self._raw_kernels[key] = raw
            self._functions[key] = function
            self._smem_limits[key] = 48 * 1024
        log.debug("compiled %s", name)

    def _function(self, family: str, name: str, smem_bytes: int, device: torch.device) -> Any:
        key = (device.index or 0, family, name)
        function = self._functions.get(key)
        if function is None:
            self.compile(family, name, device)
            function = self._functions[key]
        if smem_bytes > self._smem_limits[key]:  # more than the default 48 KB needs an opt-in per function
            self._raw_kernels[key].max_dynamic_shared_size_bytes = smem_bytes
            self._smem_limits[key] = smem_bytes
        return function

    def _stream(self, device: torch.device) -> Any:
        ptr = torch.cuda.current_stream(device).cuda_stream
        stream = self._streams.get(ptr)
        if stream is None:
            stream = self._streams[ptr] = self._cupy.cuda.ExternalStream(ptr, device.index)
        return stream

    def launch(
        self,
        family: str,
        name: str,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        smem_bytes: int,
        args: tuple[Any, ...],
        device: torch.device,
    ) -> None:
        with self._cupy.cuda.Device(device.index):
            function = self._function(family, name, smem_bytes, device)
            function(grid, block, args, shared_mem=smem_bytes, stream=self._stream(device))

    def num_sms(self, device: torch.device) -> int:
        index = device.index or 0
        count = self._sm_counts.get(index)
        if count is None:
            count = self._sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return count


# The process-wide backend (a registry like the compiled-module cache; tests swap in the emulator).
_backend: KernelBackend | None = None


def get_backend() -> KernelBackend:
    """The active backend, creating the CuPy one on first use (RuntimeError when CuPy is missing)."""
    global _backend
    if _backend is None:
        _backend = CupyBackend()
    return _backend


def set_backend(backend: KernelBackend | None) -> KernelBackend | None:
    """Replace the active backend (None: CuPy again on next use); returns the previous one."""
    global _backend
    previous, _backend = _backend, backend
    return previous


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and workspace comes from here (tests poison them by replacing this function)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _i32(x: int) -> np.int32:
    return np.int32(x)


def _i64(x: int) -> np.int64:
    return np.int64(x)


def _f32(x: float) -> np.float32:
    return np.float32(x)


# ---------------------------------------------------------------------------------------------------------------
# Checks


def _element_type(t: torch.Tensor, name: str) -> str:
    if t.dtype not in ELEMENT_TYPES:
        raise ValueError(f"{name} must be bfloat16 or float16, got {t.dtype}")
    return ELEMENT_TYPES[t.dtype]


def _check_devices(backend: KernelBackend, **tensors: torch.Tensor | None) -> torch.device:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    device = named[0][1].device
    backend.check_device(device)
    for n, t in named:
        if t.device != device:
            raise ValueError(f"{n} is on {t.device}, expected {device} like {named[0][0]}")
    return device


def _check_shape(t: torch.Tensor, name: str, shape: Sequence[int | None]) -> None:
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        dims = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{dims}], got {list(t.shape)}")


def _check_dtype(t: torch.Tensor, name: str, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.data_ptr() % 16:
        raise ValueError(f"{name} must be 16-byte aligned")


def _check_token_rows(t: torch.Tensor, name: str) -> int:
    """A [tokens, heads, dim] tensor whose heads and dims are packed; returns its token stride (elements)."""
    if t.dim() != 3 or t.stride(2) != 1 or t.stride(1) != t.shape[2]:
        raise ValueError(f"{name} must be [tokens, heads, head_dim] with heads and head_dim packed")
    if t.stride(0) % 8 or t.data_ptr() % 16:
        raise ValueError(f"{name}'s rows must be 16-byte aligned (token stride {t.stride(0)})")
    return t.stride(0)


def _block_size_log2(k_cache: torch.Tensor) -> int:
    block_size = k_cache.shape[2]
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return block_size.bit_length() - 1


# ---------------------------------------------------------------------------------------------------------------
# Elementwise ops


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm with an optional fused residual add: returns (norm(x + residual) * weight, x + residual)."""
    backend = get_backend()
    device = _check_devices(backend, x=x, weight=weight, residual=residual)
    ctype = _element_type(x, "x")
    _check_shape(x, "x", (None, None))
    num_tokens, hidden = x.shape
    _check_shape(weight, "weight", (hidden,))
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None:
            _check_dtype(t, name, (x.dtype,))
            _check_contiguous(t, name)
    if residual is not None:
        _check_shape(residual, "residual", (num_tokens, hidden))
    if hidden % 8 or hidden > 24576:
        raise ValueError(f"hidden must be a multiple of 8 and at most 24576, got {hidden}")
    out = _empty((num_tokens, hidden), x.dtype, device)
    residual_out = None if residual is None else _empty((num_tokens, hidden), x.dtype, device)
    if num_tokens:
        threads = min(256, 32 * math.ceil(hidden // 8 / 32))
        args = (_ptr(out), _ptr(residual_out), _ptr(x), _ptr(residual), _ptr(weight), _i32(hidden), _f32(eps))
        backend.launch("rms_norm", f"rms_norm_kernel<{ctype}>", (num_tokens, 1, 1), (threads, 1, 1), hidden * 2, args,
                       device)
    return out, residual_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * ffn] -> [num_tokens, ffn]
    """SwiGLU activation: silu(gate) * up, with gate the first half of the last dim and up the second."""
    backend = get_backend()
    device = _check_devices(backend, x=x)
    ctype = _element_type(x, "x")
    _check_shape(x, "x", (None, None))
    _check_contiguous(x, "x")
    num_tokens, width = x.shape
    if width % 16:
        raise ValueError(f"x's last dim must be 2 * ffn with ffn a multiple of 8, got {width}")
    ffn = width // 2
    out = _empty((num_tokens, ffn), x.dtype, device)
    if num_tokens:
        threads = min(256, 32 * math.ceil(ffn // 8 / 32))
        grid = (num_tokens, math.ceil(ffn // 8 / threads), 1)
        backend.launch("activation", f"silu_and_mul_kernel<{ctype}>", grid, (threads, 1, 1), 0,
                       (_ptr(out), _ptr(x), _i32(ffn)), device)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rotary embedding and KV-cache writes (one kernel, rotary.cu)


def _index_flag(t: torch.Tensor, name: str, num_tokens: int) -> int:
    _check_shape(t, name, (num_tokens,))
    _check_dtype(t, name, (torch.int32, torch.int64))
    _check_contiguous(t, name)
    return int(t.dtype == torch.int64)


def _check_cos_sin(cos_sin_cache: torch.Tensor, x: torch.Tensor) -> tuple[str, int]:
    _check_shape(cos_sin_cache, "cos_sin_cache", (None, None))
    _check_dtype(cos_sin_cache, "cos_sin_cache", (torch.float32, x.dtype))
    _check_contiguous(cos_sin_cache, "cos_sin_cache")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 16 or rotary_dim > x.shape[2] or x.shape[2] % 8:
        raise ValueError(
            f"rotary_dim must be a multiple of 16 and at most head_dim (a multiple of 8); got rotary_dim {rotary_dim},"
            f" head_dim {x.shape[2]}"
        )
    ctype = "float" if cos_sin_cache.dtype == torch.float32 else ELEMENT_TYPES[x.dtype]
    return ctype, rotary_dim


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> None:
    _check_shape(k_cache, "k_cache", (None, None, None, None))
    _check_shape(v_cache, "v_cache", tuple(k_cache.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_dtype(t, name, (dtype,))
        _check_contiguous(t, name)


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
        return _i64(0 if t is None else t.stride(0))

    args = (
        _ptr(q_out), _ptr(q_in), stride(q_out), stride(q_in), _i32(num_heads),
        _ptr(k_out), _ptr(k_in), stride(k_out), stride(k_in), _i32(num_kv_heads),
        _ptr(v), stride(v), _ptr(k_cache), _ptr(v_cache),
        _ptr(slot_mapping), _i32(int(slot_mapping is not None and slot_mapping.dtype == torch.int64)),
        _ptr(positions), _i32(int(positions is not None and positions.dtype == torch.int64)),
        _ptr(cos_sin_cache), _i32(rotary_dim), _i32(head_dim), _i32(block_size),
        _i32(int(rotate_k)), _i32(int(k_cache is not None)),
    )  # fmt: skip
    name = f"rotary_cache_kernel<{ELEMENT_TYPES[dtype]}, {cos_sin_type}>"
    get_backend().launch("rotary", name, (num_tokens, 1, 1), (128, 1, 1), 0, args, device)


def apply_rotary(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]
) -> torch.Tensor:
    """Rotate-half rotary embedding on the first `rotary_dim` features of every head (returns a new tensor)."""
    device = _check_devices(get_backend(), x=x, positions=positions, cos_sin_cache=cos_sin_cache)
    _element_type(x, "x")
    _check_token_rows(x, "x")
    _index_flag(positions, "positions", x.shape[0])
    cos_sin_type, _ = _check_cos_sin(cos_sin_cache, x)
    out = _empty(x.shape, x.dtype, device)
    _rotary_launch(device=device, q_out=out, q_in=x, k_out=None, k_in=None, v=None, k_cache=None, v_cache=None,
                   slot_mapping=None, positions=positions, cos_sin_cache=cos_sin_cache, cos_sin_type=cos_sin_type,
                   rotate_k=False, dtype=x.dtype)
    return out


def _check_kv_inputs(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    _element_type(k, "k")
    _check_token_rows(k, "k")
    _check_token_rows(v, "v")
    _check_shape(v, "v", tuple(k.shape))
    _check_dtype(v, "v", (k.dtype,))
    _check_cache_pair(k_cache, v_cache, k.dtype)
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
    device = _check_devices(get_backend(), k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
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
    device = _check_devices(get_backend(), q=q, k=k, v=v, positions=positions, cos_sin_cache=cos_sin_cache,
                            k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _element_type(q, "q")
    _check_token_rows(q, "q")
    _check_dtype(k, "k", (q.dtype,))
    _check_kv_inputs(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} disagree on tokens or head_dim")
    _index_flag(positions, "positions", q.shape[0])
    cos_sin_type, _ = _check_cos_sin(cos_sin_cache, q)
    _rotary_launch(device=device, q_out=q, q_in=q, k_out=k, k_in=k, v=v, k_cache=k_cache, v_cache=v_cache,
                   slot_mapping=slot_mapping, positions=positions, cos_sin_cache=cos_sin_cache,
                   cos_sin_type=cos_sin_type, rotate_k=True, dtype=q.dtype)
    return q, k


# ---------------------------------------------------------------------------------------------------------------
# Paged attention


def decode_group_tile(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(query heads per CTA, CTAs per kv head) of the CUDA-core decode kernel for this GQA shape."""
    group = num_heads // num_kv_heads
    tile = min(group, DECODE_MAX_GROUP)
    return tile, math.ceil(group / tile)


def decode_smem_bytes(head_dim: int, group_tile: int) -> int:
    """Dynamic shared memory of paged_decode_kernel (DecodeLayout::BYTES in decode_attention.cu)."""
    q_bytes = group_tile * (head_dim + 8) * 4
    pipe = DECODE_WARPS * DECODE_STAGES * DECODE_TILE * ((head_dim + 8) + head_dim) * 2
    merge = DECODE_WARPS * group_tile * (head_dim + 2) * 4
    return q_bytes + max(pipe, merge)


def decode_mma_smem_bytes(head_dim: int, stages: int) -> int:
    """Dynamic shared memory of paged_decode_mma_kernel (DecodeMmaLayout::BYTES in decode_attention.cu)."""
    pipe = DECODE_WARPS * stages * 2 * DECODE_TILE * (head_dim + 8) * 2
    merge = DECODE_WARPS * DECODE_MMA_ROWS * (head_dim + 2) * 4
    return max(pipe, merge)


@attrs.frozen(kw_only=True)
class DecodePlan:
    """How paged_decode_attention runs for one shape: which kernel, CTAs per kv head, splits, ring depth."""

    kernel: str  # instantiation name
    head_chunks: int
    num_splits: int
    smem_bytes: int
    num_ctas: int


def plan_decode(
    dtype: torch.dtype,
    *,
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_context: int,
    num_sms: int,
    impl: str | None = None,
    num_splits: int | None = None,
    stages: int | None = None,
) -> DecodePlan:
    """The decode launch for a shape (None: the default choice for impl "simt"/"mma", splits and mma ring depth)."""
    ctype = ELEMENT_TYPES[dtype]
    group = num_heads // num_kv_heads
    impl = impl or ("mma" if group >= MMA_MIN_GROUP else "simt")
    if impl == "simt":
        rows, head_chunks = decode_group_tile(num_heads, num_kv_heads)
    elif impl == "mma":
        rows, head_chunks = DECODE_MMA_ROWS, math.ceil(group / DECODE_MMA_ROWS)
    else:
        raise ValueError(f"impl must be 'simt' or 'mma', got {impl!r}")
    units = num_seqs * num_kv_heads * head_chunks
    if num_splits is None:
        num_splits = plan_decode_splits(units, max_context, num_sms)
    if not 1 <= num_splits <= 1024:
        raise ValueError(f"num_splits must be in 1..1024, got {num_splits}")
    if impl == "simt":
        kernel, smem = f"paged_decode_kernel<{ctype}, {head_dim}, {rows}>", decode_smem_bytes(head_dim, rows)
    else:
        if stages is None:  # a CTA alone on its SM needs the deep ring to keep enough bytes in flight
            stages = DECODE_MMA_STAGES[1] if units * num_splits <= num_sms else DECODE_MMA_STAGES[0]
        if stages not in DECODE_MMA_STAGES:
            raise ValueError(f"stages must be one of {DECODE_MMA_STAGES}, got {stages}")
        kernel, smem = f"paged_decode_mma_kernel<{ctype}, {head_dim}, {stages}>", decode_mma_smem_bytes(head_dim, stages)
    return DecodePlan(kernel=kernel, head_chunks=head_chunks, num_splits=num_splits, smem_bytes=smem,
                      num_ctas=units * num_splits)


def prefill_smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of paged_prefill_kernel (PrefillLayout::BYTES in prefill_attention.cu)."""
    pitch = head_dim + 8
    return (PREFILL_BLOCK_M * pitch + 2 * 2 * PREFILL_BLOCK_N * pitch) * 2


def plan_decode_splits(num_units: int, max_context: int, num_sms: int) -> int:
    """How many splits of the context each (sequence, kv-head chunk) gets in the decode kernel.

    Cost model (decode attention is bound by reading K and V): a CTA's time is the tokens it streams plus a fixed
    SPLIT_OVERHEAD_TOKENS; one CTA per SM already has enough copies in flight to take that SM's share of bandwidth, so
    CTAs sharing an SM slow each other down and the busiest SM sets the time:
        time(P) = ceil(num_units * P / num_sms) * (ceil(max_context / P) rounded up to a tile + SPLIT_OVERHEAD_TOKENS)
                  + (P > 1) * SPLIT_MERGE_TOKENS
    The smallest P minimising it wins, with P <= MAX_DECODE_SPLITS and at least MIN_SPLIT_TOKENS per split. So many
    sequences x kv heads (>= the SM count) never split; batch 1 on 32 kv heads splits ~4 ways. Checked against forced
    splits on the H100 (batch 1 x 1k, 32 kv heads: 1/2/4/8/16 splits took 20.2/14.9/13.4/13.6/16.5 us; 8 kv heads:
    20.7/13.7/9.9/8.8/9.4 us), where the model picks 4 and 8.
    """
    best_splits, best_time = 1, math.inf
    max_splits = max(1, min(MAX_DECODE_SPLITS, max_context // MIN_SPLIT_TOKENS))
    for splits in range(1, max_splits + 1):
        tokens = math.ceil(max_context / splits / DECODE_TILE) * DECODE_TILE
        time = math.ceil(num_units * splits / num_sms) * (tokens + SPLIT_OVERHEAD_TOKENS)
        time += SPLIT_MERGE_TOKENS if splits > 1 else 0
        if time < best_time:
            best_splits, best_time = splits, time
    return best_splits


def _check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     num_seqs: int) -> tuple[str, int]:
    ctype = _element_type(q, "q")
    _check_token_rows(q, "q")
    _check_cache_pair(k_cache, v_cache, q.dtype)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    if head_dim not in ATTENTION_HEAD_DIMS or k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim must be 64 or 128 and match k_cache's; got q {head_dim}, k_cache {k_cache.shape[3]}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    _check_shape(block_tables, "block_tables", (num_seqs, None))
    _check_dtype(block_tables, "block_tables", (torch.int32,))
    _check_contiguous(block_tables, "block_tables")
    return ctype, _block_size_log2(k_cache)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, each >= 1
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """One query token per sequence attending to all of its `context_len` cached positions (GQA-aware)."""
    return paged_decode_attention_splits(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None)


def paged_decode_attention_splits(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None,
    impl: str | None = None,
    stages: int | None = None,
) -> torch.Tensor:
    """paged_decode_attention with the plan forced (None: the default choice; see plan_decode); tests and benches."""
    backend = get_backend()
    device = _check_devices(backend, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                            context_lens=context_lens)
    num_seqs, num_heads, head_dim = q.shape
    ctype, block_log2 = _check_attention(q, k_cache, v_cache, block_tables, num_seqs)
    _check_shape(context_lens, "context_lens", (num_seqs,))
    _check_dtype(context_lens, "context_lens", (torch.int32,))
    _check_contiguous(context_lens, "context_lens")
    num_kv_heads = k_cache.shape[1]
    out = _empty((num_seqs, num_heads, head_dim), q.dtype, device)
    if num_seqs == 0:
        return out
    plan = plan_decode(q.dtype, num_seqs=num_seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       max_context=block_tables.shape[1] * k_cache.shape[2], num_sms=backend.num_sms(device),
                       impl=impl, num_splits=num_splits, stages=stages)
    num_splits = plan.num_splits
    part_out = part_ml = None
    if num_splits > 1:
        part_out = _empty((num_seqs, num_heads, num_splits, head_dim), torch.float32, device)
        part_ml = _empty((num_seqs, num_heads, num_splits, 2), torch.float32, device)
    args = (
        _ptr(out), _ptr(part_out), _ptr(part_ml), _ptr(q), _i64(q.stride(0)), _ptr(k_cache), _ptr(v_cache),
        _ptr(block_tables), _i32(block_tables.shape[1]), _ptr(context_lens), _i32(num_heads), _i32(num_kv_heads),
        _i32(plan.head_chunks), _i32(block_log2), _f32(scale * LOG2E), _i32(num_splits),
    )  # fmt: skip
    grid = (num_splits, num_kv_heads * plan.head_chunks, num_seqs)
    backend.launch("decode_attention", plan.kernel, grid, (DECODE_WARPS * 32, 1, 1), plan.smem_bytes, args, device)
    if num_splits > 1:
        merge = f"paged_decode_merge_kernel<{ctype}, {head_dim}>"
        backend.launch("decode_attention", merge, (num_heads, num_seqs, 1), (head_dim, 1, 1), 0,
                       (_ptr(out), _ptr(part_out), _ptr(part_ml), _i32(num_heads), _i32(num_splits)), device)
    return out


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
    device = _check_devices(backend, q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                            cu_seqlens_q=cu_seqlens_q, context_lens=context_lens)
    num_seqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    ctype, block_log2 = _check_attention(q, k_cache, v_cache, block_tables, num_seqs)
    for name, t, n in (("cu_seqlens_q", cu_seqlens_q, num_seqs + 1), ("context_lens", context_lens, num_seqs)):
        _check_shape(t, name, (n,))
        _check_dtype(t, name, (torch.int32,))
        _check_contiguous(t, name)
    num_tokens, num_heads, head_dim = q.shape
    out = _empty((num_tokens, num_heads, head_dim), q.dtype, device)
    max_tiles = (num_tokens + num_seqs * (PREFILL_BLOCK_M - 1)) // PREFILL_BLOCK_M
    if max_tiles == 0 or num_seqs == 0:
        return out
    args = (
        _ptr(out), _ptr(q), _i64(q.stride(0)), _ptr(k_cache), _ptr(v_cache), _ptr(block_tables),
        _i32(block_tables.shape[1]), _ptr(cu_seqlens_q), _ptr(context_lens), _i32(num_seqs), _i32(num_heads),
        _i32(k_cache.shape[1]), _i32(block_log2), _f32(scale * LOG2E),
    )  # fmt: skip
    backend.launch("prefill_attention", f"paged_prefill_kernel<{ctype}, {head_dim}>", (max_tiles, num_heads, 1),
                   (PREFILL_WARPS * 32, 1, 1), prefill_smem_bytes(head_dim), args, device)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation


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
