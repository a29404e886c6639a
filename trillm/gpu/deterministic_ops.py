"""Deterministic op set (`--deterministic`): the CUDA kernels with every batch-dependent reduction replaced.

Runs outside the event loop, inside a rank process; `model_builder.select_ops` picks this module instead of the
kernels package when the mode is on. Same names and signatures as `gpu/reference.py`.

What changes, and why it is enough for a token's result to depend on that token alone:
- Projections (`fused_linear`, and so qkv, o, gate-up, down and lm_head): `kernels.deterministic.det_linear`, one
  fixed summation order per output element for every batch size, where cuBLAS picks algorithms (and split-K) by
  shape. RMSNorm in front and SwiGLU behind are the ordinary per-token kernels; the GEMV path is not used.
- Attention: decode and prefill (whole prompts, chunks after cached positions, prefix-cache hits, preemption
  recompute) all go through `kernels.deterministic.det_attention`, whose split of the context is fixed per position
  (256-position chunks), so a position prefilled and the same position decoded give the same bits. torch's flash
  SDPA for fresh prompts is not used (the op set has no `fresh_prefill_attention`).
- Unchanged, because they already compute each token on its own: embedding, rotary, the KV-cache writes, RMSNorm
  (one CTA per row, its width fixed by the hidden size), SwiGLU, residual adds, and the sampler (per-row softmax,
  sort and per-request generators).
Projection weights stay row-major ([out, in], what det_linear reads); CUDA graphs, chunked prefill, prefix caching,
step overlap and seeded sampling stay on. Tensor parallelism: the all-reduce sums ranks in a fixed order only on the
one-shot IPC path; see docs/deterministic.md for what holds at tp > 1.
"""

from __future__ import annotations

from trillm.gpu.kernels import apply_rotary as apply_rotary
from trillm.gpu.kernels import rms_norm as rms_norm
from trillm.gpu.kernels import rotary_cache_write as rotary_cache_write
from trillm.gpu.kernels import silu_and_mul as silu_and_mul
from trillm.gpu.kernels import write_kv_cache as write_kv_cache
from trillm.gpu.kernels.deterministic import fused_linear as fused_linear
from trillm.gpu.kernels.deterministic import paged_decode_attention as paged_decode_attention
from trillm.gpu.kernels.deterministic import paged_prefill_attention as paged_prefill_attention
