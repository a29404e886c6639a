"""Prompt logprobs: the log-probability of each prompt token (and the top k) from a prefill's hidden states.

Runs in the rank process (outside the event loop), after the forward of a plan with SeqSteps that carry a
`PromptLogprobsSpec` (only sequences that asked: `/v1/completions` with `echo` and `logprobs`). Row p of a sequence's
chunk predicts the token at p + 1, so the scored rows are a slice of the chunk's rows of the hidden states; they go
through the lm_head in slices of `ROWS_PER_SLICE` (a 4k-token prompt at a 128k vocabulary would otherwise need 2 GiB
of float32 logits at once), each slice's log-softmax is gathered at its targets, and everything comes to the host in
one transfer at the end. Plans without a spec never reach this module, so other requests pay nothing.

The logprobs are the model's raw distribution (no penalties, bias or temperature: nothing of sampling applies to
tokens that were given), the same as Hugging Face's `log_softmax(logits)` on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trillm.protocol.api import TokenLogprob
from trillm.protocol.step import PromptLogprobs, PromptLogprobsSpec, SeqStep, StepPlan

ROWS_PER_SLICE = 256


def score_prompts(
    plan: StepPlan,
    hidden: torch.Tensor,  # [num_tokens, hidden_size], rows in plan order (the SeqSteps' tokens concatenated)
    compute_logits: Callable[[torch.Tensor], torch.Tensor],  # [rows, hidden_size] → [rows, vocab] float32
) -> tuple[PromptLogprobs, ...]:
    """The prompt logprobs of every SeqStep of `plan` that asks for them (outside the event loop)."""
    jobs: list[tuple[SeqStep, int, PromptLogprobsSpec]] = []  # (seq, its first scored row in `hidden`, spec)
    offset = 0
    for seq in plan.seqs:
        if seq.prompt_logprobs is not None:
            jobs.append((seq, offset + seq.prompt_logprobs.first_pos - seq.start_pos, seq.prompt_logprobs))
        offset += seq.num_tokens
    if not jobs:
        return ()
    max_top = max(spec.num_top for _, _, spec in jobs)
    pieces = []
    for _, first_row, spec in jobs:
        targets = spec.target_ids
        rows = hidden[first_row : first_row + len(targets)]  # [targets, hidden_size]
        target_ids = torch.tensor(targets, dtype=torch.int64).to(hidden.device, non_blocking=True)
        for begin in range(0, len(targets), ROWS_PER_SLICE):
            logprobs = compute_logits(rows[begin : begin + ROWS_PER_SLICE]).float().log_softmax(dim=-1)
            chosen = logprobs.gather(1, target_ids[begin : begin + ROWS_PER_SLICE].view(-1, 1))  # [slice, 1]
            top_values, top_ids = logprobs.topk(max_top, dim=-1)  # [slice, max_top] each, highest first
            pieces.append(torch.cat([chosen.double(), top_ids.double(), top_values.double()], 1))
    # One float64 buffer (exact for ids below 2**53): per scored row [chosen, top ids..., top values...].
    packed = torch.cat(pieces).tolist()
    results = []
    row = 0
    for seq, _, spec in jobs:
        entries = []
        num_top = spec.num_top
        for target in spec.target_ids:
            record = packed[row]
            ids, values = record[1 : 1 + num_top], record[1 + max_top : 1 + max_top + num_top]
            top = [(int(t), v) for t, v in zip(ids, values, strict=True)]
            if all(t != target for t, _ in top):
                top.append((target, record[0]))  # like sampled tokens: the given token is always listed
            entries.append(TokenLogprob(token_id=target, logprob=record[0], top=tuple(top)))
            row += 1
        results.append(PromptLogprobs(seq_id=seq.seq_id, first_pos=spec.first_pos + 1, logprobs=tuple(entries)))
    return tuple(results)
