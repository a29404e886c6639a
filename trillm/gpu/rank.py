"""Rank process: the spawned entry point that builds one ModelRunner and answers StepPlans until told to stop.

Runs outside the event loop, in its own process, one per tensor-parallel rank: `actors/gpu_worker.py` starts
`python -m trillm.gpu.rank --fd N` with its end of a socket pair inherited as file descriptor N, sends the pickled
`RunnerConfig` as the first frame, and owns the other end from then on. A plain subprocess (not multiprocessing)
works from daemonic processes too, such as hypercorn's CLI workers, and never re-imports the parent's `__main__`.

Wire format, both ways: `trillm.protocol.wire`, the framing the serving process's GPUWorkerActor uses too.

Protocol: the rank first sends `RankReady` (or `RankFailed` and exits 1), then loops: `StepPlan` → `StepResult`
(rank 0 with the samples, other ranks an empty acknowledgement), `Shutdown` → close and exit 0. Any exception →
`RankFailed` with the traceback, exit 1. A closed socket (the serving process is gone) → exit 1 without a reply.
SIGINT is ignored: a Ctrl-C reaches the whole process group, and the serving process, not the terminal, decides
when its ranks stop. torch and the runner are imported inside the rank only, so the serving process (which imports
this module to spawn it) never loads torch, and a failing import is reported as RankFailed.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import Any

from trillm.protocol.step import RankFailed, RankReady, Shutdown, StepPlan
from trillm.config import RunnerConfig
from trillm.protocol.wire import READ_CHUNK_BYTES, FrameDecoder, encode_frame

log = logging.getLogger(__name__)

def send_message(sock: socket.socket, message: Any) -> None:
    """Write one frame (blocking)."""
    sock.sendall(encode_frame(message))


def recv_message(sock: socket.socket, decoder: FrameDecoder) -> Any:
    """Read the next message (blocking); EOFError when the peer has closed the socket."""
    while (message := decoder.next_message()) is None:
        chunk = sock.recv(max(READ_CHUNK_BYTES, decoder.num_missing_bytes))
        if not chunk:
            raise EOFError("the serving process closed the socket")
        decoder.feed(chunk)
    return message


OUT_OF_MEMORY_HINT = (" (the device ran out of memory during a step; restart with a smaller --max-batch-size, "
                      "--max-prefill-token-num or --cache-max-entry-count)")
POLL_S = 50e-6  # while a step runs: how long one wait for the next plan lasts before the step is checked again


def _recv_unless_done(sock: socket.socket, decoder: FrameDecoder, pending: Any) -> Any:
    """The next message, or None as soon as `pending` (a LaunchedStep) has finished on the device without one.

    Step chaining: with step overlap the serving process sends plan N+1 while the rank still runs N, so the rank
    waits here for N+1 while N runs and launches it behind N (`ModelRunner.launch`), keeping the GPU busy through
    the host's turn-around between steps. A step that finishes first is answered at once, so no plan waits on it.
    """
    while (message := decoder.next_message()) is None:
        if pending.is_done():
            return None
        readable, _, _ = select.select([sock], [], [], POLL_S)
        if readable:
            chunk = sock.recv(max(READ_CHUNK_BYTES, decoder.num_missing_bytes))
            if not chunk:
                raise EOFError("the serving process closed the socket")
            decoder.feed(chunk)
    return message


def _configure_threads(config: RunnerConfig) -> None:
    """On CPU, `cpu_threads` torch threads, or the cores this process may use split evenly between the ranks."""
    if config.device != "cpu":
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(config.cpu_threads or max(1, cores // config.world_size))


def rank_main(config: RunnerConfig, sock: socket.socket) -> None:
    """Process entry point of one rank (runs outside the event loop); exits 0 after Shutdown, 1 after a failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{config.rank} %(name)s %(levelname)s %(message)s")
    exit_code = _serve(config, sock)
    sock.close()
    sys.exit(exit_code)


def _serve(config: RunnerConfig, sock: socket.socket) -> int:
    runner = None
    decoder = FrameDecoder()
    try:
        from trillm.gpu.runner import CHAINING, ModelRunner

        _configure_threads(config)
        runner = ModelRunner(config)
        ready = RankReady(
            rank=config.rank,
            layout=runner.layout,
            device_name=runner.device_name,
            max_model_len=runner.max_model_len,
            vocab_size=runner.vocab_size,
        )
        send_message(sock, ready)
        pending = None  # a launched step whose result is not sent yet
        while True:
            msg = recv_message(sock, decoder) if pending is None else _recv_unless_done(sock, decoder, pending)
            if not CHAINING and isinstance(msg, StepPlan):  # the default: one step at a time
                send_message(sock, runner.step(msg))
                continue
            match msg:
                case None:  # the pending step finished before the next plan came
                    assert pending is not None
                    send_message(sock, runner.finish(pending))
                    pending = None
                case StepPlan():
                    if pending is not None and runner.can_chain(msg, pending):
                        launched = runner.launch(msg, pending)  # queued behind the pending step on the device
                        send_message(sock, runner.finish(pending))
                    else:
                        if pending is not None:
                            send_message(sock, runner.finish(pending))
                        launched = runner.launch(msg)
                    pending = launched
                case Shutdown():
                    if pending is not None:
                        send_message(sock, runner.finish(pending))
                    log.info("rank %d shutting down", config.rank)
                    return 0
                case _:
                    raise TypeError(f"rank {config.rank} got an unexpected message {type(msg).__name__}")
    except (EOFError, ConnectionError) as exc:
        log.error("rank %d lost its connection to the serving process: %s", config.rank, exc)
        return 1
    except Exception as exc:
        log.exception("rank %d failed", config.rank)
        message = f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda's: say which settings make a step smaller
            message += OUT_OF_MEMORY_HINT
        failure = RankFailed(rank=config.rank, message=message, traceback=traceback.format_exc())
        try:
            send_message(sock, failure)
        except OSError:
            log.error("rank %d could not report its failure: the socket is closed", config.rank)
        return 1
    finally:
        if runner is not None:
            runner.close()


def _load_target(spec: str) -> Callable[[RunnerConfig, socket.socket], None]:
    """`module:function` → the function (tests start stand-in ranks that speak the same protocol)."""
    module_name, _, qualname = spec.partition(":")
    target: Any = import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m trillm.gpu.rank --fd N [--target module:function]`: read the RunnerConfig, then run the rank."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trillm.gpu.rank", description="one trillm rank process")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the serving process")
    parser.add_argument("--target", default=None, help="module:function to run instead of rank_main")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    # The worker sends nothing after the config until this rank reports ready, so no bytes of a later frame can be
    # left in this first decoder.
    config = recv_message(sock, FrameDecoder())
    if not isinstance(config, RunnerConfig):
        raise TypeError(f"expected a RunnerConfig as the first frame, got {type(config).__name__}")
    target = rank_main if args.target is None else _load_target(args.target)
    target(config, sock)


if __name__ == "__main__":
    main()
