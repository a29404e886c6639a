"""Fakes for HTTP tests: FakeEngine and FakeTokenizer, with the public API of `Engine` and `Tokenizer` (team.md).

FakeTokenizer is byte-level (id = byte + 3) with ChatML specials 0 `<|pad|>`, 1 `<|im_start|>`, 2 `<|im_end|>`
(the EOS). FakeEngine answers every prompt with a fixed script (`SCRIPT`, rotated by the seed when sampling is not
greedy), one token per choice per step, then EOS; it honours max_tokens, the context window, stop strings (cut
before the match), logprobs, n, sessions (history, busy, cancel, end) and keeps block accounting that
`statistics()` reports, so tests can check that a disconnect frees a request's blocks.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from trillm.protocol.api import (
    CompletionOutput,
    EngineClient,
    EngineStats,
    FinishReason,
    GenerateRequest,
    InteractiveTurn,
    OutputStream,
    SamplingParams,
    TokenLogprob,
)
from trillm.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineDrainingError,
    InvalidRequestError,
    SessionBusyError,
    SessionNotFoundError,
    SessionOccupiedError,
)

SPECIALS = ("<|pad|>", "<|im_start|>", "<|im_end|>")
EOS_ID = 2
SCRIPT = "Hello! I am a fake model, and I answer every prompt with these same words."
BLOCK_SIZE = 16


class FakeTokenizer:
    """Byte-level tokenizer with ChatML specials; no BOS is added (like SmolLM2's)."""

    eos_token_ids = (EOS_ID,)
    bos_token_id = 1
    vocab_size = 256 + len(SPECIALS)
    all_special_ids = frozenset(range(len(SPECIALS)))

    def __init__(self, generation_defaults: dict[str, float | int] | None = None) -> None:
        self.generation_defaults = dict(generation_defaults or {})

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids: list[int] = []
        while text:
            special = next((i for i, s in enumerate(SPECIALS) if text.startswith(s)), None)
            if special is not None:
                ids.append(special)
                text = text[len(SPECIALS[special]):]
                continue
            ids.extend(b + len(SPECIALS) for b in text[0].encode())
            text = text[1:]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for token_id in ids:
            if token_id >= len(SPECIALS):
                out.append(token_id - len(SPECIALS))
            elif not skip_special_tokens:
                out.extend(SPECIALS[token_id].encode())
        return out.decode(errors="replace")

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        if any(m["role"] not in ("system", "developer", "user", "assistant", "tool", "function") for m in messages):
            raise InvalidRequestError("bad role", param="messages")
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.encode(self.render_chat(messages))

    def render_session_turn(self, history: list[dict[str, Any]], new_messages: list[dict[str, Any]], *,
                            last_output_ids: Sequence[int]) -> str:
        bridge = "\n" if last_output_ids and last_output_ids[-1] == EOS_ID else "<|im_end|>\n"
        return bridge + self.render_chat(new_messages)

    def token_text(self, token_id: int) -> str:
        return SPECIALS[token_id] if token_id < len(SPECIALS) else self.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        return SPECIALS[token_id].encode() if token_id < len(SPECIALS) else bytes([token_id - len(SPECIALS)])


@attrs.define
class _Session:
    history: list[int] = attrs.field(factory=list)
    is_busy: bool = False
    cancel: trio.Event | None = None


@attrs.define
class _Choice:
    index: int
    token_ids: list[int]  # the script this choice will emit
    max_new_tokens: int
    stops: tuple[str, ...]
    decoder: Any = attrs.field(factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    num_output_tokens: int = 0
    text: str = ""  # detokenized output so far
    num_emitted_chars: int = 0
    finish_reason: FinishReason | None = None


class FakeEngine:
    """A deterministic, in-process stand-in for `trillm.actors.engine.Engine`."""

    def __init__(self, *, max_model_len: int = 512, step_s: float = 0.001, num_total_blocks: int = 256,
                 generation_defaults: dict[str, float | int] | None = None) -> None:
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.tokenizer = FakeTokenizer(generation_defaults)
        self.created = int(time.time())
        self.device_name = "fake"
        self.is_alive = True
        self.failure: str | None = None
        self.step_s = step_s
        self.num_total_blocks = num_total_blocks
        self.is_draining = False
        self.requests: list[GenerateRequest] = []  # every admitted request, for assertions
        self.aborted: list[str] = []  # request ids left before they finished
        self.sessions: dict[int, _Session] = {}
        self._next_session_id = 1_000_000
        self._running_blocks: dict[object, int] = {}
        self._prompt_tokens = self._generation_tokens = self._computed_prompt_tokens = self._steps = 0

    # -------------------------------------------------------------------------------------------- public API

    def statistics(self) -> EngineStats:
        used = sum(self._running_blocks.values()) + sum(
            -(-len(s.history) // BLOCK_SIZE) for s in self.sessions.values())
        return EngineStats(
            num_running=len(self._running_blocks), num_waiting=0, num_sessions=len(self.sessions),
            kv_usage=used / self.num_total_blocks, num_free_blocks=self.num_total_blocks - used,
            num_total_blocks=self.num_total_blocks, prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            computed_prompt_tokens_total=self._computed_prompt_tokens,
            cached_prompt_tokens_total=self._prompt_tokens - self._computed_prompt_tokens,
            prefix_cache_query_tokens_total=0, prefix_cache_hit_tokens_total=0, num_preemptions=0,
            steps=self._steps,
        )

    def drain(self) -> None:
        self.is_draining = True

    def fail(self, reason: str = "rank 0 died") -> None:
        self.is_alive = False
        self.failure = reason

    def new_session_id(self) -> int:
        self._next_session_id += 1
        return self._next_session_id

    def generate(self, request: GenerateRequest) -> OutputStream:
        self._admit_check(len(request.prompt_token_ids), request.prompt_field)
        if request.session_id is not None and self.sessions.get(request.session_id, _Session()).history:
            raise SessionOccupiedError(request.session_id)
        return self._run(request.request_id, request.prompt_token_ids, request.sampling, request.n, request.stop,
                         num_history_tokens=0)

    def interactive(self, turn: InteractiveTurn) -> OutputStream:
        session_id, prompt, interactive_mode = turn.session_id, turn.prompt, turn.interactive_mode
        sampling, stop, request_id = turn.sampling, turn.stop, turn.request_id
        self._admit_check(1)
        if turn.continues and not self.sessions.get(session_id, _Session()).history:
            raise SessionNotFoundError(session_id)
        session = self.sessions.setdefault(session_id, _Session())
        if session.is_busy:
            raise SessionBusyError(session_id)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if session.history:
            new_ids = self.tokenizer.encode(self.tokenizer.render_session_turn(
                [], messages, last_output_ids=session.history[-1:]))
        else:
            new_ids = self.tokenizer.encode_chat(messages)
        total = len(session.history) + len(new_ids)
        if total >= self.max_model_len:
            if not session.history:
                del self.sessions[session_id]
            raise ContextLengthExceededError(total, self.max_model_len, param="prompt",
                                             hint="End the session (interactive_mode false) to start a new one.")
        return self._turn(session_id, session, new_ids, interactive_mode, sampling, stop, request_id)

    async def end_session(self, session_id: int) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None and session.cancel is not None:
            session.cancel.set()

    async def cancel_session(self, session_id: int) -> None:
        session = self.sessions.get(session_id)
        if session is not None and session.cancel is not None:
            session.cancel.set()

    # -------------------------------------------------------------------------------------------- internals

    def _admit_check(self, num_prompt_tokens: int, prompt_field: str = "prompt") -> None:
        if not self.is_alive:
            raise EngineDeadError(self.failure or "dead")
        if self.is_draining:
            raise EngineDrainingError("draining")
        if num_prompt_tokens == 0:
            raise InvalidRequestError(f"{prompt_field} is empty: there is nothing to continue from", param=prompt_field,
                                      code="empty_prompt")
        if num_prompt_tokens >= self.max_model_len:
            raise ContextLengthExceededError(num_prompt_tokens, self.max_model_len, param=prompt_field)

    def _script(self, sampling: SamplingParams, index: int) -> list[int]:
        text = SCRIPT
        if not sampling.is_greedy and sampling.seed is not None:
            shift = (sampling.seed + index) % len(SCRIPT)
            text = SCRIPT[shift:] + SCRIPT[:shift]
        ids = self.tokenizer.encode(text)
        return ids if sampling.ignore_eos else ids + [EOS_ID]

    @asynccontextmanager
    async def _turn(self, session_id: int, session: _Session, new_ids: list[int], interactive_mode: bool,
                    sampling: SamplingParams, stop: tuple[str, ...], request_id: str) -> AsyncIterator[Any]:
        session.is_busy = True
        session.cancel = trio.Event()
        num_history = len(session.history)
        prompt = tuple(session.history + new_ids)
        self._computed_prompt_tokens += len(new_ids) - len(prompt)  # _run adds the whole prompt back
        outputs: list[int] = []
        try:
            async with self._run(request_id, prompt, sampling, 1, stop, num_history_tokens=num_history,
                                 cancel=session.cancel, collect=outputs) as stream:
                yield stream
        finally:
            session.is_busy = False
            session.cancel = None
            if interactive_mode and session_id in self.sessions:
                session.history = list(prompt) + outputs
            else:
                self.sessions.pop(session_id, None)

    @asynccontextmanager
    async def _run(self, request_id: str, prompt: tuple[int, ...], sampling: SamplingParams, n: int,
                   stops: tuple[str, ...], *, num_history_tokens: int, cancel: trio.Event | None = None,
                   collect: list[int] | None = None) -> AsyncIterator[Any]:
        self.requests.append(GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling, n=n,
                                             stop=stops))
        self._prompt_tokens += len(prompt) * n
        self._computed_prompt_tokens += len(prompt)
        window = self.max_model_len - len(prompt)
        limit = window if sampling.max_tokens is None else min(sampling.max_tokens, window)
        choices = [_Choice(index=i, token_ids=self._script(sampling, i), max_new_tokens=limit, stops=stops)
                   for i in range(n)]
        for choice in choices:
            self._running_blocks[(request_id, choice.index)] = -(-len(prompt) // BLOCK_SIZE)
        try:
            yield self._outputs(request_id, prompt, sampling, choices, num_history_tokens, cancel, collect)
        finally:
            if any(c.finish_reason is None for c in choices):
                self.aborted.append(request_id)
            for choice in choices:
                self._running_blocks.pop((request_id, choice.index), None)

    async def _outputs(self, request_id: str, prompt: tuple[int, ...], sampling: SamplingParams,
                       choices: list[_Choice], num_history_tokens: int, cancel: trio.Event | None,
                       collect: list[int] | None) -> AsyncIterator[CompletionOutput]:
        while any(c.finish_reason is None for c in choices):
            await trio.sleep(self.step_s)
            if not self.is_alive:
                raise EngineDeadError(self.failure or "dead")
            self._steps += 1
            for choice in choices:
                if choice.finish_reason is not None:
                    continue
                if cancel is not None and cancel.is_set():
                    choice.finish_reason = FinishReason.ABORT
                    yield self._output(choice, prompt, (), (), num_history_tokens)
                    continue
                token_id = choice.token_ids[choice.num_output_tokens % len(choice.token_ids)]
                choice.num_output_tokens += 1
                self._generation_tokens += 1
                if collect is not None:
                    collect.append(token_id)
                self._running_blocks[(request_id, choice.index)] = -(
                    -(len(prompt) + choice.num_output_tokens) // BLOCK_SIZE)
                if token_id == EOS_ID and not sampling.ignore_eos:
                    choice.finish_reason = FinishReason.STOP
                elif choice.num_output_tokens >= choice.max_new_tokens:
                    choice.finish_reason = FinishReason.LENGTH
                if token_id >= len(SPECIALS):
                    choice.text += choice.decoder.decode(bytes([token_id - len(SPECIALS)]))
                self._apply_stops(choice)
                logprobs: tuple[TokenLogprob, ...] = ()
                if sampling.logprobs is not None:
                    top = tuple((t % self.tokenizer.vocab_size, -0.25 - i)
                                for i, t in enumerate(range(token_id, token_id + max(sampling.logprobs, 1))))
                    logprobs = (TokenLogprob(token_id=token_id, logprob=-0.25, top=top),)
                yield self._output(choice, prompt, (token_id,), logprobs, num_history_tokens)

    def _apply_stops(self, choice: _Choice) -> None:
        for stop in choice.stops:
            at = choice.text.find(stop)
            if at >= 0:
                choice.text = choice.text[:at]
                choice.finish_reason = FinishReason.STOP

    def _output(self, choice: _Choice, prompt: tuple[int, ...], token_ids: tuple[int, ...],
                logprobs: tuple[TokenLogprob, ...], num_history_tokens: int) -> CompletionOutput:
        hold = 0 if choice.finish_reason is not None else max((len(s) - 1 for s in choice.stops), default=0)
        safe_end = max(len(choice.text) - hold, choice.num_emitted_chars)
        text = choice.text[choice.num_emitted_chars:safe_end]
        choice.num_emitted_chars = safe_end
        return CompletionOutput(index=choice.index, text=text, token_ids=token_ids, logprobs=logprobs,
                                finish_reason=choice.finish_reason, num_prompt_tokens=len(prompt),
                                num_output_tokens=choice.num_output_tokens, num_history_tokens=num_history_tokens)


def _satisfies_engine_client(engine: FakeEngine) -> EngineClient:
    return engine  # mypy (make test) checks that the fake has the real seam's shape
