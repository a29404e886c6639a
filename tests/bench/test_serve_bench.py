"""bench/serve.py against the fake OpenAI streaming server of bench/fake_openai.py, on loopback.

Each run test drives `run_benchmark` (or the whole command, `amain`) and the fake server in one asyncio loop, so
nothing waits on real time beyond the few milliseconds the fake server takes to stream.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from bench.fake_openai import FakeBehaviour, FakeServer, open_fake_server
from bench.serve import (
    CHAT,
    SHAREGPT_MEAN_INPUT_LEN,
    SHAREGPT_MEAN_OUTPUT_LEN,
    BenchConfig,
    RequestSpec,
    RunResult,
    SSEReader,
    amain,
    arrival_offsets_s,
    build_requests,
    device_slug,
    request_body,
    run_benchmark,
    sharegpt_like_lengths,
    summarize,
)

T = TypeVar("T")
SPEC = RequestSpec(prompt=(1, 2, 3), prompt_len=3, output_len=4)


def with_fake_server(behaviour: FakeBehaviour, scenario: Callable[[FakeServer, str], Awaitable[T]]) -> T:
    """Run `scenario(server, base_url)` in a fresh asyncio loop while the fake server serves, bounded in time."""

    async def main() -> T:
        async with open_fake_server(behaviour) as (fake, url):
            return await asyncio.wait_for(scenario(fake, url), timeout=20)

    return asyncio.run(main())


def run_against(behaviour: FakeBehaviour, **config: Any) -> tuple[FakeServer, RunResult]:
    async def scenario(fake: FakeServer, url: str) -> tuple[FakeServer, RunResult]:
        defaults: dict[str, Any] = {"dataset": "random", "input_len": 8, "output_len": 6, "num_prompts": 6,
                                    "num_warmup": 0, "is_save": False, "is_progress": False}
        return fake, await run_benchmark(BenchConfig(base_url=url, **{**defaults, **config}))

    return with_fake_server(behaviour, scenario)


# --------------------------------------------------------------------------------------------------------------------
# Runs against the fake server


def test_every_token_is_counted_and_timed() -> None:
    fake, run = run_against(FakeBehaviour(), num_prompts=8, output_len=10, range_ratio=0.5)
    figures = summarize(run)
    assert (figures["completed"], figures["failed"]) == (8, 0)
    assert figures["total_output_tokens"] == sum(body["max_tokens"] for body in fake.bodies)
    assert figures["output_tokens_source"] == "usage"
    assert figures["total_input_tokens"] == sum(len(body["prompt"]) for body in fake.bodies)
    for result in run.results:
        assert 0 < result.ttft_s <= result.e2e_s
        assert len(result.itls_s) == result.output_tokens - 1 == result.output_len - 1
    assert figures["cached_fraction"] is None


def test_failures_are_counted_with_their_messages() -> None:
    behaviour = FakeBehaviour(modes=("ok", "http500", "drop", "error_event"))
    _, run = run_against(behaviour, num_prompts=8)
    figures = summarize(run)
    assert (figures["completed"], figures["failed"]) == (2, 6)
    assert figures["total_output_tokens"] == sum(r.output_len for r in run.results if r.is_success)
    assert sorted(error.split(":")[0] for error in figures["errors"]) == ["HTTP 500", "RemoteProtocolError",
                                                                          "error event"]


def test_max_concurrency_is_never_exceeded() -> None:
    fake, run = run_against(FakeBehaviour(chunk_delay_s=0.002), num_prompts=12, max_concurrency=3)
    assert fake.max_streams_open == run.max_in_flight == 3
    assert summarize(run)["completed"] == 12


def test_without_a_cap_every_request_streams_at_once() -> None:
    fake, _ = run_against(FakeBehaviour(chunk_delay_s=0.002), num_prompts=12)
    assert fake.max_streams_open == 12


def test_chat_takes_the_listed_model_and_skips_the_role_chunk() -> None:
    fake, run = run_against(FakeBehaviour(model_id="listed-model"), endpoint=CHAT, num_prompts=3, num_warmup=1)
    assert run.model == "listed-model"
    assert len(fake.bodies) == 4  # the warm-up request, then the timed ones
    for body, result in zip(fake.bodies[1:], run.results):
        assert body["model"] == "listed-model"
        assert len(body["messages"][0]["content"].split()) == result.prompt_len == 8
        assert result.num_chunks == result.output_tokens == 6  # the empty role chunk is no token
    assert summarize(run)["completed"] == 3


def test_without_usage_output_tokens_are_counted_from_chunks() -> None:
    _, run = run_against(FakeBehaviour(is_usage=False))
    figures = summarize(run)
    assert figures["output_tokens_source"] == "chunks"
    assert figures["input_tokens_source"] == "sent"
    assert figures["total_output_tokens"] == 6 * 6


def test_shared_prefix_reports_the_cached_fraction() -> None:
    fake, run = run_against(FakeBehaviour(cached_tokens=16), dataset="shared-prefix", prefix_len=16, suffix_len=4)
    prompts = [body["prompt"] for body in fake.bodies]
    assert all(prompt[:16] == prompts[0][:16] and len(prompt) == 20 for prompt in prompts)
    assert len({tuple(prompt[16:]) for prompt in prompts}) == len(prompts)
    assert summarize(run)["cached_fraction"] == pytest.approx(16 / 20)


def test_command_writes_the_json_and_ends_with_the_summary_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    result_file = tmp_path / "result.json"

    async def scenario(_: FakeServer, url: str) -> int:
        return await amain(["--base-url", url, "--dataset", "random", "--input-len", "8", "--output-len", "5",
                            "--num-prompts", "4", "--max-concurrency", "2", "--request-rate", "1000",
                            "--label", "unit test", "--device-name", "fake gpu", "--result-file", str(result_file)])

    assert with_fake_server(FakeBehaviour(), scenario) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"serve random /v1/completions model=fake-model n=4 rate=1000.0 concurrency=2: "
                        r"20 tokens, \d+\.\d\d s, \d+\.\d\d tok/s", lines[-1])
    assert any(line.startswith("TTFT") for line in lines)
    saved = json.loads(result_file.read_text())
    assert {"command", "argv", "git_commit", "device", "label", "date", "model", "params", "results",
            "requests"} <= saved.keys()
    assert (saved["label"], saved["device"], saved["params"]["max_concurrency"]) == ("unit test", "fake gpu", 2)
    assert "api_key" not in saved["params"]
    for stat in ("ttft", "tpot", "itl", "e2e"):
        assert {f"mean_{stat}_ms", f"median_{stat}_ms", f"p90_{stat}_ms", f"p99_{stat}_ms"} <= saved["results"].keys()
    assert (saved["results"]["completed"], saved["results"]["failed"]) == (4, 0)


def test_an_unreachable_server_exits_with_status_2() -> None:
    async def scenario(_: FakeServer, url: str) -> int:
        return await amain(["--base-url", url + "/nowhere", "--no-save", "--no-progress"])

    assert with_fake_server(FakeBehaviour(), scenario) == 2


# --------------------------------------------------------------------------------------------------------------------
# Datasets, arrivals, request bodies


def test_sharegpt_like_lengths_are_seeded_clipped_and_have_the_mix_mean() -> None:
    def draw(seed: int, max_len: int = 1024) -> np.ndarray:
        return sharegpt_like_lengths(np.random.default_rng(seed), 1000, SHAREGPT_MEAN_INPUT_LEN, max_len)

    assert np.array_equal(draw(0), draw(0))
    assert not np.array_equal(draw(0), draw(1))
    lengths = draw(0)
    assert abs(lengths.mean() / SHAREGPT_MEAN_INPUT_LEN - 1) < 0.15
    assert lengths.min() >= 4 and lengths.max() == 1024  # the tail reaches the clip
    assert draw(0, max_len=300).max() == 300
    outputs = sharegpt_like_lengths(np.random.default_rng(0), 1000, SHAREGPT_MEAN_OUTPUT_LEN, 1024)
    assert abs(outputs.mean() / SHAREGPT_MEAN_OUTPUT_LEN - 1) < 0.15


def test_requests_are_the_same_for_the_same_seed() -> None:
    def prompts(seed: int) -> list[RequestSpec]:
        return build_requests(BenchConfig(dataset="sharegpt-like", num_prompts=20, seed=seed))

    assert prompts(3) == prompts(3)
    assert prompts(3) != prompts(4)
    token_ids = np.concatenate([np.asarray(spec.prompt) for spec in prompts(3)])
    assert 1000 <= token_ids.min() and token_ids.max() < 30000


def test_poisson_gaps_have_mean_one_over_rate() -> None:
    gaps = np.diff(arrival_offsets_s(np.random.default_rng(0), 20001, rate=8.0, burstiness=1.0))
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: coefficient of variation 1


def test_gamma_gaps_keep_the_rate_and_are_steadier_above_burstiness_1() -> None:
    gaps = np.diff(arrival_offsets_s(np.random.default_rng(0), 20001, rate=8.0, burstiness=4.0))
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(0.5, rel=0.05)  # gamma shape k: 1 / sqrt(k)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert not arrival_offsets_s(np.random.default_rng(0), 5, rate=float("inf"), burstiness=1.0).any()


def test_body_asks_for_a_streamed_exact_length_completion() -> None:
    body = json.loads(request_body(BenchConfig(extra_body={"top_k": 1}), "m", SPEC))
    assert body == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, "top_k": 1}
    assert "ignore_eos" not in json.loads(request_body(BenchConfig(is_ignore_eos=False), "m", SPEC))


def test_bad_values_name_their_flag() -> None:
    with pytest.raises(ValueError, match="--max-concurrency must be > 0, got 0"):
        BenchConfig(max_concurrency=0)
    with pytest.raises(ValueError, match=re.escape("--range-ratio must be in [0, 1), got 1.5")):
        BenchConfig(range_ratio=1.5)


def test_device_slug() -> None:
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# --------------------------------------------------------------------------------------------------------------------
# The SSE reader


def _event(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"text":"%s"}]}\n\n' % text.encode()


def test_reader_times_chunks_across_split_reads() -> None:
    reader = SSEReader()
    stream = _event("a") + _event("") + _event("b") + b'data:{"choices":[],"usage":{"completion_tokens":3}}\n\n'
    reader.feed(stream[:10], 1.0)  # half a line: nothing yet
    reader.feed(stream[10:], 2.0)
    reader.feed(_event("c") + b"data: [DONE]\n\n", 3.5)
    assert (reader.num_chunks, reader.first_s, reader.itls_s, reader.is_done) == (3, 2.0, [0.0, 1.5], True)
    result = reader.result(SPEC, 0.5, 4.0)
    assert (result.output_tokens, result.ttft_s, result.e2e_s, result.error) == (3, 1.5, 3.5, "")


def test_reader_reports_error_events_and_unfinished_streams() -> None:
    reader = SSEReader()
    reader.feed(b'data: {"object":"error","message":"out of memory","code":500}\n\ndata: [DONE]\n\n', 1.0)
    assert reader.result(SPEC, 0.0, 1.0).error == "error event: out of memory"
    reader = SSEReader()
    reader.feed(_event("a"), 1.0)
    assert reader.result(SPEC, 0.0, 1.0).error == "stream ended without data: [DONE]"
    reader = SSEReader()
    reader.feed(b"data: [DONE]\n\n", 1.0)
    assert reader.result(SPEC, 0.0, 1.0).error == "no content chunk in the stream"
