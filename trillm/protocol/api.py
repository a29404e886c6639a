"""The HTTP ↔ engine vocabulary: what a request asks for and what comes back, plus the `EngineClient` protocol.

Frozen attrs value objects with no behaviour beyond cheap derived properties and validators; they import no Trio
and no torch, so every layer can use them (rank processes read `SamplingParams` and `TokenLogprob` as plain data).

    HTTP handler ──GenerateRequest──▶ EngineClient.generate ──CompletionOutput*──▶ HTTP handler
    HTTP handler ──InteractiveTurn──▶ EngineClient.interactive ──CompletionOutput*──▶ HTTP handler

`EngineClient` is the one seam the HTTP layer calls: `trillm.actors.engine.Engine` satisfies it, and so does the
HTTP tests' `FakeEngine` (mypy checks both), so the fake cannot drift from the real engine unnoticed.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

import attrs

from trillm.protocol.wire import compact_pickle
class FinishReason(str, enum.Enum):
    """Why a sequence stopped: OpenAI's vocabulary plus LMDeploy's `abort`."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


def _non_negative(instance: object, attribute: attrs.Attribute[float] | attrs.Attribute[int], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _in_unit_interval(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value}")


def _penalty_range(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not -2.0 <= value <= 2.0:
        raise ValueError(f"{attribute.name} must be in [-2, 2], got {value}")


@compact_pickle
@attrs.frozen(kw_only=True)
class SamplingParams:
    """HTTP layer → Engine → rank: how to pick each next token of one sequence.

    Defaults are OpenAI's (temperature 1, top_p 1, no top_k). `seed=None` means "random": the Batcher resolves it to a
    concrete seed at submission so that a sequence samples the same tokens whatever else is in its batch and across
    preemption (the rank derives each token's randomness from `(seed, output index)` alone).
    """

    temperature: float = attrs.field(default=1.0, validator=_non_negative)
    top_p: float = attrs.field(default=1.0, validator=_in_unit_interval)
    top_k: int = attrs.field(default=0, validator=_non_negative)  # 0 = off
    min_p: float = attrs.field(default=0.0, validator=_in_unit_interval)
    repetition_penalty: float = attrs.field(default=1.0)  # > 0; 1 = off (HF semantics over prompt + output)
    presence_penalty: float = attrs.field(default=0.0, validator=_penalty_range)  # OpenAI semantics over output
    frequency_penalty: float = attrs.field(default=0.0, validator=_penalty_range)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to the logit)
    seed: int | None = None
    max_tokens: int | None = attrs.field(default=None)  # None = up to the context window
    min_tokens: int = attrs.field(default=0, validator=_non_negative)  # EOS and stop ids are masked before this
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = attrs.field(default=None)  # None = no logprobs; k >= 0 = sampled token's logprob plus the top k alternatives
    prompt_logprobs: int | None = attrs.field(default=None)  # None = off; k >= 0 = each prompt token's logprob + top k
    grammar: str | None = None  # constrained decoding: an llguidance grammar (trillm.structured.grammar builds it)

    @repetition_penalty.validator
    def _check_repetition_penalty(self, attribute: attrs.Attribute[float], value: float) -> None:
        if value <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {value}")

    @max_tokens.validator
    def _check_max_tokens(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and value < 0:
            raise ValueError(f"max_tokens must be >= 0, got {value}")

    @logprobs.validator
    def _check_logprobs(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and not 0 <= value <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {value}")

    @prompt_logprobs.validator
    def _check_prompt_logprobs(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and not 0 <= value <= 20:
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {value}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# --------------------------------------------------------------------------------------------------------------------
# HTTP layer / SessionActor → Engine → BatcherActor


@attrs.frozen(kw_only=True)
class GenerateRequest:
    """HTTP handler → Engine.generate, once per request: what to generate.

    `n` choices are generated as `n` sequences (choice i uses seed `seed + i` when a seed is given). `stop` strings
    are matched on detokenized text in the serving process; the text is cut before the stop string.
    `session_id` with `keep_kv=True` parks the sequence's KV blocks under that session when it finishes, so the
    session's next turn (whose prompt starts with this turn's prompt + output) prefills only its new tokens.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    n: int = 1
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    session_id: int | None = None
    keep_kv: bool = False
    prompt_field: str = "prompt"  # the request field the prompt came from: admission errors name it (`param`)
    # Requests with the same share key are one client request to the fair scheduler (policy/fair_share.py): the
    # prompts of one /v1/completions request. "": the request is a share of its own (its n choices).
    share_key: str = ""


@attrs.frozen(kw_only=True)
class InteractiveTurn:
    """HTTP handler → Engine.interactive → SessionActor, once per turn of an interactive session (API.md).

    `prompt` is the turn's new text (one user message) or its new OpenAI messages; the session adds its history.
    `interactive_mode=False` answers the turn and then ends the session. `continues=True` (the client's
    `x-session-continue` header) means the session must already exist: an unknown one is an error, not a new one.
    """

    request_id: str
    session_id: int
    prompt: str | tuple[Mapping[str, Any], ...]
    interactive_mode: bool
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    continues: bool = False


@compact_pickle
@attrs.frozen(kw_only=True)
class TokenLogprob:
    """Rank 0 → Batcher → Engine, per sampled token when logprobs were asked: its log-probability and the top ones.

    `top` holds the `SamplingParams.logprobs` most likely (token id, logprob) pairs, highest first, plus the sampled
    token when it is not among them (API.md: the sampled token is included in `top_logprobs`), so up to k + 1.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()




@attrs.frozen(kw_only=True)
class CompletionOutput:
    """Engine.generate → HTTP handler: one choice's progress, already detokenized.

    `text` and `token_ids` are deltas since the previous output of the same choice `index`; the counts are cumulative.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_history_tokens: int = 0  # interactive turns: tokens the session held before this turn
    # Set on a choice's first output when its request asked for prompt logprobs: one entry per prompt token after the
    # first (the first token has no logprob), in prompt order.
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@attrs.frozen(kw_only=True)
class EngineStats:
    """EngineClient.statistics(): queue sizes, KV usage and cumulative token counters (the /metrics source)."""

    num_running: int
    num_waiting: int
    num_sessions: int
    kv_usage: float  # 0-1: blocks running (and waiting) requests hold / total; idle sessions' KV is not load
    num_free_blocks: int
    num_total_blocks: int
    prompt_tokens_total: int
    generation_tokens_total: int
    computed_prompt_tokens_total: int  # prompt tokens actually prefilled (not reused from parked or cached KV)
    cached_prompt_tokens_total: int  # prompt tokens reused from the prefix cache or a session's parked KV
    prefix_cache_query_tokens_total: int  # prompt tokens looked up in the prefix cache (full blocks)
    prefix_cache_hit_tokens_total: int  # of those, found cached
    num_preemptions: int
    steps: int
    session_kv_usage: float = 0.0  # 0-1: blocks only idle sessions' parked KV holds / total (evicted under pressure)
    num_expired_sessions: int = 0  # sessions ended by --session-idle-timeout since start-up


class TextCodec(Protocol):
    """The tokenizer surface the HTTP layer uses (`trillm.tokenizer.Tokenizer` and the test fakes satisfy it)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def generation_defaults(self) -> Mapping[str, float | int]: ...

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str: ...

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


OutputStream = AbstractAsyncContextManager[AsyncIterator[CompletionOutput]]


@runtime_checkable
class AbortableOutputs(Protocol):
    """An OutputStream's iterator that can stop its sequences synchronously (the real Engine's RequestStream).

    Leaving the OutputStream's context aborts too, but only once the task that holds it has run; a request of 800
    prompts has 800 such tasks, and the serving loop needs a third of a second to unwind them all. `abort_nowait`
    lets the HTTP layer stop every one of them at once when the client leaves (`http/streams.py`): each stream adds
    its aborts to one `batch`, and one `send_batch_nowait` hands them all to the engine, so that they take effect
    between the same two engine steps.
    """

    def abort_nowait(self, batch: list[Any] | None = None) -> None: ...

    def send_batch_nowait(self, batch: list[Any]) -> None: ...


class EngineClient(Protocol):
    """What the HTTP layer calls: the real Engine and the HTTP tests' FakeEngine both satisfy it (mypy checks).

    Admission errors (raised when the context is entered, before any output): InvalidRequestError,
    ContextLengthExceededError, SessionOccupiedError, SessionBusyError, EngineDeadError, EngineDrainingError.
    After admission the output iterator may raise EngineDeadError.
    """

    @property
    def model_name(self) -> str: ...

    @property
    def created(self) -> int: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def device_name(self) -> str: ...

    @property
    def tokenizer(self) -> TextCodec: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...

    @property
    def is_draining(self) -> bool: ...

    def generate(self, request: GenerateRequest) -> OutputStream: ...

    def interactive(self, turn: InteractiveTurn) -> OutputStream: ...

    async def end_session(self, session_id: int) -> None: ...

    async def cancel_session(self, session_id: int) -> None: ...

    def new_session_id(self) -> int: ...

    def drain(self) -> None:
        """Refuse new requests from now on (EngineDrainingError) while the ones in flight finish."""

    def statistics(self) -> EngineStats: ...
