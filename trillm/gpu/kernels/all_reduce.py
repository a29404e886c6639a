"""IPC all-reduce wrappers (all_reduce.cu): the sum over ranks of a tensor through CUDA IPC slots, in one or two shots.

Runs outside the event loop (inside the rank processes). The caller (`gpu/ipc_all_reduce.py`) owns the IPC regions
and the per-rank epoch counters and picks the kernel by size; this module only checks the arguments and launches.
Every rank must launch the same sequence of calls with the same sizes and kernels: the calls pair up by their
position in that sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from trillm.gpu.kernels.arguments import check_contiguous, check_devices, check_shape, i32, ptr
from trillm.gpu.kernels.backend import get_backend

log = logging.getLogger(__name__)

AR_BLOCKS = 24  # must equal all_reduce.cu's constants
AR_THREADS = 512
AR_MAX_RANKS = 8
AR_FLAG_BYTES = 4096
AR_TYPES = {torch.bfloat16: "bf16_t", torch.float16: "fp16_t", torch.float32: "float"}


def region_bytes(slot_bytes: int) -> int:
    """Size of one rank's IPC region: the flags (2 × AR_BLOCKS u32), then two slots (calls alternate between them)."""
    return AR_FLAG_BYTES + 2 * slot_bytes


def all_reduce_kernel_name(dtype: torch.dtype, world_size: int, *, is_two_shot: bool = False) -> str:
    return f"all_reduce_kernel<{AR_TYPES[dtype]}, {world_size}, {'true' if is_two_shot else 'false'}>"


def one_shot_all_reduce(
    data: torch.Tensor,  # any shape, contiguous; summed in place
    regions: Sequence[int],  # device address of every rank's IPC region, in rank order (this rank's own included)
    epochs: torch.Tensor,  # [AR_BLOCKS] int32, this rank's call counters (zeroed with the regions)
    rank: int,
    slot_bytes: int,
) -> torch.Tensor:
    """Sum `data` over the ranks in place and return it: every rank reads every peer's whole tensor."""
    return _launch(data, regions, epochs, rank, slot_bytes, is_two_shot=False)


def two_shot_all_reduce(
    data: torch.Tensor,  # any shape, contiguous; summed in place
    regions: Sequence[int],  # as one_shot_all_reduce's
    epochs: torch.Tensor,  # [AR_BLOCKS] int32, shared with one_shot_all_reduce (one sequence of calls)
    rank: int,
    slot_bytes: int,
) -> torch.Tensor:
    """Sum `data` over the ranks in place and return it: reduce-scatter, then all-gather (same bits as one shot)."""
    return _launch(data, regions, epochs, rank, slot_bytes, is_two_shot=True)


def _launch(data: torch.Tensor, regions: Sequence[int], epochs: torch.Tensor, rank: int, slot_bytes: int, *,
            is_two_shot: bool) -> torch.Tensor:  # fmt: skip
    backend = get_backend()
    device = check_devices(backend, data=data, epochs=epochs)
    if data.dtype not in AR_TYPES:
        raise ValueError(f"data must be bfloat16, float16 or float32, got {data.dtype}")
    check_contiguous(data, "data")
    check_shape(epochs, "epochs", (AR_BLOCKS,))
    world_size = len(regions)
    if not 2 <= world_size <= AR_MAX_RANKS or not 0 <= rank < world_size:
        raise ValueError(f"need 2..{AR_MAX_RANKS} regions and a rank among them, got {world_size} and rank {rank}")
    nbytes = data.numel() * data.element_size()
    if nbytes % 16 or nbytes > slot_bytes:
        raise ValueError(f"data must be a multiple of 16 bytes and at most {slot_bytes} bytes, got {nbytes}")
    padded = [np.uint64(r) for r in regions] + [np.uint64(0)] * (AR_MAX_RANKS - world_size)
    args = (ptr(data), *padded, ptr(epochs), i32(rank), i32(nbytes // 16), np.uint64(slot_bytes))
    name = all_reduce_kernel_name(data.dtype, world_size, is_two_shot=is_two_shot)
    backend.launch("all_reduce", name, (AR_BLOCKS, 1, 1), (AR_THREADS, 1, 1), 0, args, device)
    return data
