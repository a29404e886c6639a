"""Host-path benchmark: how much of the engine's own throughput survives HTTP, on any machine, with or without a GPU.

For each `--streams` count it runs the same load twice against one engine, in one process:

- engine alone: `streams` requests of `--input-len` random token ids and `--output-len` tokens (`ignore_eos`) sent at
  once through `Engine.generate` (bench/offline.py's loop);
- through HTTP: the app served by hypercorn with the server's own settings (`trillm.http.listening`) on a loopback
  port, and `python -m bench.serve` in a separate process sending the same load (streaming, usage chunk).

It prints output tok/s of both and their ratio (issue #8's bar is >= 0.95), plus median TPOT. With `--model
random:<preset>` on a GPU it measures the real engine; by default it uses `bench/null_rank.py`, a rank process with no
model whose steps take `--decode-ms` (+ `--prefill-us-per-token`): then the GPU is out of the picture and only the
serving process's own cost (scheduling, detokenizing, request streams, SSE, sockets) limits the ratio.

Example:
    python -m bench.host_path --streams 32 128 256 --input-len 256 --output-len 256 --decode-ms 25
    python -m bench.host_path --model random:llama2-7b --tokenizer TOKENIZER_DIR --real-rank --streams 32 128 256
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench.offline import _engine_batch, print_table, write_results
from trillm.actors.engine import Engine
from trillm.config import EngineConfig, ServerConfig
from trillm.http.app import create_app
from trillm.http.listening import hypercorn_settings, raise_open_file_limit

NULL_RANK = "bench.null_rank:main"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def http_run(engine: Engine, args: argparse.Namespace, streams: int) -> dict[str, Any]:
    """Serve the app on a free loopback port and run bench.serve against it in a child process."""
    import hypercorn.trio

    port = free_port()
    config = ServerConfig(engine=EngineConfig(model=args.model), server_name="127.0.0.1", server_port=port)
    app = create_app(config, engine=engine)
    stop = trio.Event()
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "serve.json"
        command = [
            sys.executable, "-m", "bench.serve", "--base-url", f"http://127.0.0.1:{port}", "--dataset", "random",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--num-prompts", str(streams),
            "--max-concurrency", str(streams), "--warmup", "1", "--no-progress", "--result-file", str(result_file),
            "--device-name", engine.device_name,
        ]
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: hypercorn.trio.serve(
                app, hypercorn_settings(config), shutdown_trigger=stop.wait, task_status=task_status))
            await trio.run_process(command, stdout=sys.stderr)
            stop.set()
        figures: dict[str, Any] = json.loads(result_file.read_text())["results"]
    return figures


async def measure(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    config = EngineConfig(model=args.model, tokenizer=args.tokenizer, max_batch_size=max(args.streams),
                          session_len=args.session_len, enable_prefix_caching=args.prefix_caching)
    rows = []
    async with Engine.open(config, rank_target=None if args.real_rank else NULL_RANK) as engine:
        vocab = engine.tokenizer.vocab_size
        await _engine_batch(engine, 4, 8, 4, vocab, seed=0)  # warm-up
        for streams in args.streams:
            alone = await _engine_batch(engine, streams, args.input_len, args.output_len, vocab, seed=streams)
            http = await http_run(engine, args, streams)
            rows.append({
                "streams": streams,
                "engine_tok_per_s": alone["output_tok_per_s"],
                "engine_itl_median_ms": alone["itl_median_ms"],
                "http_tok_per_s": http["output_tok_per_s"],
                "http_tpot_median_ms": http["median_tpot_ms"],
                "http_failed": http["failed"],
                "ratio": http["output_tok_per_s"] / alone["output_tok_per_s"],
            })
        return engine.device_name, rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.host_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model spec (its tokenizer detokenizes the null rank's "
                        "tokens); with --real-rank, the model served")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or model spec (random presets)")
    parser.add_argument("--real-rank", action="store_true", help="run the real rank processes instead of the null rank")
    parser.add_argument("--streams", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--session-len", type=int, default=4096)
    parser.add_argument("--decode-ms", type=float, default=25.0, help="null rank: time of one step")
    parser.add_argument("--prefill-us-per-token", type=float, default=20.0, help="null rank: prefill cost per token")
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    os.environ["TRILLM_NULL_RANK"] = f"decode_ms={args.decode_ms},prefill_us_per_token={args.prefill_us_per_token}"
    raise_open_file_limit()
    device_name, rows = trio.run(measure, args)
    label = "null-rank" if not args.real_rank else device_name
    path = write_results("host-path", label, {"model": args.model, "real_rank": args.real_rank,
                                               "decode_ms": None if args.real_rank else args.decode_ms,
                                               "input_len": args.input_len, "output_len": args.output_len,
                                               "rows": rows}, out_dir=args.out_dir)
    print(f"# host path: engine alone vs HTTP, {args.model} on {label}, {args.input_len} in / {args.output_len} out "
          f"({path.name})")
    print_table(["streams", "engine tok/s", "engine ITL ms", "HTTP tok/s", "HTTP TPOT ms", "failed", "HTTP/engine"],
                [[r["streams"], r["engine_tok_per_s"], r["engine_itl_median_ms"] or 0.0, r["http_tok_per_s"],
                  r["http_tpot_median_ms"] or 0.0, r["http_failed"], r["ratio"]] for r in rows])


if __name__ == "__main__":
    main()
