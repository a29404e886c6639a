"""A random:<preset> model serves through the real Engine with the default model's tokenizer (it has none)."""

from __future__ import annotations

import pytest

from trillm.actors.engine import Engine
from trillm.protocol.api import GenerateRequest, SamplingParams
from trillm.config import EngineConfig

pytestmark = pytest.mark.slow


async def test_random_preset_engine_uses_the_default_tokenizer_and_generates(smollm2_folder: str) -> None:
    config = EngineConfig(model="random:tiny", tokenizer=smollm2_folder, session_len=256)
    async with Engine.open(config) as engine:
        assert engine.tokenizer.eos_token_ids == (2,)  # SmolLM2's <|im_end|>
        prompt = tuple(engine.tokenizer.encode("hello world"))
        greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        runs = []
        for attempt in range(2):
            request = GenerateRequest(request_id=f"r{attempt}", prompt_token_ids=prompt, sampling=greedy)
            async with engine.generate(request) as outputs:
                runs.append([token for out in [o async for o in outputs] for token in out.token_ids])
        assert len(runs[0]) == 6 and runs[0] == runs[1]  # random weights, but deterministic
