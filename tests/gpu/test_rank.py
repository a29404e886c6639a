"""Rank processes over a socketpair: the RankReady / StepPlan / Shutdown protocol, failures, tp=3 and tp=4 over gloo."""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from trillm.protocol.api import SamplingParams
from trillm.protocol.step import RankFailed, RankReady, SampleSpec, SeqStep, Shutdown, StepPlan, StepResult
from trillm.config import RunnerConfig
from trillm.gpu.rank import rank_main, recv_message, send_message
from trillm.protocol.wire import FrameDecoder

TIMEOUT_S = 120.0
GREEDY = SampleSpec(sampling=SamplingParams(temperature=0.0, logprobs=2), output_index=0)


def _config(**overrides: Any) -> RunnerConfig:
    fields: dict[str, Any] = dict(
        model_path="random:tiny",
        rank=0,
        world_size=1,
        dist_init_method="",
        device="cpu",
        dtype="float32",
        block_size=8,
        max_model_len=64,
        max_batch_size=2,
        max_prefill_token_num=128,
        cache_max_entry_count=0.5,
        cpu_memory_budget_bytes=1 << 20,
        enable_cuda_graph=False,
    )
    fields.update(overrides)
    return RunnerConfig(**fields)


class RankHandle:
    """One spawned rank process and the parent's end of its socket."""

    def __init__(self, config: RunnerConfig) -> None:
        self.sock, child = socket.socketpair()
        self.decoder = FrameDecoder()
        self.sock.settimeout(TIMEOUT_S)
        self.process = multiprocessing.get_context("spawn").Process(target=rank_main, args=(config, child), daemon=True)
        self.process.start()
        child.close()

    def request(self, msg: Any) -> Any:
        send_message(self.sock, msg)
        return recv_message(self.sock, self.decoder)

    def close(self) -> None:
        self.sock.close()
        self.process.join(TIMEOUT_S)
        if self.process.is_alive():  # pragma: no cover - only when a test already failed
            self.process.kill()


@pytest.fixture
def ranks() -> Iterator[list[RankHandle]]:
    handles: list[RankHandle] = []
    yield handles
    for handle in handles:
        handle.close()


def _greedy_tokens(request: Any, num_tokens: int, logprobs: list[float] | None = None) -> list[int]:
    """Prefill a 5-token prompt, then decode; `request(plan)` returns rank 0's StepResult."""
    tokens: list[int] = []
    plan = StepPlan(
        step_id=0, seqs=(SeqStep(seq_id=1, token_ids=(9, 8, 7, 6, 5), start_pos=0, block_table=(0, 1), sample=GREEDY),)
    )
    for step in range(num_tokens):
        result = request(plan)
        assert isinstance(result, StepResult) and result.step_id == step
        tokens.append(result.sampled[0].token_id)
        if logprobs is not None:
            logprobs.extend(logprob for _, logprob in result.sampled[0].logprob.top)
        spec = SampleSpec(sampling=GREEDY.sampling, output_index=step + 1)
        plan = StepPlan(
            step_id=step + 1,
            seqs=(SeqStep(seq_id=1, token_ids=(tokens[-1],), start_pos=5 + step, block_table=(0, 1), sample=spec),),
        )
    return tokens


@pytest.mark.slow
def test_rank_answers_ready_then_steps_then_exits_zero(ranks: list[RankHandle]) -> None:
    ranks.append(RankHandle(_config()))
    ready = recv_message(ranks[0].sock, ranks[0].decoder)
    assert isinstance(ready, RankReady)
    assert (ready.rank, ready.max_model_len, ready.vocab_size, ready.layout.num_blocks) == (0, 64, 512, 16)
    assert len(_greedy_tokens(ranks[0].request, 3)) == 3
    send_message(ranks[0].sock, Shutdown())
    ranks[0].process.join(TIMEOUT_S)
    assert ranks[0].process.exitcode == 0


@pytest.mark.slow
def test_bad_model_path_reports_rank_failed_and_exits_one(ranks: list[RankHandle], tmp_path: Any) -> None:
    ranks.append(RankHandle(_config(model_path=str(tmp_path))))
    failed = recv_message(ranks[0].sock, ranks[0].decoder)
    assert isinstance(failed, RankFailed)
    assert failed.message == f"ModelLoadError: {tmp_path} has no config.json (found: nothing)"
    assert "Traceback" in failed.traceback
    ranks[0].process.join(TIMEOUT_S)
    assert ranks[0].process.exitcode == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize(("model", "world_size", "kv_heads"), [("random:tiny", 3, 2), ("random:tiny-tp8", 4, 1)])
def test_tensor_parallel_over_gloo_matches_one_rank(ranks: list[RankHandle], model: str, world_size: int,
                                                     kv_heads: int) -> None:  # fmt: skip
    """tp=3 splits tiny's 6 KV heads; tp=4 replicates each of tiny-tp8's 2 KV heads on 2 ranks (models/sharding.py)."""
    from trillm.gpu.runner import ModelRunner

    single = ModelRunner(_config(model_path=model))
    expected_logprobs: list[float] = []
    expected = _greedy_tokens(single.step, 4, expected_logprobs)

    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ranks.extend(RankHandle(_config(model_path=model, rank=r, world_size=world_size, dist_init_method=init_method))
                 for r in range(world_size))  # fmt: skip
    for r, handle in enumerate(ranks):
        ready = recv_message(handle.sock, handle.decoder)
        assert isinstance(ready, RankReady) and ready.rank == r and ready.layout.num_kv_heads == kv_heads

    def request_all(plan: StepPlan) -> StepResult:
        for handle in ranks:
            send_message(handle.sock, plan)
        results = [recv_message(handle.sock, handle.decoder) for handle in ranks]
        assert [r.sampled for r in results[1:]] == [()] * (world_size - 1)  # other ranks only acknowledge
        return results[0]

    logprobs: list[float] = []
    assert _greedy_tokens(request_all, 4, logprobs) == expected
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-5)  # the logits agree, not only their argmax
    for handle in ranks:
        send_message(handle.sock, Shutdown())
    for handle in ranks:
        handle.process.join(TIMEOUT_S)
        assert handle.process.exitcode == 0
