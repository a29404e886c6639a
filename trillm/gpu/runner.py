"""Model runner: one rank's model, paged KV cache and step loop (batch inputs → forward → logits → sampling).

Runs outside the event loop, inside a rank process (gpu/rank.py), or in a test's own thread. One `ModelRunner` per
tensor-parallel rank; every rank runs every step's forward (the row-parallel layers all-reduce), and only rank 0
computes logits and samples.

Op sets: CPU runs `gpu/reference.py`. CUDA runs the CuPy kernels of `gpu/kernels.py` in bfloat16/float16; float32,
or a shape the kernels do not support (head_dim other than 64/128), runs the reference ops on the GPU, eagerly. On
CUDA the projection weights are stored column-major (`column_major_weights`): cuBLAS streams them faster at decode
batch sizes.

KV cache sizing (per rank; every rank ends up with the same block count):
- budget: `cache_max_entry_count` × (free device memory after the weights on CUDA; `cpu_memory_budget_bytes` on CPU),
- never more blocks than `max_batch_size` sequences of `max_model_len` tokens need,
- at least one `max_model_len` sequence's worth, or ModelLoadError saying how much memory that needs,
- with several ranks, the minimum over ranks (all_reduce MIN).

Batch inputs are built on the host with numpy (one vectorised pass per sequence, no per-token Python). On CPU they
are wrapped as tensors; on CUDA every index tensor is int32, packed into one pinned host buffer and sent with ONE
non-blocking copy. Decode-only steps on CUDA write the static buffers of `gpu/cuda_graphs.py` instead and replay the
captured graph of their padded batch size (or run eagerly on those buffers: graphs off or batch too large); with
tensor parallelism the graphs hold the NCCL all-reduces as well. Only the sampled token ids (and logprobs when
asked) come back to the host.

Step overlap. A decode planned before the previous step's sample was known carries `PREVIOUS_TOKEN`; `step`
substitutes the token this rank sampled for that seq_id in the previous plan, kept in a small host dict that only
holds the seq_ids of the latest plan (bounded). Every rank must substitute the same id, so with tensor parallelism
every rank computes the logits and samples, not only rank 0: after the all-reduce every rank holds the same hidden
rows (the all-reduce hands every rank the same sums), the lm_head is replicated and a draw depends only on
(seed, output index), so all ranks draw the same tokens; ranks other than 0 keep them and still answer with an empty
acknowledgement. This costs no wall time (the ranks run in parallel) and no extra message or collective per step.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch

from trillm.protocol.api import SamplingParams
from trillm.protocol.step import PREVIOUS_TOKEN, KVCacheLayout, SampleSpec, SampledToken, SeqStep, StepPlan, StepResult
from trillm.config import RunnerConfig
from trillm.errors import ModelLoadError
from trillm.gpu import kernels, reference
from trillm.gpu.comm import Communicator, open_communicator
from trillm.gpu.cuda_graphs import DecodeGraphs, DecodeInputBuffers, graph_batch_sizes
from trillm.gpu.sampling import sample
from trillm.models.llama import (
    AttnMeta,
    ColumnParallelLinear,
    KVCache,
    LlamaArgs,
    LlamaForCausalLM,
    RowParallelLinear,
    checkpoint_shapes,
)
from trillm.models.loader import check_architecture, iter_safetensors, read_hf_config
from trillm.models.presets import RANDOM_PREFIX, preset_config, random_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_SEED = 0  # random presets are the same model in every run and at every tensor-parallel degree
INITIAL_UPLOAD_ELEMENTS = 1 << 16  # pinned staging for prefill inputs; grows on demand
WARM_UP_TOKENS = 128  # prompt length of the start-up warm-up prefill


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


def plan_num_blocks(
    *, bytes_per_block: int, budget_bytes: int, block_size: int, max_model_len: int, max_batch_size: int
) -> int:
    """How many KV blocks to allocate: the budget's worth, capped at what the batch can use, at least one sequence."""
    blocks_per_seq = -(-max_model_len // block_size)
    num_blocks = min(budget_bytes // bytes_per_block, blocks_per_seq * max_batch_size)
    if num_blocks < blocks_per_seq:
        raise ModelLoadError(
            f"the KV cache budget ({budget_bytes / 2**20:.0f} MiB) holds {num_blocks} blocks of {block_size} tokens, "
            f"less than one sequence of max_model_len {max_model_len} needs ({blocks_per_seq} blocks, "
            f"{blocks_per_seq * bytes_per_block / 2**20:.0f} MiB): lower --session-len or raise the cache budget"
        )
    return num_blocks


def column_major_weights(model: LlamaForCausalLM) -> None:
    """Store every projection weight (and an untied lm_head) column-major, in place: same values and shapes.

    Each weight becomes the transposed view of a contiguous [in, out] tensor, so F.linear hands cuBLAS an "NN" product
    that streams faster at decode batch sizes on the H100. Measured with CUDA graphs on the Llama-2-7B shapes (sum of
    the four projections of one layer): 151 vs 162 us at batch 1, 153 vs 163 us at batch 32, 568 vs 562 us at 1,024
    tokens; lm_head 90 vs 98 us at batch 1. One matrix at a time is copied.
    """
    modules: list[Any] = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    if model.lm_head is not None:
        modules.append(model.lm_head)
    for module in modules:
        module.weight.data = module.weight.data.t().contiguous().t()  # [out, in] view of [in, out] storage


def kernels_support(args: LlamaArgs, dtype: torch.dtype) -> str | None:
    """Why the CUDA kernels cannot run this model (None: they can)."""
    if dtype not in kernels.ELEMENT_TYPES:
        return f"dtype {dtype} (the kernels are bfloat16/float16)"
    if args.head_dim not in kernels.ATTENTION_HEAD_DIMS:
        return f"head_dim {args.head_dim} (the attention kernels take {kernels.ATTENTION_HEAD_DIMS})"
    if args.hidden_size % 8 or args.intermediate_size % 8:
        return "hidden or FFN size not a multiple of 8"
    return None


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


class ModelRunner:
    """One rank's model and KV cache; `step` runs a StepPlan (runs outside the event loop)."""

    def __init__(self, config: RunnerConfig, *, ops: Any = None) -> None:
        self.config = config
        self.rank = config.rank
        self.dtype = DTYPES[config.dtype]
        self.device = torch.device("cpu") if config.device == "cpu" else torch.device("cuda", config.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.comm: Communicator = open_communicator(
            rank=config.rank, world_size=config.world_size, device=config.device, init_method=config.dist_init_method
        )
        self.is_random = is_random = config.model_path.startswith(RANDOM_PREFIX)
        hf_config = preset_config(config.model_path) if is_random else read_hf_config(config.model_path)
        check_architecture(hf_config, config.model_path)
        self.args = LlamaArgs.from_hf_config(hf_config)
        self.ops = ops if ops is not None else self._default_ops()
        self.max_model_len = min(config.max_model_len, self.args.max_model_len)
        self.model = self._build_model(is_random)
        self.kv_caches, self.layout = self._allocate_kv_cache()
        self.device_name = (
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else (platform.processor() or "cpu")
        )
        self._upload: PinnedUpload | None = None
        self._last_sampled: dict[int, int] = {}  # seq_id → its token from the latest plan that sampled it
        self._decode_buffers: DecodeInputBuffers | None = None
        self._graphs: DecodeGraphs | None = None
        if self.device.type == "cuda":
            self._prepare_cuda()
        self._warm_up()
        log.info("rank %d ready: %s, %s", self.rank, self.layout, self.device_name)

    def _warm_up(self) -> None:
        """Run one throwaway prefill and decode so the first request does not pay for lazy initialisation.

        The first forward of a process is slow (oneDNN/cuBLAS handles, CuPy compiling the prefill kernels, first
        touch of the weights): 4.7 s for SmolLM2 on our CPU machine, against 0.4 s afterwards. Every rank runs the
        same plans, so tensor-parallel all-reduces pair up. The KV written here sits in blocks nobody owns yet and is
        overwritten before any request reads it.
        """
        block_size = self.layout.block_size
        capacity = self.layout.num_blocks * block_size
        num_tokens = max(1, min(WARM_UP_TOKENS, self.config.max_prefill_token_num, self.max_model_len - 1, capacity - 1))
        table = tuple(range(-(-(num_tokens + 1) // block_size)))
        greedy = SampleSpec(sampling=SamplingParams(temperature=0.0, logprobs=1), output_index=0)
        drawn = SampleSpec(sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=0), output_index=1)
        prompt = tuple(i % self.args.vocab_size for i in range(num_tokens))
        self.step(StepPlan(step_id=-2, seqs=(SeqStep(seq_id=-1, token_ids=prompt, start_pos=0, block_table=table,
                                                       sample=greedy),)))
        self.step(StepPlan(step_id=-1, seqs=(SeqStep(seq_id=-1, token_ids=(0,), start_pos=num_tokens,
                                                       block_table=table, sample=drawn),)))

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def graph_capture_s(self) -> float:
        """Seconds spent capturing decode CUDA graphs at start (0.0 without graphs)."""
        return 0.0 if self._graphs is None else self._graphs.capture_s

    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        return () if self._graphs is None else self._graphs.sizes

    def _default_ops(self) -> Any:
        if self.device.type == "cpu":
            return reference
        unsupported = kernels_support(self.args, self.dtype)
        if unsupported is None:
            return kernels
        log.warning("CUDA kernels do not support %s: running the reference ops eagerly on the GPU", unsupported)
        return reference

    def _build_model(self, is_random: bool) -> LlamaForCausalLM:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # parameters are created empty in the serving dtype, on the device
        try:
            with torch.device(self.device):
                model = LlamaForCausalLM(
                    self.args,
                    ops=self.ops,
                    rank=self.config.rank,
                    world_size=self.config.world_size,
                    all_reduce=self.comm.all_reduce,
                    max_positions=self.max_model_len,
                )
        finally:
            torch.set_default_dtype(default_dtype)
        if is_random:
            weights = random_weights(
                checkpoint_shapes(self.args), device=self.device, dtype=self.dtype, seed=RANDOM_SEED
            )
        else:
            weights = iter_safetensors(self.config.model_path)
        model.load_weights(weights)
        if self.device.type == "cuda":
            column_major_weights(model)
        return model.eval()

    def _allocate_kv_cache(self) -> tuple[list[KVCache], KVCacheLayout]:
        cfg, args = self.config, self.args
        num_kv_heads = args.num_kv_heads // cfg.world_size
        bytes_per_block = 2 * args.num_layers * num_kv_heads * cfg.block_size * args.head_dim * self.dtype.itemsize
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # weight-loading temporaries go back to the driver before we measure
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            budget = int(cfg.cache_max_entry_count * free_bytes)
        else:
            budget = int(cfg.cache_max_entry_count * cfg.cpu_memory_budget_bytes)
        num_blocks = plan_num_blocks(
            bytes_per_block=bytes_per_block,
            budget_bytes=budget,
            block_size=cfg.block_size,
            max_model_len=self.max_model_len,
            max_batch_size=cfg.max_batch_size,
        )
        num_blocks = self.comm.all_reduce_min(num_blocks)
        shape = (num_blocks, num_kv_heads, cfg.block_size, args.head_dim)
        caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(args.num_layers)
        ]
        layout = KVCacheLayout(
            num_blocks=num_blocks,
            block_size=cfg.block_size,
            num_layers=args.num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=args.head_dim,
            dtype=cfg.dtype,
        )
        return caches, layout

    def _prepare_cuda(self) -> None:
        """Pinned staging, static decode buffers, kernel compilation and (if enabled and possible) graph capture."""
        cfg, args = self.config, self.args
        self._upload = PinnedUpload(self.device)
        sizes = graph_batch_sizes(cfg.max_batch_size)
        max_width = -(-self.max_model_len // cfg.block_size)
        self._decode_buffers = DecodeInputBuffers(
            max_rows=max(sizes), max_width=max_width, block_size=cfg.block_size, device=self.device
        )
        if self.ops is not kernels:
            return
        kernels.compile_for_model(
            self.dtype,
            head_dim=args.head_dim,
            num_heads=args.num_heads // cfg.world_size,
            num_kv_heads=args.num_kv_heads // cfg.world_size,
            device=self.device,
        )
        if not cfg.enable_cuda_graph:
            return
        # With tensor parallelism the graphs hold the NCCL all-reduces too (NCCL supports stream capture): every rank
        # captures the same batch sizes in the same order, so their collectives pair up during capture and replay.

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
            return self.model(input_ids, positions, self.kv_caches, meta)  # type: ignore[no-any-return]

        self._graphs = DecodeGraphs(forward, self._decode_buffers, sizes)
        with torch.inference_mode():
            self._graphs.capture()

    # -----------------------------------------------------------------------------------------------------------------
    # Batch inputs

    def _check_seq(self, seq: SeqStep) -> None:
        if seq.context_len > self.max_model_len or seq.context_len > len(seq.block_table) * self.config.block_size:
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
        block_size = self.config.block_size
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

    def prepare(self, plan: StepPlan) -> StepInputs:
        """Flatten a plan's SeqSteps into device tensors (host work in numpy, then one copy on CUDA).

        On CUDA a decode-only plan fills the static decode buffers: the inputs it returns are only valid until the
        next `prepare` of a decode plan.
        """
        if not plan.seqs:
            raise ValueError("a StepPlan needs at least one SeqStep")
        specs = tuple(s.sample for s in plan.seqs if s.sample is not None)
        seq_ids = tuple(s.seq_id for s in plan.seqs if s.sample is not None)
        buffers = self._decode_buffers
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
        meta = AttnMeta(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=context_lens,
            cu_seqlens_q=cu_seqlens,
            is_decode=plan.is_decode_only,
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
            width = -(-max(s.context_len for s in plan.seqs) // self.config.block_size)
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

    # -----------------------------------------------------------------------------------------------------------------
    # Forward and step

    @torch.inference_mode()
    def forward_logits(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run the model; returns the sampled rows' logits [num_sampled, vocab] float32 (None if nothing samples).

        Every rank computes them: each must know the sampled tokens to substitute `PREVIOUS_TOKEN` (module docstring).
        """
        if inputs.graph_rows:
            assert self._graphs is not None
            hidden = self._graphs.replay(inputs.graph_rows)  # [graph_rows, hidden]
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)  # [num_tokens, hidden]
        if not inputs.specs:
            return None
        if inputs.sample_rows is None:
            sampled = hidden[: len(inputs.specs)]  # [num_sampled, hidden]
        else:
            sampled = hidden.index_select(0, inputs.sample_rows)  # [num_sampled, hidden]
        return self.model.compute_logits(sampled)  # [num_sampled, vocab]

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepResult:
        """Run one StepPlan; rank 0 returns the sampled tokens in plan order, other ranks an empty acknowledgement."""
        start = time.perf_counter()
        self._forget_absent_sequences(plan)
        inputs = self.prepare(plan)
        logits = self.forward_logits(inputs)
        sampled: tuple[SampledToken, ...] = ()
        if logits is not None:
            drawn = sample(logits, inputs.specs)
            for seq_id, (token_id, _) in zip(inputs.sample_seq_ids, drawn, strict=True):
                self._last_sampled[seq_id] = token_id
            if self.rank == 0:
                sampled = tuple(
                    SampledToken(seq_id=seq_id, token_id=token_id, logprob=logprob)
                    for seq_id, (token_id, logprob) in zip(inputs.sample_seq_ids, drawn, strict=True)
                )
        return StepResult(step_id=plan.step_id, sampled=sampled, elapsed_s=time.perf_counter() - start)

    def _forget_absent_sequences(self, plan: StepPlan) -> None:
        """Keep the last samples of this plan's sequences only: finished ones drop out, so memory stays bounded."""
        last = self._last_sampled
        self._last_sampled = {s.seq_id: last[s.seq_id] for s in plan.seqs if s.seq_id in last}

    def close(self) -> None:
        """Drop the graphs, model and caches and leave the tensor-parallel group."""
        self._graphs = None
        self.kv_caches = []
        self.comm.close()
