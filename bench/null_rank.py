"""Null rank: a stand-in rank process with no model, whose steps take a fixed, configurable time.

It speaks the real rank protocol (`gpu/rank.py`, framed by `protocol/wire.py`) and answers each StepPlan after sleeping
`decode_ms + prefill_us_per_token * prefill tokens`, the way a GPU would keep the rank busy, with a deterministic
token per sampled sequence. The serving process (HTTP, actors, scheduler, detokenizer, SSE) runs for real, so
`bench/host_path.py` measures on any machine, without a GPU, how many tokens per second the host path can carry
and how much of the engine's own throughput survives HTTP.

Started by the GPUWorkerActor as `python -m trillm.gpu.rank --fd N --target bench.null_rank:main`; timing comes from
`TRILLM_NULL_RANK` (`decode_ms=25,prefill_us_per_token=20`), read once in this process (a bench tool, not the
product: trillm itself reads the environment only in config.py).
"""

from __future__ import annotations

import os
import socket
import time

from trillm.config import RunnerConfig
from trillm.gpu.rank import recv_message, send_message
from trillm.protocol.step import KVCacheLayout, RankReady, SampledToken, Shutdown, StepPlan, StepResult
from trillm.protocol.wire import FrameDecoder

NUM_BLOCKS = 1 << 16
MAX_MODEL_LEN = 8192
FIRST_TOKEN_ID = 1000  # ordinary text tokens of SmolLM2's and Llama's vocabularies
NUM_TOKEN_IDS = 20000
VOCAB_SIZE = 49152


def timing() -> tuple[float, float]:
    """(decode seconds per step, prefill seconds per prompt token) from TRILLM_NULL_RANK."""
    fields = dict(item.split("=", 1) for item in os.environ.get("TRILLM_NULL_RANK", "").split(",") if item)
    return float(fields.get("decode_ms", 25.0)) / 1e3, float(fields.get("prefill_us_per_token", 20.0)) / 1e6


def answer(plan: StepPlan) -> StepResult:
    """A token per sampled sequence: a function of (seq id, position), never EOS."""
    sampled = tuple(
        SampledToken(seq_id=seq.seq_id, token_id=FIRST_TOKEN_ID + (seq.seq_id * 7919 + seq.context_len) % NUM_TOKEN_IDS)
        for seq in plan.seqs
        if seq.sample is not None
    )
    return StepResult(step_id=plan.step_id, sampled=sampled)


def main(config: RunnerConfig, sock: socket.socket) -> None:
    """Rank entry point: RankReady, then StepPlan → (sleep) → StepResult until Shutdown."""
    decode_s, prefill_s_per_token = timing()
    layout = KVCacheLayout(num_blocks=NUM_BLOCKS, block_size=config.block_size, num_layers=1, num_kv_heads=1,
                           head_dim=1, dtype="none")
    max_model_len = min(config.max_model_len, MAX_MODEL_LEN)
    send_message(sock, RankReady(rank=config.rank, layout=layout, device_name="null-rank", max_model_len=max_model_len,
                                 vocab_size=VOCAB_SIZE))
    decoder = FrameDecoder()
    while True:
        try:
            message = recv_message(sock, decoder)
        except EOFError:
            os._exit(1)
        match message:
            case StepPlan():
                started = time.perf_counter()
                num_prefill = sum(seq.num_tokens for seq in message.seqs if seq.num_tokens > 1)
                result = answer(message) if config.rank == 0 else StepResult(step_id=message.step_id, sampled=())
                remaining = decode_s + prefill_s_per_token * num_prefill - (time.perf_counter() - started)
                if remaining > 0:
                    time.sleep(remaining)
                send_message(sock, result)
            case Shutdown():
                os._exit(0)
