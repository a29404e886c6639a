"""The custom all-reduce of small and mid-sized tensors: CUDA IPC regions shared by the ranks, summed by one kernel.

Runs outside the event loop, in rank processes (CUDA only). A decode step's all-reduce moves a few kilobytes to a
few megabytes; NCCL's ring spends tens of microseconds on protocol for them (64 of them per 7B decode step, 160 per
70B step), while a kernel that reads the peers' buffers over NVLink needs a few. `IpcAllReduce` owns this rank's
region (cudaMalloc'd through CuPy: IPC handles name whole allocations, which torch's caching allocator does not hand
out), the peers' regions opened from their handles, and the epoch counters the kernels advance on the device.
Handles travel through the TCP store the NCCL rendezvous already uses.

Which path, by size alone (so every rank takes the same one; the calls pair up by position):
- one shot (`kernels.one_shot_all_reduce`, each rank reads every peer's tensor) up to `one_shot_max_bytes`:
  the whole slot at 2 ranks, 512 KiB at 4, 256 KiB at 8 — its reads grow as (W - 1) × N;
- two shot (`kernels.two_shot_all_reduce`: reduce-scatter, then all-gather; 2 × (W - 1) / W × N read per rank) from
  there up to the slot size, at 4 and 8 ranks; the slot is 4 MiB there (a 70B decode batch of 256 rows in bf16);
- NCCL above the slot (prefill chunks).
The 512/256 KiB cut-overs are vLLM's custom all-reduce's for fully NVLinked GPUs, not yet measured here:
`python -m bench.all_reduce --world-size 8` times all three paths (bench/tp_check.sh runs it).

Every rank must take the same path for every call, so the ranks agree before use: each publishes whether its set-up
worked, and the custom path is on only if it worked everywhere. TRILLM_CUSTOM_ALL_REDUCE=0 turns it off. NVLink
multicast is not used (it is off on our machines).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from trillm.gpu import kernels

log = logging.getLogger(__name__)

DEFAULT_SLOT_BYTES = 512 * 1024  # 2 ranks: decode batches up to 64 rows of a 4,096-wide bf16 hidden state
TWO_SHOT_SLOT_BYTES = 4 << 20  # 4 and 8 ranks: up to 256 rows of an 8,192-wide bf16 hidden state (70B)
TWO_SHOT_MIN_RANKS = 4
IPC_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


def default_slot_bytes(world_size: int) -> int:
    """Each slot's size (the largest tensor the custom all-reduce takes): bigger where the two-shot kernel runs."""
    return TWO_SHOT_SLOT_BYTES if world_size >= TWO_SHOT_MIN_RANKS else DEFAULT_SLOT_BYTES


def one_shot_max_bytes(world_size: int, slot_bytes: int) -> int:
    """The largest tensor the one-shot kernel takes; above it (up to the slot) the two-shot kernel does."""
    if world_size < TWO_SHOT_MIN_RANKS:
        return slot_bytes
    return min(slot_bytes, (512 if world_size <= 4 else 256) * 1024)


class IpcAllReduce:
    """One rank's side of the IPC all-reduce; call it on tensors for which `fits` is true, on the current stream."""

    def __init__(self, *, rank: int, addresses: list[int], own: int, peers: list[int], slot_bytes: int,
                 device: torch.device, runtime: Any) -> None:  # fmt: skip
        self.rank, self.addresses, self.slot_bytes = rank, addresses, slot_bytes
        self.one_shot_max_bytes = one_shot_max_bytes(len(addresses), slot_bytes)
        self._own, self._peers, self._runtime = own, peers, runtime
        self.epochs = torch.zeros(kernels.AR_BLOCKS, dtype=torch.int32, device=device)

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.is_contiguous() and x.dtype in kernels.all_reduce.AR_TYPES and nbytes % 16 == 0 and (
            0 < nbytes <= self.slot_bytes
        )

    def is_two_shot(self, x: torch.Tensor) -> bool:
        """Whether `x` (which `fits`) takes the two-shot kernel: by size alone, the same answer on every rank."""
        return x.numel() * x.element_size() > self.one_shot_max_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_two_shot(x):
            return kernels.two_shot_all_reduce(x, self.addresses, self.epochs, self.rank, self.slot_bytes)
        return kernels.one_shot_all_reduce(x, self.addresses, self.epochs, self.rank, self.slot_bytes)

    def close(self) -> None:
        for address in self._peers:
            self._runtime.ipcCloseMemHandle(address)
        self._runtime.free(self._own)
        self._peers = []


def open_ipc_all_reduce(
    *, rank: int, world_size: int, store: Any, slot_bytes: int | None = None
) -> IpcAllReduce | None:
    """Set up the IPC regions with every peer; None (use NCCL throughout) if any rank could not, or it is turned off.

    Collective: every rank of the group must call it, in the same order relative to other store traffic.
    """
    wanted = os.environ.get("TRILLM_CUSTOM_ALL_REDUCE", "1") != "0" and world_size <= kernels.all_reduce.AR_MAX_RANKS
    import cupy

    runtime = cupy.cuda.runtime
    device = torch.device("cuda", torch.cuda.current_device())
    slot_bytes = slot_bytes or default_slot_bytes(world_size)
    names = [kernels.all_reduce_kernel_name(dt, world_size, is_two_shot=two) for dt in kernels.all_reduce.AR_TYPES
             for two in ((False, True) if world_size >= TWO_SHOT_MIN_RANKS else (False,))]  # fmt: skip
    size = kernels.region_bytes(slot_bytes)
    own, handle = 0, b""
    if wanted:
        try:
            with cupy.cuda.Device(device.index):
                own = runtime.malloc(size)
                runtime.memset(own, 0, size)
                runtime.deviceSynchronize()  # zeroed before any peer can see the handle
                handle = bytes(runtime.ipcGetMemHandle(own))
                kernels.compile_kernels([("all_reduce", name) for name in names], device=device)
        except Exception as exc:  # noqa: BLE001 - any failure means NCCL only, decided together below
            log.warning("rank %d: no IPC all-reduce region (%s); using NCCL for every all-reduce", rank, exc)
            handle = b""
    store.set(f"ipc_all_reduce/handle/{rank}", handle.hex() or "-")
    addresses: list[int] = []
    peers: list[int] = []
    ok = bool(handle)
    for r in range(world_size):
        published = store.get(f"ipc_all_reduce/handle/{r}").decode()
        if r == rank:
            addresses.append(own)
            continue
        if published == "-" or not ok:
            ok = False
            continue
        try:
            with cupy.cuda.Device(device.index):
                address = int(runtime.ipcOpenMemHandle(bytes.fromhex(published), IPC_LAZY_PEER_ACCESS))
            peers.append(address)
            addresses.append(address)
        except Exception as exc:  # noqa: BLE001 - e.g. no peer access between these GPUs
            log.warning("rank %d: cannot map rank %d's IPC region (%s); using NCCL", rank, r, exc)
            ok = False
    store.set(f"ipc_all_reduce/ok/{rank}", "1" if ok else "0")
    everyone = all(store.get(f"ipc_all_reduce/ok/{r}").decode() == "1" for r in range(world_size))
    if not everyone:
        for address in peers:
            runtime.ipcCloseMemHandle(address)
        if own:
            runtime.free(own)
        return None
    torch.cuda.synchronize(device)  # the zeroed flags are in place before any kernel reads them
    log.info("rank %d: IPC all-reduce on for tensors up to %d KiB (one shot up to %d KiB)", rank, slot_bytes // 1024,
             one_shot_max_bytes(world_size, slot_bytes) // 1024)
    return IpcAllReduce(rank=rank, addresses=addresses, own=own, peers=peers, slot_bytes=slot_bytes, device=device,
                        runtime=runtime)  # fmt: skip
