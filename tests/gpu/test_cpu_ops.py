"""CPU op set vs the reference ops: same names and signatures, the same results (bit-identical where no reduction
order changes, else within float32 rounding), on float32 inputs drawn from a seeded generator.

Edge shapes: one token, a chunk ending exactly on a block boundary, several GQA ratios, padding slots (-1), q and k
that are not neighbours in memory (the per-tensor rotary path), a prefill chunk after cached positions, and decode
rows of different context lengths (the masked SDPA path).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from trillm.gpu import cpu_ops, reference
from trillm.models.layers import build_cos_sin_cache

OPS = ("rms_norm", "silu_and_mul", "fused_linear", "apply_rotary", "write_kv_cache", "rotary_cache_write",
       "paged_decode_attention", "paged_prefill_attention")  # fmt: skip
HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 64, 16, 24
ATOL = 2e-6  # attention: SDPA and the reference's einsum sum in different orders


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cos_sin() -> torch.Tensor:  # [512, head_dim]
    return build_cos_sin_cache(head_dim=HEAD_DIM, rope_theta=1e5, rope_scaling=(), max_positions=512,
                               device=torch.device("cpu"))  # fmt: skip


def _caches(num_kv_heads: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (NUM_BLOCKS, num_kv_heads, BLOCK_SIZE, HEAD_DIM)
    g = _generator(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_names_and_signatures_match_the_reference() -> None:
    for name in OPS:
        ours, theirs = inspect.signature(getattr(cpu_ops, name)), inspect.signature(getattr(reference, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()], name


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_norm_silu_and_fused_linear_are_bit_identical(num_tokens: int) -> None:
    g = _generator(num_tokens)
    x, residual, weight = torch.randn(num_tokens, 96, generator=g), torch.randn(num_tokens, 96, generator=g), torch.randn(96, generator=g)
    proj = torch.randn(2 * 40, 96, generator=g)
    for ours, theirs in (
        (cpu_ops.rms_norm(x, weight, 1e-5, residual), reference.rms_norm(x, weight, 1e-5, residual)),
        (cpu_ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)),
        (cpu_ops.fused_linear(x, proj, None, weight, 1e-5, residual, True),
         reference.fused_linear(x, proj, None, weight, 1e-5, residual, True)),
    ):  # fmt: skip
        assert torch.equal(ours[0], theirs[0])
        assert (ours[1] is None and theirs[1] is None) or torch.equal(ours[1], theirs[1])
    assert torch.equal(cpu_ops.silu_and_mul(proj[:num_tokens]), reference.silu_and_mul(proj[:num_tokens]))


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("is_fused_qkv", [True, False])
def test_rotary_cache_write_is_bit_identical(num_heads: int, num_kv_heads: int, is_fused_qkv: bool) -> None:
    g, num_tokens = _generator(num_heads), 2 * BLOCK_SIZE  # the chunk ends exactly on a block boundary
    sizes = [num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM, num_kv_heads * HEAD_DIM]
    if is_fused_qkv:  # q, k, v: neighbouring column ranges of one row, as after the fused projection's split
        q, k, v = torch.randn(num_tokens, sum(sizes), generator=g).split(sizes, dim=-1)
    else:
        q, k, v = (torch.randn(num_tokens, size, generator=g) for size in sizes)
    q = q.reshape(num_tokens, num_heads, HEAD_DIM)  # [num_tokens, num_heads, head_dim]
    k = k.reshape(num_tokens, num_kv_heads, HEAD_DIM)  # [num_tokens, num_kv_heads, head_dim]
    v = v.reshape(num_tokens, num_kv_heads, HEAD_DIM)
    positions = torch.arange(num_tokens) + 3
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:num_tokens]
    slots[5] = -1  # padding: written nowhere
    ours_k, ours_v = _caches(num_kv_heads, 0)
    ref_k, ref_v = ours_k.clone(), ours_v.clone()
    q_in = q.clone()
    theirs = reference.rotary_cache_write(q.clone(), k.clone(), v.clone(), positions, _cos_sin(), ref_k, ref_v, slots)
    # up to cpu_quant.MAX_ROWS tokens of a fused qkv row the C kernel rotates q and k in place (the model's own use)
    ours = cpu_ops.rotary_cache_write(q, k, v, positions, _cos_sin(), ours_k, ours_v, slots)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert torch.equal(ours_k, ref_k) and torch.equal(ours_v, ref_v)
    rotated = cpu_ops.apply_rotary(q_in, positions, _cos_sin())
    assert torch.equal(rotated, reference.apply_rotary(q_in, positions, _cos_sin()))


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_matches_with_mixed_context_lengths(num_heads: int, num_kv_heads: int) -> None:
    g = _generator(num_heads + 100)
    k_cache, v_cache = _caches(num_kv_heads, 1)
    q = torch.randn(3, num_heads, HEAD_DIM, generator=g)
    tables = torch.randperm(NUM_BLOCKS, generator=g)[:12].reshape(3, 4).to(torch.int32)
    for lens in ([1, 17, 64], [BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE]):  # masked, then every row full (no mask)
        context_lens = torch.tensor(lens, dtype=torch.int32)
        ours = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
        theirs = reference.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_prefill_attention_matches_whole_prompts_and_chunks_after_cached_positions() -> None:
    g, num_heads, num_kv_heads = _generator(7), 9, 3
    k_cache, v_cache = _caches(num_kv_heads, 2)
    q_lens, context_lens = [1, 20, 16, 5], [1, 20, 40, 37]  # whole prompts, then chunks after 24 and 32 cached
    cu = torch.tensor([0, 1, 21, 37, 42], dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_heads, HEAD_DIM, generator=g)
    tables = torch.randperm(NUM_BLOCKS, generator=g)[:12].reshape(4, 3).to(torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    ours = cpu_ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, 0.125)
    theirs = reference.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, 0.125)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_other_dtypes_take_the_reference_path() -> None:
    g = _generator(3)
    x, weight = torch.randn(4, 32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    assert torch.equal(cpu_ops.rms_norm(x, weight, 1e-5)[0], reference.rms_norm(x, weight, 1e-5)[0])


def test_rotary_follows_a_new_cos_sin_cache_at_a_freed_caches_address() -> None:
    """A runner's cos/sin cache freed and another (another rope scaling) allocated at its address, with its shape:
    the rotary tables cached per cache must follow the new one (CI once got the old runner's rotation)."""
    positions, x = torch.arange(7) + 40, torch.randn(7, 2, HEAD_DIM, generator=_generator(5))
    first = _cos_sin()
    cpu_ops.apply_rotary(x, positions, first)  # caches first's table
    linear = (("factor", 2.0), ("rope_type", "linear"))
    scaled = build_cos_sin_cache(head_dim=HEAD_DIM, rope_theta=1e5, rope_scaling=linear, max_positions=512,
                                 device=torch.device("cpu"))  # fmt: skip
    second = torch.empty(0).set_(first.untyped_storage(), 0, first.shape, first.stride())  # same address and shape
    second.copy_(scaled)
    assert second.data_ptr() == first.data_ptr() and second is not first
    assert torch.equal(cpu_ops.apply_rotary(x, positions, second), reference.apply_rotary(x, positions, scaled))
