"""GPUWorkerActor over real spawned processes (a stand-in rank, tests/actors/fake_rank.py), and its supervision."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import fake_rank
from fakes import FakeTokenizer
from trillm.actors import engine as engine_module
from trillm.actors import gpu_worker
from trillm.actors.engine import Engine
from trillm.actors.gpu_worker import FrameReader, GPUWorkerActor, send_frame
from trillm.protocol.api import GenerateRequest, SamplingParams
from trillm.protocol.step import RankReady, SeqStep, StepPlan, StepResult
from trillm.config import EngineConfig, RunnerConfig
from trillm.errors import EngineDeadError

pytestmark = pytest.mark.slow  # each test spawns a Python process


def live_rank_children() -> list[int]:
    """Pids of this process's children running `python -m trillm.gpu.rank` (zombies have no command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                parent_pid = int(stat.read().rsplit(")", 1)[1].split()[1])
                command = cmdline.read()
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        if parent_pid == os.getpid() and b"trillm.gpu.rank" in command:
            pids.append(int(entry))
    return pids


def config(behaviour: str) -> RunnerConfig:
    return RunnerConfig(
        model_path=f"fake:{behaviour}",
        rank=0,
        world_size=1,
        dist_init_method="",
        device="cpu",
        dtype="float32",
        block_size=4,
        max_model_len=128,
        max_batch_size=4,
        max_prefill_token_num=64,
        cache_max_entry_count=0.5,
        cpu_memory_budget_bytes=1 << 20,
        enable_cuda_graph=False,
    )


def plan(step_id: int) -> StepPlan:
    seq = SeqStep(seq_id=1, token_ids=(100 + step_id,), start_pos=step_id - 1, block_table=(0,), sample=None)
    return StepPlan(step_id=step_id, seqs=(seq,))


Started = tuple[GPUWorkerActor, RankReady, trio.MemorySendChannel[StepPlan], trio.MemoryReceiveChannel[StepResult]]


@asynccontextmanager
async def started_worker(behaviour: str, step_timeout_s: float = 0.0) -> AsyncIterator[Started]:
    plans_send, plans_receive = trio.open_memory_channel[StepPlan](0)
    results_send, results_receive = trio.open_memory_channel[StepResult](0)
    worker = GPUWorkerActor(config(behaviour), plans_receive, results_send, target="fake_rank:main",
                            step_timeout_s=step_timeout_s)
    async with trio.open_nursery() as nursery:
        ready = await nursery.start(worker.run)
        yield worker, ready, plans_send, results_receive


async def test_frames_round_trip_over_a_stream() -> None:
    left, right = trio.testing.memory_stream_pair()
    big = tuple(range(100_000))

    async def send_both() -> None:
        await send_frame(left, {"a": 1})
        await send_frame(left, big)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_both)
        reader = FrameReader(right)
        assert await reader.receive() == {"a": 1}
        assert await reader.receive() == big
    await left.aclose()
    with pytest.raises(EOFError):
        await reader.receive()


async def test_worker_serves_plans_in_order_and_shuts_its_rank_down() -> None:
    async with started_worker("ok") as (worker, ready, plans, results):
        assert ready.layout.num_blocks == fake_rank.NUM_BLOCKS and ready.max_model_len == 128
        pid = worker.pid
        for step_id in (1, 2, 3):
            await plans.send(plan(step_id))
            assert (await results.receive()).step_id == step_id
        await plans.aclose()  # the Batcher is gone: the worker sends Shutdown and waits for the exit
    assert pid is not None
    assert worker._process is not None and worker._process.returncode == 0


async def test_rank_that_fails_to_start_raises_at_start() -> None:
    with pytest.RaisesGroup(pytest.RaisesExc(EngineDeadError, match="rank 0 failed to start: fake rank cannot start")):
        async with started_worker("fail-start"):
            pass  # pragma: no cover


async def test_rank_that_crashes_mid_step_raises() -> None:
    with pytest.RaisesGroup(
        pytest.RaisesExc(EngineDeadError, match=r"rank 0 died during step 2 \(exit code 3\)"), flatten_subgroups=True
    ):
        async with started_worker("die-at-step-2") as (_, _, plans, results):
            await plans.send(plan(1))
            await results.receive()
            await plans.send(plan(2))
            await trio.sleep_forever()


async def test_rank_failure_reply_raises_with_its_message() -> None:
    with pytest.RaisesGroup(
        pytest.RaisesExc(EngineDeadError, match="rank 0 failed during step 1: fake rank broke"), flatten_subgroups=True
    ):
        async with started_worker("fail-at-step-1") as (_, _, plans, _):
            await plans.send(plan(1))
            await trio.sleep_forever()


async def test_a_hung_rank_is_caught_by_the_watchdog_and_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_worker, "SHUTDOWN_GRACE_S", 0.2)
    start = trio.current_time()
    with pytest.RaisesGroup(
        pytest.RaisesExc(EngineDeadError, match=r"rank 0 did not answer step 2 within 0.5 s \(--step-timeout\)"),
        flatten_subgroups=True,
    ):
        async with started_worker("hang-at-step-2", step_timeout_s=0.5) as (worker, _, plans, results):
            await plans.send(plan(1))
            await results.receive()  # a normal step is well within the budget
            await plans.send(plan(2))
            await trio.sleep_forever()
    assert trio.current_time() - start < 5.0
    assert worker._process is not None and worker._process.returncode == -signal.SIGKILL


async def test_rank_killed_while_idle_is_noticed_without_a_step() -> None:
    with pytest.RaisesGroup(
        pytest.RaisesExc(EngineDeadError, match=r"rank 0 process died \(exit code -9\)"), flatten_subgroups=True
    ):
        async with started_worker("ok") as (worker, _, _, _):
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            await trio.sleep_forever()


async def test_rank_that_ignores_shutdown_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_worker, "SHUTDOWN_GRACE_S", 0.2)
    async with started_worker("ignore-shutdown") as (worker, _, plans, _):
        await plans.aclose()
    assert worker._process is not None and worker._process.returncode == -signal.SIGKILL


# -- the engine over spawned ranks -----------------------------------------------------------------------------------


@asynccontextmanager
async def spawned_engine(behaviour: str, monkeypatch: pytest.MonkeyPatch, **fields: object) -> AsyncIterator[Engine]:
    monkeypatch.setattr(engine_module, "_resolve_model", lambda spec, cache_dir: spec)
    config = EngineConfig(model=f"fake:{behaviour}", cache_block_seq_len=4, **fields)  # type: ignore[arg-type]
    tokenizer = FakeTokenizer()
    async with Engine.open(config, tokenizer=tokenizer, rank_target="fake_rank:main") as engine:  # type: ignore[arg-type]
        yield engine


def greedy(prompt: tuple[int, ...], max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        request_id="r", prompt_token_ids=prompt, sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens)
    )


async def test_engine_fails_running_and_waiting_requests_when_its_rank_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    async with spawned_engine("die-at-step-3", monkeypatch, max_batch_size=1) as engine:
        assert engine.device_name.startswith("fake-rank-")
        errors = []

        async def run(prompt: tuple[int, ...]) -> None:
            with pytest.raises(EngineDeadError) as info:
                async with engine.generate(greedy(prompt, 20)) as outputs:
                    async for _ in outputs:
                        pass
            errors.append(str(info.value))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, (100, 101, 102))
            nursery.start_soon(run, (200, 201))  # waiting behind the first: max_batch_size 1
        assert len(errors) == 2 and all("exit code 3" in error for error in errors)
        assert not engine.is_alive and "exit code 3" in (engine.failure or "")
        with pytest.raises(EngineDeadError, match="exit code 3"):
            async with engine.generate(greedy((1, 2), 2)):
                pass  # pragma: no cover
    assert not live_rank_children()


async def test_engine_notices_a_rank_killed_while_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    async with spawned_engine("ok", monkeypatch) as engine:
        async with engine.generate(greedy((100, 101), 3)) as outputs:
            assert sum(len(o.token_ids) for o in [o async for o in outputs]) == 3
        (rank_pid,) = live_rank_children()
        os.kill(rank_pid, signal.SIGKILL)
        with trio.fail_after(5):
            while engine.is_alive:
                await trio.sleep(0.01)
        assert engine.failure == "rank 0 process died (exit code -9)"


async def test_a_step_out_of_device_memory_fails_the_engine_saying_what_to_lower(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The real rank loop (rank_main) whose runner raises torch.cuda.OutOfMemoryError in step 3 (fake_rank.py).
    async with spawned_engine("oom-at-step-3", monkeypatch) as engine:
        with pytest.raises(EngineDeadError) as info:
            async with engine.generate(greedy((100, 101, 102), 20)) as outputs:
                async for _ in outputs:
                    pass
        assert "OutOfMemoryError: CUDA out of memory" in str(info.value)
        assert "--max-batch-size" in str(info.value)
        assert not engine.is_alive and "OutOfMemoryError" in (engine.failure or "")
    assert not live_rank_children()
