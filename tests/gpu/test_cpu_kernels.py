"""CPU decode kernels (gpu/cpu_kernels.c) and GGUF block recovery (gpu/cpu_quant.py) against the reference ops.

The C kernels sum in their own order, so they match within float32 rounding, except rotary + KV write (no sums:
bit-identical). Block recovery must give back exactly the values it was given, or nothing. A tiny Llama whose weights
are Q4_1 / Q8_0 blocks gives transformers' greedy tokens through the block kernels. Skipped where the kernels cannot
be built (no C compiler, no AVX2).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.models.test_llama_vs_hf import PROMPTS, assert_same_greedy, greedy_generate, hf_greedy, make_runner
from trillm.gpu import cpu_kernels, cpu_ops, cpu_quant, reference
from trillm.models.layers import build_cos_sin_cache

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="the CPU decode kernels cannot be built here")
HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 64, 16, 24


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def q4_1_weight(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:  # [rows, cols]: d * q + m per 32
    """Random Q4_1 blocks dequantized as gguf does (fp16 d and m; each block's extremes at q = 0 and 15)."""
    q = torch.randint(0, 16, (rows, cols // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # as llama.cpp's quantizer: the minimum at 0, the maximum at 15
    d = (torch.rand(rows, cols // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (torch.randn(rows, cols // 32, 1, generator=g) * 0.1).half().float()
    return (q * d + m).reshape(rows, cols)


def q8_0_weight(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:  # [rows, cols]: d * q per 32
    q = torch.randint(-127, 128, (rows, cols // 32, 32), generator=g).float()
    q[..., 0] = 127
    d = (torch.rand(rows, cols // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    return (q * d).reshape(rows, cols)


@pytest.mark.parametrize("num_rows", [1, 2, 3, 5, 8, 13])
def test_block_matmul_matches_the_dense_product(num_rows: int) -> None:
    g = _generator(num_rows)
    for kind, weight in (("q4_1", q4_1_weight(72, 96, g)), ("q8_0", q8_0_weight(40, 64, g))):
        blocks = cpu_quant.recover_blocks(weight)
        assert blocks is not None and blocks.kind == kind
        x = torch.randn(num_rows, weight.shape[1], generator=g)
        expected = (x.double() @ weight.double().t()).float()
        torch.testing.assert_close(cpu_quant.matmul(x, blocks), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols", [96, 1024])  # x rows of 8 in L1 (the 8-row tile) or not (two 4x2 tiles)
def test_block_matmul_gives_a_row_the_same_bits_in_any_batch(cols: int) -> None:
    """Every tile sums an output element in one order, so a row's outputs do not depend on its batch or position."""
    g = _generator(cols)
    for weight in (q4_1_weight(24, cols, g), q8_0_weight(16, cols, g)):
        blocks = cpu_quant.recover_blocks(weight)
        assert blocks is not None
        x = torch.randn(cpu_quant.MAX_ROWS, cols, generator=g)
        alone = torch.cat([cpu_quant.matmul(x[i:i + 1].contiguous(), blocks) for i in range(x.shape[0])])
        for num_rows in (2, 3, 4, 7, 8, 9, 13, 16, 31, cpu_quant.MAX_ROWS):
            for start in (0, cpu_quant.MAX_ROWS - num_rows):
                batch = x[start:start + num_rows].contiguous()
                assert torch.equal(cpu_quant.matmul(batch, blocks), alone[start:start + num_rows]), (num_rows, start)


def test_weights_that_are_not_blocks_stay_dense() -> None:
    g = _generator(1)
    weight = q4_1_weight(8, 64, g)
    weight[3, 5] += 1e-4  # one value off its block's grid
    assert cpu_quant.recover_blocks(weight) is None
    assert cpu_quant.recover_blocks(torch.randn(8, 64, generator=g)) is None
    assert cpu_quant.recover_blocks(q4_1_weight(6, 64, g)) is None  # rows not a multiple of 4
    assert cpu_quant.recover_blocks(q4_1_weight(8, 64, g).double()) is None


def test_fused_linear_over_blocks_matches_the_reference() -> None:
    g = _generator(2)
    weight, norm_weight = q4_1_weight(2 * 48, 64, g), torch.randn(64, generator=g)
    x, residual = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    model = torch.nn.Linear(64, 2 * 48, bias=False)
    model.weight.data.copy_(weight)
    assert cpu_quant.pack_model(model) == 1
    ours = cpu_ops.fused_linear(x, model.weight, None, norm_weight, 1e-5, residual, True)
    theirs = reference.fused_linear(x, weight, None, norm_weight, 1e-5, residual, True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert ours[1] is not None and torch.equal(ours[1], theirs[1])  # the residual sum is exact


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "num_tokens"), [(9, 3, 1), (4, 4, 3), (8, 1, 2)])
def test_rotary_cache_write_in_place_is_bit_identical(num_heads: int, num_kv_heads: int, num_tokens: int) -> None:
    g = _generator(num_heads)
    sizes = [num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM, num_kv_heads * HEAD_DIM]
    qkv = torch.randn(num_tokens, sum(sizes), generator=g)  # [num_tokens, q + k + v columns]
    shapes = [(num_tokens, n // HEAD_DIM, HEAD_DIM) for n in sizes]
    q, k, v = (part.reshape(shape) for part, shape in zip(qkv.split(sizes, dim=-1), shapes, strict=True))
    cos_sin = build_cos_sin_cache(head_dim=HEAD_DIM, rope_theta=1e5, rope_scaling=(), max_positions=512,
                                  device=torch.device("cpu"))  # fmt: skip
    positions, slots = torch.arange(num_tokens) + 40, torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:num_tokens]
    k_cache, v_cache = torch.zeros(2, NUM_BLOCKS, num_kv_heads, BLOCK_SIZE, HEAD_DIM)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    theirs = reference.rotary_cache_write(q.clone(), k.clone(), v.clone(), positions, cos_sin, ref_k, ref_v, slots)
    ours = cpu_ops.rotary_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    assert ours[0].data_ptr() == q.data_ptr()  # the C path ran (in place)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "lens", "head_dim"), [
    (9, 3, [1, 17, 64], HEAD_DIM), (16, 2, [100, 128, 128], HEAD_DIM), (4, 4, [33, 65, 7], 32),
    (2, 1, [31, 96, 128], 128), (6, 2, [40, 1, 90], 96),
])  # fmt: skip
def test_decode_attention_matches_the_reference(num_heads: int, num_kv_heads: int, lens: list[int],
                                               head_dim: int) -> None:  # fmt: skip
    """Few positions run on one thread, many (16 heads × 356 positions) on all (cpu_kernels.c PARALLEL_POSITIONS);
    one query head per KV head or a group; head_dim 64 and 128 (compiled as constants) and others; contexts that end
    inside a chunk of V rows (cpu_kernels.c VALUE_CHUNK) and a page."""
    g = _generator(num_heads)
    k_cache, v_cache = torch.randn(2, NUM_BLOCKS, num_kv_heads, BLOCK_SIZE, head_dim, generator=g)
    q = torch.randn(3, num_heads, head_dim, generator=g)
    tables = torch.randperm(NUM_BLOCKS, generator=g).reshape(3, 8).to(torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    ours = cpu_kernels.decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
    theirs = reference.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)


def test_decode_attention_past_the_kernels_group_limit_runs_in_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu_kernels.c keeps one softmax sum per query head of a group on the stack (MAX_GROUP of them)."""
    num_heads = cpu_kernels.MAX_GROUP + 2  # one KV head for all of them
    g = _generator(7)
    k_cache, v_cache = torch.randn(2, NUM_BLOCKS, 1, BLOCK_SIZE, HEAD_DIM, generator=g)
    q = torch.randn(3, num_heads, HEAD_DIM, generator=g)
    tables = torch.randperm(NUM_BLOCKS, generator=g).reshape(3, 8).to(torch.int32)
    context_lens = torch.tensor([5, 40, 77], dtype=torch.int32)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the C attention was called for a group past MAX_GROUP")

    monkeypatch.setattr(cpu_kernels, "decode_attention", refuse)
    ours = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
    theirs = reference.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_swiglu_matches_the_reference() -> None:
    x = torch.randn(3, 2 * 100, generator=_generator(6)) * 4
    torch.testing.assert_close(cpu_kernels.silu_and_mul(x), reference.silu_and_mul(x), rtol=2e-6, atol=1e-6)


def block_llama(num_layers: int, seed: int) -> Any:
    """A transformers Llama whose projections are Q4_1 blocks and whose tied embedding is Q8_0 (scaled up)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    g = _generator(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:  # the embedding (and tied lm_head) as Q8_0, projections as Q4_1, scaled up
                make = q8_0_weight if "embed" in name else q4_1_weight
                param.copy_(make(*param.shape, g) * (8.0 if "embed" in name else 4.0))
            else:
                param.normal_(1.0, 0.2)
    return model


@pytest.mark.slow
def test_tiny_llama_of_blocks_gives_transformers_greedy_tokens(tmp_path: Any) -> None:
    model = block_llama(num_layers=2, seed=0)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    model.save_pretrained(tmp_path)
    runner = make_runner(str(tmp_path))
    assert cpu_quant.block_weight(runner.model.model.layers[0].mlp.gate_up_proj.weight) is not None
    assert cpu_quant.block_weight(runner.model.model.embed_tokens.weight) is not None
    expected = [hf_greedy(model, prompt, 12) for prompt in PROMPTS]
    assert_same_greedy(model, greedy_generate(runner, PROMPTS, 12), expected)
