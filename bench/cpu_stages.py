"""Where a CPU decode step's time goes, stage by stage: the one-call decode step timed at its barriers (issue #15).

    python -m bench.cpu_stages                        # SmolLM2 GGUF, batch 1 and 8, contexts 192..256, 10 s each
    python -m bench.cpu_stages --batch 1 8 16 --context 512 --seconds 20

Builds `gpu/cpu_kernels.c` a second time with `-DTRILLM_STAGE_TIMING` (a library of its own, beside the normal one),
in which each stage of `trillm_decode_forward` ends its loop without the implicit barrier, every thread notes when
its own share ended, and the threads then meet at an explicit barrier: the same number of barriers as the normal
build, so its step time is the normal build's within the noise. It then drives the model runner as `bench.offline
steps` does: `--batch` sequences prefilled to `--context` positions, 64 greedy decode steps, a fresh batch, and so on
for `--seconds` (the prefills are not timed). Printed per stage, in ms per decode step: the wall time (barrier to
barrier) and each thread's busy time (the difference is that thread's wait at the barrier: imbalance, or a thread
the OS parked). "outside" is the step's remainder: the lm_head, sampling and the runner's Python. JSON:
bench/results/<cpu>-cpu-stages-<date>.json (`--out-dir` elsewhere), with the command and git commit.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.offline import _BlockAllocator, _DecodeBatch, git_commit, print_table, result_path

STAGES = ("input norm", "qkv_proj", "rotary + KV write", "attention", "o_proj", "post norm", "gate_up_proj", "SwiGLU",
          "down_proj")  # fmt: skip  # the order of STAGE_END(k) in cpu_kernels.c
STAGE_THREADS = 8  # cpu_kernels.c
STEPS_PER_BATCH = 64


def timing_library() -> ctypes.CDLL:
    """The kernels built with stage timing, installed as the library every runner of this process uses."""
    from trillm.gpu import cpu_kernels

    if cpu_kernels._library_tried:  # noqa: SLF001 - must come first: the runner picks the library up once
        raise RuntimeError("the CPU kernels were loaded before the timing build")
    cpu_kernels.COMPILE_FLAGS = (*cpu_kernels.COMPILE_FLAGS, "-DTRILLM_STAGE_TIMING")
    library = cpu_kernels.library()
    if library is None or not hasattr(library, "trillm_stage_calls"):
        raise RuntimeError("the CPU kernels cannot be built here (no C compiler or no AVX2)")
    return library


def read_counters(library: ctypes.CDLL) -> tuple[int, list[float], list[list[float]]]:
    """(calls, wall seconds per stage, busy seconds per thread per stage), summed since the library was loaded."""
    calls = ctypes.c_long.in_dll(library, "trillm_stage_calls").value
    wall = list((ctypes.c_double * len(STAGES)).in_dll(library, "trillm_stage_wall_s"))
    busy = (ctypes.c_double * (STAGE_THREADS * len(STAGES))).in_dll(library, "trillm_stage_busy_s")
    per_thread = [list(busy[t * len(STAGES):(t + 1) * len(STAGES)]) for t in range(STAGE_THREADS)]
    return calls, wall, per_thread


def measure(runner: Any, library: ctypes.CDLL, *, batch: int, context: int, seconds: float, seed: int) -> dict[str, Any]:
    """Decode steps at `batch` for about `seconds`: the step time and the stage table, per step. Only decode steps
    call trillm_decode_forward, so the prefills between batches leave the counters alone."""
    rng = random.Random(seed)
    alloc = _BlockAllocator(runner.layout.num_blocks, runner.layout.block_size)
    step_id, steps, step_s = 1_000_000 * (seed + 1), 0, 0.0
    calls_0, wall_0, busy_0 = read_counters(library)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        alloc.next_block = 0
        decode = _DecodeBatch(runner, alloc, rng, batch=batch, context=context, max_steps=STEPS_PER_BATCH,
                              step_id=step_id, prefill_chunk=8192)  # fmt: skip
        step_id += 100_000
        plans = decode.next_plans(STEPS_PER_BATCH)
        started = time.perf_counter()
        for plan in plans:
            runner.step(plan)
        step_s += time.perf_counter() - started
        steps += len(plans)
    calls_1, wall_1, busy_1 = read_counters(library)
    if calls_1 - calls_0 != steps:
        raise RuntimeError(f"{steps} decode steps but {calls_1 - calls_0} one-call steps (gpu/cpu_decode.py declined)")
    ms, threads = 1000.0 / steps, runner_threads()
    stage_rows = [{"stage": name, "wall_ms": (wall_1[k] - wall_0[k]) * ms,
                   "busy_ms": [(busy_1[t][k] - busy_0[t][k]) * ms for t in range(threads)]}
                  for k, name in enumerate(STAGES)]  # fmt: skip
    return {"batch": batch, "context": [context, context + STEPS_PER_BATCH], "steps": steps,
            "step_ms": step_s * ms, "stages_ms": sum(r["wall_ms"] for r in stage_rows), "stages": stage_rows}


def runner_threads() -> int:
    import torch

    return min(STAGE_THREADS, torch.get_num_threads())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model spec (its projections must be GGUF blocks)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=192, help="positions before the first timed step")
    parser.add_argument("--seconds", type=float, default=10.0, help="per batch size")
    parser.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = parser.parse_args(argv)

    library = timing_library()
    from trillm.config import RunnerConfig
    from trillm.gpu.runner import ModelRunner
    from trillm.models.loader import resolve_model

    config = RunnerConfig(
        model_path=resolve_model(args.model), rank=0, world_size=1, dist_init_method="", device="cpu", dtype="float32",
        block_size=64, max_model_len=args.context + STEPS_PER_BATCH + 16, max_batch_size=max(args.batch),
        max_prefill_token_num=8192, cache_max_entry_count=0.8, cpu_memory_budget_bytes=8 << 30,
        enable_cuda_graph=False, deterministic=False,
    )  # fmt: skip
    runner = ModelRunner(config)
    results = [measure(runner, library, batch=b, context=args.context, seconds=args.seconds, seed=i)
               for i, b in enumerate(args.batch)]  # fmt: skip
    threads = runner_threads()
    for result in results:
        print(f"\n# batch {result['batch']}, context {result['context'][0]}..{result['context'][1]}: "
              f"{result['step_ms']:.2f} ms a step over {result['steps']} steps, ms per step:")
        rows = [[r["stage"], r["wall_ms"], *r["busy_ms"]] for r in result["stages"]]
        rows.append(["all stages", result["stages_ms"], *[""] * threads])
        rows.append(["outside (lm_head, sampling, Python)", result["step_ms"] - result["stages_ms"], *[""] * threads])
        print_table(["stage", "wall", *[f"busy t{t}" for t in range(threads)]], rows)
    device = f"cpu ({platform.processor() or platform.machine()})"
    path = result_path("cpu-stages", device, args.out_dir)
    payload = {"command": " ".join([Path(sys.executable).name, "-m", "bench.cpu_stages", *sys.argv[1:]]),
               "git_commit": git_commit(), "device": device, "host": platform.node(), "model": args.model,
               "threads": threads, "results": results}  # fmt: skip
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
