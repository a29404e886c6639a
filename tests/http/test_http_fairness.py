"""Fair scheduling and aborts under a big request (issue 13), over HTTP against the real Engine (Batcher, Scheduler,
core thread) with an in-process runner whose steps take time in proportion to their tokens.

- With an n=128 request holding every batch slot, a small request's first token comes within 2x its unloaded time
  (policy/fair_share.py), after a handful of engine steps, not after the big request's choices.
- An 800-prompt streamed completion whose client disconnects stops within 2 engine steps: the two plans already in
  flight when the server closes the stream, none after them.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from http_live import InProcessEngineServer

from fakes import FakeRunner, FakeTokenizer
from trillm.config import EngineConfig, ServerConfig
from trillm.http.streams import ChoiceStream
from trillm.policy.scheduler import Scheduler
from trillm.protocol.api import FinishReason
from trillm.protocol.step import StepPlan, StepResult

pytestmark = pytest.mark.slow

STEP_S = 0.005  # fixed cost of a step
TOKEN_S = 40e-6  # and per token: a 2,000-token prefill takes 85 ms, a 64-sequence decode 7.6 ms
SLOW_STEP_S = 0.03  # the disconnect test's fixed step cost
ATTEMPTS = 3
PROMPT_CHARS = 2000  # the FakeTokenizer is character-level: 2,000 tokens


class TimedRunner(FakeRunner):
    """A FakeRunner whose steps sleep STEP_S + TOKEN_S per token (in the worker thread: the GIL is free)."""

    def step(self, plan: StepPlan) -> StepResult:
        time.sleep(STEP_S + TOKEN_S * plan.num_tokens)
        return super().step(plan)


@pytest.fixture(scope="module")
def server() -> Iterator[InProcessEngineServer]:
    engine = EngineConfig(model="fake", cache_block_seq_len=16, max_batch_size=64)
    config = ServerConfig(engine=engine, server_name="127.0.0.1", server_port=1, max_prompts=1000, max_choices=1024)
    live = InProcessEngineServer(config, TimedRunner(num_blocks=4096, block_size=16), FakeTokenizer())
    live.start()
    yield live
    live.stop()


def engine_stats(server: InProcessEngineServer) -> Any:
    return server.call(lambda: server.state.engine.statistics())


def wait_idle(server: InProcessEngineServer, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine_stats(server)
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        time.sleep(0.01)
    raise AssertionError(f"the engine did not go idle: {engine_stats(server)}")


def first_token(client: httpx.Client, server: InProcessEngineServer) -> tuple[float, int]:
    """Seconds to the first streamed text of a new 2,000-token prompt, and the engine steps taken meanwhile."""
    prompt = f"{time.perf_counter_ns()}:".ljust(PROMPT_CHARS, "q")  # never in the prefix cache
    steps = engine_stats(server).steps
    start = time.perf_counter()
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                elapsed_s = time.perf_counter() - start
                return elapsed_s, engine_stats(server).steps - steps
    raise AssertionError("the stream ended without text")


class Background:
    """A streamed request read in a thread until `stop()` (which disconnects it)."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.num_chunks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                for _ in response.iter_raw():
                    self.num_chunks += 1
                    if self._stop.is_set():
                        return  # leaving the block closes the connection mid-stream

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def measure_first_tokens(server: InProcessEngineServer) -> tuple[float, float, list[int]]:
    """(median unloaded first-token s, median first-token s with n=128 holding the batch, engine steps of each)."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        first_token(client, server)  # warm-up
        unloaded = [first_token(client, server)[0] for _ in range(3)]
        big = Background(server.url, {"prompt": "big-one!", "n": 128, "max_tokens": 300, "stream": True})
        try:
            deadline = time.monotonic() + 30
            while engine_stats(server).num_running < 64:  # every batch slot is the big request's
                assert time.monotonic() < deadline, "the big request never filled the batch"
                time.sleep(0.005)
            loaded = [first_token(client, server) for _ in range(3)]
            stats = engine_stats(server)
            assert stats.num_running + stats.num_waiting >= 100, "the big request ended before the measurement did"
        finally:
            big.stop()
    wait_idle(server)
    unloaded_s = statistics.median(unloaded)
    loaded_s = statistics.median(elapsed for elapsed, _ in loaded)
    steps = [num_steps for _, num_steps in loaded]
    print(f"first token: unloaded {unloaded_s * 1e3:.1f} ms, with n=128 running {loaded_s * 1e3:.1f} ms, "
          f"steps {steps}")
    return unloaded_s, loaded_s, steps


def test_a_small_requests_first_token_within_2x_while_n_128_runs(server: InProcessEngineServer) -> None:
    # Best of ATTEMPTS against a loaded CI machine's noise; without fair shares the small request waits for the
    # big one's 128 choices x 300 tokens (seconds), which no attempt survives.
    results = []
    for _ in range(ATTEMPTS):
        unloaded_s, loaded_s, steps = measure_first_tokens(server)
        assert min(steps) <= 6  # steps, not the big request's 300 x 2 rounds
        results.append(loaded_s / unloaded_s)
        if loaded_s < 2 * unloaded_s:
            return
    raise AssertionError(f"first token with n=128 running / unloaded, each attempt: {results}")


def test_800_prompts_stop_within_2_steps_of_a_disconnect(server: InProcessEngineServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    closed_at: list[int] = []  # steps collected when the server closed the stream (read from the serving loop)
    aborted_at: list[tuple[int, int]] = []  # (steps planned, steps collected) when the Batcher took the first Abort
    batcher = server.state.engine._batcher  # noqa: SLF001 - its step counters, read in its own thread
    original_close, original_abort = ChoiceStream.close, Scheduler.abort

    def close(stream: ChoiceStream) -> None:
        if not closed_at:
            closed_at.append(server.state.engine.statistics().steps)
        original_close(stream)

    def abort(scheduler: Scheduler, seq_id: int, reason: FinishReason = FinishReason.ABORT) -> Any:
        if not aborted_at:
            aborted_at.append((scheduler.statistics().num_steps, batcher.statistics().num_steps))
        return original_abort(scheduler, seq_id, reason)

    monkeypatch.setattr(ChoiceStream, "close", close)
    monkeypatch.setattr(Scheduler, "abort", abort)
    # Steps of a GPU's length here (~30 ms at 64 sequences), so that the claim counts steps, not the host's thread
    # scheduling: with 8 ms steps a loaded 2-core CI machine could hold the abort's hop between threads for 2 of them.
    monkeypatch.setattr(sys.modules[__name__], "STEP_S", SLOW_STEP_S)
    prompts = [f"prompt {i}" for i in range(800)]
    big = Background(server.url, {"prompt": prompts, "max_tokens": 200, "stream": True})
    deadline = time.monotonic() + 30
    while big.num_chunks < 5 or engine_stats(server).num_running < 64:
        assert time.monotonic() < deadline, "the 800-prompt request did not start"
        time.sleep(0.005)
    assert engine_stats(server).num_waiting > 600
    big.stop()
    idle = wait_idle(server)
    time.sleep(3 * SLOW_STEP_S)  # the plans still in flight
    idle = engine_stats(server)
    assert closed_at and aborted_at, "the server never closed the stream"
    (planned, collected), = aborted_at
    print(f"steps collected: {closed_at[0]} at the disconnect, {collected} when the aborts arrived, {idle.steps} "
          f"when idle; {planned} planned by then")
    assert idle.steps == planned  # nothing was planned after the aborts: only the steps already in flight ran
    assert planned - collected <= 2  # at most two plans are in flight (step overlap)
    assert collected - closed_at[0] <= 1  # all 800 aborts arrived together, at the Batcher's next step
    assert idle.num_free_blocks == idle.num_total_blocks
