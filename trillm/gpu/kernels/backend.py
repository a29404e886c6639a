"""Kernel backend: what compiles and launches the `.cu` kernels — CuPy's NVRTC, or a CPU emulator the tests swap in.

Runs outside the event loop (inside the rank process). The wrappers call every launch through `get_backend()`, so
`set_backend` is the one hook that redirects them: the kernel tests install their emulator backend there (the same
.cu sources built as host C++, `TRILLM_KERNEL_EMULATOR=1`) and restore the previous one afterwards.

Compilation: one `cupy.RawModule` per kernel instantiation (family, template arguments), built on first use and cached
for the process (CuPy also caches the binary on disk). Options: `-std=c++17` and `-arch=sm_<cc>` of the device, with
the arch-specific `sm_90a` on Hopper. CuPy appends its own `-arch=sm_<cc>` after ours; NVRTC 13 honours the first
(checked: an sm_90a-only instruction compiles that way). Should an NVRTC reject the pair, the module is rebuilt without
ours (no kernel here needs sm_90a-only instructions). CuPy is imported lazily, by the first `CupyBackend`: the package
imports on a CPU-only machine, and the ops raise RuntimeError there.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).parent  # the .cu / .cuh sources sit beside this package's modules
COMPILE_OPTIONS = ("-std=c++17",)
FAMILIES = ("rms_norm", "activation", "linear", "rotary", "decode_attention", "prefill_attention", "all_reduce",
            "deterministic")


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
