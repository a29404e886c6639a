"""Offline benchmark: engine throughput and model-runner step times, no HTTP.

Two measurements, both runnable on any machine (`--device cpu` for smoke runs):

- `engine`: N requests of fixed prompt/output lengths (random token ids, `ignore_eos`) submitted at once through the
  Trio `Engine` (actors, scheduler, rank processes; `--tp N` for N GPUs): output tokens per second, time to first
  token, and the engine's start time (model load: rank start, weights built or read, graphs captured).
- `steps`: the `ModelRunner` driven directly with hand-built `StepPlan`s: one prefill of `--prefill-len` tokens, and
  decode steps at each `--batch` with `--context` tokens of context per sequence (ms per step, tokens per second).

Each run prints a table last and writes JSON to bench/results/<device>-offline-<date>.json (`--out-dir` elsewhere) with
the command, the git commit, the device name and every figure. `steps` also prints each figure's bandwidth/compute
floor on the lent H100 (PERF.md's ceilings: 3.0 TB/s copy, 800 TFLOP/s bf16), and with `--profile` writes the
torch.profiler kernel table of a few decode steps per batch size (`<device>-offline-profile-<date>.txt`).

Examples:
    python -m bench.offline engine --model smollm2 --batch 1 16 --prompt-len 128 --output-len 128
    python -m bench.offline engine --model random:llama3-70b --tokenizer TOK --dtype bfloat16 --tp 8 --batch 1 64
    python -m bench.offline steps --model random:llama2-7b --batch 1 32 --context 1024 --prefill-len 1024 --profile
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

RESULTS_DIR = Path(__file__).resolve().parent / "results"
H100_COPY_BYTES_PER_S = 3.0e12  # measured device-to-device copy, read + write (PERF.md)
H100_BF16_FLOPS = 800e12  # measured bf16 matmul (PERF.md)
PROFILE_STEPS = 5


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def result_path(kind: str, device_name: str, out_dir: str | None, suffix: str = "json") -> Path:
    """`<out_dir or bench/results>/<device>-<kind>-<date>.<suffix>`, creating the folder."""
    folder = Path(out_dir) if out_dir else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name.lower()).strip("-")
    return folder / f"{slug}-{kind}-{datetime.date.today().isoformat()}.{suffix}"


def write_results(
    kind: str, device_name: str, payload: dict[str, Any], *, out_dir: str | None = None, commit: str | None = None
) -> Path:
    """Write one JSON result file (under bench/results/ unless `out_dir`) and return its path."""
    path = result_path(kind, device_name, out_dir)
    date = datetime.date.today().isoformat()
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.offline", *sys.argv[1:]]),
        "git_commit": commit or git_commit(),
        "device": device_name,
        "host": platform.node(),
        "date": date,
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, header))] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# --------------------------------------------------------------------------------------------------------------------
# engine: requests through the Trio engine


async def _engine_batch(engine: Any, batch: int, prompt_len: int, output_len: int, vocab: int, seed: int) -> dict[str, Any]:
    import trio

    from trillm.protocol.api import GenerateRequest, SamplingParams

    rng = random.Random(seed)
    ttfts: list[float] = []
    gaps: list[float] = []  # inter-token latency: time between consecutive outputs of one request
    output_tokens = 0

    async def one(i: int) -> None:
        nonlocal output_tokens
        prompt = tuple(rng.randrange(3, vocab) for _ in range(prompt_len))
        sampling = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        request = GenerateRequest(request_id=f"bench-{batch}-{i}", prompt_token_ids=prompt, sampling=sampling)
        start = last = time.perf_counter()
        first = True
        async with engine.generate(request) as outputs:
            async for out in outputs:
                now = time.perf_counter()
                if first and out.token_ids:
                    ttfts.append(now - start)
                    first = False
                elif out.token_ids:
                    gaps.append(now - last)
                last = now
                output_tokens += len(out.token_ids)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(batch):
            nursery.start_soon(one, i)
    elapsed = time.perf_counter() - start
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "output_tokens": output_tokens,
        "seconds": elapsed,
        "output_tok_per_s": output_tokens / elapsed,
        "ttft_median_ms": 1000 * statistics.median(ttfts) if ttfts else None,
        "itl_median_ms": 1000 * statistics.median(gaps) if gaps else None,
    }


def run_engine(args: argparse.Namespace) -> None:
    import trio

    from trillm.actors.engine import Engine
    from trillm.config import EngineConfig

    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=max(args.batch),
        cache_block_seq_len=args.block_size,
        enable_cuda_graph=not args.no_cuda_graph,
        tokenizer=args.tokenizer,
        session_len=args.session_len,
        tp=args.tp,
        deterministic=args.deterministic,
    )
    if args.no_overlap:
        config = attrs.evolve(config, enable_overlap=False)

    async def main() -> tuple[str, float, list[dict[str, Any]]]:
        results = []
        start = time.perf_counter()
        async with Engine.open(config) as engine:
            load_s = time.perf_counter() - start  # rank processes up, weights built or read, graphs captured
            vocab = engine.tokenizer.vocab_size
            await _engine_batch(engine, 1, 8, 4, vocab, seed=0)  # warm-up: first-step costs, graph capture
            for batch in args.batch:
                results.append(await _engine_batch(engine, batch, args.prompt_len, args.output_len, vocab, seed=batch))
            return engine.device_name, load_s, results

    device_name, load_s, results = trio.run(main)
    overlap = getattr(config, "enable_overlap", False)
    mode = ("det-" if args.deterministic else "") + ("overlap" if overlap else "lockstep")
    path = write_results(f"offline-engine-tp{args.tp}-{mode}", device_name,
                         {"mode": "engine", "model": args.model, "dtype": args.dtype, "overlap": overlap, "tp": args.tp,
                          "load_s": load_s, "results": results}, out_dir=args.out_dir, commit=args.git_commit)
    print(f"# engine throughput, {args.model} on {device_name}, tp {args.tp}, "
          f"step overlap {'on' if overlap else 'off'}, engine start {load_s:.1f} s ({path.name})")
    print_table(
        ["batch", "prompt", "output", "tokens", "seconds", "tok/s", "TTFT ms", "ITL ms"],
        [[r["batch"], r["prompt_len"], r["output_len"], r["output_tokens"], r["seconds"], r["output_tok_per_s"],
          r["ttft_median_ms"] or 0.0, r["itl_median_ms"] or 0.0] for r in results],
    )


# --------------------------------------------------------------------------------------------------------------------
# steps: the ModelRunner driven directly


class _BlockAllocator:
    """Hands out consecutive block ids; enough for a benchmark that never frees."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.next_block = 0
        self.num_blocks = num_blocks
        self.block_size = block_size

    def table(self, num_tokens: int) -> tuple[int, ...]:
        count = -(-num_tokens // self.block_size)
        if self.next_block + count > self.num_blocks:
            raise SystemExit(f"KV cache too small: need {self.next_block + count} blocks, have {self.num_blocks}")
        ids = tuple(range(self.next_block, self.next_block + count))
        self.next_block += count
        return ids


def _prefill_plans(step_id: int, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]],
                   tables: Sequence[tuple[int, ...]], chunk: int) -> list[Any]:
    """Plans that prefill every prompt in chunks of at most `chunk` tokens per step, the last chunk sampled."""
    from trillm.protocol.api import SamplingParams
    from trillm.protocol.step import SampleSpec, SeqStep, StepPlan

    greedy = SampleSpec(sampling=SamplingParams(temperature=0.0, seed=0), output_index=0)
    plans: list[Any] = []
    for seq_id, prompt, table in zip(seq_ids, prompts, tables):
        for start in range(0, len(prompt), chunk):
            piece = tuple(prompt[start:start + chunk])
            is_last = start + chunk >= len(prompt)
            step = SeqStep(seq_id=seq_id, token_ids=piece, start_pos=start, block_table=table,
                           sample=greedy if is_last else None)
            plans.append(StepPlan(step_id=step_id + len(plans), seqs=(step,)))
    return plans


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def floors_ms(args: Any, itemsize: int, *, batch: int, context: int, prefill_len: int = 0) -> float:
    """The H100 floor of one step: weight + KV bytes over copy bandwidth (decode), or FLOPs over matmul rate (prefill).

    Weights read per decode step exclude the embedding table (only `batch` rows of it are read); prefill FLOPs
    exclude lm_head (one row). For random:llama2-7b this gives PERF.md's 4.58 ms (batch 1, 1k), 10.13 ms (batch 32,
    1k) and 16.9 ms (1k prefill; PERF.md rounds to 17.0).
    """
    from trillm.models.llama import checkpoint_shapes

    shapes = checkpoint_shapes(args)
    params = sum(math.prod(shape) for shape in shapes.values()) - args.vocab_size * args.hidden_size
    if prefill_len:  # only the sampled row goes through lm_head
        params -= 0 if args.tie_word_embeddings else args.vocab_size * args.hidden_size
        attention = 2 * prefill_len * prefill_len * args.num_heads * args.head_dim * args.num_layers  # causal QK + PV
        return float(1000 * (2 * params * prefill_len + attention) / H100_BF16_FLOPS)
    kv_bytes = batch * context * args.num_layers * 2 * args.num_kv_heads * args.head_dim * itemsize
    return float(1000 * (params * itemsize + kv_bytes) / H100_COPY_BYTES_PER_S)


class _DecodeBatch:
    """`batch` sequences of `context` prompt tokens, prefilled, then advanced one greedy decode step at a time."""

    def __init__(self, runner: Any, alloc: _BlockAllocator, rng: random.Random, *, batch: int, context: int,
                 max_steps: int, step_id: int, prefill_chunk: int) -> None:
        from trillm.protocol.api import SamplingParams

        self.runner, self.rng, self.step_id = runner, rng, step_id
        self.greedy = SamplingParams(temperature=0.0, seed=0)
        self.seq_ids = list(range(1000, 1000 + batch))
        prompts = [[rng.randrange(3, 32000) for _ in range(context)] for _ in self.seq_ids]
        self.tables = [alloc.table(context + max_steps + 1) for _ in self.seq_ids]
        for plan in _prefill_plans(step_id, self.seq_ids, prompts, self.tables, chunk=prefill_chunk):
            runner.step(plan)
        self.step_id += 10_000
        self.lengths = [context] * batch
        self.num_steps = 0

    def next_plans(self, num_steps: int) -> list[Any]:
        """The next `num_steps` decode plans, built ahead (the Batcher builds them in another process)."""
        from trillm.protocol.step import SampleSpec, SeqStep, StepPlan

        plans = []
        for _ in range(num_steps):
            self.num_steps += 1
            spec = SampleSpec(sampling=self.greedy, output_index=self.num_steps)
            seqs = tuple(
                SeqStep(seq_id=s, token_ids=(self.rng.randrange(3, 32000),), start_pos=self.lengths[j],
                        block_table=self.tables[j], sample=spec)
                for j, s in enumerate(self.seq_ids)
            )
            plans.append(StepPlan(step_id=self.step_id, seqs=seqs))
            self.step_id += 1
            self.lengths = [n + 1 for n in self.lengths]
        return plans


def _profile(run: Callable[[], object], num_steps: int) -> tuple[str, dict[str, float]]:
    """torch.profiler over `num_steps` calls of `run`: the kernel table, and per step the GPU kernel time and the
    GPU's idle time between its first and last kernel (in gaps under 20 us: launch latency; longer: waiting for the
    host). The profiler slows the host, so long gaps read high; the unprofiled step time minus the kernel time bounds
    the true idle time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            run()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)  # type: ignore[attr-defined]  # fmt: skip
    busy_us = short_gaps_us = long_gaps_us = 0.0
    end = spans[0][0] if spans else 0.0
    for span_start, span_end in spans:
        gap = span_start - end
        if gap > 0:
            short_gaps_us += gap if gap < 20 else 0.0
            long_gaps_us += gap if gap >= 20 else 0.0
        busy_us += max(0.0, span_end - max(span_start, end))
        end = max(end, span_end)
    per_step = 1000.0 * num_steps
    return table, {"gpu_kernel_ms": busy_us / per_step, "gpu_short_gaps_ms": short_gaps_us / per_step,
                   "gpu_long_gaps_ms": long_gaps_us / per_step}


def run_steps(args: argparse.Namespace) -> None:
    import torch

    from trillm.config import RunnerConfig
    from trillm.gpu.runner import ModelRunner
    from trillm.models.loader import resolve_model

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    extra_steps = args.decode_steps + (PROFILE_STEPS if args.profile else 0)
    max_context = max(args.context) + extra_steps + 8
    config = RunnerConfig(
        model_path=resolve_model(args.model), rank=0, world_size=1, dist_init_method="", device=device, dtype=dtype,
        block_size=args.block_size, max_model_len=max(max_context, args.prefill_len + 8),
        max_batch_size=max(args.batch), max_prefill_token_num=args.max_prefill_tokens,
        cache_max_entry_count=args.cache_fraction, cpu_memory_budget_bytes=8 << 30,
        enable_cuda_graph=not args.no_cuda_graph, deterministic=args.deterministic,
    )
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    start = time.perf_counter()
    runner = ModelRunner(config)
    _sync(device)
    init_s = time.perf_counter() - start
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'x86_64'})"
    itemsize = runner.dtype.itemsize
    vocab = 32000
    rng = random.Random(0)
    step_id = 0
    rows: list[dict[str, Any]] = []
    profiles: list[str] = []

    # Prefill: one prompt of prefill_len tokens in one step (time to first token, engine only).
    alloc = _BlockAllocator(runner.layout.num_blocks, args.block_size)
    prompt = [rng.randrange(3, vocab) for _ in range(args.prefill_len)]
    times = []
    for rep in range(args.repeats + 2):
        alloc.next_block = 0
        plan = _prefill_plans(step_id, [rep], [prompt], [alloc.table(len(prompt))], chunk=len(prompt))[0]
        step_id += 1
        _sync(device)
        start = time.perf_counter()
        runner.step(plan)
        _sync(device)
        if rep >= 2:
            times.append(time.perf_counter() - start)
    prefill_ms = 1000 * statistics.median(times)
    floor = floors_ms(runner.args, itemsize, batch=1, context=0, prefill_len=args.prefill_len)
    rows.append({"what": "prefill", "batch": 1, "context": args.prefill_len, "ms": prefill_ms,
                 "tok_per_s": args.prefill_len / prefill_ms * 1000, "h100_floor_ms": floor,
                 "floor_fraction": floor / prefill_ms})
    if args.profile and device == "cuda":
        _profile(lambda: runner.step(plan), 1)  # warm-up: the profiler's first use costs a second
        table, summary = _profile(lambda: runner.step(plan), 1)
        summary["gpu_busy_fraction"] = summary["gpu_kernel_ms"] / prefill_ms
        rows[-1].update(summary)
        profiles.append(f"## prefill of {args.prefill_len} tokens, {prefill_ms:.2f} ms unprofiled: {summary}\n"
                        f"{table}\n")

    for context in args.context:
        for batch_size in args.batch:
            alloc.next_block = 0
            batch = _DecodeBatch(runner, alloc, rng, batch=batch_size, context=context, max_steps=extra_steps,
                                 step_id=step_id, prefill_chunk=args.max_prefill_tokens)
            step_times = []
            for plan in batch.next_plans(args.decode_steps):
                _sync(device)
                start = time.perf_counter()
                runner.step(plan)
                _sync(device)
                step_times.append(time.perf_counter() - start)
            step_id = batch.step_id + 1
            warm = step_times[min(3, len(step_times) - 1):]
            ms = 1000 * statistics.median(warm)
            floor = floors_ms(runner.args, itemsize, batch=batch_size, context=context)
            row = {"what": "decode", "batch": batch_size, "context": context, "ms": ms,
                   "tok_per_s": batch_size / ms * 1000, "ms_min": 1000 * min(warm), "h100_floor_ms": floor,
                   "floor_fraction": floor / ms}
            if args.profile and device == "cuda":
                plans = iter(batch.next_plans(PROFILE_STEPS))
                table, summary = _profile(lambda: runner.step(next(plans)), PROFILE_STEPS)
                summary["gpu_busy_fraction"] = summary["gpu_kernel_ms"] / ms
                row.update(summary)
                profiles.append(f"## decode batch {batch_size}, context {context}, {ms:.2f} ms/step unprofiled: "
                                f"{summary}\n{table}\n")
            rows.append(row)
    graph_sizes, capture_s = runner.graph_batch_sizes, runner.graph_capture_s
    runner.close()

    mode = ("graphs" if graph_sizes else "eager") + ("" if args.blas == "default" else f"-{args.blas}")
    mode += "-det" if args.deterministic else ""
    payload = {
        "mode": "steps", "model": args.model, "dtype": dtype, "block_size": args.block_size, "blas": args.blas,
        "deterministic": args.deterministic,
        "cuda_graphs": bool(graph_sizes), "runner_init_s": init_s, "graph_capture_s": capture_s,
        "graph_batch_sizes": list(graph_sizes), "num_kv_blocks": runner.layout.num_blocks, "results": rows,
    }
    path = write_results(f"offline-steps-{mode}-{dtype}", device_name, payload, out_dir=args.out_dir, commit=args.git_commit)
    if profiles:
        profile_path = result_path(f"offline-profile-{mode}", device_name, args.out_dir, suffix="txt")
        profile_path.write_text("".join(profiles))
        print("".join(profiles))
    print(f"# runner step times, {args.model} {dtype} on {device_name}, {mode} "
          f"(init {init_s:.1f} s, graph capture {capture_s:.2f} s for batch {list(graph_sizes)}; {path.name})")
    print_table(["what", "batch", "context", "ms/step", "tok/s", "H100 floor ms", "floor/ms"],
                [[r["what"], r["batch"], r["context"], r["ms"], r["tok_per_s"], r["h100_floor_ms"],
                  r["floor_fraction"]] for r in rows])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.offline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2", help="model spec: smollm2, a .gguf, a folder, random:<preset>")
    common.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    common.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    common.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes to measure")
    common.add_argument("--block-size", type=int, default=64, help="KV cache block size (tokens)")
    common.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly")
    common.add_argument("--blas", default="default", choices=["default", "cublas", "cublaslt"],
                        help="torch.backends.cuda.preferred_blas_library for the runner's GEMMs")
    common.add_argument("--deterministic", action="store_true", help="the batch-invariant kernels (--deterministic)")
    common.add_argument("--out-dir", default=None, help="where result files go (default bench/results/)")
    common.add_argument("--git-commit", default=None, help="commit to record (default: git rev-parse)")
    engine = sub.add_parser("engine", parents=[common], help="throughput through the Trio engine")
    engine.add_argument("--prompt-len", type=int, default=128)
    engine.add_argument("--output-len", type=int, default=128)
    engine.add_argument("--tokenizer", default=None, help="tokenizer folder or model spec (random presets)")
    engine.add_argument("--session-len", type=int, default=None, help="context window (default: the model's)")
    engine.add_argument("--no-overlap", action="store_true", help="plan each step only after the previous one")
    engine.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (GPUs)")
    steps = sub.add_parser("steps", parents=[common], help="prefill and decode step times on the ModelRunner")
    steps.add_argument("--context", type=int, nargs="+", default=[1024], help="context length per sequence")
    steps.add_argument("--prefill-len", type=int, default=1024)
    steps.add_argument("--decode-steps", type=int, default=32)
    steps.add_argument("--repeats", type=int, default=5)
    steps.add_argument("--max-prefill-tokens", type=int, default=8192)
    steps.add_argument("--cache-fraction", type=float, default=0.8)
    steps.add_argument("--profile", action="store_true", help="torch.profiler kernel table of a few decode steps")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_engine(args) if args.mode == "engine" else run_steps(args)


if __name__ == "__main__":
    main()
