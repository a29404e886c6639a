"""Engine with an in-process FakeRunner: requests, choices, stop strings, batching, preemption, failure, drain."""

from __future__ import annotations

import itertools

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from fakes import EOS_ID, FakeRunner, FakeTokenizer, hash_next_token, reference_tokens, take_tokens
from trillm.actors.engine import Engine
from trillm.actors.gpu_worker import CPU_MAX_BATCH_SIZE, resolve_device, runner_configs
from trillm.protocol.api import CompletionOutput, FinishReason, GenerateRequest, SamplingParams
from trillm.protocol.step import SampleSpec
from trillm.config import EngineConfig
from trillm.gpu import cpu_quant
from trillm.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineDrainingError,
    InvalidRequestError,
)

pytestmark = pytest.mark.usefixtures("overlap")  # every test runs in lockstep and with step overlap

GREEDY = SamplingParams(temperature=0.0)
TOKENIZER = FakeTokenizer()


@asynccontextmanager
async def open_engine(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    use_threads: bool = False,
    runner: FakeRunner | None = None,
    **config: Any,
) -> AsyncIterator[tuple[Engine, FakeRunner]]:
    runner = runner or FakeRunner(num_blocks=num_blocks, block_size=block_size)
    engine_config = EngineConfig(model="fake", cache_block_seq_len=runner.layout.block_size, **config)
    async with Engine.open(
        engine_config, runner_factory=lambda _: runner, tokenizer=FakeTokenizer(), use_threads=use_threads
    ) as engine:
        yield engine, runner


def request(prompt: Sequence[int], max_tokens: int | None = 8, **fields: Any) -> GenerateRequest:
    sampling = fields.pop("sampling", SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return GenerateRequest(request_id="r", prompt_token_ids=tuple(prompt), sampling=sampling, **fields)


async def collect(engine: Engine, req: GenerateRequest) -> list[CompletionOutput]:
    async with engine.generate(req) as outputs:
        return [output async for output in outputs]


def tokens_of(outputs: Sequence[CompletionOutput], index: int = 0) -> list[int]:
    return [t for o in outputs if o.index == index for t in o.token_ids]


def text_of(outputs: Sequence[CompletionOutput], index: int = 0) -> str:
    return "".join(o.text for o in outputs if o.index == index)


def expected(prompt: Sequence[int], max_new: int, sampling: SamplingParams = GREEDY) -> list[int]:
    spec = SampleSpec(sampling=sampling, output_index=0)
    return reference_tokens(prompt, spec, max_new, hash_next_token(1000), eos_token_ids=(EOS_ID,))


PROMPT = tuple(range(100, 107))


async def assert_idle_and_free(engine: Engine) -> None:
    await trio.testing.wait_all_tasks_blocked()
    stats = engine.statistics()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks and stats.kv_usage == 0.0


# -- configuration ---------------------------------------------------------------------------------------------------


def test_auto_device_is_cpu_without_a_cuda_driver() -> None:
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == "cuda"
    assert resolve_device("auto") in ("cpu", "cuda")


def test_runner_configs_resolve_defaults_per_device() -> None:
    (cpu,) = runner_configs(EngineConfig(session_len=512), "/m", "cpu")
    assert (cpu.dtype, cpu.max_batch_size, cpu.max_model_len, cpu.device) == ("float32", CPU_MAX_BATCH_SIZE, 512, "cpu")
    assert CPU_MAX_BATCH_SIZE == cpu_quant.MAX_ROWS  # the batch the one-call decode step serves
    gpus = runner_configs(EngineConfig(tp=2, dtype="float16", max_batch_size=8), "/m", "cuda")
    assert [c.rank for c in gpus] == [0, 1] and {c.world_size for c in gpus} == {2}
    assert (gpus[0].dtype, gpus[0].max_batch_size) == ("float16", 8)
    assert gpus[0].dist_init_method == gpus[1].dist_init_method  # one rendezvous for every rank
    assert gpus[0].dist_init_method.startswith("tcp://127.0.0.1:")
    (cuda,) = runner_configs(EngineConfig(), "/m", "cuda")
    assert (cuda.dtype, cuda.max_batch_size) == ("bfloat16", 256)


def test_deterministic_reaches_every_rank_and_warns_past_two_ranks(caplog: pytest.LogCaptureFixture) -> None:
    pair = runner_configs(EngineConfig(tp=2, deterministic=True), "/m", "cuda")
    assert [c.deterministic for c in pair] == [True, True]
    assert "--deterministic" not in caplog.text  # two ranks: any all-reduce is one commutative sum
    assert not runner_configs(EngineConfig(), "/m", "cuda")[0].deterministic
    runner_configs(EngineConfig(tp=4, deterministic=True), "/m", "cuda")
    assert "--deterministic at --tp 4" in caplog.text


async def test_window_is_the_session_len_capped_at_the_kv_cache() -> None:
    async with open_engine(num_blocks=8, block_size=4) as (engine, _):
        assert engine.max_model_len == 32 and engine.device_name == "fake" and engine.is_alive
    async with open_engine(num_blocks=8, block_size=4, session_len=20) as (engine, _):
        assert engine.max_model_len == 20


async def test_a_runner_that_fails_to_start_fails_open() -> None:
    def broken(_: object) -> FakeRunner:
        raise RuntimeError("no weights here")

    with pytest.raises(RuntimeError, match="no weights here"):
        config = EngineConfig(model="fake")
        async with Engine.open(config, runner_factory=broken, tokenizer=FakeTokenizer()):  # type: ignore[arg-type]
            pass  # pragma: no cover


# -- generation ------------------------------------------------------------------------------------------------------


async def test_greedy_request_yields_tokens_text_and_counts() -> None:
    async with open_engine() as (engine, runner):
        outputs = await collect(engine, request(PROMPT, 6))
        want = expected(PROMPT, 6)
        assert tokens_of(outputs) == want
        assert text_of(outputs) == TOKENIZER.decode(want)
        # One output per step while the consumer keeps up; tokens that piled up behind a slow consumer come as one.
        assert [o.finish_reason for o in outputs] == [None] * (len(outputs) - 1) + [FinishReason.LENGTH]
        counts = [o.num_output_tokens for o in outputs]
        assert counts == list(itertools.accumulate(len(o.token_ids) for o in outputs)) and counts[-1] == 6
        assert {o.num_prompt_tokens for o in outputs} == {7} and {o.num_history_tokens for o in outputs} == {0}
        stats = engine.statistics()
        assert (stats.prompt_tokens_total, stats.computed_prompt_tokens_total) == (7, 7)
        assert stats.generation_tokens_total == 6
        assert stats.steps == len(runner.plans) == 6
        await assert_idle_and_free(engine)


async def test_max_tokens_none_runs_to_the_window() -> None:
    async with open_engine(num_blocks=8, block_size=4) as (engine, _):
        outputs = await collect(engine, request(PROMPT, None))
        assert len(tokens_of(outputs)) == 32 - 7 and outputs[-1].finish_reason is FinishReason.LENGTH


async def test_max_tokens_beyond_the_window_is_capped_with_length() -> None:
    async with open_engine(num_blocks=8, block_size=4) as (engine, _):
        outputs = await collect(engine, request(PROMPT, 1000))
        assert len(tokens_of(outputs)) == 25 and outputs[-1].finish_reason is FinishReason.LENGTH


async def test_max_tokens_zero_finishes_without_a_step() -> None:
    async with open_engine() as (engine, runner):
        outputs = await collect(engine, request(PROMPT, 0))
        final = CompletionOutput(index=0, text="", token_ids=(), finish_reason=FinishReason.LENGTH, num_prompt_tokens=7)
        assert outputs == [final]
        assert runner.plans == []


async def test_eos_finishes_with_stop_and_is_not_in_the_text() -> None:
    def next_token(context: Sequence[int], spec: SampleSpec) -> int:
        return 50 if spec.output_index < 2 else EOS_ID

    runner = FakeRunner(num_blocks=16, block_size=4, next_token=next_token)
    async with open_engine(runner=runner) as (engine, _):
        outputs = await collect(engine, request(PROMPT, 10))
        assert tokens_of(outputs) == [50, 50, EOS_ID] and text_of(outputs) == chr(40) * 2
        assert outputs[-1].finish_reason is FinishReason.STOP


async def test_n_choices_use_consecutive_seeds_and_interleave() -> None:
    sampling = SamplingParams(temperature=1.0, seed=5, max_tokens=5)
    async with open_engine() as (engine, runner):
        outputs = await collect(engine, request(PROMPT, n=3, sampling=sampling))
        assert {o.index for o in outputs} == {0, 1, 2}
        assert [o.index for o in outputs[:3]] != [0, 0, 0]  # interleaved, not one choice after the other
        for index in range(3):
            assert tokens_of(outputs, index) == expected(PROMPT, 5, SamplingParams(temperature=1.0, seed=5 + index))
        seeds = {s.sample.sampling.seed for p in runner.plans for s in p.seqs if s.sample is not None}
        assert seeds == {5, 6, 7}


async def test_unseeded_requests_get_a_concrete_seed_per_choice() -> None:
    async with open_engine() as (engine, runner):
        await collect(engine, request(PROMPT, n=2, sampling=SamplingParams(max_tokens=1)))
        seeds = [s.sample.sampling.seed for s in runner.plans[0].seqs]  # type: ignore[union-attr]
        assert None not in seeds and seeds[1] == seeds[0] + 1  # type: ignore[operator]


async def test_stop_string_cuts_the_text_finishes_with_stop_and_aborts_the_sequence() -> None:
    want = expected(PROMPT, 30)
    text = TOKENIZER.decode(want)
    stop = text[6:9]
    cut = text.find(stop)
    async with open_engine() as (engine, runner):
        outputs = await collect(engine, request(PROMPT, 30, stop=(stop, "never-there")))
        assert text_of(outputs) == text[:cut]
        assert outputs[-1].finish_reason is FinishReason.STOP
        assert tokens_of(outputs) == want[: cut + len(stop)]  # the tokens through the match are reported
        steps_with_it = sum(1 for plan in runner.plans if plan.seqs)
        assert steps_with_it <= cut + len(stop) + 2  # aborted at once, not run to max_tokens
        await assert_idle_and_free(engine)


async def test_logprobs_pass_through() -> None:
    async with open_engine() as (engine, _):
        sampling = SamplingParams(temperature=0.0, max_tokens=2, logprobs=1)
        outputs = await collect(engine, request(PROMPT, sampling=sampling))
        assert [entry.token_id for o in outputs for entry in o.logprobs] == tokens_of(outputs)


# -- validation ------------------------------------------------------------------------------------------------------


async def test_requests_are_validated_before_anything_is_submitted() -> None:
    async with open_engine(num_blocks=8, block_size=4) as (engine, runner):
        with pytest.raises(ContextLengthExceededError, match="context length is 32 tokens, but the request has 32"):
            await collect(engine, request(range(32)))
        with pytest.raises(InvalidRequestError, match="prompt is empty: there is nothing to continue from"):
            await collect(engine, request(()))
        with pytest.raises(InvalidRequestError, match="n must be >= 1"):
            await collect(engine, request(PROMPT, n=0))
        assert runner.plans == [] and engine.statistics().prompt_tokens_total == 0


async def test_drain_refuses_new_requests_while_in_flight_ones_finish() -> None:
    async with open_engine() as (engine, _):
        async with engine.generate(request(PROMPT, 5)) as outputs:
            engine.drain()
            with pytest.raises(EngineDrainingError):
                await collect(engine, request(PROMPT, 5))
            assert tokens_of([o async for o in outputs]) == expected(PROMPT, 5)


# -- batching --------------------------------------------------------------------------------------------------------


async def test_requests_join_and_leave_the_batch_at_step_boundaries(overlap: bool) -> None:
    prompt_b = tuple(range(300, 304))
    async with open_engine(use_threads=True) as (engine, runner):
        runner.hold()
        runner.allow(3)
        async with engine.generate(request(PROMPT, 12)) as outputs_a:
            first = await take_tokens(outputs_a, 3)
            async with engine.generate(request(prompt_b, 4)) as outputs_b:
                runner.allow(1000)
                rest_b = [o async for o in outputs_b]
            rest_a = [o async for o in outputs_a]
        assert tokens_of(first + rest_a) == expected(PROMPT, 12)
        assert tokens_of(rest_b) == expected(prompt_b, 4)
        batches = [sorted(s.seq_id for s in plan.seqs) for plan in runner.plans]
        # Step 4 was planned when a's third token was delivered, before b arrived: b joins at step 5, decodes
        # alongside a, and leaves when it finishes. With overlap step 5 was planned ahead too: b joins at step 6.
        joined = 5 if overlap else 4
        assert batches[:joined] == [[1]] * joined
        assert batches[joined : joined + 4] == [[1, 2]] * 4
        assert batches[joined + 4 :] == [[1]] * (8 - joined)
        await assert_idle_and_free(engine)


async def test_concurrent_requests_with_a_tiny_cache_are_preempted_yet_exact() -> None:
    prompts = [tuple(range(100 * i, 100 * i + 6)) for i in range(1, 6)]
    async with open_engine(num_blocks=8, block_size=4) as (engine, _):
        results: dict[int, list[CompletionOutput]] = {}

        async def run(i: int) -> None:
            results[i] = await collect(engine, request(prompts[i], 14))

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(run, i)
        for i, prompt in enumerate(prompts):
            assert tokens_of(results[i]) == expected(prompt, 14)
        assert engine.statistics().num_preemptions > 0
        await assert_idle_and_free(engine)


async def test_leaving_the_context_early_aborts_and_frees_blocks() -> None:
    async with open_engine() as (engine, _):
        async with engine.generate(request(PROMPT, 50, n=2)) as outputs:
            seen = 0
            async for _ in outputs:
                seen += 1
                if seen == 3:
                    break
        await assert_idle_and_free(engine)
        assert engine.statistics().generation_tokens_total < 100


async def test_cancelled_consumer_aborts_its_request() -> None:
    async with open_engine() as (engine, _):
        seen = 0
        with trio.CancelScope() as scope:  # the HTTP handler of a client that disconnected is cancelled like this
            async with engine.generate(request(PROMPT, 50)) as outputs:
                async for _ in outputs:
                    seen += 1
                    if seen == 2:
                        scope.cancel()
        assert seen == 2
        await assert_idle_and_free(engine)
        assert engine.statistics().generation_tokens_total < 10


# -- failure ---------------------------------------------------------------------------------------------------------


async def test_runner_failure_kills_the_engine_and_fails_every_request() -> None:
    async with open_engine(max_batch_size=1) as (engine, runner):
        runner.fail_at_step = 3
        errors: list[str] = []

        async def run(prompt: tuple[int, ...]) -> None:
            with pytest.raises(EngineDeadError) as info:
                await collect(engine, request(prompt, 10))
            errors.append(str(info.value))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, PROMPT)
            nursery.start_soon(run, tuple(range(200, 205)))  # waiting: max_batch_size 1
        assert errors == ["FakeRunner failed at step 3"] * 2
        assert not engine.is_alive and engine.failure == "FakeRunner failed at step 3"
        with pytest.raises(EngineDeadError, match="FakeRunner failed at step 3"):
            await collect(engine, request(PROMPT))
    assert runner.is_closed


# -- step overlap ----------------------------------------------------------------------------------------------------


async def test_eos_while_the_next_step_is_in_flight_leaks_no_token_to_the_client(overlap: bool) -> None:
    fallback = hash_next_token(1000)

    def next_token(context: Sequence[int], spec: SampleSpec) -> int:  # EOS as the 4th output
        return EOS_ID if len(context) == len(PROMPT) + 3 else fallback(context, spec)

    runner = FakeRunner(num_blocks=64, block_size=4, next_token=next_token)
    async with open_engine(runner=runner) as (engine, _):
        outputs = await collect(engine, request(PROMPT, 10))
        await assert_idle_and_free(engine)
    spec = SampleSpec(sampling=GREEDY, output_index=0)
    want = reference_tokens(PROMPT, spec, 10, next_token, eos_token_ids=(EOS_ID,))
    assert tokens_of(outputs) == want and len(want) == 4 and want[-1] == EOS_ID
    assert text_of(outputs) == TOKENIZER.decode(want)
    assert outputs[-1].finish_reason is FinishReason.STOP and outputs[-1].num_output_tokens == 4
    indexes = [s.sample.output_index for p in runner.plans for s in p.seqs if s.sample is not None]
    # With overlap the 5th output was sampled speculatively while the EOS step's result travelled: it is dropped.
    assert indexes == list(range(5 if overlap else 4))


async def test_aborts_with_a_step_in_flight_free_every_block(overlap: bool) -> None:
    async with open_engine(num_blocks=16, block_size=4, use_threads=True) as (engine, runner):
        with trio.CancelScope() as scope:  # a client that disconnects after its second token
            async with engine.generate(request(PROMPT, 40)) as outputs:
                seen = 0
                async for output in outputs:
                    seen += len(output.token_ids)
                    if seen >= 2:
                        scope.cancel()
        kept = await collect(engine, request(PROMPT, 6))
        with trio.fail_after(10):
            while (stats := engine.statistics()).num_running + stats.num_waiting:
                await trio.sleep(0.001)
        assert tokens_of(kept) == expected(PROMPT, 6)
        stats = engine.statistics()
        assert stats.num_free_blocks == stats.num_total_blocks


async def test_tokens_that_pile_up_behind_a_slow_consumer_come_out_as_one_output() -> None:
    async with open_engine() as (engine, runner):
        async with engine.generate(request(PROMPT, 6)) as outputs:
            await trio.testing.wait_all_tasks_blocked()  # the engine ran every step; this consumer read nothing
            assert len(runner.plans) == 6
            received = [o async for o in outputs]
        assert len(received) == 1 and received[0].num_output_tokens == 6
        assert received[0].finish_reason is FinishReason.LENGTH
        assert tokens_of(received) == expected(PROMPT, 6)
        assert text_of(received) == TOKENIZER.decode(expected(PROMPT, 6))
