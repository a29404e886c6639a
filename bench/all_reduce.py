"""All-reduce microbenchmark: trillm's IPC kernels (one and two shot) against NCCL, in CUDA graphs, on one host's GPUs.

Starts one process per GPU; each opens the communicator the rank processes use (trillm.gpu.comm: NCCL through CuPy,
plus the IPC all-reduce). For every size it checks the sum (each rank's tensor is a known multiple of one shared
random tensor), then captures a graph of CALLS back-to-back all-reduces per path and reports the median time per
call over the replays (GPU time, as the decode graphs see it). Writes JSON to <out-dir>/<gpu>x<N>-all-reduce-<date>.json.

    python -m bench.all_reduce --world-size 2   # and 4, 8: the two-shot kernel runs above the one-shot limit there
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

SIZES_BYTES = (8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20,
               8 << 20)  # above the IPC slot (512 KiB at 2 ranks, 4 MiB at 4 and 8) only NCCL runs
CALLS = 32
REPLAYS = 30


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _time_graph(fn: Any, x: torch.Tensor) -> float:
    """Median microseconds per call of `fn(x)` over REPLAYS replays of a graph of CALLS calls."""
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return statistics.median(times)


def _rank_main(rank: int, world_size: int, init_method: str, queue: Any) -> None:
    from trillm.gpu.comm import NcclCommunicator, open_communicator

    torch.cuda.set_device(rank)
    comm = open_communicator(rank=rank, world_size=world_size, device="cuda", init_method=init_method)
    assert isinstance(comm, NcclCommunicator)
    ipc = comm._ipc  # noqa: SLF001 - the benchmark times the two paths separately

    def nccl(x: torch.Tensor) -> None:
        comm._comm.allReduce(x.data_ptr(), x.data_ptr(), x.numel(), comm._dtypes[x.dtype],  # noqa: SLF001
                             comm._nccl.NCCL_SUM, torch.cuda.current_stream().cuda_stream)  # noqa: SLF001

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for nbytes in SIZES_BYTES:
        numel = nbytes // 2
        base = torch.randn(numel, generator=gen, device="cuda", dtype=torch.float32)
        row: dict[str, Any] = {"bytes": nbytes}
        paths = [("nccl", nccl)] + ([("ipc", ipc)] if ipc is not None and ipc.fits(base.bfloat16()) else [])
        if len(paths) > 1:
            assert ipc is not None
            row["ipc_kernel"] = "two-shot" if ipc.is_two_shot(base.bfloat16()) else "one-shot"
        for name, fn in paths:
            x = (base * (rank + 1)).bfloat16()
            fn(x)
            expected = sum((base * (r + 1)).bfloat16().float() for r in range(world_size))
            row[f"{name}_max_err"] = float((x.float() - expected).abs().max() / expected.abs().max())
            row[f"{name}_us"] = _time_graph(fn, x.clone())
        rows.append(row)
    comm.close()
    if rank == 0:
        queue.put({"rows": rows, "ipc": ipc is not None})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--git-commit", default="unknown")
    args = parser.parse_args(argv)
    if torch.cuda.device_count() < args.world_size:
        print(f"needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
        return 1
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, args.world_size, init_method, queue)) for r in range(args.world_size)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    name = torch.cuda.get_device_name(0)
    out = {
        "command": " ".join(["python", "-m", "bench.all_reduce", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": args.git_commit,
        "device": f"{args.world_size}x {name}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "calls_per_graph": CALLS,
        **result,
    }
    tag = "".join(c for c in name.split()[-1].lower() if c.isalnum())
    path = Path(args.out_dir) / f"{tag}x{args.world_size}-all-reduce-{dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'bytes':>8} {'nccl us':>8} {'ipc us':>8} {'ipc err':>8} {'kernel':>8}")
    for row in result["rows"]:
        print(f"{row['bytes']:>8} {row['nccl_us']:>8.2f} {row.get('ipc_us', float('nan')):>8.2f} "
              f"{row.get('ipc_max_err', float('nan')):>8.1e} {row.get('ipc_kernel', '-'):>8}")
    print(f"wrote {path}")
    return 0 if all(p.exitcode == 0 for p in procs) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
