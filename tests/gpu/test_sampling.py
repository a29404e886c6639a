"""Tests of the sampler: greedy, seeded draws, filters, penalties, stop masking and logprobs (CPU; one CUDA check)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trillm.protocol.api import SamplingParams
from trillm.protocol.step import SampleSpec
from trillm.gpu.sampling import _draw, sample

VOCAB = 32


def spec(output_index: int = 0, **sampling: object) -> SampleSpec:
    extra = {k: sampling.pop(k) for k in ("eos_token_ids", "history_token_ids", "num_prompt_tokens") if k in sampling}
    return SampleSpec(sampling=SamplingParams(**sampling), output_index=output_index, **extra)  # type: ignore[arg-type]


def tokens(logits: torch.Tensor, specs: list[SampleSpec]) -> list[int]:
    return [token_id for token_id, _ in sample(logits, specs)]


def random_logits(num_rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax_and_leaves_input_alone() -> None:
    logits = random_logits(5)
    before = logits.clone()
    assert tokens(logits, [spec(temperature=0.0)] * 5) == logits.argmax(-1).tolist()
    assert torch.equal(logits, before)
    assert sample(torch.empty(0, VOCAB), []) == []


def test_same_seed_and_index_give_same_token_whatever_the_batch() -> None:
    flat = torch.zeros(1, VOCAB)  # uniform: every token is equally likely, so only the noise decides
    target = spec(7, seed=1234)
    alone = tokens(flat, [target])[0]
    others = [spec(temperature=0.0), spec(3, seed=99, top_k=5), spec(0, seed=5, temperature=0.3, logprobs=2)]
    batch = torch.cat([random_logits(3, seed=1), flat])
    assert tokens(batch, [*others, target])[3] == alone
    batch = torch.cat([flat, random_logits(3, seed=2)])
    assert tokens(batch, [target, *others])[0] == alone
    draws = tokens(flat.expand(20, VOCAB), [spec(i, seed=1234) for i in range(20)])
    assert len(set(draws)) > 5  # different output indices draw independently
    assert tokens(flat, [spec(7, seed=1235)])[0] != alone or tokens(flat, [spec(7, seed=1236)])[0] != alone


def test_negative_and_huge_seeds_are_accepted() -> None:
    flat = torch.zeros(2, VOCAB)
    assert len(tokens(flat, [spec(0, seed=-1), spec(2**70, seed=2**70)])) == 2


def test_top_k_one_equals_greedy() -> None:
    # `sample` sends top_k = 1 rows down the greedy branch (SamplingParams.is_greedy), so the top-k filter itself is
    # checked through `_draw`: on its own (every row has a top_k: `topk`), and next to an unfiltered row (full sort).
    # At temperature 5 the logits are nearly flat: without the filter, the noise would pick other tokens.
    logits = random_logits(16, seed=3)
    argmax = logits.argmax(-1).tolist()
    specs = [spec(i, seed=i, top_k=1, temperature=5.0) for i in range(16)]
    assert tokens(logits, specs) == argmax
    assert _draw(logits, specs).tolist() == argmax
    unfiltered = spec(16, seed=16, temperature=5.0)
    assert _draw(torch.cat([logits, logits[:1]]), [*specs, unfiltered]).tolist()[:16] == argmax


def test_top_k_draws_only_among_the_k_most_likely_tokens() -> None:
    # Nearly flat logits, most likely first; rows of top_k 2 and 3 share a batch (the filter masks by rank).
    logits = torch.linspace(0.0, -0.1, VOCAB).expand(300, VOCAB)
    specs = [spec(0, seed=s, top_k=2 + s % 2) for s in range(300)]
    drawn = tokens(logits, specs)
    assert set(drawn[0::2]) == {0, 1}
    assert set(drawn[1::2]) == {0, 1, 2}


def test_tiny_top_p_is_argmax() -> None:
    logits = random_logits(8, seed=4)
    specs = [spec(i, seed=i, top_p=1e-6, temperature=2.0) for i in range(8)]
    assert tokens(logits, specs) == logits.argmax(-1).tolist()
    assert tokens(logits, [spec(i, seed=i, top_p=0.0) for i in range(8)]) == logits.argmax(-1).tolist()


def test_min_p_keeps_only_tokens_near_the_top() -> None:
    # probabilities proportional to 8, 6, 3, 1 (and 0.1 for the rest): min_p 0.5 keeps p >= 4 -> tokens 0 and 1
    weights = torch.full((VOCAB,), 0.1)
    weights[:4] = torch.tensor([8.0, 6.0, 3.0, 1.0])
    logits = weights.log().expand(200, VOCAB)
    seen = Counter(tokens(logits, [spec(0, seed=s, min_p=0.5) for s in range(200)]))
    assert set(seen) == {0, 1}


def test_temperature_reshapes_the_distribution() -> None:
    # Chi-square over 3000 deterministic seeds on a 4-token vocabulary; 16.27 is the 0.1 % critical value (3 dof).
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    num_draws, temperature = 3000, 0.7
    drawn = Counter(
        tokens(logits.expand(num_draws, 4), [spec(0, seed=s, temperature=temperature) for s in range(num_draws)])
    )

    def chi_square(expected_probs: torch.Tensor) -> float:
        return sum((drawn[i] - num_draws * p) ** 2 / (num_draws * p) for i, p in enumerate(expected_probs.tolist()))

    assert chi_square((logits / temperature).softmax(-1)) < 16.27
    assert chi_square(logits.softmax(-1)) > 50  # the untempered distribution is clearly rejected


def test_logit_bias_forces_and_forbids_tokens() -> None:
    logits = random_logits(1, seed=5)
    low = int(logits.argmin())
    assert tokens(logits, [spec(temperature=0.0, logit_bias=((low, 100.0),))]) == [low]
    assert tokens(logits, [spec(0, seed=3, logit_bias=((low, 100.0),))]) == [low]
    top2 = logits[0].topk(2).indices.tolist()
    assert tokens(logits, [spec(temperature=0.0, logit_bias=((top2[0], -100.0), (10**9, 5.0)))]) == [top2[1]]


def processed_logprobs(logits: list[float], **sampling: object) -> list[float]:
    """Logprobs of every token after penalties, as the sampler reports them (logprobs = vocab size)."""
    [(_, logprob)] = sample(torch.tensor([logits]), [spec(temperature=0.0, logprobs=len(logits), **sampling)])
    assert logprob is not None
    return [value for _, value in sorted(logprob.top)]


def test_repetition_penalty_matches_hf_semantics() -> None:
    logits = [2.0, 1.5, -1.0, -0.5]
    # token 0 (prompt) and token 3 (output) were seen: 2.0 / 2 = 1.0 and -0.5 * 2 = -1.0; token 1 now wins
    kwargs = dict(repetition_penalty=2.0, history_token_ids=(0, 3, 3), num_prompt_tokens=1)
    assert tokens(torch.tensor([logits]), [spec(temperature=0.0, **kwargs)]) == [1]  # type: ignore[arg-type]
    expected = torch.tensor([1.0, 1.5, -1.0, -1.0]).log_softmax(-1).tolist()
    assert processed_logprobs(logits, **kwargs) == pytest.approx(expected, abs=1e-6)


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = [1.0, 1.5, 0.2, 1.4]
    # token 1 appears twice in the output: 1.5 - 2 * 0.5 - 0.3 = 0.2; token 3 appears in the prompt only: unchanged
    kwargs = dict(frequency_penalty=0.5, presence_penalty=0.3, history_token_ids=(3, 3, 1, 1), num_prompt_tokens=2)
    assert tokens(torch.tensor([logits]), [spec(temperature=0.0, **kwargs)]) == [3]  # type: ignore[arg-type]
    expected = torch.tensor([1.0, 0.2, 0.2, 1.4]).log_softmax(-1).tolist()
    assert processed_logprobs(logits, **kwargs) == pytest.approx(expected, abs=1e-6)
    # a negative presence penalty rewards repetition
    rewarded = processed_logprobs(logits, presence_penalty=-1.0, history_token_ids=(2,), num_prompt_tokens=0)
    assert rewarded == pytest.approx(torch.tensor([1.0, 1.5, 1.2, 1.4]).log_softmax(-1).tolist(), abs=1e-6)


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])  # eos 0, stop id 1 are the favourites
    early = spec(1, temperature=0.0, min_tokens=2, stop_token_ids=(1,), eos_token_ids=(0,))
    assert tokens(logits, [early]) == [2]
    done = spec(2, temperature=0.0, min_tokens=2, stop_token_ids=(1,), eos_token_ids=(0,))
    assert tokens(logits, [done]) == [0]
    ignore_eos = spec(5, temperature=0.0, min_tokens=2, stop_token_ids=(1,), eos_token_ids=(0,), ignore_eos=True)
    assert tokens(logits, [ignore_eos]) == [1]  # EOS stays masked, the stop id is allowed again
    seeded = [spec(0, seed=s, min_tokens=1, eos_token_ids=(0,), stop_token_ids=(1,)) for s in range(50)]
    assert not {0, 1} & set(tokens(logits.expand(50, 4), seeded))


def test_logprobs_are_log_softmax_before_temperature() -> None:
    logits = random_logits(2, seed=6)
    results = sample(logits, [spec(temperature=0.0, logprobs=3), spec(4, seed=8, temperature=0.3, top_k=4, logprobs=3)])
    reference = logits.log_softmax(-1)
    for row, (token_id, logprob) in enumerate(results):
        assert logprob is not None and logprob.token_id == token_id
        assert logprob.logprob == pytest.approx(reference[row, token_id].item(), abs=1e-6)
        values, ids = reference[row].topk(3)
        assert [t for t, _ in logprob.top[:3]] == ids.tolist()
        assert [v for _, v in logprob.top[:3]] == pytest.approx(values.tolist(), abs=1e-6)
    assert sample(logits[:1], [spec(temperature=0.0)]) == [(int(logits[0].argmax()), None)]


def test_top_logprobs_include_the_sampled_token() -> None:
    logits = torch.tensor([0.3, 0.2, 0.1, 0.0]).expand(40, 4)
    results = sample(logits, [spec(0, seed=s, logprobs=1) for s in range(40)])
    off_top = [(t, lp) for t, lp in results if t != 0]
    assert off_top, "a near-uniform distribution must sometimes draw a token other than the argmax"
    reference = logits[0].log_softmax(-1).tolist()
    for token_id, logprob in off_top:
        assert logprob is not None
        assert [t for t, _ in logprob.top] == [0, token_id]
        assert [v for _, v in logprob.top] == pytest.approx([reference[0], reference[token_id]], abs=1e-6)
    [(token_id, logprob)] = sample(logits[:1], [spec(temperature=0.0, logprobs=0)])
    assert logprob is not None and [t for t, _ in logprob.top] == [0]  # k = 0 still reports the sampled token


def allowed_tokens(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Independent reference of the top-k / top-p / min-p survivors (with a little slack at the top-p boundary)."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k:
        order = order[:top_k]
    weights = [math.exp((logits[i] - logits[order[0]]) / temperature) for i in order]
    total = sum(weights)
    kept, mass = [], 0.0
    for i, weight in zip(order, weights, strict=True):
        kept.append((i, weight))
        mass += weight / total
        if mass >= top_p + 1e-4:
            break
    return {i for i, weight in kept if weight >= min_p * weights[0] * (1 - 1e-4)}


@settings(max_examples=40, deadline=None)
@given(
    eighths=st.lists(st.integers(-64, 64), min_size=2, max_size=12, unique=True),  # distinct logits, no ties
    temperature=st.floats(0.05, 3.0),
    top_k=st.integers(0, 6),
    top_p=st.floats(0.0, 1.0),
    min_p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**63),
    output_index=st.integers(0, 10_000),
)
def test_sampled_token_survives_the_filters(
    eighths: list[int], temperature: float, top_k: int, top_p: float, min_p: float, seed: int, output_index: int
) -> None:
    logits = [value / 8 for value in eighths]
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, logprobs=2)
    [(token_id, logprob)] = sample(torch.tensor([logits]), [spec(output_index, **params)])  # type: ignore[arg-type]
    assert token_id in allowed_tokens(logits, temperature, top_k, top_p, min_p)
    assert logprob is not None and math.isfinite(logprob.logprob)
    assert token_id in {t for t, _ in logprob.top}


@pytest.mark.gpu
def test_cuda_sampling_is_batch_invariant_and_greedy_exact() -> None:
    logits = random_logits(6, vocab=50_000, seed=9).cuda()
    greedy = tokens(logits, [spec(temperature=0.0)] * 6)
    assert greedy == logits.argmax(-1).tolist()
    target = spec(11, seed=77, top_p=0.95, top_k=100, logprobs=3)
    alone = sample(logits[2:3], [target])[0]
    penalised = spec(0, seed=2, repetition_penalty=1.2, history_token_ids=(1, 2, 3))
    mixed = sample(logits, [spec(temperature=0.0), spec(1, seed=1), target, penalised, *[spec(temperature=0.0)] * 2])
    assert mixed[2] == alone
