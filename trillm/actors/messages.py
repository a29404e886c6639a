"""Messages: every value that crosses a Trio channel or a rank-process pipe.

All classes are frozen attrs value objects with no behaviour beyond cheap derived properties. Fields hold immutable
values (tuples, strings, numbers, other frozen messages). The flow is:

    HTTP handler ──GenerateRequest──▶ Engine ──Submit/Abort/ReleaseSession──▶ BatcherActor
    BatcherActor ──StepPlan/Shutdown──▶ GPUWorkerActor ──(pipe)──▶ rank process (gpu/rank.py)
    rank process ──RankReady/StepResult/RankFailed──▶ GPUWorkerActor ──▶ BatcherActor
    BatcherActor ──TokenEvent──▶ per-request channel ──▶ Engine.generate ──CompletionOutput──▶ HTTP handler
"""

from __future__ import annotations

import enum
from typing import Union

import attrs


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
class Submit:
    """Engine → Batcher, once per sequence: admit it to the waiting queue.

    `events` is the sequence's own TokenEvent channel; the Batcher sends with `send_nowait` (the buffer is bounded by
    the sequence's token budget) and treats a closed channel as an abort.
    """

    seq_id: int
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # seed already resolved to an int
    max_new_tokens: int  # resolved: min(max_tokens, window - prompt)
    events: object  # trio.MemorySendChannel[TokenEvent]; typed loosely so this module needs no Trio
    session_id: int | None = None
    keep_kv: bool = False


@attrs.frozen(kw_only=True)
class Abort:
    """Engine → Batcher: stop a sequence (client gone, stop string found, cancel); its blocks are freed next step."""

    seq_id: int
    reason: FinishReason = FinishReason.ABORT


@attrs.frozen(kw_only=True)
class ReleaseSession:
    """SessionActor → Batcher, when a session ends: free the KV blocks parked under `session_id`."""

    session_id: int


@attrs.frozen(kw_only=True)
class TokenEvent:
    """Batcher → one sequence's channel, after each step that sampled for it (or when it ends without sampling).

    `token_ids` are the new tokens (usually one; none when the sequence was aborted or failed between steps).
    `num_cached_tokens` is how many prompt tokens were reused from parked or prefix-cached KV instead of computed.
    """

    seq_id: int
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # set when the engine failed: the request must fail with 503


BatcherInbox = Union[Submit, Abort, ReleaseSession]


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


# --------------------------------------------------------------------------------------------------------------------
# BatcherActor ⇄ rank processes


@attrs.frozen(kw_only=True)
class SampleSpec:
    """Part of a SeqStep whose last position is sampled: the parameters and the context penalties need.

    `output_index` is the index of the token being sampled among the sequence's outputs (0 for the first); with
    `sampling.seed` it fully determines the random draw. `history_token_ids` (prompt + outputs so far) is filled only
    when penalties are on; `num_prompt_tokens` splits it.
    """

    sampling: SamplingParams
    output_index: int
    eos_token_ids: tuple[int, ...] = ()  # masked while output_index < min_tokens (unless ignore_eos...)
    history_token_ids: tuple[int, ...] = ()
    num_prompt_tokens: int = 0


PREVIOUS_TOKEN = -1  # a SeqStep token id meaning "the token this rank last sampled for this seq_id" (step overlap)


@attrs.frozen(kw_only=True)
class SeqStep:
    """One sequence's share of a StepPlan: compute `token_ids` at positions `start_pos ...` into its KV blocks.

    `block_table` lists the KV blocks for positions [0, start_pos + len(token_ids)). A prefill chunk that does not
    reach the end of the prompt has `sample=None`. With step overlap a decode's token may be `PREVIOUS_TOKEN`: the
    Batcher planned this step before the previous one's sample came back, and every rank substitutes the token it
    sampled for this `seq_id` in the last plan that sampled it (that plan is always the one just before this one).
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    sample: SampleSpec | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@attrs.frozen(kw_only=True)
class StepPlan:
    """Batcher → every rank, once per engine step: the batch to run. Ranks answer in step order.

    Prefill steps (any SeqStep with more than one token or start_pos 0) and decode steps may mix; ranks order
    nothing and return samples in `seqs` order.
    """

    step_id: int
    seqs: tuple[SeqStep, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_tokens == 1 for s in self.seqs)


@attrs.frozen(kw_only=True)
class Shutdown:
    """Batcher/Engine → every rank, at shutdown: finish the current step, release the GPU, exit."""


@attrs.frozen(kw_only=True)
class SampledToken:
    """Part of a StepResult: the token sampled for one sequence."""

    seq_id: int
    token_id: int
    logprob: TokenLogprob | None = None


@attrs.frozen(kw_only=True)
class StepResult:
    """Rank 0 → Batcher, once per StepPlan: the sampled tokens, in the plan's order of sampled sequences.

    Ranks other than 0 answer with an empty `sampled` as an acknowledgement.
    """

    step_id: int
    sampled: tuple[SampledToken, ...]
    elapsed_s: float = 0.0  # time the rank spent on the step (host + device)


@attrs.frozen(kw_only=True)
class KVCacheLayout:
    """Rank → Batcher, once at start: the paged KV cache the rank allocated."""

    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int  # per rank, after the tensor-parallel split
    head_dim: int
    dtype: str


@attrs.frozen(kw_only=True)
class RankReady:
    """Rank process → its GPUWorkerActor, once the model is loaded and the KV cache allocated."""

    rank: int
    layout: KVCacheLayout
    device_name: str
    max_model_len: int
    vocab_size: int


@attrs.frozen(kw_only=True)
class RankFailed:
    """Rank process → its GPUWorkerActor, when it caught an exception: the rank exits after sending this."""

    rank: int
    message: str
    traceback: str = ""


RankInbox = Union[StepPlan, Shutdown]
RankOutbox = Union[RankReady, StepResult, RankFailed]
