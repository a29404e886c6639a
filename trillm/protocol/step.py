"""The batcher ↔ rank vocabulary: one engine step's plan, its result, and what each sequence gets from it.

Frozen attrs value objects, no Trio and no torch: the Batcher (serving process), the pure Scheduler (policy/) and the
rank processes (gpu/) all speak it; `protocol/wire.py` frames it on the rank socket.

    BatcherActor ──StepPlan/Shutdown──▶ GPUWorkerActor ──(socket, wire.py)──▶ rank process (gpu/rank.py)
    rank process ──RankReady/StepResult/RankFailed──▶ GPUWorkerActor ──▶ BatcherActor
    Scheduler.apply(StepResult) ──TokenEvent──▶ one sequence's channel ──▶ RequestStream

Why each shape exists (docs/design.md has the whole ladder): a `StepPlan` is the only thing a rank needs to run a
step (token ids, positions, block tables, sampling) and is built fresh per step, so ranks never see the Scheduler's
mutable `Sequence`s; a `StepResult` carries only sampled ids (and logprobs when asked) back; a `TokenEvent` is one
sequence's share of a step, the unit the per-request channel carries.
"""

from __future__ import annotations

from typing import Protocol, Union

import attrs

from trillm.protocol.api import FinishReason, SamplingParams, TokenLogprob
from trillm.protocol.wire import compact_pickle


@compact_pickle
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
    grammar_replay: tuple[int, ...] | None = None  # constrained: restart the rank's matcher, replay these outputs


@compact_pickle
@attrs.frozen(kw_only=True)
class PromptLogprobsSpec:
    """Part of a prefill SeqStep of a sequence that asked for prompt logprobs: which of its positions to score.

    Row `first_pos + i` of the chunk (an absolute position) predicts the prompt token at `first_pos + i + 1`, which
    is `target_ids[i]`; the last target may lie just past the chunk (the next chunk's first token).
    """

    num_top: int
    first_pos: int
    target_ids: tuple[int, ...]


PREVIOUS_TOKEN = -1  # a SeqStep token id meaning "the token this rank last sampled for this seq_id" (step overlap)


@compact_pickle
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
    prompt_logprobs: PromptLogprobsSpec | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@compact_pickle
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


@compact_pickle
@attrs.frozen(kw_only=True)
class SampledToken:
    """Part of a StepResult: the token sampled for one sequence."""

    seq_id: int
    token_id: int
    logprob: TokenLogprob | None = None


@compact_pickle
@attrs.frozen(kw_only=True)
class PromptLogprobs:
    """Part of a StepResult: the logprobs of prompt tokens `first_pos, first_pos + 1, ...` of one sequence."""

    seq_id: int
    first_pos: int
    logprobs: tuple[TokenLogprob, ...]


@compact_pickle
@attrs.frozen(kw_only=True)
class StepResult:
    """Rank 0 → Batcher, once per StepPlan: the sampled tokens, in the plan's order of sampled sequences.

    Ranks other than 0 answer with an empty `sampled` as an acknowledgement.
    """

    step_id: int
    sampled: tuple[SampledToken, ...]
    elapsed_s: float = 0.0  # time the rank spent on the step (host + device)
    prompt_logprobs: tuple[PromptLogprobs, ...] = ()  # for the plan's SeqSteps with a PromptLogprobsSpec


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
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # on a sequence's first event, when it asked for them


class StepRunner(Protocol):
    """What runs StepPlans: `ModelRunner` in a rank process, or a fake in actor and policy tests."""

    @property
    def layout(self) -> KVCacheLayout: ...

    def step(self, plan: StepPlan) -> StepResult: ...
