"""Checkpoint tensor sources: one named checkpoint tensor of which a rank reads (or draws) only its own slice.

Runs outside the event loop, inside rank processes (`gpu/model_builder.py` feeds them to `load_sharded_weights`).

A `WeightSource` knows the tensor's full checkpoint shape and materialises a slice on demand (`narrow`, torch's
signature: a plain `torch.Tensor` is one). The tensor-parallel layers narrow every source to their rank's rows or
columns before anything is read, so no rank, host or GPU ever holds a whole sharded tensor, let alone the whole model:

- `SafetensorsWeight`: a tensor of a safetensors file, read through `safe_open(...).get_slice` (the file is
  memory-mapped; only the slice's bytes are copied out). `iter_checkpoint` walks a folder's files, following
  `model.safetensors.index.json` when there is one.
- `RandomWeight`: a random preset's tensor (models/presets.py), computed element by element from a counter-based hash
  of (seed, tensor name, flat index) on the target device. Any slice is therefore exactly the corresponding part of
  the tp=1 tensor, on CPU and CUDA alike, and building one rank's shard allocates only that shard (plus a bounded
  chunk of int64 temporaries). Values: the sum of the four bytes of a 32-bit hash (Irwin-Hall, close to a normal,
  1,021 levels bounded at ±3.46σ) scaled to std INIT_STD, computed with integer ops and one float multiply (no
  transcendental function whose last bit could depend on the slice's alignment). Norm weights are ones. Cost: about
  15 int64 passes per element, ~0.1 µs per element on two CPU cores, well under a second per rank of a 70B model
  on an H100.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from trillm.models.loader import checkpoint_files

log = logging.getLogger(__name__)

INIT_STD = 0.02  # the std of every random matrix and bias; norms are ones
CHUNK_ELEMENTS = 1 << 22  # random slices are drawn in chunks of at most this many elements (bounds the temporaries)
_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B  # < 2**27: a 32-bit value times it stays inside int64
_IRWIN_HALL_STD = ((256**2 - 1) / 3) ** 0.5  # std of the sum of four uniform bytes (0 .. 255 each)
_IRWIN_HALL_MEAN = 2 * 255


class WeightSource(Protocol):
    """One checkpoint tensor: its full shape, and any slice along one dimension (torch.Tensor is one)."""

    @property
    def shape(self) -> Sequence[int]: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


def read_whole(source: WeightSource) -> torch.Tensor:
    """The whole tensor (replicated parameters: norms, embeddings, row-parallel biases)."""
    return source.narrow(0, 0, int(source.shape[0]))


# ---------------------------------------------------------------------------------------------------------------------
# Safetensors


class SafetensorsWeight:
    """A tensor of an open safetensors file; `narrow` copies out only the slice (valid while the file is open)."""

    def __init__(self, tensor_slice: Any) -> None:
        self._slice = tensor_slice
        self.shape = tuple(int(n) for n in tensor_slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        out: torch.Tensor = self._slice[index]
        return out


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[str, WeightSource]]:
    """Every (checkpoint name, source) of the folder's safetensors files; each source is read before the next comes."""
    from safetensors import safe_open

    files = checkpoint_files(folder)
    weight_map = _index_weight_map(folder)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if weight_map is not None and weight_map.get(name) != path.name:
                    continue  # the index places this tensor in another file: that copy is the one read
                yield name, SafetensorsWeight(f.get_slice(name))


def _index_weight_map(folder: str | Path) -> dict[str, str] | None:
    index = Path(folder) / "model.safetensors.index.json"
    if not index.is_file():
        return None
    with open(index, encoding="utf-8") as f:
        weight_map: dict[str, str] = json.load(f)["weight_map"]
    return weight_map


# ---------------------------------------------------------------------------------------------------------------------
# Random presets


class RandomWeight:
    """A random preset's tensor, any slice of which is drawn on `device` without the rest (module docstring)."""

    def __init__(self, name: str, shape: Sequence[int], *, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        self.name, self.shape, self.device, self.dtype = name, tuple(shape), device, dtype
        self.is_ones = name.endswith("norm.weight")
        self._key = zlib.crc32(f"{seed}:{name}".encode())  # 32 bits
        if math.prod(self.shape) > _MASK32:
            raise ValueError(f"{name}: {self.shape} has more elements than the 32-bit hash can index")

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if not 0 <= dim < len(self.shape) or start < 0 or start + length > self.shape[dim]:
            raise ValueError(f"{self.name}: slice {start}..{start + length} of dim {dim} outside {self.shape}")
        out_shape = list(self.shape)
        out_shape[dim] = length
        if self.is_ones:
            return torch.ones(out_shape, device=self.device, dtype=self.dtype)
        out = torch.empty(out_shape, device=self.device, dtype=self.dtype)
        row_elements = 1
        for n in out_shape[1:]:
            row_elements *= n
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, row_elements))
        for first in range(0, out_shape[0], rows_per_chunk):
            rows = min(rows_per_chunk, out_shape[0] - first)
            out.narrow(0, first, rows).copy_(self._draw(self._flat_index(dim, start, first, rows, out_shape)))
        return out

    def _flat_index(self, dim: int, start: int, first: int, rows: int, out_shape: list[int]) -> torch.Tensor:
        """Flat indices into the full tensor of output rows first .. first + rows of the slice."""
        row_ids = torch.arange(first, first + rows, device=self.device, dtype=torch.int64)  # [rows]
        if dim == 0:
            row_ids += start
        if len(self.shape) == 1:
            return row_ids
        col_ids = torch.arange(out_shape[1], device=self.device, dtype=torch.int64)  # [cols of the slice]
        if dim == 1:
            col_ids += start
        return row_ids[:, None] * self.shape[1] + col_ids[None, :]  # [rows, cols]; 2-D tensors only (checkpoints)

    def _draw(self, index: torch.Tensor) -> torch.Tensor:
        """INIT_STD-scaled Irwin-Hall(4) values at flat indices `index` (float32), from integer ops only."""
        index ^= self._key  # in place: `index` is this chunk's own temporary
        hashed = _mix32(index)
        total = hashed & 0xFF  # the sum of the hash's four bytes: 0 .. 1020, exact
        for shift in (8, 16, 24):
            total += (hashed >> shift) & 0xFF
        return (total - _IRWIN_HALL_MEAN).to(torch.float32) * (INIT_STD / _IRWIN_HALL_STD)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds), in place, of int64 values in 0 .. 2**32 - 1."""
    for _ in range(2):
        x ^= x >> 16
        x *= _HASH_MULTIPLIER  # < 2**32 * 2**27: no int64 overflow
        x &= _MASK32
    x ^= x >> 16
    return x


def iter_random_weights(
    shapes: dict[str, tuple[int, ...]], *, device: torch.device, dtype: torch.dtype, seed: int
) -> Iterator[tuple[str, WeightSource]]:
    """A `RandomWeight` for every checkpoint tensor of `shapes` (nothing is drawn until a slice is asked for)."""
    for name, shape in shapes.items():
        yield name, RandomWeight(name, shape, seed=seed, device=device, dtype=dtype)
