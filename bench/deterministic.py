"""Deterministic-mode kernels against the ordinary ones, on Llama-2-7B shapes (bf16, one GPU).

Method as bench/kernels.py (CUDA events, CUDA-graph replay of a rotation of inputs bigger than L2, medians):
- projections: `det_linear` under each tile shape (and candidate shapes given with --gemm-configs) against cuBLAS
  (F.linear) on row-major and column-major weights, at M = 1, 8, 32, 128, 256, 1024 for qkv, o, gate-up, down, lm_head;
- attention: the deterministic decode (split) against `paged_decode_attention` at batch 1, 32 and 128 x 1k context,
  and the deterministic prefill against `paged_prefill_attention` and torch's flash SDPA for a 1k-token prompt.
Prints a table last; writes JSON to <out-dir>/<gpu>-deterministic-<date>.json.

    python -m bench.deterministic --out-dir /tmp/out
    python -m bench.deterministic --gemm-configs 1,2,1,4,64,6 2,2,1,4,64,4   # extra tile shapes to try
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.kernels import ROTATION_BYTES, time_graph
from trillm.gpu import kernels
from trillm.gpu.kernels import deterministic as det

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}  # fmt: skip
ROWS = (1, 8, 32, 128, 256, 1024)


def _copies(make: Callable[[], Any], nbytes: int) -> list[Any]:
    return [make() for _ in range(max(2, math.ceil(ROTATION_BYTES / max(1, nbytes))))]


def bench_linear(configs: Sequence[str], replays: int) -> list[dict[str, Any]]:
    rows = []
    dev = torch.device("cuda")
    for name, (n, k) in SHAPES.items():
        weights = _copies(lambda: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, n * k * 2)
        col_major = [w.t().contiguous().t() for w in weights]
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row: dict[str, Any] = {"what": f"linear {name}", "m": m, "n": n, "k": k}
            row["cublas_row_us"] = time_graph([lambda w=w: F.linear(x, w) for w in weights], replays)
            row["cublas_col_us"] = time_graph([lambda w=w: F.linear(x, w) for w in col_major], replays)
            for config in configs:
                row[f"det_{config}_us"] = time_graph([lambda w=w: det.det_linear(x, w, config=config)
                                                      for w in weights], replays)  # fmt: skip
            row["det_auto"] = det.gemm_config(m)
            rows.append(row)
            print(row, flush=True)
    return rows


def bench_attention(replays: int) -> list[dict[str, Any]]:
    dev = torch.device("cuda")
    heads, kv_heads, head_dim, block = 32, 32, 128, 64
    rows = []
    for batch, context in ((1, 1024), (32, 1024), (128, 1024)):
        blocks_per_seq = context // block
        num_blocks = batch * blocks_per_seq
        k_cache = torch.randn(num_blocks, kv_heads, block, head_dim, device=dev, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        tables = torch.arange(num_blocks, device=dev, dtype=torch.int32).view(batch, blocks_per_seq)
        ctx = torch.full((batch,), context, device=dev, dtype=torch.int32)
        q = torch.randn(batch, heads, head_dim, device=dev, dtype=torch.bfloat16)
        row = {"what": "decode attention", "batch": batch, "context": context,
               "kernel_us": time_graph([lambda: kernels.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.08)],
                                       replays),
               "det_us": time_graph([lambda: det.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.08)],
                                    replays)}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    length = 1024
    k_cache = torch.randn(length // block, kv_heads, block, head_dim, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(length // block, device=dev, dtype=torch.int32).view(1, -1)
    q = torch.randn(length, heads, head_dim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(length, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, length], device=dev, dtype=torch.int32)
    ctx = torch.tensor([length], device=dev, dtype=torch.int32)
    row = {"what": "prefill attention", "batch": 1, "context": length,
           "kernel_us": time_graph([lambda: kernels.paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, 0.08)],
                                   replays),
           "sdpa_us": time_graph([lambda: kernels.fresh_prefill_attention(q, k, k, (length,), 0.08)], replays),
           "det_us": time_graph([lambda: det.paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, 0.08)],
                                replays)}  # fmt: skip
    rows.append(row)
    print(row, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.deterministic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gemm-configs", nargs="*", default=[], metavar="MT,NT,WM,WN,BK,STAGES",
                        help="extra det_linear tile shapes to time beside the built-in ones")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out-dir", default="bench/results")
    args = parser.parse_args(argv)
    for spec in args.gemm_configs:
        det.GEMM_CONFIGS[spec] = tuple(int(v) for v in spec.split(","))  # type: ignore[assignment]
    configs = list(det.GEMM_CONFIGS)
    payload = {"device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip() or None,
               "configs": {c: det.GEMM_CONFIGS[c] for c in configs},
               "linear": bench_linear(configs, args.replays), "attention": bench_attention(args.replays)}  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = payload["device"].replace(" ", "-").lower()
    path = out / f"{name}-deterministic-{payload['date']}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{'what':<18}{'m/batch':>8}  " + "  ".join(f"{c:>12}" for c in ["cublas_row", "cublas_col", *configs]))
    for row in payload["linear"]:
        cells = [row["cublas_row_us"], row["cublas_col_us"], *[row[f"det_{c}_us"] for c in configs]]
        print(f"{row['what']:<18}{row['m']:>8}  " + "  ".join(f"{c:>12.1f}" for c in cells))
    for row in payload["attention"]:
        print(row)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
