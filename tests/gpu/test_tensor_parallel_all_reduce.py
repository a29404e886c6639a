"""The IPC all-reduce kernels at 2, 4 and 8 ranks, one rank played for real and its peers' side staged by the test.

Runs on the CPU emulator (TRILLM_KERNEL_EMULATOR=1) or one GPU (the regions are plain tensors of one process): each
test fills the peers' slots and raises their flags as the peers would have, then checks the played rank's result,
what it published, and its flags. The path choice by size and the real multi-GPU runs are in
test_tensor_parallel_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import backend_device, emulator_build_dir, rand  # noqa: F401 - fixtures, used by name

from trillm.gpu import kernels
from trillm.gpu.ipc_all_reduce import default_slot_bytes, one_shot_max_bytes

FLAG2 = kernels.AR_BLOCKS  # u32 index of the second flag array (two-shot's stage 2)


def staged_regions(world_size: int, slot_bytes: int, dev: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(kernels.region_bytes(slot_bytes), dtype=torch.uint8, device=dev) for _ in range(world_size)]


def slot_view(region: torch.Tensor, call: int, slot_bytes: int, like: torch.Tensor) -> torch.Tensor:
    """The call's slot of a region, as a tensor of `like`'s dtype and size."""
    start = kernels.AR_FLAG_BYTES + (call % 2) * slot_bytes
    return region[start : start + like.numel() * like.element_size()].view(like.dtype)


def rank_order_sum(inputs: list[torch.Tensor]) -> torch.Tensor:
    total = inputs[0].float()
    for x in inputs[1:]:
        total = total + x.float()
    return total.to(inputs[0].dtype)


@pytest.mark.parametrize(("world_size", "rank"), [(4, 0), (4, 3), (8, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_shot_all_reduce_sums_every_peers_slot(backend_device: torch.device, dtype: torch.dtype,  # noqa: F811
                                                   world_size: int, rank: int) -> None:  # fmt: skip
    dev = backend_device
    gen = torch.Generator().manual_seed(world_size + rank)
    numel = 3 * 16 // torch.tensor([], dtype=dtype).element_size() * 40  # 120 16-byte vectors
    slot_bytes = 4096
    regions = staged_regions(world_size, slot_bytes, dev)
    epochs = torch.zeros(kernels.AR_BLOCKS, dtype=torch.int32, device=dev)
    for call in (1, 2):
        inputs = [rand(gen, numel, dtype=dtype, device=dev) for _ in range(world_size)]
        for peer in range(world_size):
            if peer != rank:
                slot_view(regions[peer], call, slot_bytes, inputs[peer]).copy_(inputs[peer])
                regions[peer][: 4 * kernels.AR_BLOCKS].view(torch.int32).fill_(call)
        x = inputs[rank].clone()
        kernels.one_shot_all_reduce(x, [r.data_ptr() for r in regions], epochs, rank, slot_bytes)
        assert torch.equal(x.cpu(), rank_order_sum(inputs).cpu()), call
        assert torch.equal(slot_view(regions[rank], call, slot_bytes, x).cpu(), inputs[rank].cpu())
        assert (regions[rank][: 4 * kernels.AR_BLOCKS].view(torch.int32).cpu() == call).all()


@pytest.mark.parametrize(("world_size", "rank", "num_vecs"), [(4, 0, 128), (4, 3, 130), (8, 6, 1203), (8, 7, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_two_shot_all_reduce_sums_its_partition_and_gathers_the_others(
    backend_device: torch.device, dtype: torch.dtype, world_size: int, rank: int, num_vecs: int  # noqa: F811
) -> None:
    """Partitions of ceil(num_vecs / W) vectors (the last short, or empty with 5 vectors over 8 ranks).

    The peers' side: their whole inputs in their slots (stage 1), then each peer's own partition replaced by the
    partition's sum (stage 2), both flags raised. The played rank must sum its partition from every slot, publish
    that sum in its own slot, and copy every other partition from its owner.
    """
    dev = backend_device
    gen = torch.Generator().manual_seed(num_vecs)
    per_vec = 16 // torch.tensor([], dtype=dtype).element_size()
    part = -(-num_vecs // world_size) * per_vec  # elements per partition
    numel = num_vecs * per_vec
    slot_bytes = numel * torch.tensor([], dtype=dtype).element_size() + 32
    regions = staged_regions(world_size, slot_bytes, dev)
    epochs = torch.zeros(kernels.AR_BLOCKS, dtype=torch.int32, device=dev)
    for call in (1, 2, 3):
        inputs = [rand(gen, numel, dtype=dtype, device=dev) for _ in range(world_size)]
        expected = rank_order_sum(inputs)
        for peer in range(world_size):
            if peer == rank:
                continue
            published = inputs[peer].clone()
            published[peer * part : (peer + 1) * part] = expected[peer * part : (peer + 1) * part]
            slot_view(regions[peer], call, slot_bytes, published).copy_(published)
            regions[peer][: 8 * kernels.AR_BLOCKS].view(torch.int32).fill_(call)  # flag 1 and flag 2
        x = inputs[rank].clone()
        kernels.two_shot_all_reduce(x, [r.data_ptr() for r in regions], epochs, rank, slot_bytes)
        assert torch.equal(x.cpu(), expected.cpu()), call
        mine = inputs[rank].clone()
        mine[rank * part : (rank + 1) * part] = expected[rank * part : (rank + 1) * part]
        assert torch.equal(slot_view(regions[rank], call, slot_bytes, x).cpu(), mine.cpu())  # what peers gather
        flags = regions[rank][: 8 * kernels.AR_BLOCKS].view(torch.int32).cpu()
        assert (flags == call).all()  # both stages' flags raised
        assert (epochs.cpu() == call).all()


def test_path_by_size_one_shot_then_two_shot_then_nccl() -> None:
    assert default_slot_bytes(2) == 512 * 1024 and one_shot_max_bytes(2, 512 * 1024) == 512 * 1024
    assert default_slot_bytes(4) == default_slot_bytes(8) == 4 << 20
    assert one_shot_max_bytes(4, 4 << 20) == 512 * 1024 and one_shot_max_bytes(8, 4 << 20) == 256 * 1024
    name = kernels.all_reduce_kernel_name(torch.bfloat16, 8, is_two_shot=True)
    assert name == "all_reduce_kernel<bf16_t, 8, true>"
