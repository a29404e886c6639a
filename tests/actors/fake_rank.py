"""A stand-in rank process for GPUWorkerActor tests: speaks gpu/rank.py's protocol over a FakeRunner.

`main(config, sock)` has rank_main's signature. The part of `config.model_path` after its first ":" picks the behaviour:
- "fake:ok": RankReady, then StepPlan → StepResult until Shutdown (exit 0);
- "fake:fail-start": RankFailed instead of RankReady (exit 1);
- "fake:die-at-step-N": exits with code 3 on receiving step N, without a reply (a crash);
- "fake:fail-at-step-N": answers step N with RankFailed (exit 1);
- "fake:ignore-shutdown": never exits on Shutdown (the worker must kill it);
- "fake:hang-at-step-N": never answers step N (a hung rank: the watchdog must notice).
"""

from __future__ import annotations

import os
import socket
import time

from fakes import FakeRunner
from trillm.protocol.step import RankFailed, RankReady, Shutdown, StepPlan
from trillm.config import RunnerConfig
from trillm.gpu.rank import recv_message, send_message
from trillm.protocol.wire import FrameDecoder

NUM_BLOCKS = 64


def main(config: RunnerConfig, sock: socket.socket) -> None:
    behaviour = config.model_path.split(":", 1)[1]
    if behaviour == "fail-start":
        send_message(sock, RankFailed(rank=config.rank, message="fake rank cannot start", traceback="(fake)"))
        os._exit(1)
    runner = FakeRunner(num_blocks=NUM_BLOCKS, block_size=config.block_size)
    send_message(
        sock,
        RankReady(
            rank=config.rank,
            layout=runner.layout,
            device_name=f"fake-rank-{os.getpid()}",
            max_model_len=min(config.max_model_len, NUM_BLOCKS * config.block_size),
            vocab_size=runner.vocab_size,
        ),
    )
    decoder = FrameDecoder()
    while True:
        try:
            message = recv_message(sock, decoder)
        except EOFError:
            os._exit(1)
        match message:
            case StepPlan():
                if behaviour == f"die-at-step-{message.step_id}":
                    os._exit(3)
                if behaviour == f"hang-at-step-{message.step_id}":
                    time.sleep(3600)
                if behaviour == f"fail-at-step-{message.step_id}":
                    send_message(sock, RankFailed(rank=config.rank, message="fake rank broke", traceback="(fake)"))
                    os._exit(1)
                send_message(sock, runner.step(message))
            case Shutdown() if behaviour == "ignore-shutdown":
                time.sleep(3600)
            case Shutdown():
                os._exit(0)
