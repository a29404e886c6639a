"""Kernel tests: every CUDA kernel of trillm/gpu/kernels/ against gpu/reference.py computed in float64.

Two backends run the same tests: `cuda` (CuPy on a GPU, `gpu` marker) and `emulator`: the same .cu sources built
as host C++ against gpu/kernels/emulate.cuh (a CPU model of thread blocks, warps, cp.async, ldmatrix and mma.sync)
and launched through ctypes with the same argument packing. The emulator needs g++ and is slow, so it runs only
when TRILLM_KERNEL_EMULATOR=1, on small shapes. Every output buffer the wrappers allocate is poisoned with NaN, and
caches start as NaN, so an element the kernel forgets to write fails the comparison. Inputs are fresh random
tensors from a per-test seeded generator (deterministic, never zeros).

The CPU-only tests at the top always run: the module imports without CuPy, the sources exist, the wrappers match the
reference's names and signatures, the layout constants agree with the .cu files, and the split cost model behaves.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trillm.gpu import kernels, reference
from trillm.gpu.kernels import arguments as kernel_arguments
from trillm.gpu.kernels import linear as kernel_linear

PUBLIC_OPS = (
    "rms_norm",
    "silu_and_mul",
    "fused_linear",
    "apply_rotary",
    "write_kv_cache",
    "rotary_cache_write",
    "paged_decode_attention",
    "paged_prefill_attention",
)
DTYPES = {"bf16_t": torch.bfloat16, "fp16_t": torch.float16}
USE_EMULATOR = os.environ.get("TRILLM_KERNEL_EMULATOR") == "1"
# Relative L2 error allowed against the float64 reference, by output dtype.
REL_TOL = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
# Largest element error allowed, relative to the largest reference magnitude.
MAX_TOL = {torch.bfloat16: 4e-2, torch.float16: 8e-3}


# ---------------------------------------------------------------------------------------------------------------
# CPU-only checks (CI)


@pytest.mark.slow
def test_module_imports_and_ops_fail_clearly_without_cupy() -> None:
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import torch\n"
        "from trillm.gpu import kernels\n"
        "x = torch.ones(2, 8, dtype=torch.bfloat16)\n"
        "try:\n"
        "    kernels.silu_and_mul(torch.ones(2, 16, dtype=torch.bfloat16))\n"
        "except RuntimeError as exc:\n"
        "    print('error:', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "error: trillm's CUDA kernels need CuPy" in result.stdout


def test_every_family_has_a_source_with_a_layout_comment() -> None:
    for family in kernels.FAMILIES:
        path = kernels.KERNEL_DIR / f"{family}.cu"
        text = path.read_text()
        assert text.startswith(f"// {family}.cu — "), path
        assert "Mapping:" in text or "grid =" in text, f"{path} lacks its grid/block mapping comment"
        assert '#include "common.cuh"' not in kernels.kernel_source(family)
        assert "TRILLM_COMMON_CUH" in kernels.kernel_source(family)


def test_wrappers_match_reference_names_and_signatures() -> None:
    for name in PUBLIC_OPS:
        ours, theirs = getattr(kernels, name), getattr(reference, name)
        ours_params = [(p.name, p.default, p.kind) for p in inspect.signature(ours).parameters.values()]
        theirs_params = [(p.name, p.default, p.kind) for p in inspect.signature(theirs).parameters.values()]
        assert ours_params == theirs_params, name


def _cu_constant(family: str, name: str) -> int:
    match = re.search(rf"constexpr int {name} = (\d+);", (kernels.KERNEL_DIR / f"{family}.cu").read_text())
    assert match, name
    return int(match.group(1))


def test_layout_constants_agree_with_the_cuda_sources() -> None:
    assert _cu_constant("decode_attention", "DEC_MMA_ROWS") == kernels.DECODE_MMA_ROWS
    assert _cu_constant("decode_attention", "DEC_WARPS") == kernels.DECODE_WARPS
    assert _cu_constant("decode_attention", "DEC_TILE") == kernels.DECODE_TILE
    assert _cu_constant("decode_attention", "DEC_STAGES") == kernels.DECODE_STAGES
    assert _cu_constant("prefill_attention", "PF_WARPS") == kernels.PREFILL_WARPS
    assert _cu_constant("prefill_attention", "PF_BM") == kernels.PREFILL_BLOCK_M
    assert _cu_constant("prefill_attention", "PF_BN") == kernels.PREFILL_BLOCK_N
    assert _cu_constant("linear", "LIN_WARPS") == kernel_linear.GEMV_WARPS
    assert _cu_constant("linear", "LIN_ROWS") == kernel_linear.GEMV_ROWS_PER_WARP


def test_split_model_never_splits_a_full_batch_and_splits_batch_one() -> None:
    assert kernels.plan_decode_splits(32 * 32, 1024, 132) == 1  # batch 32 x 32 kv heads fills 132 SMs
    assert kernels.plan_decode_splits(1 * 32, 1024, 132) == 4  # batch 1: ~one CTA per SM
    assert kernels.plan_decode_splits(1 * 8, 32768, 132) == 16
    assert kernels.plan_decode_splits(1, 16, 132) == 1  # too short to split
    for units in (1, 3, 40, 200, 5000):
        for context in (1, 100, 1024, 40000):
            splits = kernels.plan_decode_splits(units, context, 132)
            assert 1 <= splits <= kernels.MAX_DECODE_SPLITS
            assert splits == 1 or context // splits >= kernels.MIN_SPLIT_TOKENS


def test_decode_plan_picks_the_kernel_by_group_and_the_ring_by_grid_size() -> None:
    def plan(num_seqs: int, num_heads: int, num_kv_heads: int, context: int) -> kernels.DecodePlan:
        return kernels.plan_decode(torch.bfloat16, num_seqs=num_seqs, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                   head_dim=128, max_context=context, num_sms=132)  # fmt: skip

    mha = plan(32, 32, 32, 1024)
    assert mha.kernel == "paged_decode_kernel<bf16_t, 128, 1>" and mha.num_splits == 1 and mha.num_ctas == 1024
    gqa = plan(32, 32, 8, 1024)
    assert gqa.kernel == "paged_decode_mma_kernel<bf16_t, 128, 3>" and gqa.num_ctas == 256
    small = plan(1, 32, 8, 4096)  # 8 units split until about one CTA per SM: the deep ring
    assert small.kernel == "paged_decode_mma_kernel<bf16_t, 128, 6>" and small.num_ctas <= 132
    assert plan(2, 64, 2, 512).head_chunks == 2  # groups of 32 query heads: two m16 tiles
    assert plan(32, 9, 3, 1024).kernel.startswith("paged_decode_mma_kernel")  # SmolLM2's group of 3
    assert plan(1, 32, 8, 1024).num_splits == 8  # the fastest of 1..16 splits measured on the H100
    assert kernels.decode_mma_smem_bytes(128, 6) <= 227 * 1024
    with pytest.raises(ValueError, match="impl must be"):
        kernels.plan_decode(torch.bfloat16, num_seqs=1, num_heads=4, num_kv_heads=4, head_dim=64, max_context=16,
                            num_sms=132, impl="tensor")  # fmt: skip


def test_kernel_names_cover_the_instantiations_a_model_needs() -> None:
    names = kernels.kernel_names(torch.bfloat16, head_dim=64, num_heads=9, num_kv_heads=3)
    assert ("decode_attention", "paged_decode_kernel<bf16_t, 64, 3>") in names
    assert ("prefill_attention", "paged_prefill_kernel<bf16_t, 64>") in names
    assert kernels.decode_group_tile(64, 4) == (8, 2)


# ---------------------------------------------------------------------------------------------------------------
# The emulator backend


class EmulatorBackend:
    """Builds each kernel instantiation with g++ against emulate.cuh and launches it through ctypes."""

    def __init__(self, build_dir: Path) -> None:
        self._build_dir = build_dir
        self._launchers: dict[tuple[str, str], Any] = {}

    def check_device(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"the emulator runs on CPU tensors, got {device}")

    def compile(self, family: str, name: str, device: torch.device) -> None:
        key = (family, name)
        if key in self._launchers:
            return
        sources = "".join((kernels.KERNEL_DIR / f).read_text() for f in ("common.cuh", "emulate.cuh", f"{family}.cu"))
        digest = hashlib.sha256((sources + name).encode()).hexdigest()[:16]
        lib_path = self._build_dir / f"{family}-{digest}.so"
        if not lib_path.exists():
            thunk = (
                "#define TRILLM_EMULATE 1\n"
                f'#include "{family}.cu"\n'
                'extern "C" int trillm_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,\n'
                "                             unsigned bz, unsigned long long smem, void** args) {\n"
                f"  auto* kernel = &{name};\n"
                "  return emu::launch(dim3{gx, gy, gz}, dim3{bx, by, bz}, smem, [&] { emu::invoke(kernel, args); });\n"
                "}\n"
            )
            src = self._build_dir / f"{family}-{digest}.cpp"
            src.write_text(thunk)
            tmp = lib_path.with_suffix(".tmp.so")
            cmd = ["g++", "-std=c++20", "-O1", "-w", "-fPIC", "-shared", f"-I{kernels.KERNEL_DIR}", str(src), "-o",
                   str(tmp)]  # fmt: skip
            subprocess.run(cmd, check=True, timeout=600)
            tmp.rename(lib_path)
        lib = ctypes.CDLL(str(lib_path))
        lib.trillm_launch.restype = ctypes.c_int
        lib.trillm_launch.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_ulonglong, ctypes.c_void_p]
        self._launchers[key] = lib.trillm_launch

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
        self.compile(family, name, device)
        buffers = [ctypes.create_string_buffer(np.asarray(a).tobytes(), 16) for a in args]
        argv = (ctypes.c_void_p * len(args))(*[ctypes.addressof(b) for b in buffers])
        rc = self._launchers[(family, name)](*grid, *block, smem_bytes, ctypes.cast(argv, ctypes.c_void_p))
        if rc != 0:
            raise RuntimeError(f"emulated kernel {name} trapped or deadlocked")

    def num_sms(self, device: torch.device) -> int:
        return 132


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def emulator_build_dir() -> Iterator[Path]:
    path = Path(tempfile.gettempdir()) / f"trillm-kernel-emulator-{os.getuid()}"
    path.mkdir(exist_ok=True)
    yield path


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("cuda", marks=pytest.mark.gpu),
        pytest.param(
            "emulator",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(not USE_EMULATOR, reason="set TRILLM_KERNEL_EMULATOR=1 to run the CPU emulator"),
                pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator needs g++"),
            ],
        ),
    ],
)
def backend_device(request: pytest.FixtureRequest, emulator_build_dir: Path) -> Iterator[torch.device]:
    """The device the tests put tensors on, with the matching kernel backend active."""
    if request.param == "cuda":
        previous = kernels.set_backend(None)
        device = torch.device("cuda", torch.cuda.current_device())
        try:
            kernels.compile_kernels(kernel_names_for_tests(), device=device, max_workers=16)
        except Exception as exc:  # noqa: BLE001 - each test then fails on its own kernel, with the compiler's log
            print(f"precompiling the test kernels failed: {exc!r}")
        yield device
    else:
        previous = kernels.set_backend(EmulatorBackend(emulator_build_dir))
        yield torch.device("cpu")
    kernels.set_backend(previous)


@pytest.fixture
def dev(backend_device: torch.device, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """backend_device, with every buffer the wrappers allocate pre-filled with NaN."""

    def poisoned(shape: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernel_arguments, "empty", poisoned)
    return backend_device


def kernel_names_for_tests() -> list[tuple[str, str]]:
    """Every instantiation the GPU tests launch, so they can be compiled in parallel up front."""
    names = []
    for ctype in ("bf16_t", "fp16_t"):
        names += [("rms_norm", f"rms_norm_kernel<{ctype}>"), ("activation", f"silu_and_mul_kernel<{ctype}>")]
        names.append(("all_reduce", kernels.all_reduce_kernel_name(DTYPES[ctype], 2)))
        for rows, _, _, norm, _, silu_mul, _, _ in LINEAR_CASES:
            if rows <= kernels.GEMV_MAX_ROWS:
                names.append(("linear", kernels.gemv_kernel_name(DTYPES[ctype], rows, norm=norm, swiglu=silu_mul)))
        names += [("rotary", f"rotary_cache_kernel<{ctype}, {cs}>") for cs in ("float", ctype)]
    decode = [("bf16_t", c) for c in DECODE_CASES + DECODE_GPU_CASES + [(64, 16, 2, 1, [300], None)]]
    decode += [("fp16_t", c) for c in DECODE_CASES[1:3]]
    for ctype, (head_dim, _, num_heads, num_kv_heads, _, _) in decode:
        tile, _ = kernels.decode_group_tile(num_heads, num_kv_heads)
        names.append(("decode_attention", f"paged_decode_kernel<{ctype}, {head_dim}, {tile}>"))
        names.append(("decode_attention", f"paged_decode_merge_kernel<{ctype}, {head_dim}>"))
        for stages in kernels.DECODE_MMA_STAGES:
            names.append(("decode_attention", f"paged_decode_mma_kernel<{ctype}, {head_dim}, {stages}>"))
    prefill = [("bf16_t", c[0]) for c in PREFILL_CASES + PREFILL_GPU_CASES] + [("fp16_t", PREFILL_CASES[3][0])]
    names += [("prefill_attention", f"paged_prefill_kernel<{ctype}, {d}>") for ctype, d in prefill]
    names.append(("all_reduce", kernels.all_reduce_kernel_name(torch.float32, 2)))
    return sorted(set(names))


def is_emulated(device: torch.device) -> bool:
    return device.type == "cpu"


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(device)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    assert out64.shape == ref64.shape, what
    assert torch.isfinite(out64).all(), f"{what}: non-finite outputs (unwritten or NaN)"
    rel = (out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)
    worst = (out64 - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30)
    assert rel <= REL_TOL[dtype], f"{what}: relative L2 error {rel:.2e}"
    assert worst <= MAX_TOL[dtype], f"{what}: max error {worst:.2e} of the largest magnitude"


def cos_sin_cache(max_pos: int, rotary_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [max_pos, rot/2]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype).to(device)  # [max_pos, rotary_dim]


def paged_layout(
    gen: torch.Generator, context_lens: list[int], block_size: int, device: torch.device, spare_blocks: int = 3
) -> tuple[torch.Tensor, int]:
    """Block tables [num_seqs, max_blocks] int32 over a shuffled pool (rows padded with 0), and the pool size."""
    per_seq = [math.ceil(c / block_size) for c in context_lens]
    num_blocks = sum(per_seq) + spare_blocks
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(per_seq) + 1  # one padding column, like a graph-padded table
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    start = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = torch.tensor(pool[start : start + n], dtype=torch.int32)
        start += n
    return tables.to(device), num_blocks


def kv_pool(
    gen: torch.Generator, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    return rand(gen, *shape, dtype=dtype, device=device), rand(gen, *shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Elementwise kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_tokens", "hidden", "with_residual"), [(1, 576, False), (5, 576, True), (3, 4096, True)])
def test_rms_norm_matches_reference(
    dev: torch.device, dtype: torch.dtype, num_tokens: int, hidden: int, with_residual: bool
) -> None:
    gen = torch.Generator().manual_seed(hidden + num_tokens)
    x = rand(gen, num_tokens, hidden, dtype=dtype, device=dev, scale=3.0)
    weight = rand(gen, hidden, dtype=dtype, device=dev)
    residual = rand(gen, num_tokens, hidden, dtype=dtype, device=dev) if with_residual else None
    out, new_residual = kernels.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_residual = reference.rms_norm(
        x.double(), weight.double(), 1e-5, None if residual is None else residual.double()
    )
    assert_close(out, ref_out, dtype, "rms_norm out")
    if residual is None:
        assert new_residual is None
    else:
        assert new_residual is not None
        # the new residual is exactly the dtype-rounded sum
        assert torch.equal(new_residual.cpu(), (x + residual).cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_tokens", "ffn"), [(1, 64), (6, 1536)])
def test_silu_and_mul_matches_reference(dev: torch.device, dtype: torch.dtype, num_tokens: int, ffn: int) -> None:
    gen = torch.Generator().manual_seed(ffn + num_tokens)
    x = rand(gen, num_tokens, 2 * ffn, dtype=dtype, device=dev, scale=2.0)
    assert_close(kernels.silu_and_mul(x), reference.silu_and_mul(x.double()), dtype, "silu_and_mul")


# (rows, k, n_out, norm, residual, silu_mul, bias, x_stride_pad): rows 1..8 run the matrix-vector kernel (k not a
# multiple of its 256-feature stride, n_out not a multiple of its 8 columns per CTA), 9 the cuBLAS composition.
LINEAR_CASES = [
    (1, 264, 13, False, False, False, False, 0),
    (2, 1048, 70, True, True, True, True, 0),
    (1, 512, 40, True, False, False, False, 0),
    (3, 328, 24, True, True, False, True, 8),
    (8, 256, 17, True, True, True, False, 0),
    (5, 520, 16, False, False, True, True, 16),
    (9, 136, 24, True, True, True, True, 0),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "k", "n_out", "norm", "with_residual", "silu_mul", "with_bias", "pad"),
                         LINEAR_CASES)  # fmt: skip
def test_fused_linear_matches_reference(
    dev: torch.device, dtype: torch.dtype, rows: int, k: int, n_out: int, norm: bool, with_residual: bool,
    silu_mul: bool, with_bias: bool, pad: int,
) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + k + n_out)
    out_rows = 2 * n_out if silu_mul else n_out
    x = rand(gen, rows, k + pad, dtype=dtype, device=dev, scale=2.0)[:, :k]  # a row stride of k + pad
    residual = rand(gen, rows, k + pad, dtype=dtype, device=dev)[:, :k] if with_residual else None
    weight = rand(gen, out_rows, k, dtype=dtype, device=dev, scale=k**-0.5)
    bias = rand(gen, out_rows, dtype=dtype, device=dev) if with_bias else None
    norm_weight = rand(gen, k, dtype=dtype, device=dev) if norm else None
    out, summed = kernels.fused_linear(x, weight, bias, norm_weight, 1e-5, residual, silu_mul)
    d = (lambda t: None if t is None else t.double())  # noqa: E731
    ref, ref_summed = reference.fused_linear(d(x), d(weight), d(bias), d(norm_weight), 1e-5, d(residual), silu_mul)
    assert out.shape == (rows, n_out)
    assert_close(out, ref, dtype, "fused_linear out")
    if residual is None:
        assert summed is None
    else:
        assert summed is not None and torch.equal(summed.cpu(), (x + residual).cpu())  # the dtype-rounded sum


def test_fused_linear_rejects_a_residual_without_a_norm() -> None:
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="norm_weight"):
        reference.fused_linear(x, torch.zeros(8, 8, dtype=torch.bfloat16), residual=x)


@pytest.mark.gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "lens"), [(8, 2, [37, 600, 1]), (4, 4, [512])])
def test_fresh_prefill_attention_matches_the_paged_reference(num_heads: int, num_kv_heads: int, lens: list[int]) -> None:
    """Prompts from position 0 attended over their own k/v (SDPA per prompt) equal the reference over the paged cache."""
    dev, dtype, head_dim, block_size = torch.device("cuda"), torch.bfloat16, 128, 16
    gen = torch.Generator().manual_seed(sum(lens))
    num_tokens = sum(lens)
    q = rand(gen, num_tokens, num_heads, head_dim, dtype=dtype, device=dev)
    k = rand(gen, num_tokens, num_kv_heads, head_dim, dtype=dtype, device=dev)
    v = rand(gen, num_tokens, num_kv_heads, head_dim, dtype=dtype, device=dev)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
    out = kernels.fresh_prefill_attention(q, k, v, lens, head_dim**-0.5)
    assert out is not None
    tables, num_blocks = paged_layout(gen, lens, block_size, torch.device("cpu"))
    k_cache = torch.zeros(num_blocks, num_kv_heads, block_size, head_dim, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    for s, (start, length) in enumerate(zip(cu.tolist(), lens)):
        for i in range(length):
            block, offset = int(tables[s, i // block_size]), i % block_size
            k_cache[block, :, offset] = k[start + i].double().cpu()
            v_cache[block, :, offset] = v[start + i].double().cpu()
    ref = reference.paged_prefill_attention(q.double().cpu(), k_cache, v_cache, tables, cu.cpu(),
                                            torch.tensor(lens, dtype=torch.int32), head_dim**-0.5)  # fmt: skip
    assert_close(out, ref, dtype, "fresh_prefill_attention")


def test_fresh_prefill_attention_declines_cpu_tensors() -> None:
    x = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    assert kernels.fresh_prefill_attention(x, x, x, [4], 0.125) is None
    assert kernels.fresh_prefill_attention(x, x, x, [1] * (kernels.FRESH_MAX_SEQS + 1), 0.125) is None
    if torch.cuda.is_available():  # short prompts only: the paged kernel serves them
        y = torch.zeros(4, 2, 64, dtype=torch.bfloat16, device="cuda")
        assert kernels.fresh_prefill_attention(y, y, y, [4], 0.125) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_shot_all_reduce_sums_the_ranks_slots_and_alternates_them(dev: torch.device, dtype: torch.dtype) -> None:
    """Rank 0 of two, with the peer's side played by the test: its slot filled and its flags raised beforehand."""
    gen = torch.Generator().manual_seed(7)
    per_vec = 16 // torch.tensor([], dtype=dtype).element_size()
    numel = (kernels.AR_BLOCKS * kernels.AR_THREADS + 5) * per_vec  # past one grid-wide stride
    slot_bytes = numel * torch.tensor([], dtype=dtype).element_size() + 64
    regions = [torch.zeros(kernels.region_bytes(slot_bytes), dtype=torch.uint8, device=dev) for _ in range(2)]
    epochs = torch.zeros(kernels.AR_BLOCKS, dtype=torch.int32, device=dev)
    addresses = [r.data_ptr() for r in regions]
    for call in (1, 2, 3):
        x, peer = rand(gen, numel, dtype=dtype, device=dev), rand(gen, numel, dtype=dtype, device=dev)
        slot = kernels.AR_FLAG_BYTES + (call % 2) * slot_bytes
        regions[1][slot : slot + peer.numel() * peer.element_size()].view(dtype).copy_(peer)
        regions[1][: 4 * kernels.AR_BLOCKS].view(torch.int32).fill_(call)
        original = x.clone()
        out = kernels.one_shot_all_reduce(x, addresses, epochs, 0, slot_bytes)
        assert out is x
        assert torch.equal(x.cpu(), (original.float() + peer.float()).to(dtype).cpu()), call
        mine = regions[0][slot : slot + x.numel() * x.element_size()].view(dtype)
        assert torch.equal(mine.cpu(), original.cpu())  # this rank's input, published in this call's slot
        assert (regions[0][: 4 * kernels.AR_BLOCKS].view(torch.int32).cpu() == call).all()  # flags raised
        assert (epochs.cpu() == call).all()


@pytest.mark.parametrize(
    ("dtype", "head_dim", "rotary_dim", "cs_dtype", "pos_dtype"),
    [
        (torch.bfloat16, 128, 128, torch.float32, torch.int64),
        (torch.float16, 64, 32, torch.float16, torch.int32),
        (torch.bfloat16, 64, 64, torch.bfloat16, torch.int32),
    ],
)
def test_apply_rotary_matches_reference(
    dev: torch.device, dtype: torch.dtype, head_dim: int, rotary_dim: int, cs_dtype: torch.dtype,
    pos_dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    x = rand(gen, 7, 3, head_dim, dtype=dtype, device=dev)
    positions = torch.tensor([0, 1, 5, 17, 100, 2047, 3], dtype=pos_dtype, device=dev)
    cache = cos_sin_cache(2048, rotary_dim, cs_dtype, dev)
    out = kernels.apply_rotary(x, positions, cache)
    assert_close(out, reference.apply_rotary(x.double(), positions, cache.double()), dtype, "apply_rotary")
    # pass-through dims are copied exactly
    assert torch.equal(out[..., rotary_dim:].cpu(), x[..., rotary_dim:].cpu())


@pytest.mark.parametrize(("block_size", "slot_dtype"), [(16, torch.int64), (32, torch.int32)])
def test_write_kv_cache_writes_slots_and_skips_minus_one(
    dev: torch.device, block_size: int, slot_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(block_size)
    dtype, num_kv_heads, head_dim, num_blocks = torch.bfloat16, 2, 64, 4
    k = rand(gen, 5, num_kv_heads, head_dim, dtype=dtype, device=dev)
    v = rand(gen, 5, num_kv_heads, head_dim, dtype=dtype, device=dev)
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=dev)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=dev)
    slots = torch.tensor([0, block_size - 1, -1, block_size, 3 * block_size + 2], dtype=slot_dtype, device=dev)
    kernels.write_kv_cache(k, v, k_cache, v_cache, slots)
    ref_k = torch.full(shape, float("nan"), dtype=dtype)
    ref_v = torch.full(shape, float("nan"), dtype=dtype)
    reference.write_kv_cache(k.cpu(), v.cpu(), ref_k, ref_v, slots.cpu())
    assert torch.equal(k_cache.cpu().nan_to_num(7.0), ref_k.nan_to_num(7.0))
    assert torch.equal(v_cache.cpu().nan_to_num(7.0), ref_v.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (32, 8)])  # 32/8: each token split over 3 CTAs
def test_rotary_cache_write_rotates_views_in_place_and_fills_the_cache(
    dev: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int
) -> None:
    gen = torch.Generator().manual_seed(99)
    num_tokens, head_dim, block_size, num_blocks = 6, 128, 16, 3
    qkv = rand(gen, num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=dev)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)  # views: token stride = qkv width
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    positions = torch.tensor([3, 4, 5, 6, 7, 8], device=dev)
    cache = cos_sin_cache(64, head_dim, torch.float32, dev)
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=dev)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=dev)
    slots = torch.tensor([3, 4, -1, 20, 21, 47], device=dev)
    q_out, k_out = kernels.rotary_cache_write(q, k, v, positions, cache, k_cache, v_cache, slots)
    assert q_out is q and k_out is k
    ref_k_cache = torch.full(shape, float("nan"), dtype=torch.float64)
    ref_v_cache = torch.full(shape, float("nan"), dtype=torch.float64)
    ref_q, ref_k = reference.rotary_cache_write(
        q0.double().cpu(), k0.double().cpu(), v0.double().cpu(), positions.cpu(), cache.double().cpu(),
        ref_k_cache, ref_v_cache, slots.cpu(),
    )  # fmt: skip
    assert_close(q, ref_q, dtype, "q")
    assert_close(k, ref_k, dtype, "k")
    assert torch.equal(v.cpu(), v0.cpu()), "v must be untouched"
    written = slots.cpu() >= 0
    blocks, offsets = slots.cpu()[written] // block_size, slots.cpu()[written] % block_size
    assert_close(k_cache.cpu()[blocks, :, offsets], ref_k_cache[blocks, :, offsets], dtype, "k_cache")
    assert torch.equal(v_cache.cpu()[blocks, :, offsets], v0.cpu()[written])
    assert int(torch.isnan(k_cache.float()).sum()) == (num_blocks * block_size - len(blocks)) * num_kv_heads * head_dim


# ---------------------------------------------------------------------------------------------------------------
# Paged decode attention

# (head_dim, block_size, num_heads, num_kv_heads, context_lens, forced splits) — the emulator runs the short ones
DECODE_CASES = [
    (128, 16, 4, 4, [1], None),  # one token
    (128, 16, 8, 2, [16, 33, 64], 1),  # exact block boundaries, GQA 4, no split
    (64, 32, 9, 3, [70, 5, 96], 3),  # GQA 3 (SmolLM2), split path incl. empty splits
    (128, 64, 16, 2, [130, 64], 2),  # GQA 8, block 64, split
    (64, 16, 4, 4, [200], 7),  # split with uneven ranges
    (128, 16, 32, 2, [40, 17], 1),  # GQA 16: two head chunks per kv head
]
DECODE_GPU_CASES = [
    (128, 16, 32, 32, [1024] * 8, None),  # MHA batch
    (128, 32, 32, 8, [32768, 4097], None),  # long context, model's split choice
    (128, 64, 64, 8, [32768], 16),  # 32k, GQA 8, forced split
    (64, 16, 12, 3, [5000, 1, 777, 4096], None),
    (128, 16, 32, 4, [2048, 3000], 1),  # long, no split
]


def run_decode_case(
    dev: torch.device, dtype: torch.dtype, case: tuple[Any, ...], seed: int, impl: str | None = None,
    stages: int | None = None,
) -> None:
    head_dim, block_size, num_heads, num_kv_heads, context_lens, splits = case
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = paged_layout(gen, context_lens, block_size, dev)
    k_cache, v_cache = kv_pool(gen, num_blocks, num_kv_heads, block_size, head_dim, dtype, dev)
    q = rand(gen, len(context_lens), num_heads, head_dim, dtype=dtype, device=dev)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=dev)
    scale = head_dim**-0.5
    out = kernels.paged_decode_attention_splits(
        q, k_cache, v_cache, tables, lens, scale, num_splits=splits, impl=impl, stages=stages
    )
    ref = reference.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), tables, lens, scale)
    assert_close(out, ref, dtype, f"decode {impl} {case}")


@pytest.mark.parametrize("impl", ["simt", "mma"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"d{c[0]}-bs{c[1]}-h{c[2]}/{c[3]}-ctx{c[4]}-s{c[5]}")
def test_paged_decode_attention_matches_reference(dev: torch.device, case: tuple[Any, ...], impl: str) -> None:
    run_decode_case(dev, torch.bfloat16, case, seed=sum(case[4]), impl=impl)


@pytest.mark.parametrize("impl", ["simt", "mma"])
@pytest.mark.parametrize("case", DECODE_CASES[1:3], ids=["gqa4", "gqa3-split"])
def test_paged_decode_attention_fp16(dev: torch.device, case: tuple[Any, ...], impl: str) -> None:
    run_decode_case(dev, torch.float16, case, seed=7, impl=impl)


@pytest.mark.parametrize("stages", [3, 6])
def test_paged_decode_mma_ring_depths(dev: torch.device, stages: int) -> None:
    run_decode_case(dev, torch.bfloat16, (128, 32, 40, 2, [77, 300, 1], 2), seed=stages, impl="mma", stages=stages)


@pytest.mark.parametrize("impl", ["simt", "mma"])
@pytest.mark.parametrize("case", DECODE_GPU_CASES, ids=lambda c: f"d{c[0]}-bs{c[1]}-h{c[2]}/{c[3]}-n{len(c[4])}")
def test_paged_decode_attention_long_contexts(dev: torch.device, case: tuple[Any, ...], impl: str) -> None:
    if is_emulated(dev):
        pytest.skip("too long for the emulator")
    run_decode_case(dev, torch.bfloat16, case, seed=len(case[4]), impl=impl)


def test_paged_decode_attention_public_wrapper_uses_the_cost_model(dev: torch.device) -> None:
    run_decode_case(dev, torch.bfloat16, (64, 16, 2, 1, [300], None), seed=3)  # 1 unit: splits 4 ways


def test_decode_rejects_bad_inputs_clearly(backend_device: torch.device) -> None:
    dev = backend_device
    q = torch.zeros(2, 4, 96, dtype=torch.bfloat16, device=dev)
    cache = torch.zeros(3, 2, 16, 96, dtype=torch.bfloat16, device=dev)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=dev)
    lens = torch.ones(2, dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match="head_dim must be 64 or 128"):
        kernels.paged_decode_attention(q, cache, cache, tables, lens, 1.0)
    q = torch.zeros(2, 4, 64, dtype=torch.bfloat16, device=dev)
    cache = torch.zeros(3, 2, 16, 64, dtype=torch.bfloat16, device=dev)
    with pytest.raises(ValueError, match="context_lens must be torch.int32"):
        kernels.paged_decode_attention(q, cache, cache, tables, lens.long(), 1.0)
    with pytest.raises(ValueError, match="k_cache must be torch.bfloat16"):
        kernels.paged_decode_attention(q, cache.half(), cache.half(), tables, lens, 1.0)
    other = torch.device("cpu") if dev.type == "cuda" else torch.device("meta")
    with pytest.raises(ValueError):
        kernels.paged_decode_attention(q.to(other), cache, cache, tables, lens, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Paged prefill attention

# (head_dim, block_size, num_heads, num_kv_heads, [(q_len, context_len), ...])
PREFILL_CASES = [
    (128, 16, 4, 4, [(1, 1)]),  # one token, empty cache before it
    (64, 16, 8, 2, [(64, 64), (16, 48)]),  # exact tile and block boundaries; a cached prefix of 32
    (128, 32, 8, 1, [(5, 70), (0, 9), (70, 70)]),  # GQA 8, an idle sequence, a chunk spanning two q tiles
    (64, 64, 12, 3, [(1, 130), (33, 33), (100, 165)]),  # decode-like row, prefix hit, chunk at the end
]
PREFILL_GPU_CASES = [
    (128, 16, 32, 32, [(1024, 1024)]),
    (128, 32, 32, 8, [(512, 4096), (300, 300), (1, 2000), (77, 1000)]),
    (64, 64, 16, 4, [(2048, 2048), (130, 8192)]),
]


def run_prefill_case(dev: torch.device, dtype: torch.dtype, case: tuple[Any, ...], seed: int) -> None:
    head_dim, block_size, num_heads, num_kv_heads, chunks = case
    gen = torch.Generator().manual_seed(seed)
    context_lens = [c for _, c in chunks]
    tables, num_blocks = paged_layout(gen, [max(c, 1) for c in context_lens], block_size, dev)
    k_cache, v_cache = kv_pool(gen, num_blocks, num_kv_heads, block_size, head_dim, dtype, dev)
    q_lens = [n for n, _ in chunks]
    cu = torch.tensor([0, *np.cumsum(q_lens).tolist()], dtype=torch.int32, device=dev)
    q = rand(gen, sum(q_lens), num_heads, head_dim, dtype=dtype, device=dev)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=dev)
    scale = head_dim**-0.5
    out = kernels.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale)
    ref = reference.paged_prefill_attention(q.double(), k_cache.double(), v_cache.double(), tables, cu, lens, scale)
    assert_close(out, ref, dtype, f"prefill {case}")


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"d{c[0]}-bs{c[1]}-h{c[2]}/{c[3]}-{len(c[4])}seqs")
def test_paged_prefill_attention_matches_reference(dev: torch.device, case: tuple[Any, ...]) -> None:
    run_prefill_case(dev, torch.bfloat16, case, seed=len(case[4]) + case[0])


def test_paged_prefill_attention_fp16(dev: torch.device) -> None:
    run_prefill_case(dev, torch.float16, PREFILL_CASES[3], seed=11)


@pytest.mark.parametrize("case", PREFILL_GPU_CASES, ids=["1k", "mixed-gqa4", "long-d64"])
def test_paged_prefill_attention_long(dev: torch.device, case: tuple[Any, ...]) -> None:
    if is_emulated(dev):
        pytest.skip("too long for the emulator")
    run_prefill_case(dev, torch.bfloat16, case, seed=5)


def test_kernels_capture_into_a_cuda_graph(dev: torch.device) -> None:
    if is_emulated(dev):
        pytest.skip("CUDA graphs need a GPU")
    gen = torch.Generator().manual_seed(21)
    context_lens = [300, 45]
    tables, num_blocks = paged_layout(gen, context_lens, 16, dev)
    k_cache, v_cache = kv_pool(gen, num_blocks, 2, 16, 128, torch.bfloat16, dev)
    q = rand(gen, 2, 8, 128, dtype=torch.bfloat16, device=dev)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=dev)
    expected = kernels.paged_decode_attention_splits(q, k_cache, v_cache, tables, lens, 0.1, num_splits=3)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            out = kernels.paged_decode_attention_splits(q, k_cache, v_cache, tables, lens, 0.1, num_splits=3)
    torch.cuda.current_stream().wait_stream(stream)
    q.copy_(rand(gen, 2, 8, 128, dtype=torch.bfloat16, device=dev))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), tables, lens, 0.1)
    assert_close(out, ref, torch.bfloat16, "graph replay")
    assert not torch.equal(out, expected), "the replay must see the new q"
