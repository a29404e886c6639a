"""Fakes for actor and policy tests: a runner that really pages tokens through a KV block pool.

`FakeRunner` keeps, per block slot, the token id "computed" there. Each StepPlan writes its tokens at their positions
through the block tables, and each sampled sequence's next token is a pure function of the context it reads *back
from the cache*. A wrong block table, a lost block, a shared block overwritten or a position off by one therefore
changes the generated tokens, and `reference_tokens` (the same function over the true token list) catches it.

`PREVIOUS_TOKEN` placeholders (step overlap) are substituted exactly as ModelRunner does: by the token this runner
sampled for the seq_id in the latest plan that sampled it, forgetting seq_ids absent from the latest plan.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import attrs
import pytest

from trillm.protocol.api import CompletionOutput, TokenLogprob
from trillm.protocol.step import PREVIOUS_TOKEN, KVCacheLayout, SampleSpec, SampledToken, StepPlan, StepResult
from trillm.actors.batcher import BatcherActor
from trillm.config import EngineConfig

NextToken = Callable[[Sequence[int], SampleSpec], int]
FIRST_TEXT_ID = 10  # ids below this are "special" in the fakes (EOS lives there)
EOS_ID = 2
SPECIALS = {0: "<pad>", 1: "<|im_start|>", 2: "<|im_end|>"}


def hash_next_token(vocab_size: int) -> NextToken:
    """Next token = a hash of (context, seed, output index), never below FIRST_TEXT_ID: no EOS by chance."""

    def next_token(context: Sequence[int], spec: SampleSpec) -> int:
        key = hash((tuple(context), spec.sampling.seed if not spec.sampling.is_greedy else 0))
        return FIRST_TEXT_ID + key % (vocab_size - FIRST_TEXT_ID)

    return next_token


class FakeRunner:
    """An in-process stand-in for ModelRunner: `.layout` and `.step(plan)` over a simulated paged KV cache."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        vocab_size: int = 1000,
        next_token: NextToken | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.layout = KVCacheLayout(
            num_blocks=num_blocks, block_size=block_size, num_layers=1, num_kv_heads=1, head_dim=1, dtype="float32"
        )
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.device_name = "fake"
        self.next_token = next_token or hash_next_token(vocab_size)
        self._slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.plans: list[StepPlan] = []  # as received (placeholders left in)
        self._last_sampled: dict[int, int] = {}
        self.fail_at_step: int | None = None  # raise in this step (1-based), as a crashing runner would
        self._permits: threading.Semaphore | None = None
        self.is_closed = False

    def hold(self) -> None:
        """From now on each step waits for a permit from `allow` (run the engine with threads for this)."""
        self._permits = threading.Semaphore(0)

    def allow(self, num_steps: int) -> None:
        assert self._permits is not None
        self._permits.release(num_steps)

    def step(self, plan: StepPlan) -> StepResult:
        if self._permits is not None and not self._permits.acquire(timeout=10):
            raise RuntimeError("FakeRunner: no permit for a step within 10 s")
        self.plans.append(plan)
        if self.fail_at_step == len(self.plans):
            raise RuntimeError(f"FakeRunner failed at step {len(self.plans)}")
        plan = self._substitute(plan)
        size = self.layout.block_size
        sampled = []
        for seq in plan.seqs:
            assert len(seq.block_table) == -(-seq.context_len // size), "block table does not match the context"
            for offset, token_id in enumerate(seq.token_ids):
                position = seq.start_pos + offset
                self._slots[seq.block_table[position // size]][position % size] = token_id
            if seq.sample is None:
                continue
            context = [self._slots[seq.block_table[p // size]][p % size] for p in range(seq.context_len)]
            assert None not in context, f"seq {seq.seq_id} reads KV that was never written"
            token_id = self.next_token(context, seq.sample)  # type: ignore[arg-type]
            logprob = None
            if seq.sample.sampling.logprobs is not None:
                logprob = TokenLogprob(token_id=token_id, logprob=-0.5, top=((token_id, -0.5),))
            sampled.append(SampledToken(seq_id=seq.seq_id, token_id=token_id, logprob=logprob))
            self._last_sampled[seq.seq_id] = token_id
        return StepResult(step_id=plan.step_id, sampled=tuple(sampled))

    def _substitute(self, plan: StepPlan) -> StepPlan:
        last = self._last_sampled
        self._last_sampled = {s.seq_id: last[s.seq_id] for s in plan.seqs if s.seq_id in last}
        seqs = []
        for seq in plan.seqs:
            if PREVIOUS_TOKEN in seq.token_ids:
                assert seq.token_ids == (PREVIOUS_TOKEN,), "a placeholder only ever stands for a single decode token"
                assert seq.seq_id in last, f"seq {seq.seq_id}: PREVIOUS_TOKEN without a previous sample"
                seq = attrs.evolve(seq, token_ids=(last[seq.seq_id],))
            seqs.append(seq)
        return attrs.evolve(plan, seqs=tuple(seqs))

    def close(self) -> None:
        self.is_closed = True


def reference_tokens(
    prompt: Sequence[int],
    spec: SampleSpec,
    max_new_tokens: int,
    next_token: NextToken,
    *,
    eos_token_ids: Sequence[int] = (),
) -> list[int]:
    """What a sequence must generate: `next_token` over the true token list, stopping at EOS or the budget."""
    context = list(prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        token_id = next_token(context, spec)
        out.append(token_id)
        context.append(token_id)
        if token_id in eos_token_ids and len(out) > spec.sampling.min_tokens and not spec.sampling.ignore_eos:
            break
    return out


class FakeTokenizer:
    """Character-level tokenizer with the Tokenizer interface: id = code point + FIRST_TEXT_ID, ChatML specials.

    Every FakeRunner token (ids FIRST_TEXT_ID..vocab) decodes to exactly one character, so text offsets are token
    offsets. No BOS is added (like SmolLM2's).
    """

    eos_token_ids = (EOS_ID,)
    bos_token_id = None
    vocab_size = 0x110000 + FIRST_TEXT_ID
    all_special_ids = frozenset(SPECIALS)
    generation_defaults: dict[str, float | int] = {}

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = []
        while text:
            special = next((i for i, s in SPECIALS.items() if text.startswith(s)), None)
            if special is not None:
                ids.append(special)
                text = text[len(SPECIALS[special]) :]
            else:
                ids.append(ord(text[0]) + FIRST_TEXT_ID)
                text = text[1:]
        return ids

    def decode(
        self, ids: Sequence[int], *, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = False
    ) -> str:
        return "".join(self._piece(i) for i in ids if not (i in SPECIALS and skip_special_tokens))

    @staticmethod
    def _piece(token_id: int) -> str:
        if token_id in SPECIALS:
            return SPECIALS[token_id]
        return chr(token_id - FIRST_TEXT_ID) if token_id >= FIRST_TEXT_ID else f"<unused{token_id}>"

    def added_token(self, token_id: int) -> tuple[str, bool] | None:
        return (SPECIALS[token_id], True) if token_id in SPECIALS else None

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        system = [{"role": "system", "content": "Be brief."}]
        return self.encode(self.render_chat(system + messages))

    def render_session_turn(
        self, history: list[dict[str, Any]], new_messages: list[dict[str, Any]], *, last_output_ids: Sequence[int]
    ) -> str:
        bridge = "\n" if last_output_ids and last_output_ids[-1] == EOS_ID else "<|im_end|>\n"
        return bridge + self.render_chat(new_messages)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)


def set_overlap_default(patch: pytest.MonkeyPatch, enabled: bool) -> None:
    """Make `enable_overlap` default to `enabled` for every EngineConfig and every BatcherActor built meanwhile.

    Both: tests build BatcherActors directly, and the Engine may pass EngineConfig.enable_overlap on to its Batcher.
    """
    for function in (BatcherActor.__init__, EngineConfig.__init__):
        defaults = function.__kwdefaults__
        assert defaults is not None and "enable_overlap" in defaults
        patch.setitem(defaults, "enable_overlap", enabled)


async def take_tokens(outputs: AsyncIterator[CompletionOutput], num_tokens: int) -> list[CompletionOutput]:
    """Outputs until they hold `num_tokens` tokens (a consumer that fell behind gets several tokens per output)."""
    taken: list[CompletionOutput] = []
    while sum(len(o.token_ids) for o in taken) < num_tokens:
        taken.append(await outputs.__anext__())
    return taken
