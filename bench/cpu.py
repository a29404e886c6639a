"""CPU side by side: `trillm serve` through HTTP against transformers' own `generate`, on the same weights, one run.

The default experience (issue #15): on a machine without a GPU, is serving the default model through trillm at
least as fast as calling transformers directly? One command answers it:

    python -m bench.cpu                      # SmolLM2-135M-Instruct GGUF, 1 and 8 streams, 128 in / 128 out

It starts `python -m trillm serve api_server MODEL` on a free port (extra flags after `--serve-args`), resolves
the same model to its Hugging Face folder (`models/loader.py`: the GGUF dequantized once, float32), and loads it
into transformers in this process, in each `--hf-dtypes` dtype. Then, `--rounds` times, for each `--streams` count
N, interleaved so that both sides see the same machine load:

- trillm: N requests sent at once through `bench/serve.py` (random token-id prompts of `--input-len`,
  `max_tokens` = `--output-len`, `ignore_eos`, streamed); output tokens per second over the wall time, and TTFT.
- transformers: `generate` on a static batch of N such prompts (`min_new_tokens` = `max_new_tokens`, greedy),
  output tokens per second; its TTFT is the time of the same call with one new token (the prefill).

The server keeps running between measurements, idle; this process's torch uses every core while transformers runs
(`torch.get_num_threads()`, recorded). The 1-minute load average (`os.getloadavg`) is recorded before and after
each measurement: on a shared machine compare only figures taken under the same load. The JSON goes to
bench/results/<cpu>-cpu-side-by-side-<date>.json; the last line printed is the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import serve

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SERVER_START_TIMEOUT_S = 600.0  # first start converts the GGUF (a few seconds) and warms the rank up
VOCAB_LOW, VOCAB_HIGH = 1000, 30000  # prompt ids, as bench/serve.py draws them


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), for the result's file name and table."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(base_url: str, server: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll GET /health until 200; RuntimeError if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"trillm serve exited with status {server.returncode} before it was healthy")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1.0)
    raise RuntimeError(f"trillm serve was not healthy within {timeout_s:.0f} s")


@contextlib.contextmanager
def running_server(model: str, port: int, serve_args: Sequence[str]) -> Iterator[str]:
    """`trillm serve api_server` in a subprocess for the block's duration; yields its base URL."""
    command = [sys.executable, "-m", "trillm", "serve", "api_server", model, "--server-name", "127.0.0.1",
               "--server-port", str(port), "--log-level", "WARNING", *serve_args]
    server = subprocess.Popen(command)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, server, SERVER_START_TIMEOUT_S)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def load_average() -> float:
    return os.getloadavg()[0]


def trillm_streams(base_url: str, streams: int, input_len: int, output_len: int, seed: int) -> dict[str, Any]:
    """`streams` requests at once through bench/serve.py; its figures (output tok/s, TTFT, ...) plus the load."""
    config = serve.BenchConfig(
        base_url=base_url, dataset="random", num_prompts=streams, input_len=input_len, output_len=output_len,
        vocab_low=VOCAB_LOW, vocab_high=VOCAB_HIGH, seed=seed, num_warmup=1, is_save=False, is_progress=False,
    )  # fmt: skip
    load_before = load_average()
    run = asyncio.run(serve.run_benchmark(config))
    figures = serve.summarize(run)
    if figures["failed"]:
        raise RuntimeError(f"{figures['failed']} trillm requests failed: {figures['errors']}")
    ttfts = [r.ttft_s for r in run.results if r.is_success]
    return {
        "output_tok_per_s": figures["output_tok_per_s"],
        "duration_s": figures["duration_s"],
        "total_output_tokens": figures["total_output_tokens"],
        "median_ttft_ms": figures["median_ttft_ms"],
        "max_ttft_ms": 1000.0 * max(ttfts),
        "median_tpot_ms": figures["median_tpot_ms"],
        "load_before": load_before,
        "load_after": load_average(),
    }


class HFModel:
    """One transformers model on the CPU, in one dtype (this process's torch threads)."""

    def __init__(self, folder: str, dtype_name: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.dtype_name = dtype_name
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name)).eval()

    def generate_s(self, prompts: Any, new_tokens: int) -> float:
        """Wall seconds of one greedy `generate` of exactly `new_tokens` tokens for the batch `prompts` [N, len]."""
        import torch

        with torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
            return time.perf_counter() - start

    def static_batch(self, streams: int, input_len: int, output_len: int, seed: int) -> dict[str, Any]:
        """Output tok/s of one static batch of `streams` prompts, and its prefill time (the TTFT it would give)."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        prompts = torch.randint(VOCAB_LOW, VOCAB_HIGH, (streams, input_len), generator=generator)
        load_before = load_average()
        ttft_s = self.generate_s(prompts, 1)
        duration_s = self.generate_s(prompts, output_len)
        return {
            "output_tok_per_s": streams * output_len / duration_s,
            "duration_s": duration_s,
            "ttft_ms": 1000.0 * ttft_s,
            "load_before": load_before,
            "load_after": load_average(),
        }


def best_hf(row: dict[str, Any]) -> tuple[str, float]:
    """The transformers dtype with the highest output tok/s in one round's row, and that figure."""
    name, figures = max(row["transformers"].items(), key=lambda item: item[1]["output_tok_per_s"])
    return name, float(figures["output_tok_per_s"])


def summarize_rounds(rounds: Sequence[dict[str, Any]], streams: Sequence[int]) -> list[dict[str, Any]]:
    """Per stream count: the median over rounds of trillm's tok/s, of the best transformers dtype's, and their ratio.

    Each round's ratio is taken within the round (same load), and the median of those ratios is reported.
    """
    summary = []
    for n in streams:
        rows = [r for r in rounds if r["streams"] == n]
        ratios = [row["trillm"]["output_tok_per_s"] / best_hf(row)[1] for row in rows]
        summary.append({
            "streams": n,
            "trillm_tok_per_s": statistics.median(row["trillm"]["output_tok_per_s"] for row in rows),
            "trillm_max_ttft_ms": max(row["trillm"]["max_ttft_ms"] for row in rows),
            "transformers_tok_per_s": statistics.median(best_hf(row)[1] for row in rows),
            "transformers_dtypes": sorted({best_hf(row)[0] for row in rows}),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "load": [row["trillm"]["load_before"] for row in rows],
        })  # fmt: skip
    return summary


def print_summary(summary: Sequence[dict[str, Any]]) -> None:
    header = ("streams", "trillm tok/s", "max TTFT ms", "transformers tok/s", "dtype", "ratio", "load")
    cells = [list(header)] + [
        [str(s["streams"]), f"{s['trillm_tok_per_s']:.1f}", f"{s['trillm_max_ttft_ms']:.0f}",
         f"{s['transformers_tok_per_s']:.1f}", "/".join(s["transformers_dtypes"]), f"{s['ratio']:.2f}",
         " ".join(f"{x:.1f}" for x in s["load"])]
        for s in summary
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model spec for both sides (default: smollm2)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8], help="concurrent streams (default 1 8)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (default 2)")
    parser.add_argument("--hf-dtypes", nargs="+", default=["float32", "bfloat16"],
                        help="transformers dtypes; the fastest per round is the yardstick (default float32 bfloat16)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                        help="everything after this goes to `trillm serve api_server` (e.g. --max-batch-size 16)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from trillm.models.loader import resolve_model

    folder = resolve_model(args.model)
    hf_models = [HFModel(folder, name) for name in args.hf_dtypes]
    rounds: list[dict[str, Any]] = []
    with running_server(args.model, args.port or free_port(), args.serve_args) as base_url:
        for round_index in range(args.rounds):
            for n in args.streams:
                seed = 1000 * round_index + n
                row: dict[str, Any] = {"round": round_index, "streams": n}
                row["trillm"] = trillm_streams(base_url, n, args.input_len, args.output_len, seed)
                row["transformers"] = {m.dtype_name: m.static_batch(n, args.input_len, args.output_len, seed)
                                       for m in hf_models}  # fmt: skip
                rounds.append(row)
                print(f"round {round_index} streams {n}: trillm {row['trillm']['output_tok_per_s']:.1f} tok/s, "
                      f"transformers {best_hf(row)[1]:.1f} tok/s ({best_hf(row)[0]})", flush=True)
    summary = summarize_rounds(rounds, args.streams)
    name = cpu_name()
    folder_out = Path(args.out_dir) if args.out_dir else RESULTS_DIR
    folder_out.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    path = folder_out / f"{slug}-cpu-side-by-side-{datetime.date.today().isoformat()}.json"
    payload = {
        "command": " ".join(["python", "-m", "bench.cpu", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": serve.git_commit(), "cpu": name, "cores": os.cpu_count(), "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "transformers_threads": torch.get_num_threads(), "model": args.model, "input_len": args.input_len,
        "output_len": args.output_len, "summary": summary, "rounds": rounds,
    }  # fmt: skip
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print_summary(summary)
    print(f"wrote {path}")
    tokens = sum(r["trillm"]["total_output_tokens"] for r in rounds)
    seconds = sum(r["trillm"]["duration_s"] for r in rounds)
    ratios = " ".join(f"{s['streams']}:{s['ratio']:.2f}x" for s in summary)
    print(f"bench.cpu model={args.model} streams={args.streams} in/out={args.input_len}/{args.output_len} "
          f"trillm tokens={tokens} seconds={seconds:.2f} tok/s={tokens / seconds:.1f} vs transformers {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
