"""Grammar matchers: one rank's per-sequence grammar state and the token bitmasks of each step's constrained rows.

Runs in the rank process, outside the event loop. Why here and not in the Batcher: with step overlap the Batcher
plans step N+1 before step N's token is known, so it could not compute step N+1's mask without waiting for step N
(breaking the overlap); the rank knows each token the moment it samples it. Every rank samples (tensor parallelism:
they must agree on the tokens), so every rank keeps the same matchers; no message or collective is added.

Per step (`ModelRunner.step`): the forward is launched first; while the device runs it, `fill` computes the masks
of the constrained rows on the host (llguidance's executor fills them in parallel, into pinned memory) and uploads
them without a sync; the sampler applies them on the device (`gpu/sampling.py`); after sampling, `commit` advances
each matcher by its sampled token (the ids are on the host already: the step copies them there anyway). So the
constrained path adds no host round trip per token and the mask of a step is never waited on by the Batcher.

A matcher starts from a compiled grammar, cached by the grammar's text (LRU, `MAX_GRAMMARS`): a request's schema is
compiled once per rank however many sequences or requests use it; a sequence gets a cheap copy. A `SampleSpec` with
`grammar_replay` set (the Batcher sets it at each admission, so after a preemption too) restarts the sequence's
matcher from the grammar and replays its outputs so far. Matchers of sequences absent from two plans in a row are
dropped (a running sequence misses at most one: one whose plan waits for its previous result).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import llguidance
import llguidance.torch
import torch

from trillm.protocol.step import SampleSpec, StepPlan

log = logging.getLogger(__name__)

MAX_GRAMMARS = 256  # compiled grammars kept per rank (one per distinct schema / regex / tool list)


class GrammarMatchers:
    """The grammar matchers of one rank's constrained sequences, and their masks (outside the event loop)."""

    def __init__(self, tokenizer_path: Path, *, vocab_size: int, device: torch.device) -> None:
        self._tokenizer_path = tokenizer_path
        self._vocab_size = vocab_size
        self._device = device
        self._eos_token_id = 0  # the Batcher's first EOS id, learnt from the first constrained spec
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (about 1 s for a 49k vocabulary)
        self._executor: llguidance.LLExecutor | None = None
        self._grammars: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._matchers: dict[int, llguidance.LLMatcher] = {}
        self._seen: tuple[set[int], set[int]] = (set(), set())  # seq_ids of the last two plans

    @property
    def num_words(self) -> int:
        """int32 words per mask row: one bit per vocabulary entry."""
        return (self._vocab_size + 31) // 32

    def forget_absent(self, plan: StepPlan) -> None:
        """Drop the matchers of sequences absent from this plan and the one before."""
        present = {seq.seq_id for seq in plan.seqs}
        self._seen = (self._seen[1], present)
        for seq_id in [s for s in self._matchers if s not in present and s not in self._seen[0]]:
            del self._matchers[seq_id]

    def fill(self, seq_ids: Sequence[int], specs: Sequence[SampleSpec]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The masks of the constrained rows: (row indices [g] int64, bitmask [g, num_words] int32) on the device.

        None when no row is constrained. Bit j of word w of a row allows token 32 * w + j.
        """
        rows = [i for i, spec in enumerate(specs) if spec.sampling.grammar is not None]
        if not rows:
            return None
        if self._tokenizer is None:
            self._eos_token_id = next((spec.eos_token_ids[0] for spec in specs if spec.eos_token_ids), 0)
        matchers = [self._matcher(seq_ids[i], specs[i]) for i in rows]
        bitmask = torch.empty(len(rows), self.num_words, dtype=torch.int32,
                              pin_memory=self._device.type == "cuda")  # [g, num_words]
        assert self._executor is not None
        llguidance.torch.fill_next_token_bitmask_par(self._executor, [(m, k) for k, m in enumerate(matchers)], bitmask)
        for k, matcher in enumerate(matchers):
            if matcher.is_error():  # only EOS, so that the sequence ends instead of drawing from an empty set
                bitmask[k] = 0
                word, bit = divmod(self._eos_token_id, 32)
                bitmask[k, word] = 1 << bit if bit < 31 else -(1 << 31)
        row_index = torch.tensor(rows, dtype=torch.int64)
        if self._device.type == "cuda":
            return row_index.pin_memory().to(self._device, non_blocking=True), bitmask.to(self._device, non_blocking=True)
        return row_index, bitmask

    def commit(self, seq_ids: Sequence[int], specs: Sequence[SampleSpec], token_ids: Sequence[int]) -> None:
        """Advance the matcher of each constrained row by its sampled token."""
        for seq_id, spec, token_id in zip(seq_ids, specs, token_ids, strict=True):
            if spec.sampling.grammar is None:
                continue
            matcher = self._matchers[seq_id]
            if not matcher.is_stopped() and not matcher.consume_token(token_id):
                log.warning("seq %d: grammar rejected token %d: %s", seq_id, token_id, matcher.get_error())

    def _matcher(self, seq_id: int, spec: SampleSpec) -> llguidance.LLMatcher:
        """The sequence's matcher; (re)started from its grammar and replayed when the spec says so."""
        matcher = self._matchers.get(seq_id)
        if matcher is None or spec.grammar_replay is not None:
            grammar = spec.sampling.grammar
            assert grammar is not None
            matcher = self._compiled(grammar).deep_copy()
            replay = spec.grammar_replay or ()
            if replay and not matcher.consume_tokens(list(replay)):
                log.warning("seq %d: grammar rejected its replayed outputs: %s", seq_id, matcher.get_error())
            self._matchers[seq_id] = matcher
        return matcher

    def _compiled(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher of `grammar`, compiled once per rank (LRU of `MAX_GRAMMARS`)."""
        compiled = self._grammars.get(grammar)
        if compiled is not None:
            self._grammars.move_to_end(grammar)
            return compiled
        compiled = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if compiled.is_error():  # the HTTP layer checked it; its sequences end at once (the `fill` fallback)
            log.error("grammar does not compile against the tokenizer: %s", compiled.get_error())
        self._grammars[grammar] = compiled
        if len(self._grammars) > MAX_GRAMMARS:
            self._grammars.popitem(last=False)
        return compiled

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            text = self._tokenizer_path.read_text(encoding="utf-8")
            self._tokenizer = llguidance.LLTokenizer(text, n_vocab=self._vocab_size, eos_token=self._eos_token_id)
            self._executor = llguidance.LLExecutor()
        return self._tokenizer
