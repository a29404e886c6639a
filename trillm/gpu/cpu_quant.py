"""Block-quantized projections on the CPU: GGUF blocks recovered exactly from float32 weights, multiplied in C.

Runs outside the event loop, inside a rank process. A GGUF model reaches the rank as float32 weights dequantized from
Q4_1 / Q8_0 blocks of 32 (models/loader.py). Streaming those floats dominates a CPU decode step (538 MB a step for
SmolLM2-135M); the blocks hold the same values in 5.6× fewer bytes. `pack_model` recovers each weight's blocks from
its float32 values and keeps them only where every block reproduces every value bit for bit (the scale and minimum
are fp16 as in GGUF, and `fma(q, d, m)` rounds once, like gguf's `d * q + m`); any other weight stays dense. So the
weights are the ones transformers loads, and only the order of each float32 dot product's sum changes, as it does
between any two sgemm libraries.

The kernels (`cpu_kernels.c`: AVX2 + FMA, OpenMP over rows of W) are built by `cpu_kernels.py`; where they cannot
be, `pack_model` packs nothing and every projection stays dense.
`cpu_ops.fused_linear` calls `matmul` for up to MAX_ROWS rows of x (decode steps, and prefill chunks that short);
longer prefill chunks keep MKL's sgemm.
"""

from __future__ import annotations

import logging
import weakref

import attrs
import torch
from torch import nn

from trillm.gpu import cpu_kernels

log = logging.getLogger(__name__)

BLOCK = 32  # weights per GGUF block
GROUP_ROWS = 4  # rows of W interleaved block by block in the packed layout (cpu_kernels.c)
RECORD_BYTES = {"q4_1": 24, "q8_0": 36}  # float d, [float m], packed quants
MAX_ROWS = 48  # rows of x up to which the block kernel beats MKL's sgemm on the dense weight (docs/perf.md, CPU:
# SmolLM2's projections on the 2-core EPYC, 87 vs 120 ms at 32 rows, 127 vs 152 at 48, 173 vs 145 at 64)
CHUNK_ROWS = 4096  # rows of W recovered at a time (bounds the temporaries)


@attrs.frozen(kw_only=True)
class BlockWeight:
    """A [rows, cols] weight as GGUF blocks in the kernel's layout: [rows / 4, cols / 32, 4, record bytes] uint8."""

    kind: str  # "q4_1" or "q8_0"
    packed: torch.Tensor
    rows: int
    cols: int


# id(weight) → (weak reference to it, its blocks); keyed by the tensor object, as cpu_ops' rotary tables are.
_BLOCK_WEIGHTS: dict[int, tuple[weakref.ref[torch.Tensor], BlockWeight]] = {}


def _fp16_candidates(values: torch.Tensor) -> list[torch.Tensor]:
    """`values` rounded to fp16, and the fp16 neighbours either side (as float32)."""
    nearest = values.half()
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
    down = torch.nextafter(nearest, torch.full_like(nearest, float("-inf")))
    return [nearest.float(), up.float(), down.float()]


def _recover_q4_1(blocks: torch.Tensor) -> torch.Tensor | None:  # [rows, nb, 32] float32 -> [rows, nb, 24] uint8
    """Q4_1 records reproducing every value of `blocks`, or None where some block has no such record."""
    low, high = blocks.amin(-1), blocks.amax(-1)  # [rows, nb]: the minimum has q = 0, the maximum q = 15
    if not torch.equal(low.half().float(), low):
        return None
    found = torch.zeros_like(low, dtype=torch.bool)
    scale = torch.zeros_like(low)
    quants = torch.zeros_like(blocks, dtype=torch.uint8)
    offsets = blocks - low.unsqueeze(-1)  # [rows, nb, 32]
    for candidate in _fp16_candidates((high - low) / 15):  # the nearest fp16 scale almost always; its neighbours else
        d = candidate.unsqueeze(-1)  # [rows, nb, 1]
        q = offsets.div(d).nan_to_num_(0.0).round_().clamp_(0, 15)  # d = 0: a constant block, q = 0
        exact = (q.mul(d).add_(low.unsqueeze(-1)) == blocks).all(-1)  # q * d is exact: fp16 × 4 bits
        new = exact & ~found
        scale[new] = candidate[new]
        quants[new] = q[new].to(torch.uint8)
        found |= exact
        if bool(found.all()):
            break
    else:
        return None
    nibbles = quants[..., :16] | (quants[..., 16:] << 4)  # [rows, nb, 16]: element j low, element j + 16 high
    floats = torch.stack((scale, low), -1).view(torch.uint8)  # [rows, nb, 8]
    return torch.cat((floats, nibbles), -1)


def _recover_q8_0(blocks: torch.Tensor) -> torch.Tensor | None:  # [rows, nb, 32] float32 -> [rows, nb, 36] uint8
    """Q8_0 records reproducing every value of `blocks`, or None where some block has no such record."""
    scale = (blocks.abs().amax(-1) / 127).half().float()  # [rows, nb]: the largest magnitude has |q| = 127
    d = scale.unsqueeze(-1)
    q = torch.where(d > 0, blocks / d, 0.0).round_().clamp_(-128, 127)
    if not torch.equal(q * d, blocks):
        return None
    return torch.cat((scale.unsqueeze(-1).view(torch.uint8), q.to(torch.int8).view(torch.uint8)), -1)


def recover_blocks(weight: torch.Tensor) -> BlockWeight | None:  # [rows, cols] float32
    """The weight as Q4_1 blocks, else Q8_0 blocks, in the kernel's layout; None if neither holds it exactly."""
    rows, cols = weight.shape
    if weight.dtype != torch.float32 or rows % GROUP_ROWS or cols % BLOCK or not torch.isfinite(weight).all():
        return None
    for kind, recover in (("q4_1", _recover_q4_1), ("q8_0", _recover_q8_0)):
        parts = []
        for start in range(0, rows, CHUNK_ROWS):
            chunk = weight[start : start + CHUNK_ROWS].reshape(-1, cols // BLOCK, BLOCK)  # [chunk, nb, 32]
            records = recover(chunk)
            if records is None:
                break
            parts.append(records)
        else:
            records = torch.cat(parts)  # [rows, nb, record bytes]
            packed = records.view(rows // GROUP_ROWS, GROUP_ROWS, cols // BLOCK, -1).transpose(1, 2).contiguous()
            return BlockWeight(kind=kind, packed=packed, rows=rows, cols=cols)  # [rows / 4, nb, 4, record bytes]
    return None


def pack_model(model: nn.Module) -> int:
    """Recover blocks for every 2-D float32 weight of `model` that holds them exactly; returns how many."""
    if cpu_kernels.library() is None:
        return 0
    count, num_threads = 0, torch.get_num_threads()
    torch.set_num_threads(1)  # elementwise passes: 2.5 s on one core; two threads took 29 s on a busy 2-core machine
    try:
        for name, param in model.named_parameters():
            if param.dim() != 2:
                continue
            blocks = recover_blocks(param.data)
            if blocks is not None:
                _BLOCK_WEIGHTS[id(param)] = (weakref.ref(param), blocks)
                count += 1
            log.debug("%s: %s", name, blocks.kind if blocks is not None else "dense")
    finally:
        torch.set_num_threads(num_threads)
    return count


def block_weight(weight: torch.Tensor) -> BlockWeight | None:
    """The blocks `pack_model` recovered for this weight tensor (None: it is dense)."""
    entry = _BLOCK_WEIGHTS.get(id(weight))
    return entry[1] if entry is not None and entry[0]() is weight else None


def matmul(x: torch.Tensor, blocks: BlockWeight) -> torch.Tensor:  # [num_rows, cols] -> [num_rows, rows] float32
    """x Wᵀ through the block kernel (x float32 on the CPU)."""
    assert x.dtype == torch.float32 and x.shape[-1] == blocks.cols
    return cpu_kernels.block_matmul(x.contiguous(), blocks.kind, blocks.packed, blocks.rows)
