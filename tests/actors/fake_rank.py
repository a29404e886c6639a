"""A stand-in rank process for GPUWorkerActor tests: speaks gpu/rank.py's protocol over a FakeRunner.

`main(config, sock)` has rank_main's signature. The part of `config.model_path` after its first ":" picks the behaviour:
- "fake:ok": RankReady, then StepPlan → StepResult until Shutdown (exit 0);
- "fake:fail-start": RankFailed instead of RankReady (exit 1);
- "fake:die-at-step-N": exits with code 3 on receiving step N, without a reply (a crash);
- "fake:fail-at-step-N": answers step N with RankFailed (exit 1);
- "fake:ignore-shutdown": never exits on Shutdown (the worker must kill it);
- "fake:hang-at-step-N": never answers step N (a hung rank: the watchdog must notice);
- "fake:oom-at-step-N": the real rank loop (`rank_main`) over a FakeRunner whose step N raises
  `torch.cuda.OutOfMemoryError`, as a GPU out of memory mid-step does.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import types

from fakes import FakeRunner
from trillm.protocol.step import RankFailed, RankReady, Shutdown, StepPlan, StepResult
from trillm.config import RunnerConfig
from trillm.gpu.rank import rank_main, recv_message, send_message
from trillm.protocol.wire import FrameDecoder

NUM_BLOCKS = 64


class _OutOfMemoryRunner(FakeRunner):
    """ModelRunner's interface over a FakeRunner; step `oom_step` raises torch.cuda.OutOfMemoryError."""

    def __init__(self, config: RunnerConfig) -> None:
        super().__init__(num_blocks=NUM_BLOCKS, block_size=config.block_size)
        self.oom_step = int(config.model_path.rsplit("-", 1)[1])
        self.device_name = f"fake-rank-{os.getpid()}"
        self.max_model_len = min(config.max_model_len, NUM_BLOCKS * config.block_size)

    def step(self, plan: StepPlan) -> StepResult:
        if plan.step_id == self.oom_step:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return super().step(plan)


def _run_out_of_memory(config: RunnerConfig, sock: socket.socket) -> None:
    """The real rank process loop, with the runner module replaced by one whose ModelRunner runs out of memory."""
    runner_module = types.ModuleType("trillm.gpu.runner")
    runner_module.CHAINING = False  # type: ignore[attr-defined]
    runner_module.ModelRunner = _OutOfMemoryRunner  # type: ignore[attr-defined]
    sys.modules["trillm.gpu.runner"] = runner_module
    rank_main(config, sock)


def main(config: RunnerConfig, sock: socket.socket) -> None:
    behaviour = config.model_path.split(":", 1)[1]
    if behaviour.startswith("oom-at-step-"):
        _run_out_of_memory(config, sock)
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
