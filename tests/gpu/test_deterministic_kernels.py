"""Deterministic-mode kernels (gpu/kernels/deterministic.cu): close to the reference, and bit-identical for a token
whatever else shares its launch.

Same two backends as test_kernels.py (CUDA on a GPU; the CPU emulator with TRILLM_KERNEL_EMULATOR=1, small shapes).
Batch invariance is checked the strict way: `torch.equal` between a row computed alone, among other rows, at another
position of the batch, and under every tile shape; between a token's attention in a decode launch (chunks in parallel,
then merged) and in a prefill launch (chunks folded in one CTA), alone and among other sequences.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.gpu.test_kernels import (  # noqa: F401 - fixtures
    assert_close,
    backend_device,
    dev,
    emulator_build_dir,
    is_emulated,
    kv_pool,
    paged_layout,
    rand,
)
from trillm.gpu import reference
from trillm.gpu.kernels import deterministic as det


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("rows", "n", "k", "with_bias"), [(1, 48, 96, False), (5, 40, 72, True), (19, 64, 40, True),
                                                         (70, 32, 64, False)])  # fmt: skip
def test_det_linear_matches_the_reference_under_every_tile_shape(
    dev: torch.device, rows: int, n: int, k: int, with_bias: bool
) -> None:
    g = _gen(rows * 1000 + n)
    x = rand(g, rows, k, dtype=torch.bfloat16, device=dev)
    w = rand(g, n, k, dtype=torch.bfloat16, device=dev, scale=0.2)
    bias = rand(g, n, dtype=torch.bfloat16, device=dev) if with_bias else None
    want = reference.fused_linear(x.double(), w.double(), None if bias is None else bias.double())[0]
    outs = {config: det.det_linear(x, w, bias, config=config) for config in det.GEMM_CONFIGS}
    for config, out in outs.items():
        assert_close(out, want, torch.bfloat16, f"config {config}")
        assert torch.equal(out.cpu(), outs["s"].cpu()), f"config {config} summed in another order than 's'"


def test_det_linear_rows_are_the_same_alone_and_in_any_batch(dev: torch.device) -> None:
    g = _gen(7)
    rows, n, k = 37 if is_emulated(dev) else 300, 64, 96
    x = rand(g, rows, k, dtype=torch.bfloat16, device=dev)
    w = rand(g, n, k, dtype=torch.bfloat16, device=dev, scale=0.2)
    bias = rand(g, n, dtype=torch.bfloat16, device=dev)
    whole = det.det_linear(x, w, bias).cpu()  # the large-M tile shape
    for i in (0, 5, rows - 1):
        alone = det.det_linear(x[i : i + 1], w, bias).cpu()  # M = 1: the decode tile shape
        assert torch.equal(alone[0], whole[i]), f"row {i} alone differs from row {i} in a batch of {rows}"
    shuffled = torch.randperm(rows, generator=g)
    again = det.det_linear(x[shuffled.to(dev)].contiguous(), w, bias).cpu()
    assert torch.equal(again, whole[shuffled]), "rows moved within the batch changed their bits"


def test_det_linear_rejects_what_it_cannot_run(dev: torch.device) -> None:
    x = torch.zeros(2, 16, dtype=torch.bfloat16, device=dev)
    with pytest.raises(ValueError, match="multiples of 8"):
        det.det_linear(x, torch.zeros(12, 16, dtype=torch.bfloat16, device=dev))
    with pytest.raises(ValueError, match="row-major"):
        det.det_linear(x, torch.zeros(16, 16, dtype=torch.bfloat16, device=dev).t())


def _attention_case(dev: torch.device, seed: int, context_lens: list[int], num_heads: int, num_kv_heads: int,
                    head_dim: int, block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    tables, num_blocks = paged_layout(g, context_lens, block_size, dev)
    k_cache, v_cache = kv_pool(g, num_blocks, num_kv_heads, block_size, head_dim, torch.bfloat16, dev)
    return tables, k_cache, v_cache


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 64), (3, 1, 128), (2, 2, 128)])
def test_det_attention_prefill_and_decode_give_the_same_bits(
    dev: torch.device, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """Two sequences (one spanning several 256-position chunks): a prefill chunk of each, then every one of those
    positions again as a decode row, alone and in a batch: equal to each other bit for bit, and to the reference."""
    context_lens = [300, 45] if is_emulated(dev) else [1100, 77]
    q_lens = [5, 3]
    tables, k_cache, v_cache = _attention_case(dev, num_heads * 10 + head_dim, context_lens, num_heads, num_kv_heads,
                                               head_dim)  # fmt: skip
    g = _gen(99)
    q = rand(g, sum(q_lens), num_heads, head_dim, dtype=torch.bfloat16, device=dev)
    cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=dev)
    ctx = torch.tensor(context_lens, dtype=torch.int32, device=dev)
    scale = head_dim**-0.5
    prefill = det.paged_prefill_attention(q, k_cache, v_cache, tables, cu, ctx, scale)
    want = reference.paged_prefill_attention(q.double(), k_cache.double(), v_cache.double(), tables, cu, ctx, scale)
    assert_close(prefill, want, torch.bfloat16, "prefill")
    # the same tokens as decode rows: row j sees its own position's context
    seq_of = [0] * q_lens[0] + [1] * q_lens[1]
    pos_ctx = [context_lens[s] - (int(cu[s + 1]) - j) + 1 for j, s in enumerate(seq_of)]
    rows_tables = tables[torch.tensor(seq_of, device=dev)].contiguous()
    decode = det.paged_decode_attention(q, k_cache, v_cache, rows_tables, torch.tensor(pos_ctx, dtype=torch.int32,
                                                                                       device=dev), scale)  # fmt: skip
    assert torch.equal(decode.cpu(), prefill.cpu()), "a position decoded differs from the same position prefilled"
    for j in (0, len(seq_of) - 1):
        row_table = rows_tables[j : j + 1].clone()  # a fresh allocation: the kernels take 16-byte aligned tables
        alone = det.paged_decode_attention(q[j : j + 1], k_cache, v_cache, row_table,
                                           torch.tensor([pos_ctx[j]], dtype=torch.int32, device=dev), scale)
        assert torch.equal(alone[0].cpu(), prefill[j].cpu()), f"token {j} decoded alone differs"


def test_det_attention_padded_tables_and_wide_grids_change_nothing(dev: torch.device) -> None:
    """A CUDA-graph-style call (block tables padded far past the context, so the grid has empty chunks)."""
    tables, k_cache, v_cache = _attention_case(dev, 3, [260, 20], 4, 4, 64)
    g = _gen(4)
    q = rand(g, 2, 4, 64, dtype=torch.bfloat16, device=dev)
    ctx = torch.tensor([260, 20], dtype=torch.int32, device=dev)
    base = det.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125)
    padded = torch.cat([tables, torch.zeros(2, 40, dtype=torch.int32, device=dev)], dim=1).contiguous()
    wide = det.paged_decode_attention(q, k_cache, v_cache, padded, ctx, 0.125)
    assert math.ceil(padded.shape[1] * 16 / det.ATTN_CHUNK) > math.ceil(tables.shape[1] * 16 / det.ATTN_CHUNK)
    assert torch.equal(base.cpu(), wide.cpu())
    want = reference.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), tables, ctx, 0.125)
    assert_close(base, want, torch.bfloat16, "decode")
