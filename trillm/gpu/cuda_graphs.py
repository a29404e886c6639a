"""Decode CUDA graphs: static decode input buffers, and one captured model forward per padded batch size.

Runs outside the event loop, in the rank process (or a test's thread). Without graphs a 7B decode step launches
~330 kernels (10 per layer) and the launch gaps alone exceed the batch-1 bandwidth floor; a graph replays them as
one launch.

- Batch sizes: 1, 2, 4, 8, then steps of 8 up to the first size that covers `max_batch_size` (at most 256). A
  decode batch of n sequences replays the smallest graph of at least n rows; the extra rows are padding (slot -1:
  they write no KV; context 1: they read block 0 and their output is ignored). Larger batches run eagerly.
- Inputs: `DecodeInputBuffers` holds every decode input in ONE int32 device buffer that all graphs read through
  fixed views, and a pinned host twin. A step writes the host twin with numpy and sends it with one non-blocking
  copy on the current stream, so the replay that follows on that stream sees it; an event guards the host twin
  against being rewritten while that copy is still in flight.
- Block tables in the graphs are `max_blocks_per_seq` wide (the longest sequence the runner serves); the decode
  kernel sizes its split-KV from that width and trims each split to the real context on the device.
- Capture: largest size first, all graphs in one memory pool (later graphs reuse the earlier captures' freed
  intermediates; each graph's output stays alive, so nothing aliases it). Each size gets one eager warm-up on the
  capture stream first (cuBLAS picks its kernels, kernels get their shared-memory limits). The kernels must have
  been compiled before (`kernels.compile_for_model`): NVRTC cannot run inside a capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from trillm.protocol.step import SeqStep
from trillm.models.layers import AttnMeta

log = logging.getLogger(__name__)

GRAPH_BATCH_STEP = 8
MAX_GRAPH_BATCH_SIZE = 256
SEGMENT_ALIGN = 4  # int32 elements: 16 bytes, the kernels' alignment rule for index tensors
PADDING_ROW = np.array([[0], [0], [-1], [1]], dtype=np.int32)  # id 0, position 0, slot -1 (no write), context 1

DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttnMeta], torch.Tensor]  # (ids, positions, meta) -> hidden


def graph_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Padded decode batch sizes to capture: 1, 2, 4, 8, 16, 24, ... up to the first covering max_batch_size."""
    cap = min(max_batch_size, MAX_GRAPH_BATCH_SIZE)
    sizes = [1]
    while sizes[-1] < cap:
        sizes.append(sizes[-1] * 2 if sizes[-1] < GRAPH_BATCH_STEP else sizes[-1] + GRAPH_BATCH_STEP)
    return tuple(sizes)


class DecodeInputBuffers:
    """Every decode input in one int32 device buffer read through views, filled from a pinned host twin by one copy.

    Layout (S = max_rows rounded up to a multiple of 4, so that every segment starts 16-byte aligned):
        [0, S) input ids   [S, 2S) positions   [2S, 3S) slot mapping   [3S, 4S) context lens
        [4S, 4S + rows * width) block tables, row-major [rows, width]
    A step of `rows` rows and table `width` sends only [0, 4S + rows * width).
    """

    def __init__(self, *, max_rows: int, max_width: int, block_size: int, device: torch.device) -> None:
        self.max_rows, self.max_width, self.block_size = max_rows, max_width, block_size
        self.stride = stride = -(-max_rows // SEGMENT_ALIGN) * SEGMENT_ALIGN
        size = 4 * stride + max_rows * max_width
        is_cuda = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=is_cuda)
        self._host_np = self.host.numpy()
        self.device_buffer = torch.zeros(size, dtype=torch.int32, device=device)
        self._cu_seqlens = torch.arange(stride + 1, dtype=torch.int32, device=device)  # one token per sequence
        self._copied = torch.cuda.Event() if is_cuda else None  # type: ignore[no-untyped-call]
        self._is_copy_pending = False
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, AttnMeta]] = {}

    def views(self, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor, AttnMeta]:
        """(input ids [rows], positions [rows], AttnMeta) over the device buffer, for `rows` rows of `width` blocks."""
        cached = self._views.get((rows, width))
        if cached is not None:
            return cached
        s, buf = self.stride, self.device_buffer
        meta = AttnMeta(
            slot_mapping=buf[2 * s : 2 * s + rows],
            block_tables=buf[4 * s : 4 * s + rows * width].view(rows, width),  # [rows, width]
            context_lens=buf[3 * s : 3 * s + rows],
            cu_seqlens_q=self._cu_seqlens[: rows + 1],
            is_decode=True,
        )
        views = (buf[:rows], buf[s : s + rows], meta)
        if width == self.max_width:  # the graphs' width: a few row counts, reused every step
            self._views[rows, width] = views
        return views

    def fill(self, seqs: Sequence[SeqStep], token_ids: np.ndarray, *, rows: int, width: int) -> None:
        """Write one decode step (len(seqs) <= rows real rows, the rest padding) and send it to the device."""
        num_seqs, s, block_size = len(seqs), self.stride, self.block_size
        if not num_seqs <= rows <= self.max_rows or width > self.max_width:
            raise ValueError(f"{num_seqs} sequences in {rows} rows of width {width} exceed the decode buffers")
        self._wait_for_copy()
        head = self._host_np[: 4 * s].reshape(4, s)  # [4, S]: ids, positions, slots, context lens (host twin views)
        tables = self._host_np[4 * s : 4 * s + rows * width].reshape(rows, width)  # [rows, width]
        tables.fill(0)
        context_lens = np.fromiter((seq.context_len for seq in seqs), dtype=np.int64, count=num_seqs)
        for i, seq in enumerate(seqs):
            num_blocks = -(-seq.context_len // block_size)  # the blocks the context uses; the table may hold more
            tables[i, :num_blocks] = seq.block_table[:num_blocks]
        positions = context_lens - 1
        head[0, :num_seqs] = token_ids
        head[1, :num_seqs] = positions
        head[2, :num_seqs] = tables[np.arange(num_seqs), positions // block_size] * block_size + positions % block_size
        head[3, :num_seqs] = context_lens
        head[:, num_seqs:rows] = PADDING_ROW
        self._send(4 * s + rows * width)

    def fill_padding(self, rows: int, width: int) -> None:
        """Make all `rows` rows padding (graph capture and warm-up): no KV writes, context 1 in block 0."""
        self.fill((), np.zeros(0, dtype=np.int64), rows=rows, width=width)

    def _wait_for_copy(self) -> None:
        if self._copied is not None and self._is_copy_pending:
            self._copied.synchronize()  # the previous step's copy may still be reading the host twin
            self._is_copy_pending = False

    def _send(self, num_elements: int) -> None:
        self.device_buffer[:num_elements].copy_(self.host[:num_elements], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
            self._is_copy_pending = True


class DecodeGraphs:
    """One captured decode forward per padded batch size, sharing one memory pool and one set of input buffers."""

    def __init__(self, forward: DecodeForward, buffers: DecodeInputBuffers, sizes: Sequence[int]) -> None:
        if max(sizes) > buffers.max_rows:
            raise ValueError(f"graph batch size {max(sizes)} exceeds the decode buffers' {buffers.max_rows} rows")
        self._forward, self.buffers, self.sizes = forward, buffers, tuple(sorted(sizes))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0

    @property
    def width(self) -> int:
        return self.buffers.max_width

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured size holding `num_seqs` rows, or None (run eagerly)."""
        return next((size for size in self.sizes if size >= num_seqs), None)

    def capture(self) -> float:
        """Capture every size, largest first (runs outside the event loop); returns the seconds it took."""
        start = time.perf_counter()
        device = self.buffers.device_buffer.device
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        for rows in sorted(self.sizes, reverse=True):
            self.buffers.fill_padding(rows, self.width)
            ids, positions, meta = self.buffers.views(rows, self.width)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self._forward(ids, positions, meta)  # warm-up, outside the pool
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                hidden = self._forward(ids, positions, meta)  # [rows, hidden], lives in the pool
            self._graphs[rows] = (graph, hidden)
        torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start
        log.info("captured %d decode graphs (batch %s) in %.2f s", len(self.sizes), self.sizes, self.capture_s)
        return self.capture_s

    def replay(self, rows: int) -> torch.Tensor:  # [rows, hidden]
        """Replay the graph of `rows` rows on the current stream; its inputs must be filled for `rows` rows."""
        graph, hidden = self._graphs[rows]
        graph.replay()
        return hidden
