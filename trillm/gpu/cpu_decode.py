"""The CPU's counterpart of decode CUDA graphs: a whole decode step's layers in one C call.

Runs outside the event loop, inside a rank process. On the GPU a decode step replays a captured graph; on the CPU the
same step through `cpu_ops` is ~240 calls from Python into torch and into `cpu_kernels.c` (four projections, two
norms, rotary, attention and SwiGLU per layer), each opening and closing its own OpenMP parallel region. At
SmolLM2-135M's sizes on two cores that dispatch, and threads parked and woken between the calls, cost as much as
the arithmetic. `trillm_decode_forward` (cpu_kernels.c) runs every layer in one parallel region whose threads meet
at a barrier between stages, with the same per-element code as the per-op kernels, so its hidden states are the
per-op path's to the bit (tests/gpu/test_cpu_decode.py).

It serves a decode step when every layer's projections were recovered as GGUF blocks (`cpu_quant.pack_model`), no
projection has a bias, one rank holds the whole model (no all-reduce between stages) and the KV caches and rotary
table are the C kernels' layout; otherwise `build` returns None and the runner keeps the per-op path.
`TRILLM_CPU_DECODE_STEP=0` keeps the per-op path too (A/B).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from trillm.gpu import cpu_kernels, cpu_ops, cpu_quant
from trillm.models.layers import AttnMeta, KVCache

log = logging.getLogger(__name__)

KINDS = {"q4_1": 0, "q8_0": 1}  # the kind codes of cpu_kernels.c's layer table
LAYER_FIELDS = 12  # cpu_kernels.c: 8 addresses, then the 4 projections' kinds


class CpuDecodeStep:
    """One model's layer table for `trillm_decode_forward`, and the scratch its stages share."""

    def __init__(self, model: Any, table: torch.Tensor, *, block_size: int, max_rows: int) -> None:
        args = model.args
        attention = model.model.layers[0].self_attn
        self.model, self.table, self.block_size, self.max_rows = model, table, block_size, max_rows
        self.num_heads, self.num_kv_heads = attention.num_heads, attention.num_kv_heads
        self.hidden_size, self.head_dim, self.scale = args.hidden_size, args.head_dim, attention.scale
        self.ffn = model.model.layers[0].mlp.gate_up_proj.weight.shape[0] // 2
        self.eps = float(model.model.layers[0].input_layernorm.eps)
        floats = cpu_kernels.decode_scratch_floats(max_rows, self.hidden_size, self.num_heads, self.num_kv_heads,
                                                   self.head_dim, self.ffn)  # fmt: skip
        self.scratch = torch.empty(floats)

    @classmethod
    def build(cls, model: Any, kv_caches: list[KVCache], *, world_size: int) -> CpuDecodeStep | None:
        """The fused step for this model and these caches, or None where it cannot serve (module docstring)."""
        if os.environ.get("TRILLM_CPU_DECODE_STEP", "1") == "0" or world_size != 1 or cpu_kernels.library() is None:
            return None
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not layers or len(layers) != len(kv_caches) or model.args.hidden_size % 4:
            return None
        rows = []
        for layer, (k_cache, v_cache) in zip(layers, kv_caches, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            projections = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
            blocks = [cpu_quant.block_weight(p.weight) for p in projections]
            if any(b is None for b in blocks) or any(p.bias is not None for p in projections):
                return None
            if not cpu_ops._is_c_cache(k_cache, v_cache, model.cos_sin_cache):  # noqa: SLF001 - one rule for both
                return None
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(n.dtype != torch.float32 or not n.is_contiguous() for n in norms):
                return None
            rows.append([b.packed.data_ptr() for b in blocks if b is not None]
                        + [n.data_ptr() for n in norms] + [k_cache.data_ptr(), v_cache.data_ptr()]
                        + [KINDS[b.kind] for b in blocks if b is not None])  # fmt: skip
        first = layers[0].self_attn
        if first.num_heads % first.num_kv_heads or first.num_heads // first.num_kv_heads > cpu_kernels.MAX_GROUP:
            return None
        table = torch.tensor(rows, dtype=torch.int64)  # addresses only: the model and the runner keep them alive
        assert table.shape[1] == LAYER_FIELDS
        log.info("CPU decode steps run all %d layers in one C call (gpu/cpu_decode.py)", len(layers))
        return cls(model, table, block_size=kv_caches[0][0].shape[2], max_rows=cpu_quant.MAX_ROWS)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor | None:
        """Final-normed hidden states [num_rows, hidden] of a decode step; None if not a decode step or too many rows."""
        num_rows = input_ids.shape[0]
        if not meta.is_decode or num_rows > self.max_rows or num_rows == 0:
            return None
        model = self.model
        hidden = model.model.embed_tokens(input_ids).float().contiguous()  # [num_rows, hidden]
        out = torch.empty_like(hidden)
        positions = positions.to(torch.int64).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        tables = meta.block_tables.to(torch.int32).contiguous()  # [num_rows, max_blocks]
        context_lens = meta.context_lens.to(torch.int32).contiguous()
        cpu_kernels.decode_forward(
            self.table, num_rows, self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.ffn,
            self.eps, positions, model.cos_sin_cache, slots, tables, context_lens, self.block_size, self.scale,
            hidden, self.scratch, out,
        )
        residual = self.scratch[: num_rows * self.hidden_size].view(num_rows, self.hidden_size)
        norm = model.model.norm
        normed: torch.Tensor = model.ops.rms_norm(out, norm.weight, norm.eps, residual)[0]
        return normed
