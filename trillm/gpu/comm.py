"""Tensor-parallel communicator: the all-reduce between the ranks of one model (nothing, gloo, or NCCL).

Runs outside the event loop, in rank processes. Three backends behind one small interface:
- world_size 1: every call is the identity; no process group exists.
- CPU (tests, CPU serving): `torch.distributed` with gloo, rendezvous at `RunnerConfig.dist_init_method`.
- CUDA: NCCL through `cupy.cuda.nccl` (the design card's choice: no torch.distributed NCCL group). Rank 0 creates the
  NCCL unique id and publishes it through a `torch.distributed.TCPStore` at the init method's host:port; the
  all-reduce runs in place on torch's current CUDA stream, so it orders with the model's kernels without a sync.
  Small tensors (a decode step's) take the one-shot IPC kernel of `gpu/ipc_all_reduce.py` instead, when every rank
  could map every other's buffer.

`all_reduce_min` (host integers, e.g. the KV block count every rank can afford) goes through the process group on
CPU and through the TCP store on CUDA.
"""

from __future__ import annotations

import logging
import pickle
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import torch

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 300.0


class Communicator:
    """All-reduce (sum, in place) of this rank's tensors with the same tensors of every other rank."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks in place and return it (the identity for one rank)."""
        return x

    def all_reduce_min(self, value: int) -> int:
        """The smallest `value` any rank passed."""
        return value

    def close(self) -> None:
        """Release the process group or NCCL communicator."""


class GlooCommunicator(Communicator):
    """CPU ranks: torch.distributed's gloo backend."""

    def __init__(self, rank: int, world_size: int, init_method: str) -> None:
        super().__init__(rank, world_size)
        import torch.distributed as dist

        self._dist = dist
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
        )

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(x)
        return x

    def all_reduce_min(self, value: int) -> int:
        box = torch.tensor([value], dtype=torch.int64)
        self._dist.all_reduce(box, op=self._dist.ReduceOp.MIN)
        return int(box.item())

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


class NcclCommunicator(Communicator):
    """CUDA ranks: NCCL via CuPy, on torch's current stream."""

    def __init__(self, rank: int, world_size: int, init_method: str) -> None:
        super().__init__(rank, world_size)
        from cupy.cuda import nccl  # imported here: CPU-only installs have no CuPy

        self._nccl = nccl
        url = urlparse(init_method)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise ValueError(f"dist_init_method must be tcp://host:port for NCCL, got {init_method!r}")
        self._store = torch.distributed.TCPStore(  # type: ignore[attr-defined]
            url.hostname, url.port, world_size, is_master=rank == 0, timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
        )
        if rank == 0:
            self._store.set("nccl_unique_id", pickle.dumps(nccl.get_unique_id()).hex())
        unique_id = pickle.loads(bytes.fromhex(self._store.get("nccl_unique_id").decode()))
        self._comm: Any = nccl.NcclCommunicator(world_size, unique_id, rank)
        self._dtypes = {
            torch.float32: nccl.NCCL_FLOAT32,
            torch.float16: nccl.NCCL_FLOAT16,
            torch.bfloat16: nccl.NCCL_BFLOAT16,
        }
        self._num_min_calls = 0
        from trillm.gpu.ipc_all_reduce import open_ipc_all_reduce

        self._ipc = open_ipc_all_reduce(rank=rank, world_size=world_size, store=self._store)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self._ipc is not None and self._ipc.fits(x):
            return self._ipc(x)
        if not x.is_contiguous() or x.dtype not in self._dtypes:
            raise ValueError(f"NCCL all-reduce needs a contiguous float16/bfloat16/float32 tensor, got {x.dtype}")
        stream = torch.cuda.current_stream(x.device).cuda_stream
        self._comm.allReduce(x.data_ptr(), x.data_ptr(), x.numel(), self._dtypes[x.dtype], self._nccl.NCCL_SUM, stream)
        return x

    def all_reduce_min(self, value: int) -> int:
        self._num_min_calls += 1
        prefix = f"min/{self._num_min_calls}/"
        self._store.set(f"{prefix}{self.rank}", str(value))
        return min(int(self._store.get(f"{prefix}{r}")) for r in range(self.world_size))

    def close(self) -> None:
        if self._ipc is not None:
            # A peer may still be summing from this rank's region: free it only once every rank got here (briefly:
            # a dead peer must not hold up shutdown).
            torch.cuda.synchronize()
            self._store.set(f"ipc_all_reduce/closing/{self.rank}", "1")
            try:
                self._store.wait([f"ipc_all_reduce/closing/{r}" for r in range(self.world_size)], timedelta(seconds=5))
            except Exception:  # noqa: BLE001 - timed out: a peer is gone
                log.warning("rank %d: not every rank reached shutdown; freeing the IPC region anyway", self.rank)
            self._ipc.close()
            self._ipc = None
        self._comm = None


def open_communicator(*, rank: int, world_size: int, device: str, init_method: str) -> Communicator:
    """The communicator for this rank: identity for one rank, gloo on CPU, NCCL on CUDA (runs outside the loop)."""
    if world_size == 1:
        return Communicator(rank, world_size)
    log.info("rank %d/%d joining the %s group at %s", rank, world_size, device, init_method)
    if device == "cpu":
        return GlooCommunicator(rank, world_size, init_method)
    return NcclCommunicator(rank, world_size, init_method)
