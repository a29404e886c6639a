"""Scheduler: the continuous-batching policy that turns live sequences into one StepPlan per engine step.

Plain Python, no Trio and no torch; the BatcherActor owns one and calls it between steps. Each step:

1. Decodes. Every running sequence with exactly one uncomputed token (its last sampled one) gets a slot; if the KV
   pool is out of blocks, parked session KV is evicted first (least recently parked), then the newest running
   sequence is preempted by recompute: its blocks are freed and it goes back to the *front* of the waiting queue
   with prompt + outputs as the tokens to recompute. The oldest running sequence therefore always progresses (the
   engine caps the context window at the pool's size), so nothing starves.
2. Prefill chunks. Running sequences still prefilling (a long prompt, or a recompute) get chunks in admission
   order, at most `max_prefill_token_num` prefill tokens per step in total. Decodes do not count against that
   budget: a step holds at most `max_prefill_token_num` + `max_batch_size` tokens.
3. Admission: while there is prefill budget, a batch slot, and blocks for the head's whole token list.

Steps 2 and 3 go share by share (`fair_share.py`): the sequences of one client request form a share, and shares are
served in order of their virtual deadline (arrival step + the steps their remaining prefill needs), each share's
running prefills first, then its waiting sequences in order. A share's head that does not fit the KV pool is never
skipped (admission stops for the step), so a large request cannot be overtaken forever. Before all that, while the
batch is full and a share has nothing running, the newest sequence of the share holding the most slots is
preempted: one request's choices cannot hold every slot while another request waits for its first token.

A sequence's `num_computed_tokens` advances when it is put in a plan (its KV is written by that step, and ranks run
steps in order), so the next plan may already rely on it. The last sampled token of a sequence is never fed to the
model: its KV does not exist until the next decode computes it.

Planning ahead (step overlap). `schedule()` may be called again while one plan is in flight (not applied yet); at
most two plans are then in flight. A sequence whose sample is still in flight (`num_pending` > 0) continues at once:
its next decode feeds `PREVIOUS_TOKEN` at position len(token_ids) (the rank substitutes what it sampled for that
seq_id in the plan before), samples output index num_output_tokens + num_pending, and gets a block for it — unless
the pending token is already its last allowed one (max_new_tokens / the window), or it has penalties (the rank would
need the unknown token in `history_token_ids`; such sequences simply wait for their result). A non-final prefill chunk
in flight continues with its next chunk as before. `apply(result N)` reconciles: a sequence that finishes at N while
plan N+1 holds a speculative step for it is finished at once; that step's sample is dropped when N+1 is applied.

Freeing blocks with a plan in flight is safe at once. Ranks execute plans strictly in order, one at a time. A block
freed now (finish, abort, preemption) can only be handed out in a plan scheduled from now on, i.e. plan N+2 or later,
and the ranks run that plan only after every plan already in flight (N+1 included, which may still write the freed
sequence's speculative KV into it) has completed. So the new owner's writes always come after the old owner's, and it
never reads a position it has not written itself (or got from a prefix-cache hash of fully known tokens). Only blocks
holding known tokens are ever hashed into the prefix cache, and a finished sequence parks at most
len(token_ids) - 1 computed tokens, exactly as in lockstep.

Reused KV. A new sequence may start with `num_computed_tokens > 0`:
- parked session KV: a finished sequence with `keep_kv` parks its computed tokens and their blocks under its
  `session_id`; the session's next sequence reuses the longest common prefix of those tokens and its own (at least
  one token is always left to compute, since the last position must produce logits). `ReleaseSession` frees the
  parked blocks; under memory pressure they are evicted LRU and the next turn just recomputes from its tokens.
- the prefix cache (`enable_prefix_caching`): full blocks of an identical token prefix, found by chained hash.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Hashable

import attrs

from trillm.policy.fair_share import FairShares
from trillm.policy.kv_blocks import BlockManager, BlockManagerStats, blocks_for
from trillm.policy.sequence import Sequence, SeqStatus
from trillm.policy.session_kv import ClaimedKV, ParkedSessions
from trillm.protocol.api import FinishReason, SamplingParams, TokenLogprob
from trillm.protocol.step import (
    PREVIOUS_TOKEN,
    PromptLogprobsSpec,
    SampleSpec,
    SeqStep,
    StepPlan,
    StepResult,
    TokenEvent,
)

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class SchedulerStats:
    """Scheduler.statistics(): queue sizes and cumulative counters."""

    num_running: int
    num_waiting: int
    num_parked_sessions: int
    num_steps: int
    num_preemptions: int  # fair-share preemptions included
    num_fair_share_preemptions: int
    num_evicted_sessions: int
    num_prompt_tokens: int  # prompt tokens of every sequence added
    num_computed_prompt_tokens: int  # prompt positions actually computed (prefilled), recomputes included
    num_cached_prompt_tokens: int  # prompt positions reused from parked or prefix-cached KV
    num_generated_tokens: int
    blocks: BlockManagerStats


class Scheduler:
    """Admission, chunked prefill, preemption, fair shares, finishing and parked session KV over one BlockManager."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_batch_size: int,
        max_prefill_token_num: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        if max_model_len > block_manager.num_blocks * block_manager.block_size:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the KV cache "
                f"({block_manager.num_blocks} blocks of {block_manager.block_size})"
            )
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.max_batch_size = max_batch_size
        self.max_prefill_token_num = max_prefill_token_num
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self._seqs: dict[int, Sequence] = {}
        self._waiting = FairShares()
        self._running: list[Sequence] = []  # admission order: oldest first
        self._parked = ParkedSessions(block_manager)
        self._in_flight: collections.deque[tuple[int, set[int]]] = collections.deque()  # (step id, seqs it samples)
        self._step_id = 0
        self._num_preemptions = 0
        self._num_fair_share_preemptions = 0
        self._num_prompt_tokens = 0
        self._num_computed_prompt_tokens = 0
        self._num_cached_prompt_tokens = 0
        self._num_generated_tokens = 0

    # -- inbox -------------------------------------------------------------------------------------------------------

    def add(
        self,
        seq_id: int,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingParams,
        max_new_tokens: int,
        *,
        session_id: int | None = None,
        keep_kv: bool = False,
        share: Hashable | None = None,
    ) -> TokenEvent | None:
        """Queue a new sequence. Returns its final event right away when it may generate nothing.

        `share` names the client request the sequence belongs to (fair_share.py); None: a share of its own.

        The Engine admitted it (`Engine._admit`: a fresh seq_id, a prompt that leaves room in the window, a token budget
        resolved against that room), so here those are invariants. A sequence also finishes with `length` when it
        reaches the window, whatever its budget.
        """
        assert seq_id not in self._seqs, f"seq_id {seq_id} is already live"
        assert 0 < len(prompt_token_ids) < self.max_model_len, f"unadmitted prompt of {len(prompt_token_ids)} tokens"
        self._num_prompt_tokens += len(prompt_token_ids)
        if max_new_tokens <= 0:
            return TokenEvent(
                seq_id=seq_id, finish_reason=FinishReason.LENGTH, num_prompt_tokens=len(prompt_token_ids)
            )
        seq = Sequence(
            seq_id=seq_id,
            num_prompt_tokens=len(prompt_token_ids),
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            share=share if share is not None else seq_id,
            session_id=session_id,
            keep_kv=keep_kv and session_id is not None,
            token_ids=list(prompt_token_ids),
        )
        self._seqs[seq_id] = seq
        self._waiting.add(seq, self._step_id)
        return None

    def abort(self, seq_id: int, reason: FinishReason = FinishReason.ABORT) -> TokenEvent | None:
        """Finish a live sequence now (its KV is freed, or parked for its session); None if it is not live."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        self._finish(seq)
        return self._event(seq, finish_reason=reason)

    def release_session(self, session_id: int) -> None:
        """Free the KV parked under `session_id`; a live sequence of that session will no longer park."""
        self._parked.release(session_id)
        for seq in self._seqs.values():
            if seq.session_id == session_id:
                seq.keep_kv = False

    # -- stepping ----------------------------------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_in_flight(self) -> int:
        """Plans scheduled and not applied yet."""
        return len(self._in_flight)

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to run.

        May be called with one plan in flight (step overlap): the plan then continues the in-flight sequences.
        """
        assert len(self._in_flight) <= 1, "schedule() called with two steps in flight"
        self._in_flight.append((self._step_id + 1, set()))
        self._preempt_for_starved_shares()
        num_preemptions = self._num_preemptions
        steps = [self._plan_tokens(seq, 1) for seq in self._reserve_decode_slots()]
        prefilling: dict[Hashable, list[Sequence]] = collections.defaultdict(list)  # share → its seqs, oldest first
        for seq in self._running:
            if seq.num_uncomputed_tokens > 1:
                prefilling[seq.share].append(seq)
        # After a preemption the pool is full: admitting now would only preempt again next step (unless nothing
        # else would run: the engine never idles with work queued).
        may_admit = self._num_preemptions == num_preemptions or not (steps or prefilling)
        budget = self.max_prefill_token_num
        num_owed = self._waiting.num_starved()  # slots kept for shares with nothing running
        all_prefilling = (seq for seqs in prefilling.values() for seq in seqs)
        for share in self._waiting.in_order(all_prefilling, self._step_id, budget):
            for seq in prefilling.get(share.key, ()):
                chunk = min(seq.num_uncomputed_tokens, budget)
                budget -= chunk
                steps.append(self._plan_tokens(seq, chunk))
                if budget == 0:
                    break
            while may_admit and budget > 0 and share.waiting:
                is_owed = share.num_running == 0
                if len(self._running) + (0 if is_owed else num_owed) >= self.max_batch_size:
                    break
                seq = share.waiting[0]
                if not self._admit(seq):
                    may_admit = False  # the head is never skipped: no later share is admitted this step
                    break
                num_owed -= is_owed
                chunk = min(seq.num_uncomputed_tokens, budget)
                budget -= chunk
                steps.append(self._plan_tokens(seq, chunk))
            if budget == 0:
                break
        if not steps:
            self._in_flight.pop()
            return None
        self._step_id += 1
        return StepPlan(step_id=self._step_id, seqs=tuple(steps))

    def apply(self, result: StepResult) -> list[TokenEvent]:
        """Record the tokens a finished step sampled; returns one event per sequence that got a token.

        Results must come in plan order. Tokens for sequences that finished (aborted, or finished by an earlier
        step's token while this one was in flight) are dropped.
        """
        step_id, awaiting = self._in_flight.popleft()
        assert result.step_id == step_id, f"applying step {result.step_id}, expected {step_id}"
        for scored in result.prompt_logprobs:
            owner = self._seqs.get(scored.seq_id)
            if owner is not None and scored.first_pos == len(owner.prompt_logprobs) + 1:
                owner.prompt_logprobs.extend(scored.logprobs)
        events = []
        for sampled in result.sampled:
            if sampled.seq_id not in awaiting:
                continue  # finished while the step ran: the sample is discarded
            awaiting.discard(sampled.seq_id)
            seq = self._seqs[sampled.seq_id]
            seq.num_pending -= 1
            seq.token_ids.append(sampled.token_id)
            self._num_generated_tokens += 1
            reason = self._finish_reason(seq, sampled.token_id)
            if reason is not None:
                self._finish(seq)
            else:
                self._hash_computed_blocks(seq)  # a block whose last token just became known
            logprobs = (sampled.logprob,) if sampled.logprob is not None else ()
            events.append(self._event(seq, token_ids=(sampled.token_id,), logprobs=logprobs, finish_reason=reason))
        if awaiting:
            raise AssertionError(f"step {result.step_id} returned no token for seqs {sorted(awaiting)}")
        return events

    def statistics(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_parked_sessions=len(self._parked),
            num_steps=self._step_id,
            num_preemptions=self._num_preemptions,
            num_fair_share_preemptions=self._num_fair_share_preemptions,
            num_evicted_sessions=self._parked.num_evicted,
            num_prompt_tokens=self._num_prompt_tokens,
            num_computed_prompt_tokens=self._num_computed_prompt_tokens,
            num_cached_prompt_tokens=self._num_cached_prompt_tokens,
            num_generated_tokens=self._num_generated_tokens,
            blocks=self.block_manager.statistics(),
        )

    def num_idle_session_blocks(self) -> int:
        """KV blocks only idle sessions' parked KV holds (evictable; callable from another thread, for gauges)."""
        return self._parked.num_idle_blocks()

    def sequence(self, seq_id: int) -> Sequence | None:
        """A live sequence's state (tests and debugging)."""
        return self._seqs.get(seq_id)

    # -- decode slots and preemption ---------------------------------------------------------------------------------

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Running sequences that decode this step, each with a block for its next position; preempts as needed."""
        scheduled = []
        for seq in list(self._running):  # oldest first; victims are taken from the newest end
            if seq.status is not SeqStatus.RUNNING or seq.num_uncomputed_tokens != 1:
                continue
            if seq.num_pending and not self._may_plan_ahead(seq):
                continue  # waits for its result (last allowed token in flight, or penalties)
            num_needed = blocks_for(seq.num_computed_tokens + 1, self.block_size) - len(seq.block_table)
            while not self.block_manager.can_allocate(num_needed):
                if self._parked.evict_lru():
                    continue
                victim = self._running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seq.block_table += self.block_manager.allocate(num_needed)
                scheduled.append(seq)
        return scheduled

    def _preempt_for_starved_shares(self) -> None:
        """With the batch full, free a slot for each share that waits with nothing running (fair_share.py): the
        newest sequence of the share running the most is preempted, while that share runs more than one."""
        num_needed = self._waiting.num_starved() - (self.max_batch_size - len(self._running))
        for _ in range(num_needed):
            largest = self._waiting.largest()
            if largest is None:
                return
            victim = next(seq for seq in reversed(self._running) if seq.share == largest.key)
            log.debug("fair share: preempting seq %d of a share running %d", victim.seq_id, largest.num_running)
            self._preempt(victim)
            self._num_fair_share_preemptions += 1

    def _may_plan_ahead(self, seq: Sequence) -> bool:
        """Whether a sequence with a sample in flight may get its next decode now, before that sample is known."""
        if seq.sampling.has_penalties:
            return False  # the rank would need the unknown token in history_token_ids
        num_outputs = seq.num_output_tokens + seq.num_pending
        return num_outputs < seq.max_new_tokens and seq.num_tokens < self.max_model_len

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV and requeue it at the front to recompute prompt + outputs."""
        log.debug("preempting seq %d (%d tokens)", seq.seq_id, len(seq.token_ids))
        self._running.remove(seq)
        self._release_blocks(seq)
        seq.status = SeqStatus.PREEMPTED
        self._waiting.requeue(seq)
        self._num_preemptions += 1

    # -- admission ---------------------------------------------------------------------------------------------------

    def _admit(self, seq: Sequence) -> bool:
        """Move the head of the waiting queue to running with blocks for all its tokens; False if they don't fit.

        A sequence preempted with a sample in flight waits (at the head) until that sample is applied.
        """
        if seq.num_pending:
            return False
        claimed = self._claim_parked(seq)
        if claimed is None and seq.sampling.prompt_logprobs is None:  # prompt logprobs need every position's logits
            self._match_prefix(seq)
        num_needed = blocks_for(len(seq.token_ids), self.block_size) - len(seq.block_table)
        while not self.block_manager.can_allocate(num_needed):
            if not self._parked.evict_lru():
                self._unadmit(seq, claimed)
                return False
        seq.block_table += self.block_manager.allocate(num_needed)
        if not seq.is_admitted:
            seq.num_cached_tokens = seq.num_computed_tokens
            self._num_cached_prompt_tokens += seq.num_computed_tokens
            seq.is_admitted = True
        self._waiting.admitted(seq)
        seq.needs_grammar_replay = True  # the ranks may have dropped its matcher while it waited
        seq.status = SeqStatus.RUNNING
        self._running.append(seq)
        return True

    def _unadmit(self, seq: Sequence, claimed: ClaimedKV | None) -> None:
        """Undo a failed admission: give back reused blocks (to the session's parking spot when they came from it)."""
        if claimed is not None:
            assert seq.session_id is not None
            self._parked.unclaim(seq.session_id, seq.token_ids, claimed)
            seq.block_table = []
            seq.block_hashes = []
            seq.num_computed_tokens = 0
        else:
            self._release_blocks(seq)

    def _claim_parked(self, seq: Sequence) -> ClaimedKV | None:
        """Start `seq` from its session's parked KV (`ParkedSessions.claim`); None when nothing is parked for it."""
        if seq.session_id is None:
            return None
        claimed = self._parked.claim(seq.session_id, seq.token_ids)
        if claimed is None:
            return None
        seq.block_table = list(claimed.block_table)
        seq.num_computed_tokens = claimed.num_reused_tokens
        self._hash_computed_blocks(seq)
        return claimed

    def _match_prefix(self, seq: Sequence) -> None:
        """Start `seq` from prefix-cached full blocks of its tokens (never the block holding its last token)."""
        seq.block_table, seq.block_hashes = self.block_manager.match_prefix(seq.token_ids)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size

    # -- planning ----------------------------------------------------------------------------------------------------

    def _plan_tokens(self, seq: Sequence, num_tokens: int) -> SeqStep:
        """The SeqStep computing the next `num_tokens` of `seq`; advances its computed count."""
        start = seq.num_computed_tokens
        end = start + num_tokens
        sample = None
        if end == seq.num_tokens:
            assert not (seq.num_pending and seq.sampling.has_penalties), "penalised sequences are not planned ahead"
            sample = SampleSpec(
                sampling=seq.sampling,
                output_index=seq.num_output_tokens + seq.num_pending,
                eos_token_ids=self.eos_token_ids,
                history_token_ids=tuple(seq.token_ids) if seq.sampling.has_penalties else (),
                num_prompt_tokens=seq.num_prompt_tokens,
                grammar_replay=seq.output_token_ids if seq.needs_grammar_replay and seq.sampling.grammar else None,
            )
            seq.needs_grammar_replay = False
            self._in_flight[-1][1].add(seq.seq_id)
            seq.num_pending += 1
        token_ids = tuple(seq.token_ids[start:end])
        prompt_logprobs = self._prompt_logprobs_spec(seq, start, end)
        if len(token_ids) < num_tokens:  # the in-flight sample: at most one, the last position
            assert len(token_ids) + 1 == num_tokens and seq.num_pending == 2, "only the in-flight sample is unknown"
            token_ids += (PREVIOUS_TOKEN,)
        step = SeqStep(
            seq_id=seq.seq_id,
            token_ids=token_ids,
            start_pos=start,
            block_table=tuple(seq.block_table[: blocks_for(end, self.block_size)]),
            sample=sample,
            prompt_logprobs=prompt_logprobs,
        )
        self._num_computed_prompt_tokens += max(0, min(end, seq.num_prompt_tokens) - start)
        seq.num_computed_tokens = end
        self._hash_computed_blocks(seq)
        return step

    @staticmethod
    def _prompt_logprobs_spec(seq: Sequence, start: int, end: int) -> PromptLogprobsSpec | None:
        """Which rows of the chunk [start, end) score prompt tokens not scored yet (None: none, or not asked).

        Row p predicts token p + 1; the rows of a recompute after preemption are not scored twice.
        """
        if seq.sampling.prompt_logprobs is None:
            return None
        first = max(start, len(seq.prompt_logprobs))  # rows before it were scored by an earlier chunk
        stop = min(end, seq.num_prompt_tokens - 1)  # the last prompt token is predicted by row P - 2
        if first >= stop:
            return None
        return PromptLogprobsSpec(num_top=seq.sampling.prompt_logprobs, first_pos=first,
                                  target_ids=tuple(seq.token_ids[first + 1 : stop + 1]))

    def _hash_computed_blocks(self, seq: Sequence) -> None:
        """Register every newly full, computed block of `seq` in the prefix cache."""
        num_known = min(seq.num_computed_tokens, len(seq.token_ids))  # never hash a block with an unknown token
        self.block_manager.register_full_blocks(seq.token_ids, seq.block_table, seq.block_hashes, num_known)

    # -- finishing ---------------------------------------------------------------------------------------------------

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        sampling = seq.sampling
        output_index = seq.num_output_tokens - 1
        if output_index >= sampling.min_tokens:
            if token_id in self.eos_token_ids and not sampling.ignore_eos:
                return FinishReason.STOP
            if token_id in sampling.stop_token_ids:
                return FinishReason.STOP
        if seq.num_output_tokens >= seq.max_new_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence) -> None:
        """Drop a sequence from every queue; park its KV for its session or free it."""
        is_running = seq.status is SeqStatus.RUNNING
        if is_running:
            self._running.remove(seq)
        self._waiting.finished(seq, was_running=is_running)
        del self._seqs[seq.seq_id]
        for _, awaiting in self._in_flight:
            awaiting.discard(seq.seq_id)  # a sample still in flight for it is dropped when its step is applied
        seq.num_pending = 0
        # Park (or free) what lockstep would: never the last token, whose KV lockstep has not computed; with a step
        # in flight the count may run ahead of the known tokens. Freeing at once is safe (module docstring).
        seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq.token_ids) - 1)
        if seq.keep_kv and seq.num_computed_tokens > 0:
            assert seq.session_id is not None
            self._park(seq)
        else:
            self._release_blocks(seq)
        seq.status = SeqStatus.FINISHED

    def _park(self, seq: Sequence) -> None:
        assert seq.session_id is not None
        self._parked.park(seq.session_id, seq.token_ids[: seq.num_computed_tokens], seq.block_table)
        seq.block_table = []
        seq.block_hashes = []

    def _release_blocks(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _event(
        self,
        seq: Sequence,
        *,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] = (),
        finish_reason: FinishReason | None = None,
    ) -> TokenEvent:
        prompt_logprobs = None
        if seq.sampling.prompt_logprobs is not None and not seq.is_prompt_logprobs_sent:
            prompt_logprobs = tuple(seq.prompt_logprobs)
            seq.is_prompt_logprobs_sent = True
        return TokenEvent(
            seq_id=seq.seq_id,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
        )
