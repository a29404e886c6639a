"""Kernel benchmark: each CUDA kernel of trillm/gpu/kernels/ timed on Llama-2-7B / Llama-3-8B shapes.

Method (docs/perf.md, PERF.md "How to measure"): CUDA events after warm-up, the median of many runs; every call of a
rotation reads its own inputs, and one rotation moves more than 3x the 50 MB L2, so no call is served from L2.
Memory-bound kernels report bytes moved (each input read once, each output written once) / time against 3.0 TB/s;
prefill attention reports TFLOP/s. Two timings per kernel: `graph` replays a CUDA graph of one rotation (GPU time,
as the runner's decode graphs see it) and `eager` records events around each Python call (includes launch cost).
Decode attention is compared with torch SDPA on the same shapes (contiguous K/V, GQA through enable_gqa), timed the
same way. Prints a table last; writes JSON to <out-dir>/<gpu>-kernels-<date>.json.

    python -m bench.kernels                      # on a CUDA machine
    python -m bench.kernels --device cpu         # smoke run of the reference ops on tiny shapes
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trillm.gpu import reference

log = logging.getLogger(__name__)

PEAK_BYTES_PER_S = 3.0e12  # measured H100 device-to-device copy, read + write
L2_BYTES = 50 * 2**20
ROTATION_BYTES = 3 * L2_BYTES


def median_ms(times: list[float]) -> float:
    return statistics.median(times)


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def time_graph(calls: Sequence[Callable[[], Any]], replays: int) -> float:
    """Median microseconds per call over `replays` replays of a graph holding every call once."""
    for call in calls:
        call()
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    events = [(_event(), _event()) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return median_ms([s.elapsed_time(e) for s, e in events]) * 1000 / len(calls)


def time_eager(calls: Sequence[Callable[[], Any]], rounds: int) -> float:
    """Median microseconds of one call, events around each call (launch cost included)."""
    for call in calls:
        call()
    events = []
    for _ in range(rounds):
        for call in calls:
            start, end = _event(), _event()
            start.record()
            call()
            end.record()
            events.append((start, end))
    torch.cuda.synchronize()
    return median_ms([s.elapsed_time(e) for s, e in events]) * 1000


def time_cpu(calls: Sequence[Callable[[], Any]], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        for call in calls:
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000)
    return median_ms(times) * 1000


def rotation(bytes_per_set: int, cap: int = 16) -> int:
    return max(2, min(cap, math.ceil(ROTATION_BYTES / max(bytes_per_set, 1))))


class Bench:
    """Holds the options and collects one row per measurement."""

    def __init__(self, device: torch.device, dtype: torch.dtype, replays: int, ops: Any) -> None:
        self.device, self.dtype, self.replays, self.ops = device, dtype, replays, ops
        self.rows: list[dict[str, Any]] = []
        self.gen = torch.Generator(device=device).manual_seed(0)

    def randn(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=dtype or self.dtype)

    def measure(self, calls: Sequence[Callable[[], Any]]) -> dict[str, float]:
        if self.device.type == "cpu":
            return {"eager_us": time_cpu(calls, 3)}
        return {"graph_us": time_graph(calls, self.replays), "eager_us": time_eager(calls, max(5, self.replays // 4))}

    def add(self, kernel: str, shape: str, times: dict[str, float], *, bytes_moved: int = 0, flops: int = 0,
            **extra: Any) -> None:
        best = times.get("graph_us", times["eager_us"])
        row: dict[str, Any] = {"kernel": kernel, "shape": shape, **times, "bytes": bytes_moved, **extra}
        if bytes_moved:
            row["gb_per_s"] = bytes_moved / best / 1e3
            row["pct_of_3tbs"] = 100 * bytes_moved / (best * 1e-6) / PEAK_BYTES_PER_S
        if flops:
            row["tflop_per_s"] = flops / best / 1e6
        self.rows.append(row)
        log.info("%s", row)
        print(json.dumps(row), flush=True)


def bench_elementwise(b: Bench, num_tokens: int, hidden: int, ffn: int) -> None:
    esize = torch.finfo(b.dtype).bits // 8
    row_bytes = num_tokens * hidden * esize
    n = rotation(2 * row_bytes)
    xs = [b.randn(num_tokens, hidden) for _ in range(n)]
    res = [b.randn(num_tokens, hidden) for _ in range(n)]
    weight = b.randn(hidden)
    times = b.measure([functools.partial(b.ops.rms_norm, x, weight, 1e-5, r) for x, r in zip(xs, res)])
    b.add("rms_norm+residual", f"{num_tokens}x{hidden}", times, bytes_moved=4 * row_bytes + hidden * esize)

    act_bytes = num_tokens * 2 * ffn * esize
    n = rotation(act_bytes)
    acts = [b.randn(num_tokens, 2 * ffn) for _ in range(n)]
    times = b.measure([functools.partial(b.ops.silu_and_mul, a) for a in acts])
    b.add("silu_and_mul", f"{num_tokens}x{ffn}", times, bytes_moved=act_bytes * 3 // 2)


def bench_rotary(b: Bench, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    esize = torch.finfo(b.dtype).bits // 8
    width = (num_heads + 2 * num_kv_heads) * head_dim
    block_size = 16
    num_blocks = math.ceil(num_tokens / block_size) + 1
    n = rotation(num_tokens * width * esize * 2)
    qkvs = [b.randn(num_tokens, width) for _ in range(n)]
    k_cache = b.randn(n * num_blocks, num_kv_heads, block_size, head_dim)
    v_cache = torch.empty_like(k_cache)
    angles = torch.arange(8192, device=b.device)[:, None] * 10000.0 ** (
        -torch.arange(0, head_dim, 2, device=b.device) / head_dim
    )  # [positions, head_dim / 2]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).float()  # [positions, head_dim]
    positions = torch.arange(num_tokens, device=b.device)
    slots = [torch.arange(num_tokens, device=b.device) + i * num_blocks * block_size for i in range(n)]

    def call(qkv: torch.Tensor, slot: torch.Tensor) -> Any:
        q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)  # [tokens, heads, head_dim]
        k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, -1)
        v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
        return b.ops.rotary_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, slot)

    times = b.measure([functools.partial(call, q, s) for q, s in zip(qkvs, slots)])
    # read q, k, v; write q, k back and k, v to the cache
    moved = num_tokens * head_dim * esize * ((num_heads + 2 * num_kv_heads) + (num_heads + num_kv_heads) + 2 * num_kv_heads)
    b.add("rotary_cache_write", f"{num_tokens}tok {num_heads}/{num_kv_heads}h d{head_dim}", times, bytes_moved=moved)


def decode_call(ops: Any, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor, scale: float,
                splits: int | None, impl: str | None, stages: int | None, q: torch.Tensor,
                table: torch.Tensor) -> torch.Tensor:
    return ops.paged_decode_attention_splits(  # type: ignore[no-any-return]
        q, k_cache, v_cache, table, lens, scale, num_splits=splits, impl=impl, stages=stages
    )


def bench_decode(b: Bench, batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, variants: tuple[tuple[str | None, int | None, int | None], ...] = ((None, None, None),),
                 with_sdpa: bool = True) -> None:
    """variants: (impl, num_splits, mma ring stages) to time, None meaning the default choice."""
    esize = torch.finfo(b.dtype).bits // 8
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * esize
    n = rotation(kv_bytes)
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = n * batch * blocks_per_seq
    k_cache = b.randn(num_blocks, num_kv_heads, block_size, head_dim)
    v_cache = b.randn(num_blocks, num_kv_heads, block_size, head_dim)
    perm = torch.randperm(num_blocks, device=b.device, generator=b.gen).to(torch.int32)
    tables = [perm[i * batch * blocks_per_seq : (i + 1) * batch * blocks_per_seq].view(batch, blocks_per_seq)
              for i in range(n)]  # fmt: skip
    lens = torch.full((batch,), context, dtype=torch.int32, device=b.device)
    qs = [b.randn(batch, num_heads, head_dim) for _ in range(n)]
    scale = head_dim**-0.5
    moved = kv_bytes + 2 * batch * num_heads * head_dim * esize
    shape = f"b{batch} ctx{context} {num_heads}/{num_kv_heads}h d{head_dim} bs{block_size}"
    if b.device.type == "cpu":
        calls = [functools.partial(b.ops.paged_decode_attention, q, k_cache, v_cache, t, lens, scale)
                 for q, t in zip(qs, tables)]  # fmt: skip
        b.add("paged_decode_attention", shape, b.measure(calls), bytes_moved=moved)
        return

    sdpa: dict[str, Any] = {}
    if with_sdpa:
        # the same sequences, contiguous: [batch, kv_heads, context, head_dim]
        def contiguous(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            blocks = cache[table.long()]  # [batch, blocks, kv_heads, block_size, head_dim]
            return blocks.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, -1, head_dim)[:, :, :context]

        ks = [contiguous(k_cache, t).contiguous() for t in tables]
        vs = [contiguous(v_cache, t).contiguous() for t in tables]
        gqa = num_heads != num_kv_heads

        def run_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=gqa)

        sdpa_out = run_sdpa(qs[0], ks[0], vs[0]).squeeze(2).float()
        try:
            sdpa_times = b.measure([functools.partial(run_sdpa, q, k, v) for q, k, v in zip(qs, ks, vs)])
            sdpa = {"sdpa_graph_us": sdpa_times["graph_us"], "sdpa_eager_us": sdpa_times["eager_us"]}
        except RuntimeError as exc:  # e.g. a backend that cannot be graph-captured
            sdpa = {"sdpa_error": repr(exc)}
        del ks, vs
    num_sms = torch.cuda.get_device_properties(b.device).multi_processor_count
    for impl, splits, stages in variants:
        plan = b.ops.plan_decode(b.dtype, num_seqs=batch, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, max_context=blocks_per_seq * block_size, num_sms=num_sms,
                                 impl=impl, num_splits=splits, stages=stages)  # fmt: skip

        call = functools.partial(decode_call, b.ops, k_cache, v_cache, lens, scale, splits, impl, stages)
        times = b.measure([functools.partial(call, q, t) for q, t in zip(qs, tables)])
        variant = f"{impl or 'default'}/s{plan.num_splits}" + ("" if stages is None else f"/st{stages}")
        extra: dict[str, Any] = {"variant": variant,
                                 "impl_kernel": plan.kernel, "splits": plan.num_splits, "ctas": plan.num_ctas, **sdpa}
        if "sdpa_graph_us" in sdpa:
            extra["speedup_vs_sdpa"] = sdpa["sdpa_graph_us"] / times["graph_us"]
            extra["max_abs_diff_vs_sdpa"] = float((call(qs[0], tables[0]).float() - sdpa_out).abs().max())
        b.add("paged_decode_attention", shape, times, bytes_moved=moved, **extra)
    del k_cache, v_cache


def bench_prefill(b: Bench, chunks: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
                  block_size: int = 16, with_sdpa: bool = True) -> None:
    """chunks: (q_len, context_len) per sequence."""
    blocks = [math.ceil(c / block_size) for _, c in chunks]
    num_blocks = sum(blocks)
    k_cache = b.randn(num_blocks, num_kv_heads, block_size, head_dim)
    v_cache = b.randn(num_blocks, num_kv_heads, block_size, head_dim)
    table = torch.zeros(len(chunks), max(blocks), dtype=torch.int32, device=b.device)
    start = 0
    for s, nb in enumerate(blocks):
        table[s, :nb] = torch.arange(start, start + nb, device=b.device, dtype=torch.int32)
        start += nb
    q_lens = [q for q, _ in chunks]
    cu = torch.tensor([0] + [sum(q_lens[: i + 1]) for i in range(len(q_lens))], dtype=torch.int32, device=b.device)
    lens = torch.tensor([c for _, c in chunks], dtype=torch.int32, device=b.device)
    q = b.randn(sum(q_lens), num_heads, head_dim)
    scale = head_dim**-0.5
    times = b.measure([lambda: b.ops.paged_prefill_attention(q, k_cache, v_cache, table, cu, lens, scale)])
    # visible keys per row: context - q_len + i + 1; 4 flops per (row, key, dim): QK^T and PV multiply-adds
    visible = sum(ql * (c - ql) + ql * (ql + 1) // 2 for ql, c in chunks)
    flops = 4 * visible * head_dim * num_heads
    extra: dict[str, Any] = {}
    if with_sdpa and b.device.type == "cuda" and len(chunks) == 1 and chunks[0][0] == chunks[0][1]:
        n = chunks[0][0]
        qc = q.view(1, n, num_heads, head_dim).transpose(1, 2)  # [1, heads, n, head_dim]
        kc = k_cache[table[0].long()].permute(1, 0, 2, 3).reshape(1, num_kv_heads, -1, head_dim)[:, :, :n].contiguous()
        vc = v_cache[table[0].long()].permute(1, 0, 2, 3).reshape(1, num_kv_heads, -1, head_dim)[:, :, :n].contiguous()
        sdpa_times = b.measure([lambda: F.scaled_dot_product_attention(
            qc, kc, vc, is_causal=True, scale=scale, enable_gqa=num_heads != num_kv_heads)])
        extra["sdpa_graph_us"] = sdpa_times["graph_us"]
        extra["speedup_vs_sdpa"] = sdpa_times["graph_us"] / times["graph_us"]
        qf, kf, vf = q, kc[0].transpose(0, 1).contiguous(), vc[0].transpose(0, 1).contiguous()  # [n, heads, dim]
        if b.ops.fresh_prefill_attention(qf, kf, vf, [n], scale) is not None:
            fresh_times = b.measure([lambda: b.ops.fresh_prefill_attention(qf, kf, vf, [n], scale)])
            extra["fresh_graph_us"] = fresh_times["graph_us"]
            extra["fresh_speedup_vs_sdpa"] = sdpa_times["graph_us"] / fresh_times["graph_us"]
    desc = "+".join(f"{ql}/{c}" for ql, c in chunks)
    b.add("paged_prefill_attention", f"q/ctx {desc} {num_heads}/{num_kv_heads}h d{head_dim}", times, flops=flops,
          **extra)


def gpu_tag(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    match = re.search(r"(H100|H200|H20|A100|A10G|L40S|L4|B200|GH200)", name)
    return (match.group(1) if match else re.sub(r"\W+", "-", name)).lower()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'kernel':<24} {'shape':<36} {'variant':<12} {'graph us':>9} {'eager us':>9} {'GB/s':>6} "
          f"{'%3TB/s':>6} {'TFLOP/s':>7} {'vs SDPA':>7}")  # fmt: skip
    for r in rows:
        def fmt(key: str, spec: str) -> str:
            return format(r[key], spec) if key in r else "-"
        print(f"{r['kernel'][:24]:<24} {r['shape'][:36]:<36} {r.get('variant', '-'):<12} {fmt('graph_us', '9.1f'):>9} "
              f"{fmt('eager_us', '9.1f'):>9} {fmt('gb_per_s', '6.0f'):>6} {fmt('pct_of_3tbs', '6.1f'):>6} "
              f"{fmt('tflop_per_s', '7.1f'):>7} {fmt('speedup_vs_sdpa', '7.2f'):>7}")  # fmt: skip


# (name, out rows, in features, norm in front, SwiGLU behind): Llama-2-7B's projections, the lm_head, and tp=2 halves
LINEAR_SHAPES = (
    ("qkv", 12288, 4096, True, False),
    ("o", 4096, 4096, False, False),
    ("gate_up", 22016, 4096, True, True),
    ("down", 4096, 11008, False, False),
    ("lm_head", 32000, 4096, False, False),
    ("qkv/tp2", 6144, 4096, True, False),
    ("o/tp2", 4096, 2048, False, False),
    ("gate_up/tp2", 11008, 4096, True, True),
    ("down/tp2", 4096, 5504, False, False),
)


def bench_linear(b: Bench, rows: int, shapes: Sequence[tuple[str, int, int, bool, bool]] = LINEAR_SHAPES) -> None:
    """fused_linear's matrix-vector kernel (norm and SwiGLU fused) against cuBLAS beside the rms_norm/silu kernels."""
    from trillm.gpu.kernels import linear as linear_ops

    esize = torch.finfo(b.dtype).bits // 8
    for name, out_rows, k, norm, swiglu in shapes:
        weight_bytes = out_rows * k * esize
        n = rotation(weight_bytes, cap=4)
        weights = [b.randn(out_rows, k) * k**-0.5 for _ in range(n)]
        x, residual, norm_weight = b.randn(rows, k), b.randn(rows, k), b.randn(k)
        extra = dict(norm_weight=norm_weight, eps=1e-5, residual=residual) if norm else {}
        fused = [functools.partial(b.ops.fused_linear, x, w, None, silu_mul=swiglu, **extra) for w in weights]
        composed = [functools.partial(linear_ops.composed_linear, x, w, None, extra.get("norm_weight"), 1e-5,
                                      extra.get("residual"), swiglu) for w in weights]  # fmt: skip
        label = f"{rows}x{k}->{out_rows // 2 if swiglu else out_rows}" + (" +norm" if norm else "") + (
            " +swiglu" if swiglu else "")
        b.add(f"linear {name} gemv", label, b.measure(fused), bytes_moved=weight_bytes)
        b.add(f"linear {name} cublas", label, b.measure(composed), bytes_moved=weight_bytes)
        del weights
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--replays", type=int, default=40, help="graph replays (eager rounds: a quarter)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--git-commit", default=None, help="recorded in the JSON (default: git rev-parse HEAD)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--only", default="", help="comma-separated groups to run, e.g. linear,prefill (default all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        from trillm.gpu import kernels as ops

        ops.compile_for_model(dtype, head_dim=128, num_heads=32, num_kv_heads=32)
        ops.compile_for_model(dtype, head_dim=128, num_heads=32, num_kv_heads=8)
        b = Bench(device, dtype, args.replays, ops)
        runs: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            (bench_linear, (b, 1)),
            (bench_linear, (b, 2, LINEAR_SHAPES[:5])),
            (bench_elementwise, (b, 4096, 4096, 11008)),
            (bench_elementwise, (b, 32, 4096, 11008)),
            (bench_rotary, (b, 4096, 32, 32, 128)),
            (bench_rotary, (b, 32, 32, 32, 128)),
        ]
        ops.compile_for_model(dtype, head_dim=64, num_heads=9, num_kv_heads=3)
        both = (("simt", None, None), ("mma", None, None))
        sweep = tuple(("mma", splits, None) for splits in (1, 2, 4, 8, 16))
        runs += [  # (batch, context, heads, kv heads, head_dim, block size, variants)
            (bench_decode, (b, 32, 1024, 32, 32, 128, 16, (*both, ("mma", 2, None), ("mma", None, 6)))),
            (bench_decode, (b, 1, 1024, 32, 32, 128, 16, (*both, *sweep))),
            (bench_decode, (b, 8, 4096, 32, 32, 128, 16, both)),
            (bench_decode, (b, 1, 16384, 32, 32, 128, 16, (*both, ("mma", 8, None)))),
            (bench_decode, (b, 32, 1024, 32, 8, 128, 16, (*both, ("mma", None, 6), ("mma", 2, None)))),
            (bench_decode, (b, 1, 1024, 32, 8, 128, 16, (*both, *sweep))),
            (bench_decode, (b, 64, 2048, 32, 8, 128, 16, both)),
            (bench_decode, (b, 32, 1024, 9, 3, 64, 16, both)),  # SmolLM2 shape
        ]
        if not args.quick:
            for block_size in (32, 64):
                runs.append((bench_decode, (b, 32, 1024, 32, 32, 128, block_size)))
        runs += [
            (bench_prefill, (b, [(1024, 1024)], 32, 32, 128)),
            (bench_prefill, (b, [(1024, 1024)], 32, 8, 128)),
            (bench_prefill, (b, [(512, 1536)] * 4, 32, 8, 128)),
        ]
    else:
        b = Bench(device, dtype, 3, reference)
        runs = [
            (bench_elementwise, (b, 16, 256, 512)),
            (bench_rotary, (b, 16, 4, 2, 64)),
            (bench_decode, (b, 2, 64, 4, 2, 64, 16)),
            (bench_prefill, (b, [(32, 48)], 4, 2, 64, 16, False)),
        ]
    if args.only:
        wanted = {f"bench_{group.strip()}" for group in args.only.split(",")}
        runs = [(fn, fn_args) for fn, fn_args in runs if fn.__name__ in wanted]
    errors = []
    for fn, fn_args in runs:
        try:
            fn(*fn_args)
        except Exception as exc:  # one failing shape must not cost the rest of a scarce GPU run
            log.exception("%s%s failed", fn.__name__, fn_args[1:])
            errors.append(f"{fn.__name__}{fn_args[1:]}: {exc!r}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        "command": " ".join(["python", "-m", "bench.kernels", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": args.git_commit or git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "peak_bytes_per_s": PEAK_BYTES_PER_S,
        "results": b.rows,
        "errors": errors,
    }
    if device.type == "cuda":
        import cupy

        result["cupy"] = cupy.__version__
        result["num_sms"] = torch.cuda.get_device_properties(device).multi_processor_count
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{gpu_tag(device)}-kernels-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_table(b.rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
