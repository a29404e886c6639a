"""The Engine over real rank processes and SmolLM2-135M-Instruct: greedy batch invariance, preemption, abort.

One engine is shared by the module (EngineThread); the tiny-cache test opens its own. Prompts are short plain text
and answers 4 tokens, to keep CPU time modest: every "alone" run is a batch of one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import trio
import trio.testing

from engine_thread import EngineThread
from fakes import set_overlap_default
from trillm.actors.engine import Engine
from trillm.protocol.api import GenerateRequest, SamplingParams
from trillm.config import EngineConfig

pytestmark = pytest.mark.slow

PROMPTS = (
    "The capital of France is", "Once upon a time", "1, 2, 3, 4,", "The quick brown fox", "Water boils at",
    "My favourite colour is", "In the beginning", "The best way to learn Python is", "Cats and dogs",
    "Hello, my name is", "The sun rises in the", "A haiku about the sea:", "def fibonacci(n):",
    "The largest planet is", "Roses are red,", "Paris is known for",
)
MAX_TOKENS = 4


def engine_config(folder: str, **fields: object) -> EngineConfig:
    defaults: dict[str, object] = {"session_len": 64, "cache_block_seq_len": 16, "max_batch_size": 16}
    return EngineConfig(model=folder, **{**defaults, **fields})  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=[False, True], ids=["lockstep", "overlap"])
def overlap_mode(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Every Engine of these tests runs with step overlap off, then on (module-wide: the engines are shared)."""
    with pytest.MonkeyPatch.context() as patch:
        set_overlap_default(patch, request.param)
        yield request.param


@pytest.fixture(scope="module")
def shared(smollm2_folder: str, overlap_mode: bool) -> Iterator[EngineThread]:
    thread = EngineThread(engine_config(smollm2_folder)).start()
    yield thread
    thread.stop()


def greedy(prompt: Sequence[int], max_tokens: int = MAX_TOKENS) -> GenerateRequest:
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return GenerateRequest(request_id="r", prompt_token_ids=tuple(prompt), sampling=sampling)


async def generate(engine: Engine, prompt: Sequence[int]) -> list[int]:
    async with engine.generate(greedy(prompt)) as outputs:
        return [t async for o in outputs for t in o.token_ids]


async def one_at_a_time(engine: Engine) -> list[list[int]]:
    return [await generate(engine, engine.tokenizer.encode(text)) for text in PROMPTS]


async def staggered(engine: Engine) -> list[list[int]]:
    """All prompts at once, arriving in groups of four one step apart (joining running batches mid-decode)."""
    results: dict[int, list[int]] = {}
    first_step = engine.statistics().steps

    async def run(index: int) -> None:
        while engine.statistics().steps < first_step + index // 4:
            await trio.sleep(0.001)
        results[index] = await generate(engine, engine.tokenizer.encode(PROMPTS[index]))

    async with trio.open_nursery() as nursery:
        for index in range(len(PROMPTS)):
            nursery.start_soon(run, index)
    return [results[index] for index in range(len(PROMPTS))]


_ALONE: dict[bool, list[list[int]]] = {}  # overlap mode → the tokens of the prompts run one at a time


@pytest.fixture(scope="module")
def alone(shared: EngineThread, overlap_mode: bool) -> list[list[int]]:
    tokens = shared.call(one_at_a_time)
    assert all(tokens)
    _ALONE[overlap_mode] = tokens
    assert len(set(map(str, _ALONE.values()))) == 1, "overlap and lockstep generated different tokens"
    return tokens


def test_greedy_tokens_are_the_same_alone_and_among_16_staggered_requests(
    shared: EngineThread, alone: list[list[int]]
) -> None:
    steps_before = shared.call(_steps)
    assert shared.call(staggered) == alone
    assert shared.call(_steps) - steps_before < len(PROMPTS) * MAX_TOKENS  # they really were batched


def test_greedy_tokens_survive_preemption_with_a_tiny_kv_cache(smollm2_folder: str, alone: list[list[int]]) -> None:
    # 8 blocks of 4 tokens, one 32-token window's worth: the 16 requests need up to 4 blocks each.
    bytes_per_block = 2 * 30 * 3 * 4 * 64 * 4  # K and V, 30 layers, 3 KV heads, 4 tokens, head_dim 64, float32
    config = engine_config(
        smollm2_folder,
        session_len=32,
        cache_block_seq_len=4,
        cache_max_entry_count=1.0,
        cpu_memory_budget_bytes=8 * bytes_per_block,
    )
    thread = EngineThread(config).start()
    try:
        assert thread.call(_total_blocks) == 8
        assert thread.call(staggered) == alone
        assert thread.call(_preemptions) > 0
        assert thread.call(_free_blocks) == 8
    finally:
        thread.stop()


def test_aborted_and_dropped_requests_free_every_block(shared: EngineThread) -> None:
    async def scenario(engine: Engine) -> tuple[int, int, int]:
        prompt = engine.tokenizer.encode(PROMPTS[0])
        with trio.CancelScope() as scope:  # a client that disconnects: its handler is cancelled
            async with engine.generate(greedy(prompt, 40)) as outputs:
                async for _ in outputs:
                    scope.cancel()
        async with engine.generate(greedy(prompt, 40)) as outputs:  # a consumer that stops reading early
            async for _ in outputs:
                break
        with trio.fail_after(60):  # the aborts take effect when the step in flight (in the rank process) ends
            while (stats := engine.statistics()).num_running + stats.num_waiting:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        stats = engine.statistics()
        return stats.num_running + stats.num_waiting, stats.num_free_blocks, stats.num_total_blocks

    live, free, total = shared.call(scenario)
    assert live == 0 and free == total


async def _steps(engine: Engine) -> int:
    return engine.statistics().steps


async def _preemptions(engine: Engine) -> int:
    return engine.statistics().num_preemptions


async def _free_blocks(engine: Engine) -> int:
    return engine.statistics().num_free_blocks


async def _total_blocks(engine: Engine) -> int:
    return engine.statistics().num_total_blocks
