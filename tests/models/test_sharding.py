"""Tensor-parallel sharding: head and KV-head slices (split or replicated), errors naming the dimension, 70B presets."""

from __future__ import annotations

import attrs
import pytest
import torch

from trillm.config import RunnerConfig
from trillm.errors import ModelLoadError
from trillm.gpu import cpu_ops
from trillm.gpu.kv_cache import allocate_kv_cache
from trillm.models.llama import LlamaArgs, LlamaForCausalLM, checkpoint_shapes
from trillm.models.presets import preset_config
from trillm.models.sharding import ShardSlice, attention_shards, kv_heads_per_rank, split_evenly


def test_kv_heads_split_when_tp_divides_them() -> None:
    plans = [attention_shards(num_heads=64, num_kv_heads=8, rank=r, world_size=4) for r in range(4)]
    assert [(p.heads.start, p.heads.size) for p in plans] == [(0, 16), (16, 16), (32, 16), (48, 16)]
    assert [(p.kv_heads.start, p.kv_heads.size, p.kv_replicas) for p in plans] == [(0, 2, 1), (2, 2, 1), (4, 2, 1),
                                                                                   (6, 2, 1)]  # fmt: skip


def test_kv_heads_are_replicated_on_the_ranks_whose_query_heads_use_them() -> None:
    """8 query heads over 2 KV heads (groups of 4) at tp=8: query head r uses KV head r // 4, so rank r holds it."""
    for world_size in (4, 8):
        for rank in range(world_size):
            plan = attention_shards(num_heads=8, num_kv_heads=2, rank=rank, world_size=world_size)
            group = 8 // 2
            used = {h // group for h in range(plan.heads.start, plan.heads.start + plan.heads.size)}
            assert used == {plan.kv_heads.start} and plan.kv_heads.size == 1
            assert plan.kv_replicas == world_size // 2
    assert kv_heads_per_rank(num_heads=8, num_kv_heads=2, world_size=8) == 1


def test_tp_that_does_not_divide_the_heads_names_num_attention_heads() -> None:
    with pytest.raises(ModelLoadError) as info:
        attention_shards(num_heads=12, num_kv_heads=6, rank=0, world_size=8)
    assert str(info.value) == ("tensor parallelism 8 does not divide num_attention_heads (12): every rank must hold "
                               "an equal slice; choose a tp that divides 12")  # fmt: skip


def test_kv_heads_neither_divisible_nor_a_divisor_of_tp_is_an_error() -> None:
    with pytest.raises(ModelLoadError) as info:
        attention_shards(num_heads=12, num_kv_heads=6, rank=0, world_size=4)
    assert str(info.value) == (
        "tensor parallelism 4 does not divide num_key_value_heads (6): every rank must hold an equal slice; choose a "
        "tp that divides 6"
    )
    with pytest.raises(ModelLoadError) as info:
        attention_shards(num_heads=24, num_kv_heads=3, rank=0, world_size=8)
    assert "larger than num_key_value_heads (3) and not a multiple of it" in str(info.value)


def test_model_with_an_ffn_tp_does_not_divide_names_intermediate_size() -> None:
    args = attrs.evolve(LlamaArgs.from_hf_config(preset_config("random:tiny-tp8")), intermediate_size=500)
    with torch.device("meta"), pytest.raises(ModelLoadError) as info:
        LlamaForCausalLM(args, ops=cpu_ops, rank=0, world_size=8, max_positions=16)
    assert str(info.value) == ("tensor parallelism 8 does not divide intermediate_size (500): every rank must hold "
                               "an equal slice; choose a tp that divides 500")  # fmt: skip


def test_split_evenly_gives_rank_r_slice_r() -> None:
    assert split_evenly(28672, rank=5, world_size=8, what="intermediate_size") == ShardSlice(28672, 17920, 3584)


class ShapeSource:
    """A checkpoint tensor known by its shape only: every slice read is recorded and comes back as a meta tensor."""

    def __init__(self, shape: tuple[int, ...], reads: list[tuple[int, ...]]) -> None:
        self.shape, self.reads = shape, reads

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        assert 0 <= start and start + length <= self.shape[dim]
        out_shape = list(self.shape)
        out_shape[dim] = length
        self.reads.append(tuple(out_shape))
        return torch.empty(out_shape, dtype=torch.bfloat16, device="meta")


@pytest.mark.parametrize(("preset", "world_size"), [("llama2-70b", 8), ("llama3-70b", 8), ("llama3-70b", 4)])
def test_70b_rank_builds_only_its_shard(preset: str, world_size: int) -> None:
    """The whole 80-layer model on the meta device: a rank reads exactly its parameters' elements, none twice.

    Every sharded tensor is read as this rank's slice only (the sources, random or safetensors, materialise nothing
    else: test_weights.py): the largest read is the replicated embedding or one rank's gate (or up) projection, 1/tp
    of the full one; in bf16 a rank holds 1/tp of the layers plus the replicated embedding and lm_head.
    """
    args = LlamaArgs.from_hf_config(preset_config(f"random:{preset}"))
    assert (args.num_layers, args.num_heads, args.num_kv_heads, args.intermediate_size) == (80, 64, 8, 28672)
    shapes = checkpoint_shapes(args)
    full_bytes = 2 * sum(torch.Size(s).numel() for s in shapes.values())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(args, ops=cpu_ops, rank=world_size - 1, world_size=world_size, max_positions=16)
    finally:
        torch.set_default_dtype(default)
    reads: list[tuple[int, ...]] = []
    model.load_weights((name, ShapeSource(shape, reads)) for name, shape in shapes.items())
    rank_bytes = 2 * sum(p.numel() for p in model.parameters())
    assert 2 * sum(torch.Size(s).numel() for s in reads) == rank_bytes  # each parameter element drawn once
    replicated = 2 * 2 * args.vocab_size * args.hidden_size  # embedding and lm_head
    assert rank_bytes == pytest.approx((full_bytes - replicated) / world_size + replicated, rel=1e-3)
    assert max(torch.Size(s).numel() for s in reads) == max(args.vocab_size * args.hidden_size,
                                                            28672 // world_size * 8192)  # fmt: skip
    assert full_bytes / 1e9 == pytest.approx(138.0 if preset == "llama2-70b" else 141.1, abs=0.1)


def test_kv_cache_of_a_replicated_kv_head_holds_one_head_per_rank() -> None:
    args = LlamaArgs.from_hf_config(preset_config("random:tiny-tp8"))
    config = RunnerConfig(model_path="random:tiny-tp8", rank=3, world_size=4, dist_init_method="", device="cpu",
                          dtype="float32", block_size=8, max_model_len=64, max_batch_size=2, max_prefill_token_num=64,
                          cache_max_entry_count=0.5, cpu_memory_budget_bytes=1 << 20, enable_cuda_graph=False)
    caches, layout = allocate_kv_cache(config, args, dtype=torch.float32, device=torch.device("cpu"),
                                       max_model_len=64, all_reduce_min=lambda n: n)  # fmt: skip
    assert layout.num_kv_heads == 1 and caches[0][0].shape[1] == 1
