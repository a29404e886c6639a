"""Offline benchmark: engine throughput and model-runner step times, no HTTP.

Two measurements, both runnable on any machine (`--device cpu` for smoke runs):

- `engine`: N requests of fixed prompt/output lengths (random token ids, `ignore_eos`) submitted at once through the
  Trio `Engine` (actors, scheduler, rank process): output tokens per second and time to first token.
- `steps`: the `ModelRunner` driven directly with hand-built `StepPlan`s: one prefill of `--prefill-len` tokens, and
  decode steps at each `--batch` with `--context` tokens of context per sequence (ms per step, tokens per second).

Each run prints a table last and writes JSON to bench/results/<device>-offline-<date>.json with the command, the git
commit, the device name and every figure.

Examples:
    python -m bench.offline engine --model smollm2 --batch 1 16 --prompt-len 128 --output-len 128
    python -m bench.offline steps --model random:llama2-7b --batch 1 32 --context 1024 --prefill-len 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_results(kind: str, device_name: str, payload: dict[str, Any]) -> Path:
    """Write one JSON result file under bench/results/ and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name.lower()).strip("-")
    date = datetime.date.today().isoformat()
    path = RESULTS_DIR / f"{slug}-{kind}-{date}.json"
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.offline", *sys.argv[1:]]),
        "git_commit": git_commit(),
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


async def _engine_batch(engine: Any, batch: int, prompt_len: int, output_len: int, vocab: int, seed: int) -> dict:
    import trio

    from trillm.actors.messages import GenerateRequest, SamplingParams

    rng = random.Random(seed)
    ttfts: list[float] = []
    output_tokens = 0

    async def one(i: int) -> None:
        nonlocal output_tokens
        prompt = tuple(rng.randrange(3, vocab) for _ in range(prompt_len))
        sampling = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        request = GenerateRequest(request_id=f"bench-{batch}-{i}", prompt_token_ids=prompt, sampling=sampling)
        start = time.perf_counter()
        first = True
        async with engine.generate(request) as outputs:
            async for out in outputs:
                if first and out.token_ids:
                    ttfts.append(time.perf_counter() - start)
                    first = False
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
    )

    async def main() -> tuple[str, list[dict]]:
        results = []
        async with Engine.open(config) as engine:
            vocab = engine.tokenizer.vocab_size
            await _engine_batch(engine, 1, 8, 4, vocab, seed=0)  # warm-up: first-step costs, graph capture
            for batch in args.batch:
                results.append(await _engine_batch(engine, batch, args.prompt_len, args.output_len, vocab, seed=batch))
            return engine.device_name, results

    device_name, results = trio.run(main)
    path = write_results("offline", device_name, {"mode": "engine", "model": args.model, "dtype": args.dtype,
                                                  "results": results})
    print(f"# engine throughput, {args.model} on {device_name} ({path.name})")
    print_table(
        ["batch", "prompt", "output", "tokens", "seconds", "tok/s", "TTFT ms"],
        [[r["batch"], r["prompt_len"], r["output_len"], r["output_tokens"], r["seconds"], r["output_tok_per_s"],
          r["ttft_median_ms"] or 0.0] for r in results],
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
    from trillm.actors.messages import SampleSpec, SamplingParams, SeqStep, StepPlan

    greedy = SampleSpec(sampling=SamplingParams(temperature=0.0, seed=0), output_index=0)
    plans = []
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


def run_steps(args: argparse.Namespace) -> None:
    import torch

    from trillm.actors.messages import SampleSpec, SamplingParams, SeqStep, StepPlan
    from trillm.config import RunnerConfig
    from trillm.gpu.runner import ModelRunner
    from trillm.models.loader import resolve_model

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    max_context = max(args.context) + args.decode_steps + 8
    config = RunnerConfig(
        model_path=resolve_model(args.model), rank=0, world_size=1, dist_init_method="", device=device, dtype=dtype,
        block_size=args.block_size, max_model_len=max(max_context, args.prefill_len + 8),
        max_batch_size=max(args.batch), max_prefill_token_num=args.max_prefill_tokens,
        cache_max_entry_count=args.cache_fraction, cpu_memory_budget_bytes=8 << 30,
        enable_cuda_graph=not args.no_cuda_graph,
    )
    runner = ModelRunner(config)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'x86_64'})"
    vocab = 32000
    rng = random.Random(0)
    greedy = SamplingParams(temperature=0.0, seed=0)
    step_id = 0
    rows: list[dict] = []

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
    rows.append({"what": "prefill", "batch": 1, "context": args.prefill_len, "ms": prefill_ms,
                 "tok_per_s": args.prefill_len / prefill_ms * 1000})

    for context in args.context:
        for batch in args.batch:
            alloc.next_block = 0
            seq_ids = list(range(1000, 1000 + batch))
            prompts = [[rng.randrange(3, vocab) for _ in range(context)] for _ in seq_ids]
            tables = [alloc.table(context + args.decode_steps + 1) for _ in seq_ids]
            for plan in _prefill_plans(step_id, seq_ids, prompts, tables, chunk=args.max_prefill_tokens):
                runner.step(plan)
            step_id += 10_000
            lengths = [context] * batch
            step_times = []
            for i in range(args.decode_steps):
                seqs = tuple(
                    SeqStep(seq_id=s, token_ids=(rng.randrange(3, vocab),), start_pos=lengths[j],
                            block_table=tables[j], sample=SampleSpec(sampling=greedy, output_index=i + 1))
                    for j, s in enumerate(seq_ids)
                )
                _sync(device)
                start = time.perf_counter()
                runner.step(StepPlan(step_id=step_id, seqs=seqs))
                _sync(device)
                step_times.append(time.perf_counter() - start)
                step_id += 1
                lengths = [n + 1 for n in lengths]
            warm = step_times[min(3, len(step_times) - 1):]
            ms = 1000 * statistics.median(warm)
            rows.append({"what": "decode", "batch": batch, "context": context, "ms": ms,
                         "tok_per_s": batch / ms * 1000})
    runner.close()

    path = write_results("offline-steps", device_name, {
        "mode": "steps", "model": args.model, "dtype": dtype, "block_size": args.block_size,
        "cuda_graphs": not args.no_cuda_graph, "results": rows,
    })
    print(f"# runner step times, {args.model} {dtype} on {device_name}, cuda graphs "
          f"{'off' if args.no_cuda_graph else 'on'} ({path.name})")
    print_table(["what", "batch", "context", "ms/step", "tok/s"],
                [[r["what"], r["batch"], r["context"], r["ms"], r["tok_per_s"]] for r in rows])


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
    engine = sub.add_parser("engine", parents=[common], help="throughput through the Trio engine")
    engine.add_argument("--prompt-len", type=int, default=128)
    engine.add_argument("--output-len", type=int, default=128)
    steps = sub.add_parser("steps", parents=[common], help="prefill and decode step times on the ModelRunner")
    steps.add_argument("--context", type=int, nargs="+", default=[1024], help="context length per sequence")
    steps.add_argument("--prefill-len", type=int, default=1024)
    steps.add_argument("--decode-steps", type=int, default=32)
    steps.add_argument("--repeats", type=int, default=5)
    steps.add_argument("--max-prefill-tokens", type=int, default=8192)
    steps.add_argument("--cache-fraction", type=float, default=0.8)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_engine(args) if args.mode == "engine" else run_steps(args)


if __name__ == "__main__":
    main()
