"""Checkpoint tensor sources: random slices are slices of the tp=1 tensor; a sharded checkpoint is read rank by rank."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trillm.gpu import cpu_ops
from trillm.models.llama import LlamaArgs, LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, checkpoint_shapes
from trillm.models.presets import preset_config, random_weights
from trillm.models.weights import INIT_STD, RandomWeight, WeightSource, iter_checkpoint, iter_random_weights

CPU = torch.device("cpu")


@pytest.mark.parametrize(("dim", "start", "length"), [(0, 0, 64), (0, 17, 9), (1, 32, 32), (1, 95, 1)])
def test_random_slice_equals_that_slice_of_the_whole_tensor(dim: int, start: int, length: int) -> None:
    weight = RandomWeight("model.layers.0.mlp.down_proj.weight", (64, 96), seed=3, device=CPU, dtype=torch.float32)
    whole = weight.narrow(0, 0, 64)
    assert torch.equal(weight.narrow(dim, start, length), whole.narrow(dim, start, length))
    assert abs(whole.std().item() - INIT_STD) < 0.002 and abs(whole.mean().item()) < 0.002


def test_random_tensors_differ_by_name_and_seed_and_norms_are_ones() -> None:
    def draw(name: str, seed: int) -> torch.Tensor:
        return RandomWeight(name, (8, 8), seed=seed, device=CPU, dtype=torch.float32).narrow(0, 0, 8)

    assert not torch.equal(draw("a.weight", 0), draw("b.weight", 0))
    assert not torch.equal(draw("a.weight", 0), draw("a.weight", 1))
    assert torch.equal(draw("a.weight", 0), draw("a.weight", 0))
    assert torch.equal(draw("model.norm.weight", 0), torch.ones(8, 8))


def test_random_slices_are_drawn_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice bigger than a chunk is drawn chunk by chunk (the int64 temporaries stay bounded) with the same values."""
    from trillm.models import weights

    weight = RandomWeight("w", (40, 16), seed=0, device=CPU, dtype=torch.float32)
    whole = weight.narrow(1, 4, 8)
    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 16)  # two rows of 8 per chunk
    assert torch.equal(weight.narrow(1, 4, 8), whole)


class CountingSource:
    """Wraps a source and adds up the bytes of every slice read from it."""

    def __init__(self, source: WeightSource, counter: list[int]) -> None:
        self.source, self.counter, self.shape = source, counter, source.shape

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        out = self.source.narrow(dim, start, length)
        self.counter[0] += out.numel() * out.element_size()
        return out


def counted(weights: Iterator[tuple[str, WeightSource]], counter: list[int]) -> Iterator[tuple[str, WeightSource]]:
    for name, source in weights:
        yield name, CountingSource(source, counter)


def attention(model: LlamaForCausalLM, layer: int) -> LlamaAttention:
    block = model.model.layers[layer]
    assert isinstance(block, LlamaDecoderLayer)
    return block.self_attn


def rank_model(args: LlamaArgs, rank: int, world_size: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(args, ops=cpu_ops, rank=rank, world_size=world_size, max_positions=64)


def save_sharded_checkpoint(folder: Path, args: LlamaArgs, num_files: int) -> None:
    """The preset's random weights as `num_files` safetensors shards plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    tensors = dict(random_weights(checkpoint_shapes(args), device=CPU, dtype=torch.float32, seed=0))
    names = sorted(tensors)
    weight_map = {}
    for index in range(num_files):
        file_name = f"model-{index + 1:05d}-of-{num_files:05d}.safetensors"
        part = names[index::num_files]
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # A stray full copy the index does not name (as some hub repos carry): it must not be read.
    save_file({n: tensors[n].contiguous() for n in names[:3]}, str(folder / "consolidated.safetensors"))


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tp8-sharded")
    save_sharded_checkpoint(folder, LlamaArgs.from_hf_config(preset_config("random:tiny-tp8")), num_files=3)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("rank", "world_size"), [(1, 2), (2, 4), (7, 8)])
def test_sharded_checkpoint_rank_reads_only_its_slices(sharded_checkpoint: Path, rank: int, world_size: int) -> None:
    """Through the index and three shard files, a rank reads exactly its parameters' bytes and gets its shard."""
    args = LlamaArgs.from_hf_config(preset_config("random:tiny-tp8"))
    read = [0]
    model = rank_model(args, rank, world_size)
    model.load_weights(counted(iter_checkpoint(sharded_checkpoint), read))
    assert read[0] == sum(p.numel() * p.element_size() for p in model.parameters())  # nothing else, nothing twice
    expected = rank_model(args, rank, world_size)
    expected.load_weights(iter_random_weights(checkpoint_shapes(args), device=CPU, dtype=torch.float32, seed=0))
    for (name, got), (_, want) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(got, want), name


def test_fused_projection_holds_each_ranks_rows_of_q_k_and_v() -> None:
    """tp=4 over 2 KV heads: rank 3's qkv rows are q heads 6-7 and the replicated KV head 1 of the tp=1 weights."""
    args = LlamaArgs.from_hf_config(preset_config("random:tiny-tp8"))
    whole = rank_model(args, 0, 1)
    whole.load_weights(iter_random_weights(checkpoint_shapes(args), device=CPU, dtype=torch.float32, seed=0))
    shard = rank_model(args, 3, 4)
    shard.load_weights(iter_random_weights(checkpoint_shapes(args), device=CPU, dtype=torch.float32, seed=0))
    d, q_rows, kv_rows = args.head_dim, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    full = attention(whole, 1).qkv_proj.weight  # [q_rows + 2 * kv_rows, hidden]
    q, k, v = torch.split(full, [q_rows, kv_rows, kv_rows])  # [rows, hidden] each
    want = torch.cat([q[6 * d : 8 * d], k[d : 2 * d], v[d : 2 * d]])  # [(2 + 1 + 1) * head_dim, hidden]
    assert torch.equal(attention(shard, 1).qkv_proj.weight, want)
    o_full = attention(whole, 1).o_proj.weight  # [hidden, q_rows]
    assert torch.equal(attention(shard, 1).o_proj.weight, o_full[:, 6 * d : 8 * d])
