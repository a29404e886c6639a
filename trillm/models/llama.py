"""Llama family model: Llama 2/3, Mistral, Qwen2 and SmolLM2 as one tensor-parallel torch module over paged KV.

Runs outside the event loop, inside a rank process. The blocks below compose the tensor-parallel layers of
`models/layers.py`; like them, the model never touches a global: the op set (`ops`) and the rank's place in the
tensor-parallel group are constructor arguments, and per-step attention metadata arrives as a frozen `AttnMeta`.

Tensor parallelism (Megatron style): q/k/v and gate/up are column-parallel (each rank holds a slice of the heads and
of the FFN; with fewer KV heads than ranks each rank holds a replica of the one KV head its query heads use,
models/sharding.py), o_proj and down_proj are row-parallel and followed by an all-reduce. The embedding and lm_head stay
replicated on every rank. Parameter names are the Hugging Face checkpoint names, except for the two fusions declared
once in `packed_modules_mapping`.

Architectures differ only in config: Qwen2 has q/k/v biases, SmolLM2 ties lm_head to the embedding, Llama 3 scales
its rotary frequencies ("llama3" rope scaling), Mistral's sliding window caps the usable context (no windowed
attention here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import attrs
import torch
from torch import nn

from trillm.errors import ModelLoadError
from trillm.models.layers import (
    AllReduce,
    AttnMeta,
    ColumnParallelLinear,
    KVCache,
    Linear,
    PackedModulesMapping,
    ReplicatedEmbedding,
    RMSNorm,
    RowParallelLinear,
    build_cos_sin_cache,
    load_sharded_weights,
    no_all_reduce,
)
from trillm.models.sharding import ShardSlice, attention_shards, split_evenly
from trillm.models.weights import WeightSource

log = logging.getLogger(__name__)

# HF checkpoint name → (our fused parameter's module name, shard id). The only place fusions are declared.
packed_modules_mapping: PackedModulesMapping = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


@attrs.frozen(kw_only=True)
class LlamaArgs:
    """Shape and numerics of one Llama-family checkpoint (the model's part of config.json)."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs of rope_parameters; () = none
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> LlamaArgs:
        """Read a config.json dict (transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters`)."""
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        architecture = str((config.get("architectures") or ["LlamaForCausalLM"])[0])
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ModelLoadError(f"unsupported rope scaling {rope_type!r}; supported: default, linear, llama3")
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        window = config.get("sliding_window")
        uses_window = architecture == "MistralForCausalLM" or bool(config.get("use_sliding_window"))
        return cls(
            architecture=architecture,
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=() if rope_type == "default" else tuple(sorted(rope.items())),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or bool(config.get("attention_bias", False)),
            o_bias=not is_qwen2 and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=int(window) if window and uses_window else None,
        )

    @property
    def max_model_len(self) -> int:
        """Longest sequence this model serves correctly (a sliding window caps it: no windowed attention here)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)



def checkpoint_shapes(args: LlamaArgs) -> dict[str, tuple[int, ...]]:
    """Every HF checkpoint tensor this model loads, with its full (unsharded) shape."""
    a = args
    q, kv, ffn, hidden = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size, a.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (a.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = (a.vocab_size, hidden)
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
        for name, (rows, cols) in {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden)}.items():
            shapes[f"{p}self_attn.{name}.weight"] = (rows, cols)
            if a.qkv_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q)
        if a.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        for name, (rows, cols) in {
            "gate_proj": (ffn, hidden),
            "up_proj": (ffn, hidden),
            "down_proj": (hidden, ffn),
        }.items():
            shapes[f"{p}mlp.{name}.weight"] = (rows, cols)
            if a.mlp_bias:
                shapes[f"{p}mlp.{name}.bias"] = (rows,)
    return shapes


# ---------------------------------------------------------------------------------------------------------------------
# Blocks


def projection(ops: Any) -> Linear:
    """F.linear's signature over the op set's fused_linear (its matrix-vector kernel serves the decode sizes)."""

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out: torch.Tensor = ops.fused_linear(x, weight, bias)[0]
        return out

    return linear


class LlamaAttention(nn.Module):
    """Grouped-query attention over the paged KV cache, this rank's heads only."""

    def __init__(self, args: LlamaArgs, ops: Any, rank: int, world_size: int, all_reduce: AllReduce) -> None:
        super().__init__()
        plan = attention_shards(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, rank=rank,
                                world_size=world_size)  # fmt: skip
        self.ops, self.head_dim = ops, args.head_dim
        self.num_heads, self.num_kv_heads = plan.heads.size, plan.kv_heads.size
        self.scale = args.head_dim**-0.5
        d = args.head_dim
        rows: dict[str | int, ShardSlice] = {  # heads → weight rows of q/k/v
            name: ShardSlice(h.full_size * d, h.start * d, h.size * d)
            for name, h in (("q", plan.heads), ("k", plan.kv_heads), ("v", plan.kv_heads))
        }
        self.qkv_proj = ColumnParallelLinear(args.hidden_size, rows, bias=args.qkv_bias)
        self.o_proj = RowParallelLinear(
            rows["q"],
            args.hidden_size,
            bias=args.o_bias,
            rank=rank,
            world_size=world_size,
            all_reduce=all_reduce,
            linear=projection(ops),
        )

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        norm: RMSNorm,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KVCache,
        meta: AttnMeta,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """norm(hidden + residual) → attention → o_proj; returns (projected, hidden + residual)."""
        num_tokens = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        proj = self.qkv_proj
        qkv, summed = self.ops.fused_linear(hidden, proj.weight, proj.bias, norm.weight, norm.eps, residual)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)  # [num_tokens, *_size] each
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        k_cache, v_cache = kv_cache
        q, k = self.ops.rotary_cache_write(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta.slot_mapping)
        fresh_attention = getattr(self.ops, "fresh_prefill_attention", None)
        if meta.is_decode:
            out = self.ops.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale)
        elif meta.fresh_lens and fresh_attention is not None and (
            fresh := fresh_attention(q, k, v, meta.fresh_lens, self.scale)
        ) is not None:
            out = fresh  # no cached context: this step's own k/v, attended contiguously
        else:
            out = self.ops.paged_prefill_attention(
                q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, self.scale
            )
        out = out.reshape(num_tokens, q_size)  # [num_tokens, num_heads * head_dim]
        projected: torch.Tensor = self.o_proj(out)  # [num_tokens, hidden]
        return projected, hidden if summed is None else summed


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward, this rank's slice of the intermediate dimension."""

    def __init__(self, args: LlamaArgs, ops: Any, rank: int, world_size: int, all_reduce: AllReduce) -> None:
        super().__init__()
        self.ops = ops
        ffn = split_evenly(args.intermediate_size, rank=rank, world_size=world_size, what="intermediate_size")
        self.gate_up_proj = ColumnParallelLinear(args.hidden_size, {0: ffn, 1: ffn}, bias=args.mlp_bias)
        self.down_proj = RowParallelLinear(
            ffn,
            args.hidden_size,
            bias=args.mlp_bias,
            rank=rank,
            world_size=world_size,
            all_reduce=all_reduce,
            linear=projection(ops),
        )

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """norm(hidden + residual) → gate_up → SwiGLU → down; returns (out, hidden + residual)."""
        proj = self.gate_up_proj
        act, summed = self.ops.fused_linear(hidden, proj.weight, proj.bias, norm.weight, norm.eps, residual, True)
        assert summed is not None
        out: torch.Tensor = self.down_proj(act)
        return out, summed



class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block; the residual stream is carried beside the hidden state for the fused norm."""

    def __init__(self, args: LlamaArgs, ops: Any, rank: int, world_size: int, all_reduce: AllReduce) -> None:
        super().__init__()
        self.ops = ops
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = LlamaAttention(args, ops, rank, world_size, all_reduce)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = LlamaMLP(args, ops, rank, world_size, all_reduce)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KVCache,
        meta: AttnMeta,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Each norm is fused into the projection after it (ops.fused_linear), the residual add into the norm.
        attended, summed = self.self_attn(
            hidden, residual, self.input_layernorm, positions, cos_sin_cache, kv_cache, meta
        )
        out: tuple[torch.Tensor, torch.Tensor] = self.mlp(attended, summed, self.post_attention_layernorm)
        return out



class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, args: LlamaArgs, ops: Any, rank: int, world_size: int, all_reduce: AllReduce) -> None:
        super().__init__()
        self.embed_tokens = ReplicatedEmbedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, ops, rank, world_size, all_reduce) for _ in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The served model: `forward` returns final hidden states, `compute_logits` turns chosen rows into logits.

    Parameters are created empty on the current default device and dtype (the runner sets both) and filled by
    `load_weights`; the rotary cos/sin cache is float32 whatever the model dtype.
    """

    def __init__(
        self,
        args: LlamaArgs,
        *,
        ops: Any,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: AllReduce = no_all_reduce,
        max_positions: int | None = None,
    ) -> None:
        super().__init__()
        self.args, self.ops = args, ops
        self.model = LlamaModel(args, ops, rank, world_size, all_reduce)
        self.lm_head = None if args.tie_word_embeddings else ReplicatedEmbedding(args.vocab_size, args.hidden_size)
        positions = max_positions or args.max_position_embeddings
        self.register_buffer(
            "cos_sin_cache",
            build_cos_sin_cache(
                head_dim=args.head_dim,
                rope_theta=args.rope_theta,
                rope_scaling=args.rope_scaling,
                max_positions=positions,
                device=torch.empty(0).device,
            ),
            persistent=False,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttnMeta
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] for tokens `input_ids` [num_tokens] at `positions` [num_tokens]."""
        hidden = self.model.embed_tokens(input_ids)  # [num_tokens, hidden]
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, positions, self.cos_sin_cache, kv_cache, meta)
        normed: torch.Tensor = self.ops.rms_norm(hidden, self.model.norm.weight, self.model.norm.eps, residual)[0]
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [num_rows, hidden] -> [num_rows, vocab] float32
        lm_head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        logits: torch.Tensor = self.ops.fused_linear(hidden, lm_head.weight)[0]
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, WeightSource]]) -> None:
        """Copy HF-named checkpoint tensors into this rank's (possibly fused, sharded) parameters."""

        def is_skipped(name: str) -> bool:
            return "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.args.tie_word_embeddings)

        load_sharded_weights(
            self, weights, packed_modules_mapping, architecture=self.args.architecture, is_skipped=is_skipped
        )
