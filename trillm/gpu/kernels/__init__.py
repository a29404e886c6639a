"""CUDA kernels: the GPU twins of `gpu/reference.py`, compiled at run time by CuPy and launched on torch tensors.

Runs outside the event loop (inside the rank process). This package is an op set: every public op has the
reference's name and signature, so the models call `ops.rms_norm(...)` on either. The wrappers check device, dtype,
layout and shapes (raising ValueError), allocate outputs and workspaces with torch, and launch the kernels of the
`*.cu` files beside these modules zero-copy on torch's current stream. CuPy is imported lazily: the package imports
on a CPU-only machine, and the ops raise RuntimeError there.

Modules, one job each (the `.cu` family each launches in brackets):
    backend.py            compiling and launching: CuPy's NVRTC, or the tests' emulator through `set_backend`
    arguments.py          the checks before every launch, output buffers, pointer and scalar packing
    elementwise.py        rms_norm (rms_norm.cu), silu_and_mul (activation.cu)
    linear.py             fused_linear: RMSNorm → projection → SwiGLU, one matrix-vector launch up to 8 rows (linear.cu)
    rotary.py             apply_rotary, write_kv_cache, rotary_cache_write (rotary.cu)
    decode_plan.py        which decode kernel a shape runs and the split-KV cost model (no tensors)
    decode_attention.py   paged_decode_attention (decode_attention.cu)
    prefill_attention.py  paged_prefill_attention (prefill_attention.cu); fresh_prefill_attention (torch's flash
                          SDPA for prompts with no cached context)
    all_reduce.py         one_shot_all_reduce / two_shot_all_reduce: tensor-parallel sums through CUDA IPC slots
    precompile.py         every instantiation a model shape needs, compiled before CUDA-graph capture

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
"""

from __future__ import annotations

from .all_reduce import AR_BLOCKS as AR_BLOCKS
from .all_reduce import AR_FLAG_BYTES as AR_FLAG_BYTES
from .all_reduce import AR_THREADS as AR_THREADS
from .all_reduce import all_reduce_kernel_name as all_reduce_kernel_name
from .all_reduce import one_shot_all_reduce as one_shot_all_reduce
from .all_reduce import two_shot_all_reduce as two_shot_all_reduce
from .all_reduce import region_bytes as region_bytes
from .arguments import ATTENTION_HEAD_DIMS as ATTENTION_HEAD_DIMS
from .arguments import ELEMENT_TYPES as ELEMENT_TYPES
from .arguments import LOG2E as LOG2E
from .backend import COMPILE_OPTIONS as COMPILE_OPTIONS
from .backend import FAMILIES as FAMILIES
from .backend import KERNEL_DIR as KERNEL_DIR
from .backend import CupyBackend as CupyBackend
from .backend import KernelBackend as KernelBackend
from .backend import get_backend as get_backend
from .backend import kernel_source as kernel_source
from .backend import set_backend as set_backend
from .decode_attention import paged_decode_attention as paged_decode_attention
from .decode_attention import paged_decode_attention_splits as paged_decode_attention_splits
from .decode_plan import DECODE_MAX_GROUP as DECODE_MAX_GROUP
from .decode_plan import DECODE_MMA_ROWS as DECODE_MMA_ROWS
from .decode_plan import DECODE_MMA_STAGES as DECODE_MMA_STAGES
from .decode_plan import DECODE_STAGES as DECODE_STAGES
from .decode_plan import DECODE_TILE as DECODE_TILE
from .decode_plan import DECODE_WARPS as DECODE_WARPS
from .decode_plan import MAX_DECODE_SPLITS as MAX_DECODE_SPLITS
from .decode_plan import MIN_SPLIT_TOKENS as MIN_SPLIT_TOKENS
from .decode_plan import MMA_MIN_GROUP as MMA_MIN_GROUP
from .decode_plan import SPLIT_MERGE_TOKENS as SPLIT_MERGE_TOKENS
from .decode_plan import SPLIT_OVERHEAD_TOKENS as SPLIT_OVERHEAD_TOKENS
from .decode_plan import DecodePlan as DecodePlan
from .decode_plan import decode_group_tile as decode_group_tile
from .decode_plan import decode_mma_smem_bytes as decode_mma_smem_bytes
from .decode_plan import decode_smem_bytes as decode_smem_bytes
from .decode_plan import plan_decode as plan_decode
from .decode_plan import plan_decode_splits as plan_decode_splits
from .elementwise import rms_norm as rms_norm
from .elementwise import silu_and_mul as silu_and_mul
from .linear import GEMV_MAX_ROWS as GEMV_MAX_ROWS
from .linear import fused_linear as fused_linear
from .linear import gemv_kernel_name as gemv_kernel_name
from .precompile import compile_for_model as compile_for_model
from .precompile import compile_kernels as compile_kernels
from .precompile import kernel_names as kernel_names
from .prefill_attention import PREFILL_BLOCK_M as PREFILL_BLOCK_M
from .prefill_attention import PREFILL_BLOCK_N as PREFILL_BLOCK_N
from .prefill_attention import PREFILL_WARPS as PREFILL_WARPS
from .prefill_attention import FRESH_MAX_SEQS as FRESH_MAX_SEQS
from .prefill_attention import FRESH_MIN_TOKENS as FRESH_MIN_TOKENS
from .prefill_attention import fresh_prefill_attention as fresh_prefill_attention
from .prefill_attention import paged_prefill_attention as paged_prefill_attention
from .prefill_attention import prefill_smem_bytes as prefill_smem_bytes
from .rotary import apply_rotary as apply_rotary
from .rotary import rotary_cache_write as rotary_cache_write
from .rotary import write_kv_cache as write_kv_cache
