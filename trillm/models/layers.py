"""Tensor-parallel layers: the building blocks every architecture file composes, over paged KV and a given op set.

Runs outside the event loop, inside a rank process. Nothing here knows an architecture: the op set (`ops`: the
`trillm.gpu.reference` module on CPU, the CUDA kernels package on GPU, same function names) and the rank's place in
the tensor-parallel group are constructor arguments, and per-step attention metadata arrives as a frozen `AttnMeta`.

Tensor parallelism (Megatron style): a `ColumnParallelLinear` holds a slice of the output rows on each rank (fused
checkpoint tensors load shard by shard, side by side), a `RowParallelLinear` a slice of the input columns and is
followed by an all-reduce; which slice is `models/sharding.py`'s decision, and each layer reads only that slice of its
checkpoint tensor (`models/weights.py` sources). `ReplicatedEmbedding` stays whole on every rank (simple; costs
vocab × hidden per rank).
`load_sharded_weights` copies HF-named checkpoint tensors into such modules, following an architecture's
`packed_modules_mapping` (the one place it declares its fusions).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from trillm.errors import ModelLoadError
from trillm.models.sharding import ShardSlice
from trillm.models.weights import WeightSource, read_whole

log = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], torch.Tensor]
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # F.linear's (x, weight, bias)
KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_blocks, num_kv_heads, block_size, head_dim]
PackedModulesMapping = dict[str, tuple[str, str | int]]  # HF checkpoint name → (fused module name, shard id)


def no_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


@attrs.frozen(kw_only=True)
class AttnMeta:
    """Runner → model, once per step: where this step's tokens go in the paged KV cache and what they attend to.

    The runner builds these tensors fresh for each step (or points them at its CUDA-graph static buffers); the
    model only reads them.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding (write nothing)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor  # [num_seqs] int32: cached positions including this step's tokens
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32: sequence s owns token rows cu[s] .. cu[s+1]
    is_decode: bool  # every sequence has exactly one token: tokens and sequences are the same rows
    # A prefill whose every sequence starts at position 0 (no cached context): the prompt lengths (host ints),
    # else (). The attention then needs only this step's own q/k/v, and an op set may attend over them contiguously.
    fresh_lens: tuple[int, ...] = ()


# ---------------------------------------------------------------------------------------------------------------------
# Rotary embedding


def rope_inv_freq(
    head_dim: int, rope_theta: float, rope_scaling: tuple[tuple[str, Any], ...]
) -> torch.Tensor:  # [head_dim // 2] float32
    """Rotary inverse frequencies with the config's scaling, computed like transformers (float32)."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = dict(rope_scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type != "llama3":
        return inv_freq
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long wavelengths: slowed down
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(
    *,
    head_dim: int,
    rope_theta: float,
    rope_scaling: tuple[tuple[str, Any], ...],
    max_positions: int,
    device: torch.device,
) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half, sin in the second (reference.py's layout)."""
    inv_freq = rope_inv_freq(head_dim, rope_theta, rope_scaling).to(device)
    positions = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim // 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Tensor-parallel linear layers


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ with W's output rows split across ranks; shards of fused checkpoint tensors load side by side.

    `shards` maps a shard id to this rank's rows of that checkpoint tensor (models/sharding.py decides them: an even
    split, or a replicated KV head), in the order the shards sit in the fused weight.
    """

    def __init__(self, in_features: int, shards: dict[str | int, ShardSlice], *, bias: bool) -> None:
        super().__init__()
        self.shards = shards
        self.shard_offsets: dict[str | int, tuple[int, int]] = {}  # shard id → (offset, size) within this rank's rows
        offset = 0
        for shard_id, shard in shards.items():
            self.shard_offsets[shard_id] = (offset, shard.size)
            offset += shard.size
        self.weight = nn.Parameter(torch.empty(offset, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(offset), requires_grad=False) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: WeightSource, shard_id: str | int | None) -> None:
        shard = self.shards[shard_id] if shard_id is not None else next(iter(self.shards.values()))
        offset, size = self.shard_offsets[shard_id] if shard_id is not None else (0, param.shape[0])
        if loaded.shape[0] != shard.full_size:
            raise ModelLoadError(f"checkpoint rows {loaded.shape[0]} != {shard.full_size} for shard {shard_id!r}")
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, shard.start, size))  # only this rank's rows read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_rᵀ) with W's input columns split across ranks; the bias is added once, on rank 0."""

    def __init__(
        self,
        in_slice: ShardSlice,
        out_features: int,
        *,
        bias: bool,
        rank: int,
        world_size: int,
        all_reduce: AllReduce,
        linear: Linear = F.linear,
    ) -> None:
        super().__init__()
        self.in_slice = in_slice
        self.rank, self.world_size, self.all_reduce, self.linear = rank, world_size, all_reduce, linear
        self.weight = nn.Parameter(torch.empty(out_features, in_slice.size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: WeightSource, shard_id: str | int | None) -> None:
        if param is self.bias:
            param.data.copy_(read_whole(loaded))
            return
        if loaded.shape[1] != self.in_slice.full_size:
            raise ModelLoadError(f"checkpoint columns {loaded.shape[1]} != {self.in_slice.full_size}")
        param.data.copy_(loaded.narrow(1, self.in_slice.start, self.in_slice.size))  # only this rank's columns read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x, self.weight, self.bias if self.rank == 0 else None)
        return self.all_reduce(out) if self.world_size > 1 else out


# ---------------------------------------------------------------------------------------------------------------------
# Norm and embedding


class RMSNorm(nn.Module):
    """Holds an RMSNorm weight; the op (with its fused residual add) comes from the op set."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)


class ReplicatedEmbedding(nn.Module):
    """A [vocab, hidden] table held whole by every rank: the token embedding, or the lm_head used as a linear."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        return F.embedding(input_ids, self.weight)


# ---------------------------------------------------------------------------------------------------------------------
# Weight loading


def load_sharded_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, WeightSource]],
    packed_modules_mapping: PackedModulesMapping,
    *,
    architecture: str,
    is_skipped: Callable[[str], bool],
) -> None:
    """Copy HF-named checkpoint tensors into this rank's (possibly fused, sharded) parameters of `model`.

    Sharded parameters read only their rank's slice of each source (models/weights.py); the others read it whole.

    Raises:
        ModelLoadError: a tensor with no place in the model, or parameters the checkpoint left unfilled.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if is_skipped(name):
            continue
        module_name, _, param_kind = name.rpartition(".")  # e.g. "model.layers.0.self_attn.q_proj", "weight"
        parent, _, leaf = module_name.rpartition(".")
        shard_id: str | int | None = None
        if leaf in packed_modules_mapping:
            fused, shard_id = packed_modules_mapping[leaf]
            module_name = f"{parent}.{fused}"
        target = f"{module_name}.{param_kind}"
        if target not in params:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {architecture}")
        param = params[target]
        owner = model.get_submodule(module_name)
        loader = getattr(owner, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, shard_id)
        else:
            if tuple(tensor.shape) != tuple(param.shape):
                raise ModelLoadError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(param.shape)}")  # fmt: skip
            param.data.copy_(read_whole(tensor))
        loaded.add(target if shard_id is None else f"{target}:{shard_id}")
    _check_complete(model, params, loaded)


def _check_complete(model: nn.Module, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
    expected: set[str] = set()
    for name in params:
        module_name, _, kind = name.rpartition(".")
        owner = model.get_submodule(module_name)
        if isinstance(owner, ColumnParallelLinear):
            expected.update(f"{name}:{s}" for s in owner.shard_offsets)
        else:
            expected.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:4])}")
