"""Batch inputs: one StepPlan turned into the model's device inputs (`StepInputs`), on one rank.

Runs outside the event loop, inside a rank process (or a test's own thread); `ModelRunner` owns one builder.

Batch inputs are built on the host with numpy (one vectorised pass per sequence, no per-token Python). On CPU they
are wrapped as tensors; on CUDA every index tensor is int32, packed into one pinned host buffer and sent with ONE
non-blocking copy (`PinnedUpload`). Decode-only steps on CUDA write the static buffers of `gpu/cuda_graphs.py`
instead: padded to the size of a captured graph once the runner hands the graphs over (`use_graphs`), or exactly
sized for an eager forward (graphs off or batch too large).

Step overlap. A decode planned before the previous step's sample was known carries `PREVIOUS_TOKEN`; the builder
substitutes the token this rank sampled for that seq_id in the previous plan (`remember_sampled`), kept in a small
host dict that only holds the seq_ids of the latest plan (bounded: `forget_absent_sequences`). Why every rank can
substitute the same id is in `gpu/runner.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import attrs
import numpy as np
import torch

from trillm.gpu.cuda_graphs import DecodeGraphs, DecodeInputBuffers, graph_batch_sizes
from trillm.models.layers import AttnMeta
from trillm.protocol.step import PREVIOUS_TOKEN, SampleSpec, SeqStep, StepPlan

log = logging.getLogger(__name__)

INITIAL_UPLOAD_ELEMENTS = 1 << 16  # pinned staging for prefill inputs; grows on demand


@attrs.frozen(kw_only=True)
class StepInputs:
    """One step's model inputs on the device, and which hidden rows to sample."""

    input_ids: torch.Tensor  # [num_tokens] int64 on CPU, int32 on CUDA
    positions: torch.Tensor  # [num_tokens] int64 on CPU, int32 on CUDA
    meta: AttnMeta
    sample_rows: torch.Tensor | None  # [num_sampled] int: the last row of each SeqStep with `sample` set;
    # None: the first num_sampled rows (a decode step that samples every sequence: a slice, no gather)
    specs: tuple[SampleSpec, ...]
    sample_seq_ids: tuple[int, ...]
    graph_rows: int = 0  # > 0: replay the decode graph of this many rows instead of running the model
    # Chained steps: input_ids[deferred_positions[i]] must become the previous step's sampled token of row
    # deferred_rows[i] (still on the device); the builder wrote 0 there.
    deferred_positions: tuple[int, ...] = ()
    deferred_rows: tuple[int, ...] = ()


@attrs.frozen(kw_only=True)
class HostArrays:
    """A plan flattened into numpy arrays (int64 ids/positions/slots, int32 tables/lengths), before any copy."""

    input_ids: np.ndarray  # [num_tokens]
    positions: np.ndarray  # [num_tokens]
    slot_mapping: np.ndarray  # [num_tokens]
    block_tables: np.ndarray  # [num_seqs, max_blocks_per_seq]
    context_lens: np.ndarray  # [num_seqs]
    cu_seqlens_q: np.ndarray  # [num_seqs + 1]
    sample_rows: np.ndarray  # [num_sampled]


class PinnedUpload:
    """One step's int32 index arrays packed into a pinned host buffer and sent to the device with one copy."""

    def __init__(self, device: torch.device, capacity: int = INITIAL_UPLOAD_ELEMENTS) -> None:
        self.device = device
        self._host = torch.empty(capacity, dtype=torch.int32, pin_memory=True)
        self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self._is_copy_pending = False

    def send(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Device int32 tensors with the arrays' shapes and values, each starting 16-byte aligned."""
        offsets, total = [], 0
        for array in arrays:
            offsets.append(total)
            total += -(-array.size // 4) * 4  # 4 int32 = 16 bytes
        if self._is_copy_pending:
            self._copied.synchronize()  # the previous copy may still read the host buffer
            self._is_copy_pending = False
        if total > self._host.numel():
            self._host = torch.empty(max(total, 2 * self._host.numel()), dtype=torch.int32, pin_memory=True)
        host = self._host.numpy()
        for array, offset in zip(arrays, offsets, strict=True):
            host[offset : offset + array.size] = array.ravel()
        device_buffer = torch.empty(max(total, 1), dtype=torch.int32, device=self.device)
        device_buffer[:total].copy_(self._host[:total], non_blocking=True)
        self._copied.record()
        self._is_copy_pending = True
        return [device_buffer[o : o + a.size].view(a.shape) for a, o in zip(arrays, offsets, strict=True)]


class BatchInputBuilder:
    """Turns one rank's StepPlans into StepInputs; on CUDA it owns the pinned staging and the static decode buffers."""

    def __init__(
        self,
        *,
        block_size: int,
        max_model_len: int,
        vocab_size: int,
        is_random: bool,
        max_batch_size: int,
        device: torch.device,
    ) -> None:
        self.block_size, self.max_model_len, self.vocab_size = block_size, max_model_len, vocab_size
        self.is_random, self.device = is_random, device
        self._last_sampled: dict[int, int] = {}  # seq_id → its token from the latest plan that sampled it
        self._chain_rows: Mapping[int, int] = {}  # prepare's `chained_from`: seq_id → row of the previous draw
        self._deferred_positions: list[int] = []
        self._deferred_rows: list[int] = []
        self._upload: PinnedUpload | None = None
        self.decode_buffers: DecodeInputBuffers | None = None  # the inputs every decode graph reads
        self._graphs: DecodeGraphs | None = None
        if device.type == "cuda":
            self._upload = PinnedUpload(device)
            sizes = graph_batch_sizes(max_batch_size)
            max_width = -(-max_model_len // block_size)
            self.decode_buffers = DecodeInputBuffers(
                max_rows=max(sizes), max_width=max_width, block_size=block_size, device=device
            )

    def use_graphs(self, graphs: DecodeGraphs) -> None:
        """Pad decode plans to the batch sizes of `graphs` from now on (captured over `decode_buffers`)."""
        self._graphs = graphs

    def forget_absent_sequences(self, plan: StepPlan) -> None:
        """Keep the last samples of this plan's sequences only: finished ones drop out, so memory stays bounded."""
        last = self._last_sampled
        self._last_sampled = {s.seq_id: last[s.seq_id] for s in plan.seqs if s.seq_id in last}

    def remember_sampled(self, seq_ids: Sequence[int], drawn: Sequence[tuple[int, object]]) -> None:
        """Record each sequence's sampled token: a later plan's PREVIOUS_TOKEN for it stands for this one."""
        for seq_id, (token_id, _) in zip(seq_ids, drawn, strict=True):
            self._last_sampled[seq_id] = token_id

    def _check_seq(self, seq: SeqStep) -> None:
        if seq.context_len > self.max_model_len or seq.context_len > len(seq.block_table) * self.block_size:
            raise ValueError(
                f"seq {seq.seq_id}: context {seq.context_len} exceeds max_model_len {self.max_model_len} "
                f"or its {len(seq.block_table)} blocks"
            )

    def _token_ids(self, plan: StepPlan) -> np.ndarray:  # [num_tokens] int64
        """The plan's input ids, each PREVIOUS_TOKEN replaced by this rank's last sample for its sequence.

        Substituting here, while the array is built, keeps the decode hot path free of per-sequence copies of the
        plan (rebuilding frozen SeqSteps cost 81 µs per step at batch 32 on our CPU machine).

        Raises:
            ValueError: a placeholder for a sequence the previous plans did not sample, or an id outside the vocab.
        """
        last = self._last_sampled
        deferred = self._chain_rows
        self._deferred_positions, self._deferred_rows = [], []
        if deferred:  # a chained step: the previous step's samples are still on the device
            last = dict(last)
            position = 0
            for s in plan.seqs:
                row = deferred.get(s.seq_id)
                if row is not None and PREVIOUS_TOKEN in s.token_ids:
                    self._deferred_positions.append(position + s.token_ids.index(PREVIOUS_TOKEN))
                    self._deferred_rows.append(row)
                    last[s.seq_id] = 0
                position += len(s.token_ids)
        try:
            input_ids = np.fromiter(
                (last[s.seq_id] if t == PREVIOUS_TOKEN else t for s in plan.seqs for t in s.token_ids),
                dtype=np.int64,
                count=plan.num_tokens,
            )
        except KeyError as missing:
            raise ValueError(
                f"step {plan.step_id}: seq {missing.args[0]} has PREVIOUS_TOKEN but no previous sample"
            ) from None
        if self.is_random:  # random presets borrow SmolLM2's tokenizer, whose ids may exceed a preset's vocabulary
            input_ids %= self.vocab_size
        elif input_ids.size and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {input_ids.min()}..{input_ids.max()}")
        return input_ids

    def _host_arrays(self, plan: StepPlan) -> HostArrays:
        """Flatten a plan's SeqSteps into numpy arrays (one vectorised pass per sequence)."""
        block_size = self.block_size
        num_seqs = len(plan.seqs)
        max_blocks = max(len(s.block_table) for s in plan.seqs)
        block_tables = np.zeros((num_seqs, max(max_blocks, 1)), dtype=np.int32)
        cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int32)
        context_lens = np.empty(num_seqs, dtype=np.int32)
        positions, slots, sample_rows = [], [], []
        for i, seq in enumerate(plan.seqs):
            self._check_seq(seq)
            table = np.asarray(seq.block_table, dtype=np.int64)
            block_tables[i, : len(table)] = table
            pos = np.arange(seq.start_pos, seq.context_len, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            cu_seqlens[i + 1] = cu_seqlens[i] + seq.num_tokens
            context_lens[i] = seq.context_len
            if seq.sample is not None:
                sample_rows.append(int(cu_seqlens[i + 1]) - 1)
        return HostArrays(
            input_ids=self._token_ids(plan),
            positions=np.concatenate(positions),
            slot_mapping=np.concatenate(slots),
            block_tables=block_tables,
            context_lens=context_lens,
            cu_seqlens_q=cu_seqlens,
            sample_rows=np.asarray(sample_rows, dtype=np.int64),
        )

    def prepare(self, plan: StepPlan, chained_from: Mapping[int, int] | None = None) -> StepInputs:
        """Flatten a plan's SeqSteps into device tensors (host work in numpy, then one copy on CUDA).

        On CUDA a decode-only plan fills the static decode buffers: the inputs it returns are only valid until the
        next `prepare` of a decode plan. `chained_from` (seq_id → row of the previous step's draw) names sequences
        whose PREVIOUS_TOKEN is not on the host yet: their positions come back in `deferred_positions` and
        `deferred_rows`, holding 0 until the caller copies the device-side token in.
        """
        self._chain_rows = chained_from or {}
        inputs = self._prepare(plan)
        if self._deferred_positions:
            inputs = attrs.evolve(inputs, deferred_positions=tuple(self._deferred_positions),
                                  deferred_rows=tuple(self._deferred_rows))
        return inputs

    def _prepare(self, plan: StepPlan) -> StepInputs:
        if not plan.seqs:
            raise ValueError("a StepPlan needs at least one SeqStep")
        specs = tuple(s.sample for s in plan.seqs if s.sample is not None)
        seq_ids = tuple(s.seq_id for s in plan.seqs if s.sample is not None)
        buffers = self.decode_buffers
        if buffers is not None and plan.is_decode_only and len(plan.seqs) <= buffers.max_rows:
            return self._prepare_decode(plan, buffers, specs, seq_ids)
        host = self._host_arrays(plan)
        arrays = (host.input_ids, host.positions, host.slot_mapping, host.block_tables, host.context_lens,
                  host.cu_seqlens_q, host.sample_rows)  # fmt: skip
        if self._upload is not None:
            tensors = self._upload.send(arrays)
        else:
            tensors = [torch.from_numpy(a) for a in arrays]
        input_ids, positions, slot_mapping, block_tables, context_lens, cu_seqlens, sample_rows = tensors
        fresh = not plan.is_decode_only and all(s.start_pos == 0 for s in plan.seqs)
        meta = AttnMeta(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=context_lens,
            cu_seqlens_q=cu_seqlens,
            is_decode=plan.is_decode_only,
            fresh_lens=tuple(s.num_tokens for s in plan.seqs) if fresh else (),
        )
        return StepInputs(input_ids=input_ids, positions=positions, meta=meta, sample_rows=sample_rows,
                          specs=specs, sample_seq_ids=seq_ids)  # fmt: skip

    def _prepare_decode(
        self, plan: StepPlan, buffers: DecodeInputBuffers, specs: tuple[SampleSpec, ...], seq_ids: tuple[int, ...]
    ) -> StepInputs:
        """A decode step in the static buffers: padded to a graph's size, or exactly sized for an eager forward."""
        for seq in plan.seqs:
            self._check_seq(seq)
        num_seqs = len(plan.seqs)
        rows = None if self._graphs is None else self._graphs.padded_size(num_seqs)
        if rows is None:  # eager: tables trimmed to the longest context (the decode kernel plans its splits on it)
            rows, graph_rows = num_seqs, 0
            width = -(-max(s.context_len for s in plan.seqs) // self.block_size)
        else:
            graph_rows, width = rows, buffers.max_width
        buffers.fill(plan.seqs, self._token_ids(plan), rows=rows, width=width)
        input_ids, positions, meta = buffers.views(rows, width)
        sample_rows = None
        if len(specs) != num_seqs:
            rows_sampled = [i for i, s in enumerate(plan.seqs) if s.sample is not None]
            sample_rows = torch.tensor(rows_sampled, dtype=torch.int64).to(self.device, non_blocking=True)
        return StepInputs(input_ids=input_ids, positions=positions, meta=meta, sample_rows=sample_rows,
                          specs=specs, sample_seq_ids=seq_ids, graph_rows=graph_rows)  # fmt: skip
