"""Interactive sessions through Engine.interactive (SessionActor) over a FakeRunner and FakeTokenizer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from fakes import EOS_ID, FakeRunner, FakeTokenizer, hash_next_token, reference_tokens, take_tokens
from trillm.actors.engine import Engine
from trillm.protocol.api import CompletionOutput, FinishReason, GenerateRequest, InteractiveTurn, SamplingParams
from trillm.protocol.step import SampleSpec
from trillm.config import EngineConfig
from trillm.errors import (
    ContextLengthExceededError,
    SessionBusyError,
    SessionLimitError,
    SessionNotFoundError,
    SessionOccupiedError,
)

pytestmark = pytest.mark.usefixtures("overlap")  # every test runs in lockstep and with step overlap

TOKENIZER = FakeTokenizer()
GREEDY = SamplingParams(temperature=0.0)


@asynccontextmanager
async def open_engine(
    *, num_blocks: int = 64, use_threads: bool = False, enable_prefix_caching: bool = True, **config_fields: Any
) -> AsyncIterator[tuple[Engine, FakeRunner]]:
    runner = FakeRunner(num_blocks=num_blocks, block_size=4)
    config = EngineConfig(model="fake", cache_block_seq_len=4, enable_prefix_caching=enable_prefix_caching,
                          **config_fields)
    async with Engine.open(
        config, runner_factory=lambda _: runner, tokenizer=FakeTokenizer(), use_threads=use_threads
    ) as engine:
        yield engine, runner


def turn_context(  # type: ignore[no-untyped-def]
    engine: Engine, prompt: str, *, session_id: int = 1, interactive_mode: bool = True, max_tokens: int | None = 5
):
    return engine.interactive(
        InteractiveTurn(
            request_id="turn",
            session_id=session_id,
            prompt=prompt,
            interactive_mode=interactive_mode,
            sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
        )
    )


async def turn(engine: Engine, prompt: str, **fields: Any) -> list[CompletionOutput]:
    async with turn_context(engine, prompt, **fields) as outputs:
        return [output async for output in outputs]


def tokens(outputs: Sequence[CompletionOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def expected(prompt: Sequence[int], max_new: int) -> list[int]:
    spec = SampleSpec(sampling=GREEDY, output_index=0)
    return reference_tokens(prompt, spec, max_new, hash_next_token(1000), eos_token_ids=(EOS_ID,))


def first_turn_ids(text: str) -> list[int]:
    return TOKENIZER.encode_chat([{"role": "user", "content": text}])


def later_turn_ids(text: str, last_output_ids: Sequence[int]) -> list[int]:
    rendered = TOKENIZER.render_session_turn([], [{"role": "user", "content": text}], last_output_ids=last_output_ids)
    return TOKENIZER.encode(rendered, add_bos=False)


async def test_history_grows_and_each_turn_prefills_only_its_new_tokens() -> None:
    async with open_engine() as (engine, _):
        history: list[int] = []
        for index, text in enumerate(["hello", "and then?", "bye"]):
            new_ids = first_turn_ids(text) if index == 0 else later_turn_ids(text, history_outputs)
            prompt = history + new_ids
            computed_before = engine.statistics().computed_prompt_tokens_total
            outputs = await turn(engine, text)
            history_outputs = tokens(outputs)
            assert history_outputs == expected(prompt, 5)  # exact, reading parked KV back through the block tables
            assert {o.num_history_tokens for o in outputs} == {len(history)}
            assert {o.num_prompt_tokens - o.num_history_tokens for o in outputs} == {len(new_ids)}
            computed = engine.statistics().computed_prompt_tokens_total - computed_before
            # The previous answer's last token was sampled but never fed to the model: it is computed now.
            assert computed == (len(new_ids) if index == 0 else len(new_ids) + 1)
            assert outputs[0].num_cached_tokens == (0 if index == 0 else len(history) - 1)
            history = prompt + history_outputs
        assert engine.statistics().num_sessions == 1


async def test_a_second_turn_while_one_runs_is_busy_but_cancel_and_end_are_accepted() -> None:
    async with open_engine() as (engine, _):
        async with turn_context(engine, "hello", max_tokens=50):
            with pytest.raises(SessionBusyError, match="session_id 1 has a turn in progress"):
                await turn(engine, "again")
            with pytest.raises(SessionOccupiedError, match="session_id 1 is occupied"):
                async with engine.generate(GenerateRequest(request_id="g", prompt_token_ids=(100,), session_id=1)):
                    pass  # pragma: no cover
            await engine.cancel_session(1)
        await engine.end_session(1)
        assert engine.statistics().num_sessions == 0


async def test_cancel_stops_the_turn_and_keeps_its_partial_output() -> None:
    async with open_engine(use_threads=True) as (engine, runner):
        runner.hold()
        runner.allow(3)
        prompt = first_turn_ids("tell me a long story")
        async with turn_context(engine, "tell me a long story", max_tokens=100) as outputs:
            received = await take_tokens(outputs, 3)
            await engine.cancel_session(1)
            runner.allow(1000)
            received += [o async for o in outputs]
        assert received[-1].finish_reason is FinishReason.ABORT
        partial = tokens(received)
        assert 3 <= len(partial) < 100 and partial == expected(prompt, len(partial))
        follow_up = await turn(engine, "go on")
        assert follow_up[0].num_history_tokens == len(prompt) + len(partial)
        history = prompt + partial + later_turn_ids("go on", partial)
        assert tokens(follow_up) == expected(history, 5)


async def test_end_session_frees_its_kv_and_forgets_its_history() -> None:
    async with open_engine() as (engine, _):
        await turn(engine, "hello")
        assert engine.statistics().session_kv_usage > 0  # parked between turns
        await engine.end_session(1)
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics()
        assert stats.num_sessions == 0 and stats.num_free_blocks == stats.num_total_blocks
        again = await turn(engine, "hello")
        assert again[0].num_history_tokens == 0 and again[0].num_prompt_tokens == len(first_turn_ids("hello"))


async def test_non_interactive_turn_answers_then_ends_the_session() -> None:
    async with open_engine() as (engine, _):
        await turn(engine, "hello")
        outputs = await turn(engine, "last one", interactive_mode=False)
        assert outputs[0].num_history_tokens > 0 and outputs[-1].finish_reason is FinishReason.LENGTH
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics()
        assert stats.num_sessions == 0 and stats.num_free_blocks == stats.num_total_blocks
        assert (await turn(engine, "hello"))[0].num_history_tokens == 0


async def test_a_turn_that_fits_runs_out_with_length_and_one_that_does_not_fit_is_refused() -> None:
    async with open_engine(num_blocks=16) as (engine, _):  # a 64-token window
        outputs = await turn(engine, "hi", max_tokens=None)
        assert outputs[-1].finish_reason is FinishReason.LENGTH
        assert outputs[-1].num_prompt_tokens + outputs[-1].num_output_tokens == 64
        with pytest.raises(ContextLengthExceededError) as info:
            await turn(engine, "more")
        assert info.value.max_model_len == 64 and info.value.num_tokens > 64
        # The message says how to end the session, and how to start another.
        assert 'prompt ""' in info.value.message and "request_output_len 0" in info.value.message
        assert "interactive_mode false" in info.value.message and "session_id -1" in info.value.message
        assert engine.statistics().num_sessions == 1  # refused, not dropped


async def test_refused_first_turn_leaves_no_session_behind() -> None:
    async with open_engine(num_blocks=16) as (engine, _):
        with pytest.raises(ContextLengthExceededError) as info:
            await turn(engine, "x" * 100, session_id=9)
        assert engine.statistics().num_sessions == 0
        assert "shorten it" in info.value.message and "history" not in info.value.message  # not "fills the window"


async def test_evicted_session_recomputes_its_history_and_answers_exactly() -> None:
    # Prefix caching off: with it, blocks of the first turn still in the cache would be reused after the eviction.
    async with open_engine(num_blocks=24, enable_prefix_caching=False) as (engine, _):  # 96 tokens of KV
        first = await turn(engine, "hello")
        assert engine.statistics().session_kv_usage > 0
        # A stateless request that needs nearly the whole cache evicts the parked session.
        sampling = SamplingParams(temperature=0.0, max_tokens=20)
        big = GenerateRequest(request_id="big", prompt_token_ids=tuple(range(100, 170)), sampling=sampling)
        async with engine.generate(big) as outputs:
            assert len(tokens([o async for o in outputs])) == 20
        assert engine.statistics().num_preemptions == 0
        computed_before = engine.statistics().computed_prompt_tokens_total
        follow_up = await turn(engine, "again")
        history = first_turn_ids("hello") + tokens(first) + later_turn_ids("again", tokens(first))
        assert tokens(follow_up) == expected(history, 5)
        assert engine.statistics().computed_prompt_tokens_total - computed_before == len(history)
        assert follow_up[0].num_cached_tokens == 0


async def test_new_session_ids_are_unique_and_skip_sessions_in_use() -> None:
    async with open_engine() as (engine, _):
        first = engine.new_session_id()
        await turn(engine, "hi", session_id=first + 1)
        second = engine.new_session_id()
        assert second != first and second != first + 1


async def test_idle_sessions_hold_kv_that_is_not_load() -> None:
    async with open_engine() as (engine, _):
        async with turn_context(engine, "hello", max_tokens=40) as outputs:
            await take_tokens(outputs, 2)
            running = engine.statistics()
            assert running.kv_usage > 0 and running.session_kv_usage == 0
            async for _ in outputs:
                pass
        for session_id in range(2, 12):
            await turn(engine, "hello", session_id=session_id)
        idle = engine.statistics()
        assert idle.num_sessions == 11 and idle.num_running == 0
        assert idle.kv_usage == 0.0 and idle.session_kv_usage > 0.3  # what a router reads says: not busy
        assert idle.num_free_blocks + round(idle.session_kv_usage * idle.num_total_blocks) == idle.num_total_blocks


async def test_idle_sessions_expire_and_free_their_kv(autojump_clock: trio.abc.Clock) -> None:
    async with open_engine(session_idle_timeout_s=60.0) as (engine, _):
        await turn(engine, "hello", session_id=1)
        await trio.sleep(40)
        await turn(engine, "hello", session_id=2)
        await trio.sleep(30)  # session 1: idle 70 s; session 2: 30 s
        stats = engine.statistics()
        assert stats.num_sessions == 1 and stats.num_expired_sessions == 1
        follow_up = await turn(engine, "again", session_id=2)
        assert follow_up[0].num_history_tokens > 0  # session 2 lives on
        await trio.sleep(100)
        stats = engine.statistics()
        assert stats.num_sessions == 0 and stats.num_expired_sessions == 2
        assert stats.num_free_blocks == stats.num_total_blocks


async def test_a_busy_session_never_expires(autojump_clock: trio.abc.Clock) -> None:
    async with open_engine(session_idle_timeout_s=10.0) as (engine, _):
        async with turn_context(engine, "hello", max_tokens=20) as outputs:
            await take_tokens(outputs, 1)
            await trio.sleep(60)  # a slow client: the turn is open all along
            assert engine.statistics().num_sessions == 1
            async for _ in outputs:
                pass
        assert engine.statistics().num_sessions == 1 and engine.statistics().num_expired_sessions == 0


async def test_the_session_cap_holds() -> None:
    async with open_engine(max_sessions=3) as (engine, _):
        for session_id in (1, 2, 3):
            await turn(engine, "hi", session_id=session_id)
        with pytest.raises(SessionLimitError, match="limit of 3 interactive sessions"):
            await turn(engine, "hi", session_id=4)
        assert (await turn(engine, "more", session_id=2))[0].num_history_tokens > 0  # existing sessions go on
        await engine.end_session(1)
        await turn(engine, "hi", session_id=4)
        assert engine.statistics().num_sessions == 3


async def test_a_long_turn_is_tokenized_in_a_thread_and_a_second_turn_meanwhile_is_busy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from trillm.actors import session as session_module

    monkeypatch.setattr(session_module, "OFF_LOOP_CHARS", 3)
    async with open_engine() as (engine, _):
        encode_chat = engine.tokenizer.encode_chat

        def slow_encode_chat(messages: list[dict[str, Any]]) -> list[int]:
            time.sleep(0.3)  # a big prompt's tokenizing: it must not hold up the event loop
            return encode_chat(messages)

        monkeypatch.setattr(engine.tokenizer, "encode_chat", slow_encode_chat)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(turn, engine, "a long prompt")
            start = time.perf_counter()
            await trio.sleep(0.05)
            assert time.perf_counter() - start < 0.2  # the loop ran on while the thread tokenized
            with pytest.raises(SessionBusyError):
                await turn(engine, "hi")
        follow_up = await turn(engine, "again")
        assert follow_up[0].num_history_tokens == len(first_turn_ids("a long prompt")) + 5


async def test_a_turn_that_continues_an_unknown_session_is_refused_and_starts_nothing() -> None:
    def continuing(session_id: int) -> InteractiveTurn:
        return InteractiveTurn(request_id="again", session_id=session_id, prompt="and then?", interactive_mode=True,
                               sampling=SamplingParams(temperature=0.0, max_tokens=3), continues=True)

    async with open_engine() as (engine, _):
        with pytest.raises(SessionNotFoundError) as info:
            async with engine.interactive(continuing(77)) as outputs:
                [o async for o in outputs]
        assert "new session" in str(info.value) and engine.statistics().num_sessions == 0
        first = await turn(engine, "hello", session_id=77)
        async with engine.interactive(continuing(77)) as outputs:
            later = [o async for o in outputs]
        assert later[0].num_history_tokens == first[-1].num_prompt_tokens + first[-1].num_output_tokens
