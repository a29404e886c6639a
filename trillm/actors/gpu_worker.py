"""GPUWorkerActor: the one owner of the pipe to one tensor-parallel rank process.

The serving process reaches GPU code only here, and only by module name: it imports nothing from `trillm.gpu`. Each
worker spawns its rank as `python -m trillm.gpu.rank --fd N` (with `--target module:function`, a test's stand-in that
speaks the same protocol) over a `socket.socketpair()` — a plain subprocess, so daemonic hosts such as hypercorn's
CLI workers can start it too — sends it its RunnerConfig, waits for
its `RankReady`, then serves the Batcher's StepPlans in order: one task forwards each plan to the rank as soon as the
Batcher sends it (with step overlap the next plan is already in the rank's socket while it runs the current one),
another reads the replies in order and passes them on. One task writes and one reads the pipe, and replies are matched
to plans by order and step id, so a reply can never go to the wrong waiter (STACK.md).

Wire format, both ways: `trillm.protocol.wire`, the one framing both ends use.

Supervision. The worker raises `EngineDeadError` when the rank reports `RankFailed`, closes its socket, exits —
a watcher task waits on the process's pidfd, so a rank that dies while the engine is idle is noticed at once — or
leaves a step unanswered for `--step-timeout` seconds (the watchdog: a hung rank, e.g. a deadlocked collective). The
exception crashes the Engine's actor nursery, and the Engine marks itself dead. On the way out (normal or not) the
worker asks the rank to shut down, waits `SHUTDOWN_GRACE_S`, and kills it if it is still there.

Rank configuration. `device="auto"` picks CUDA when the NVIDIA driver reports a device. The serving process must not
import torch, so it asks the driver itself (`libcuda` through ctypes: `cuInit` + `cuDeviceGetCount`, which creates
no context and allocates nothing); rank processes then use torch as usual. The resolved device picks the defaults of
`dtype` (bfloat16 on CUDA, float32 on CPU) and `max_batch_size` (256 on CUDA, 48 on CPU). Without `--session-len`
the ranks get an unbounded `max_model_len` and cap it at the model's max positions (RankReady reports the result).

`InProcessWorkerActor` has the same channels and readiness for an in-process runner (any object with `.layout` and
`.step(plan)`): policy and actor tests use it with a fake runner, so they need no process and no model.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import trio

from trillm.protocol.step import RankFailed, RankReady, Shutdown, StepPlan, StepResult, StepRunner
from trillm.config import EngineConfig, RunnerConfig
from trillm.protocol.wire import READ_CHUNK_BYTES, FrameDecoder, encode_frame
from trillm.errors import EngineDeadError

# The CPU's default batch: the most decode rows the GGUF block kernels and the one-call decode step serve
# (gpu/cpu_quant.MAX_ROWS; the serving process does not import torch). SmolLM2 on the 2-core EPYC: 231 tok/s a step
# at 48 rows, 188 at 64, where the dense per-op path takes over (docs/perf.md, CPU).
CPU_MAX_BATCH_SIZE = 48

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0  # how long a rank may take to exit after Shutdown before it is killed
EXIT_CODE_WAIT_S = 2.0  # how long to wait for a rank whose socket closed to exit, to report its exit code
EXIT_POLL_S = 0.01
UNBOUNDED_MODEL_LEN = 1 << 30  # no --session-len: the rank caps the window at the model's max positions
RANK_MODULE = "trillm.gpu.rank"  # started as `python -m RANK_MODULE`; never imported here


def cuda_device_count() -> int:
    """CUDA devices the NVIDIA driver reports (0 without a driver), asked through libcuda: no torch here."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_device(device: str) -> str:
    """`auto` → "cuda" when the driver reports a device, else "cpu"; other values pass through."""
    if device != "auto":
        return device
    return "cuda" if cuda_device_count() > 0 else "cpu"


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for torch.distributed's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def runner_configs(config: EngineConfig, model_path: str, device: str) -> list[RunnerConfig]:
    """One RunnerConfig per tensor-parallel rank, with device, dtype and batch size resolved."""
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    max_batch_size = config.max_batch_size or (256 if device == "cuda" else CPU_MAX_BATCH_SIZE)
    init_method = f"tcp://127.0.0.1:{free_loopback_port()}" if config.tp > 1 else ""
    if config.deterministic and config.tp > 2:
        log.warning("--deterministic at --tp %d: the kernels are batch-invariant, but all-reduces too large for the "
                    "IPC kernels go through NCCL, which sums more than two ranks in an order that follows the "
                    "message size (docs/deterministic.md)", config.tp)
    return [
        RunnerConfig(
            model_path=model_path,
            rank=rank,
            world_size=config.tp,
            dist_init_method=init_method,
            device=device,
            dtype=dtype,
            block_size=config.cache_block_seq_len,
            max_model_len=config.session_len or UNBOUNDED_MODEL_LEN,
            max_batch_size=max_batch_size,
            max_prefill_token_num=config.max_prefill_token_num,
            cache_max_entry_count=config.cache_max_entry_count,
            cpu_memory_budget_bytes=config.cpu_memory_budget_bytes,
            enable_cuda_graph=config.enable_cuda_graph,
            cpu_threads=config.cpu_threads or 0,
            deterministic=config.deterministic,
        )
        for rank in range(config.tp)
    ]


async def send_frame(stream: trio.abc.SendStream, message: Any) -> None:
    """Write one frame (`protocol/wire.py`)."""
    await stream.send_all(encode_frame(message))


class FrameReader:
    """Reads frames from a Trio stream through a `FrameDecoder`; `receive` raises EOFError once the peer has closed."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._decoder = FrameDecoder()

    async def receive(self) -> Any:
        while (message := self._decoder.next_message()) is None:
            chunk = await self._stream.receive_some(max(READ_CHUNK_BYTES, self._decoder.num_missing_bytes))
            if not chunk:
                raise EOFError("the rank's socket closed")
            self._decoder.feed(chunk)
        return message


class GPUWorkerActor:
    """Spawns one rank process and serves it StepPlans in order; raises EngineDeadError when the rank fails."""

    def __init__(
        self,
        config: RunnerConfig,
        plans: trio.MemoryReceiveChannel[StepPlan],
        results: trio.MemorySendChannel[StepResult],
        *,
        target: str | None = None,  # "module:function" run instead of the rank's own entry point (tests)
        step_timeout_s: float = 0.0,  # the watchdog: a step unanswered this long fails the engine; 0: none
    ) -> None:
        self.rank = config.rank
        self._config = config
        self._step_timeout_s = step_timeout_s
        self._plans = plans
        self._results = results
        self._target = target
        self._process: subprocess.Popen[bytes] | None = None
        self._num_steps = 0
        self._num_outstanding = 0  # plans sent to the rank whose reply is not read yet

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def run(self, *, task_status: trio.TaskStatus[RankReady] = trio.TASK_STATUS_IGNORED) -> None:
        """Spawn the rank, report its RankReady through `task_status`, serve plans until the plan channel closes.

        Raises:
            EngineDeadError: the rank failed to start, reported a failure, or died.
        """
        # `with`, not `async with`: closing without a checkpoint lets this worker's exception reach the Engine's
        # supervisor before the Batcher, woken by the closed channels, reports a vaguer one.
        with self._plans, self._results:
            parent_socket, child_socket = socket.socketpair()
            process = self._spawn(child_socket)  # fork+exec of a fresh interpreter; returns in milliseconds
            child_socket.close()  # the child holds its own copy: EOF here now means the child is gone
            self._process = process
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_socket))
            try:
                reader = FrameReader(stream)
                await send_frame(stream, self._config)  # the rank's first read; fits the socket buffer
                ready = await self._handshake(reader, process)  # a rank that dies here closes the socket: EOF
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, process)
                    task_status.started(ready)
                    await self._serve(stream, reader, process)
                    nursery.cancel_scope.cancel()  # plans closed: stop watching, shut the rank down below
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop(stream, process)

    def _spawn(self, child_socket: socket.socket) -> subprocess.Popen[bytes]:
        """Start `python -m trillm.gpu.rank` with `child_socket` inherited; it sees this process's import path."""
        fd = child_socket.fileno()
        command = [sys.executable, "-m", RANK_MODULE, "--fd", str(fd)]
        if self._target is not None:
            command += ["--target", self._target]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
        return subprocess.Popen(command, pass_fds=(fd,), env=env)

    async def _handshake(self, reader: FrameReader, process: subprocess.Popen[bytes]) -> RankReady:
        try:
            message = await reader.receive()
        except EOFError:
            raise EngineDeadError(
                f"rank {self.rank} exited before it was ready ({await self._exit_status(process)})"
            ) from None
        match message:
            case RankReady():
                log.info("rank %d ready on %s: %s", self.rank, message.device_name, message.layout)
                return message
            case RankFailed():
                log.error("rank %d failed to start:\n%s", self.rank, message.traceback)
                raise EngineDeadError(f"rank {self.rank} failed to start: {message.message}")
            case _:
                raise EngineDeadError(f"rank {self.rank} sent {type(message).__name__} instead of RankReady")

    async def _serve(
        self, stream: trio.SocketStream, reader: FrameReader, process: subprocess.Popen[bytes]
    ) -> None:
        """Forward plans and read replies concurrently until the plans close and every reply is passed on."""
        sent_send, sent_receive = trio.open_memory_channel[int](math.inf)  # step ids sent, in order
        failures: list[EngineDeadError] = []

        async def guarded(function: Callable[[], Any], cancel_scope: trio.CancelScope) -> None:
            try:
                await function()
            except EngineDeadError as exc:  # reported once, not wrapped in the nursery's ExceptionGroup
                failures.append(exc)
                cancel_scope.cancel()

        async def forward() -> None:
            with sent_send:
                async for plan in self._plans:
                    self._num_outstanding += 1
                    sent_send.send_nowait(plan.step_id)
                    try:
                        await send_frame(stream, plan)
                    except trio.BrokenResourceError:
                        raise EngineDeadError(
                            f"rank {self.rank} died during step {plan.step_id} ({await self._exit_status(process)})"
                        ) from None

        async def answer() -> None:
            async for step_id in sent_receive:
                try:
                    with trio.move_on_after(self._step_timeout_s or math.inf) as watchdog:
                        reply = await reader.receive()
                except (EOFError, trio.BrokenResourceError):
                    raise EngineDeadError(
                        f"rank {self.rank} died during step {step_id} ({await self._exit_status(process)})"
                    ) from None
                if watchdog.cancelled_caught:
                    raise EngineDeadError(f"rank {self.rank} did not answer step {step_id} within "
                                          f"{self._step_timeout_s:g} s (--step-timeout): it hangs, and is stopped")
                match reply:
                    case StepResult(step_id=answered) if answered == step_id:
                        self._num_outstanding -= 1  # stays > 0 on any failure, which this task reports
                        self._num_steps += 1
                        await self._results.send(reply)
                    case RankFailed():
                        log.error("rank %d failed:\n%s", self.rank, reply.traceback)
                        raise EngineDeadError(f"rank {self.rank} failed during step {step_id}: {reply.message}")
                    case _:
                        raise EngineDeadError(f"rank {self.rank} answered step {step_id} with {reply!r:.200}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, forward, nursery.cancel_scope)
            nursery.start_soon(guarded, answer, nursery.cancel_scope)
        if failures:
            raise failures[0]

    async def _watch(self, process: subprocess.Popen[bytes]) -> None:
        """Raise as soon as the rank process ends between steps (during a step, `_serve` reports it: one error)."""
        await _wait_exited(process)
        if self._num_outstanding:
            return
        raise EngineDeadError(f"rank {self.rank} process died ({await self._exit_status(process)})")

    async def _exit_status(self, process: subprocess.Popen[bytes]) -> str:
        # Polled: a closed socket comes a moment before the exit, and the watcher may be waiting on the pidfd.
        with trio.move_on_after(EXIT_CODE_WAIT_S):
            while process.poll() is None:
                await trio.sleep(EXIT_POLL_S)
        return "still running" if process.returncode is None else f"exit code {process.returncode}"

    async def _stop(self, stream: trio.SocketStream, process: subprocess.Popen[bytes]) -> None:
        """Ask the rank to exit, give it SHUTDOWN_GRACE_S, then kill it; close the socket (runs shielded)."""
        if process.poll() is None:
            with trio.move_on_after(SHUTDOWN_GRACE_S) as waiting:
                try:
                    await send_frame(stream, Shutdown())
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    pass  # dead, or the pipe's owner was cancelled mid-send: the kill below takes care of it
                await _wait_exited(process)
            if waiting.cancelled_caught:
                log.warning("rank %d did not exit within %.0f s of Shutdown: killing it", self.rank, SHUTDOWN_GRACE_S)
                process.kill()
        await trio.to_thread.run_sync(process.wait)  # reaps it
        await stream.aclose()
        log.info("rank %d stopped (exit code %s) after %d steps", self.rank, process.returncode, self._num_steps)


async def _wait_exited(process: subprocess.Popen[bytes]) -> None:
    """Sleep until `process` has exited, without reaping it: its pidfd turns readable then (Linux ≥ 5.3)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return  # already reaped by a poll()
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


class InProcessWorkerActor:
    """A worker whose runner lives in this process: any object with `.layout` and `.step(plan)`.

    The runner is built from `runner_factory(config)`. Steps run in a worker thread (`trio.to_thread.run_sync`) so a
    real ModelRunner does not block the event loop; `use_thread=False` runs them inline, which keeps tests with a
    fake runner fully deterministic.
    """

    def __init__(
        self,
        runner_factory: Callable[[RunnerConfig], StepRunner],
        config: RunnerConfig,
        plans: trio.MemoryReceiveChannel[StepPlan],
        results: trio.MemorySendChannel[StepResult],
        *,
        use_thread: bool = True,
    ) -> None:
        self.rank = config.rank
        self._factory = runner_factory
        self._config = config
        self._plans = plans
        self._results = results
        self._use_thread = use_thread

    async def run(self, *, task_status: trio.TaskStatus[RankReady] = trio.TASK_STATUS_IGNORED) -> None:
        """Build the runner, report readiness, run plans until the plan channel closes; runner errors propagate."""
        with self._plans, self._results:  # closed without a checkpoint, as in GPUWorkerActor.run
            runner = await self._call(self._factory, self._config)
            try:
                task_status.started(self._ready(runner))
                async for plan in self._plans:
                    result = await self._call(runner.step, plan)
                    await self._results.send(result)
            finally:
                close = getattr(runner, "close", None)
                if close is not None:
                    close()

    def _ready(self, runner: StepRunner) -> RankReady:
        """RankReady from the runner's optional `device_name`, `max_model_len` and `vocab_size` attributes."""
        return RankReady(
            rank=self.rank,
            layout=runner.layout,
            device_name=getattr(runner, "device_name", "in-process"),
            max_model_len=getattr(runner, "max_model_len", None) or self._config.max_model_len,
            vocab_size=getattr(runner, "vocab_size", 0),
        )

    async def _call(self, function: Callable[[Any], Any], argument: Any) -> Any:
        if self._use_thread:
            return await trio.to_thread.run_sync(function, argument)
        return function(argument)
