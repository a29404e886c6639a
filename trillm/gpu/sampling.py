"""Sampler: turns one step's last-position logits into the next token of every sequence, batched on the logits' device.

Runs in the rank process (outside the event loop). The order of operations, per row:

1. `logit_bias`: each (token id, bias) is added to the logit.
2. Repetition penalty (Hugging Face semantics) over every token of prompt + output (`SampleSpec.history_token_ids`):
   a positive logit is divided by the penalty, a negative one multiplied, each distinct token once.
3. Presence and frequency penalties (OpenAI semantics) over the output tokens only
   (`history_token_ids[num_prompt_tokens:]`): `logit -= frequency * count + presence * (count > 0)`.
4. Stop masking: while `output_index < min_tokens` the EOS ids and `stop_token_ids` get -inf. With `ignore_eos` the
   EOS ids are masked at every step, so such a sequence always generates real text up to its token budget (the
   Batcher never sees an EOS to ignore); `stop_token_ids` still apply after `min_tokens`.
4b. Grammar masks (constrained decoding, `trillm/structured/`): tokens a row's grammar does not allow get -inf. The
   masks arrive as bits on the device (computed by the rank while the forward ran), so this is one unpack and one
   masked fill over the constrained rows, with no host sync.
5. Logprobs are the log-softmax of these processed logits, BEFORE temperature and the top-k / top-p / min-p filters:
   they describe the model as penalised for this request, independent of how adventurously it is sampled (a token
   outside the top-p set still gets a finite logprob, and temperature does not reshape the reported distribution).
6. Greedy rows (temperature 0 or top_k 1) take the argmax. Other rows: divide by temperature, keep the top_k
   logits, keep the smallest set of most-likely tokens whose probability reaches top_p (after top-k), drop tokens
   whose probability is below min_p times the most likely one's, then draw.

The draw is an exponential race: `argmax(logit - log(E))` with `E ~ Exp(1)` per vocabulary entry, which picks token
i with probability softmax(logits)[i] (it is the Gumbel-max trick). The noise of a row comes from its own
`torch.Generator` seeded with a 64-bit mix of `(seed, output_index)` alone, so a seeded sequence samples the same
tokens whatever else shares its batch, and after a preemption recomputes it. A random row without a seed is a caller
bug (the Batcher resolves seeds); greedy rows need none. CPU and CUDA generators are different engines, so the same
seed draws different tokens on the two devices (each is reproducible on its own).

`TokenLogprob.top` holds the k most likely tokens (k = `SamplingParams.logprobs`), highest first, plus the sampled
token at the end when it is not among them: at most k + 1 entries, always including the sampled token (k = 0 gives
just the sampled one). Logprobs of tokens masked in step 4 are -inf.

Everything per row is a tensor (parameters, penalty counts via scatter, one sort for top-k and top-p, or a `topk`
when every row has a top_k), so no step syncs with the device until the final copy of the token ids (and logprobs)
to the host, done as one transfer. The per-row generators cost one small launch per random row (about 20 us on an
H100: 5.5 ms for 256 rows of a 128k vocabulary); a fused counter-based noise kernel would remove that.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import numpy as np
import torch

from trillm.protocol.api import TokenLogprob
from trillm.protocol.step import SampleSpec

log = logging.getLogger(__name__)

_MASK_64 = (1 << 64) - 1
_TINY = 1e-30  # floor of the exponential noise, so -log(E) stays finite


def sample(
    logits: torch.Tensor,  # [num_seqs, vocab] float32 (any device)
    specs: Sequence[SampleSpec],
    grammar_mask: tuple[torch.Tensor, torch.Tensor] | None = None,  # (rows [g] int64, bits [g, words] int32)
) -> list[tuple[int, TokenLogprob | None]]:
    """Sample one token per row (outside the event loop): returns (token id, logprobs or None) in row order.

    `grammar_mask` (from `GrammarMatchers.fill`) restricts the listed rows to the tokens whose bit is set.
    """
    return sample_on_device(logits, specs, grammar_mask).results()


@attrs.define
class PendingSample:
    """A step's draw, enqueued on the device and not yet copied back: `token_ids` can feed the next step's inputs on
    the device (rank step chaining) before `results()` waits for the one copy to the host."""

    token_ids: torch.Tensor  # [num_seqs] int64 on the logits' device
    _packed: torch.Tensor | None  # float64: the token ids, then each logprob row's record (see _pack_logprobs)
    _wanted: list[int]
    _max_k: int
    _specs: Sequence[SampleSpec]
    _vocab_size: int

    def results(self) -> list[tuple[int, TokenLogprob | None]]:
        """(token id, logprobs or None) per row, in row order: the host sync."""
        if self._packed is None:
            return [(token_id, None) for token_id in self.token_ids.tolist()]
        return _unpack_logprobs(self._packed.tolist(), self._wanted, self._max_k, self._specs, self._vocab_size)


def sample_on_device(
    logits: torch.Tensor,  # [num_seqs, vocab] float32 (any device)
    specs: Sequence[SampleSpec],
    grammar_mask: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PendingSample:
    """`sample`'s device work, without the copy to the host (no sync on CUDA)."""
    num_seqs, vocab_size = logits.shape
    assert num_seqs == len(specs), f"{num_seqs} logit rows for {len(specs)} specs"
    if num_seqs == 0:
        return PendingSample(torch.empty(0, dtype=torch.int64, device=logits.device), None, [], 0, specs, vocab_size)
    logits = logits.to(torch.float32, copy=True)  # [num_seqs, vocab]; never modify the caller's tensor
    _apply_logit_bias(logits, specs)
    _apply_penalties(logits, specs)
    _mask_stop_tokens(logits, specs)
    if grammar_mask is not None:
        apply_token_bitmask(logits, *grammar_mask)

    token_ids = logits.argmax(dim=-1)  # [num_seqs]; the answer for greedy rows
    random_rows = [i for i, spec in enumerate(specs) if not spec.sampling.is_greedy]
    if random_rows:
        rows = _on_device(random_rows, torch.int64, logits.device)
        token_ids[rows] = _draw(logits[rows], [specs[i] for i in random_rows])
    return _pack_logprobs(logits, token_ids, specs)


def _host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device` without a host sync: on CUDA through pinned memory with a non-blocking copy.

    A plain `.to("cuda")` (or `torch.tensor(values, device="cuda")`) of pageable memory synchronises the stream, so
    the rank would wait for the forward pass before it could launch the sampling kernels, and could never run ahead
    of the GPU (issue #8's profile found this in the stop-token masking of every `ignore_eos` step). Torch's caching
    host allocator keeps a pinned block alive until the copy that reads it has completed.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _on_device(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of `values` on `device`, copied without a host sync (`_host_to_device`)."""
    return _host_to_device(torch.tensor(values, dtype=dtype), device)


def _apply_logit_bias(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> None:
    """Add each row's logit_bias in place (ids outside the vocabulary are ignored)."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    biases: list[float] = []
    for i, spec in enumerate(specs):
        for token_id, bias in spec.sampling.logit_bias:
            if 0 <= token_id < vocab_size:
                rows.append(i)
                cols.append(token_id)
                biases.append(bias)
    if rows:
        device = logits.device
        index = (_on_device(rows, torch.int64, device), _on_device(cols, torch.int64, device))
        logits.index_put_(index, _on_device(biases, logits.dtype, device), accumulate=True)


def _padded(sequences: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Right-pad token id lists with `pad` into one [rows, longest] int64 tensor; out-of-range ids become `pad`."""
    width = max((len(s) for s in sequences), default=0)
    host = np.full((len(sequences), width), pad, dtype=np.int64)  # [rows, width]
    for row, ids in enumerate(sequences):
        host[row, : len(ids)] = ids
    host[(host < 0) | (host > pad)] = pad
    return _host_to_device(torch.from_numpy(host), device)


def _apply_penalties(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> None:
    """Repetition (prompt + output) then presence/frequency (output) penalties, in place, for rows that have any."""
    penalised = [i for i, spec in enumerate(specs) if spec.sampling.has_penalties]
    if not penalised:
        return
    device = logits.device
    num_rows, vocab_size = len(penalised), logits.shape[1]
    chosen = [specs[i] for i in penalised]

    def column(values: list[float]) -> torch.Tensor:
        return _on_device(values, logits.dtype, device).view(num_rows, 1)  # [rows, 1]

    rows = _on_device(penalised, torch.int64, device)
    sub = logits[rows]  # [rows, vocab]
    # Column `vocab_size` of the count tensors is the padding sink; it is sliced away.
    history = _padded([s.history_token_ids for s in chosen], vocab_size, device)  # [rows, history]
    seen = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=device)
    seen = seen.scatter_(1, history, True)[:, :vocab_size]  # [rows, vocab]
    repetition = column([s.sampling.repetition_penalty for s in chosen])
    # A penalty of 1 divides or multiplies by exactly 1, so rows without it pass through unchanged.
    sub = torch.where(seen, torch.where(sub < 0, sub * repetition, sub / repetition), sub)

    outputs = _padded([s.history_token_ids[s.num_prompt_tokens :] for s in chosen], vocab_size, device)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=logits.dtype, device=device)
    counts = counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=logits.dtype))[:, :vocab_size]
    frequency = column([s.sampling.frequency_penalty for s in chosen])
    presence = column([s.sampling.presence_penalty for s in chosen])
    sub = sub - frequency * counts - presence * (counts > 0).to(logits.dtype)
    logits[rows] = sub


def _mask_stop_tokens(logits: torch.Tensor, specs: Sequence[SampleSpec]) -> None:
    """Set EOS and stop-token logits to -inf where they may not be sampled yet (min_tokens, ignore_eos)."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, spec in enumerate(specs):
        before_min = spec.output_index < spec.sampling.min_tokens
        masked: tuple[int, ...] = ()
        if before_min or spec.sampling.ignore_eos:
            masked += spec.eos_token_ids
        if before_min:
            masked += spec.sampling.stop_token_ids
        for token_id in masked:
            if 0 <= token_id < vocab_size:
                rows.append(i)
                cols.append(token_id)
    if rows:
        device = logits.device
        index = (_on_device(rows, torch.int64, device), _on_device(cols, torch.int64, device))
        logits.index_put_(index, torch.full((len(rows),), float("-inf"), dtype=logits.dtype, device=device))


def apply_token_bitmask(
    logits: torch.Tensor,  # [num_seqs, vocab], modified in place
    rows: torch.Tensor,  # [g] int64: the constrained rows
    bitmask: torch.Tensor,  # [g, ceil(vocab / 32)] int32: bit j of word w allows token 32 * w + j
) -> None:
    """Set the logits of tokens a row's grammar forbids to -inf (on the logits' device, no host sync).

    The words are read as little-endian bytes and each byte looks up its 8 bits in a 256-row table: a third of
    the time of shifting every int32 word 32 ways on the CPU.
    """
    num_rows, vocab_size = rows.shape[0], logits.shape[1]
    table = _BIT_TABLES.get(logits.device)
    if table is None:
        table = _BIT_TABLES[logits.device] = (
            (torch.arange(256, device=logits.device).unsqueeze(-1) >> torch.arange(8, device=logits.device)) & 1
        ).bool()  # [256, 8]: bit b of byte value v, least significant first
    allowed = table[bitmask.view(torch.uint8).long()].view(num_rows, -1)[:, :vocab_size]  # [g, vocab]
    if num_rows == logits.shape[0]:  # every row constrained (`rows` is then 0..g-1, in order): no gather/scatter
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill_(~allowed, float("-inf"))


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}  # per device: the constant byte → bits table


def _draw(
    logits: torch.Tensor,  # [rows, vocab] processed logits of the rows that sample randomly
    specs: Sequence[SampleSpec],
) -> torch.Tensor:  # [rows] int64
    """Temperature, top-k, top-p, min-p, then the seeded exponential race."""
    device = logits.device
    num_rows, vocab_size = logits.shape

    def column(values: list[float]) -> torch.Tensor:
        return _on_device(values, logits.dtype, device).view(num_rows, 1)  # [rows, 1]

    scaled = logits / column([s.sampling.temperature for s in specs])  # [rows, vocab]
    top_ks = [s.sampling.top_k if 0 < s.sampling.top_k < vocab_size else vocab_size for s in specs]
    top_ps = [s.sampling.top_p if s.sampling.top_p < 1.0 else float("inf") for s in specs]
    if min(top_ks) < vocab_size or min(top_ps) < 1.0:
        scaled = _top_k_top_p(scaled, top_ks, top_ps)
    min_ps = [s.sampling.min_p for s in specs]
    if max(min_ps) > 0.0:
        # p < min_p * p_max  <=>  logit < max_logit + log(min_p); log(0) = -inf keeps every token.
        threshold = scaled.max(dim=-1, keepdim=True).values + column(min_ps).log()  # [rows, 1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    return (scaled + _gumbel_noise(specs, vocab_size, device)).argmax(dim=-1)


def _top_k_top_p(
    scaled: torch.Tensor,  # [rows, vocab] temperature-scaled logits
    top_k: list[int],  # per row, vocab = off
    top_p: list[float],  # per row, inf = off
) -> torch.Tensor:  # [rows, vocab] with dropped tokens at -inf
    """Top-k then top-p over one descending sort; top-p's mass is measured on the top-k survivors.

    When every row has a top_k, only the largest max(top_k) logits are sorted (`topk`), not the whole vocabulary.
    """
    num_rows, vocab_size = scaled.shape
    width = max(top_k)
    if width < vocab_size:
        sorted_logits, order = scaled.topk(width, dim=-1)  # [rows, width] each, descending
    else:
        sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)  # [rows, vocab] each
    ranks = torch.arange(width, device=scaled.device, dtype=scaled.dtype).view(1, width)  # [1, width]
    k = _on_device(top_k, scaled.dtype, scaled.device).view(num_rows, 1)  # [rows, 1]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [rows, width]
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    p = _on_device(top_p, scaled.dtype, scaled.device).view(num_rows, 1)  # [rows, 1]
    drop = mass_before >= p  # keeps the smallest prefix whose mass reaches top_p
    drop[:, 0] = False  # the most likely token always survives (top_p = 0 means greedy)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter_(1, order, sorted_logits)


def _mix_seed(seed: int, output_index: int) -> int:
    """A 64-bit generator seed from (seed, output_index): splitmix64 mixing, so nearby pairs give unrelated seeds."""

    def splitmix64(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & _MASK_64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
        return x ^ (x >> 31)

    return splitmix64(splitmix64(seed & _MASK_64) ^ (output_index & _MASK_64))


def _gumbel_noise(specs: Sequence[SampleSpec], vocab_size: int, device: torch.device) -> torch.Tensor:
    """-log(E), E ~ Exp(1), one row per spec from its own generator: [rows, vocab] float32."""
    noise = torch.empty(len(specs), vocab_size, dtype=torch.float32, device=device)
    for row, spec in enumerate(specs):
        seed = spec.sampling.seed
        assert seed is not None, "random sampling needs a resolved seed (the Batcher sets one)"
        generator = torch.Generator(device=device)
        generator.manual_seed(_mix_seed(seed, spec.output_index))
        noise[row].exponential_(generator=generator)
    return noise.clamp_min_(_TINY).log_().neg_()


def _pack_logprobs(
    logits: torch.Tensor,  # [num_seqs, vocab] processed logits
    token_ids: torch.Tensor,  # [num_seqs] int64
    specs: Sequence[SampleSpec],
) -> PendingSample:
    """Gather the tokens and the logprobs asked for into one device buffer, so one transfer brings them back."""
    vocab_size = logits.shape[1]
    wanted = [i for i, spec in enumerate(specs) if spec.sampling.logprobs is not None]
    if not wanted:
        return PendingSample(token_ids, None, [], 0, specs, vocab_size)
    max_k = min(max(specs[i].sampling.logprobs or 0 for i in wanted), vocab_size)
    rows = _on_device(wanted, torch.int64, logits.device)
    logprobs = logits[rows].log_softmax(dim=-1)  # [wanted, vocab]
    chosen = logprobs.gather(1, token_ids[rows].view(-1, 1))  # [wanted, 1]
    top_values, top_ids = logprobs.topk(max_k, dim=-1)  # [wanted, max_k] each, highest first
    # One float64 buffer (exact for ids below 2**53): token ids, then per wanted row [chosen, ids..., values...].
    packed = torch.cat(
        [token_ids.to(torch.float64), torch.cat([chosen.double(), top_ids.double(), top_values.double()], 1).flatten()]
    )
    return PendingSample(token_ids, packed, wanted, max_k, specs, vocab_size)


def _unpack_logprobs(
    packed: list[float], wanted: list[int], max_k: int, specs: Sequence[SampleSpec], vocab_size: int
) -> list[tuple[int, TokenLogprob | None]]:
    num_seqs = len(specs)
    results: list[tuple[int, TokenLogprob | None]] = [(int(t), None) for t in packed[:num_seqs]]
    width = 1 + 2 * max_k
    for n, i in enumerate(wanted):
        record = packed[num_seqs + n * width : num_seqs + (n + 1) * width]
        token_id, k = results[i][0], min(specs[i].sampling.logprobs or 0, vocab_size)
        top = [(int(t), v) for t, v in zip(record[1 : 1 + k], record[1 + max_k : 1 + max_k + k], strict=True)]
        if all(t != token_id for t, _ in top):
            top.append((token_id, record[0]))  # at most k + 1 entries; still sorted, as it ranks below the top k
        results[i] = (token_id, TokenLogprob(token_id=token_id, logprob=record[0], top=tuple(top)))
    return results
