"""Model runner: one rank's model, paged KV cache and step loop (batch inputs → forward → logits → sampling).

Runs outside the event loop, inside a rank process (gpu/rank.py), or in a test's own thread. One `ModelRunner` per
tensor-parallel rank; every rank runs every step's forward (the row-parallel layers all-reduce), and only rank 0
computes logits and samples.

KV cache sizing (per rank; every rank ends up with the same block count):
- budget: `cache_max_entry_count` × (free device memory after the weights on CUDA; `cpu_memory_budget_bytes` on CPU),
- never more blocks than `max_batch_size` sequences of `max_model_len` tokens need,
- at least one `max_model_len` sequence's worth, or ModelLoadError saying how much memory that needs,
- with several ranks, the minimum over ranks (all_reduce MIN).

Batch inputs are built on the host with numpy (one vectorised pass per sequence, no per-token Python) and copied to
the device once per tensor.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

import attrs
import numpy as np
import torch

from trillm.actors.messages import KVCacheLayout, SampledToken, SampleSpec, StepPlan, StepResult
from trillm.config import RunnerConfig
from trillm.errors import ModelLoadError
from trillm.gpu import reference
from trillm.gpu.comm import Communicator, open_communicator
from trillm.gpu.sampling import sample
from trillm.models.llama import AttnMeta, KVCache, LlamaArgs, LlamaForCausalLM, checkpoint_shapes
from trillm.models.loader import check_architecture, iter_safetensors, read_hf_config
from trillm.models.presets import RANDOM_PREFIX, preset_config, random_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_SEED = 0  # random presets are the same model in every run and at every tensor-parallel degree


@attrs.frozen(kw_only=True)
class StepInputs:
    """One step's model inputs on the device, and which hidden rows to sample."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttnMeta
    sample_rows: torch.Tensor  # [num_sampled] int64: the last row of each SeqStep with `sample` set
    specs: tuple[SampleSpec, ...]
    sample_seq_ids: tuple[int, ...]


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


class ModelRunner:
    """One rank's model and KV cache; `step` runs a StepPlan (runs outside the event loop)."""

    def __init__(self, config: RunnerConfig, *, ops: Any = None) -> None:
        self.config = config
        self.rank = config.rank
        self.dtype = DTYPES[config.dtype]
        self.device = torch.device("cpu") if config.device == "cpu" else torch.device("cuda", config.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.ops = ops if ops is not None else reference  # TODO(#4): the CUDA kernels module on GPU
        self.comm: Communicator = open_communicator(
            rank=config.rank, world_size=config.world_size, device=config.device, init_method=config.dist_init_method
        )
        self.is_random = is_random = config.model_path.startswith(RANDOM_PREFIX)
        hf_config = preset_config(config.model_path) if is_random else read_hf_config(config.model_path)
        check_architecture(hf_config, config.model_path)
        self.args = LlamaArgs.from_hf_config(hf_config)
        self.max_model_len = min(config.max_model_len, self.args.max_model_len)
        self.model = self._build_model(is_random)
        self.kv_caches, self.layout = self._allocate_kv_cache()
        self.device_name = (
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else (platform.processor() or "cpu")
        )
        log.info("rank %d ready: %s, %s", self.rank, self.layout, self.device_name)

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

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
        return model.eval()

    def _allocate_kv_cache(self) -> tuple[list[KVCache], KVCacheLayout]:
        cfg, args = self.config, self.args
        num_kv_heads = args.num_kv_heads // cfg.world_size
        bytes_per_block = 2 * args.num_layers * num_kv_heads * cfg.block_size * args.head_dim * self.dtype.itemsize
        if self.device.type == "cuda":
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

    def prepare(self, plan: StepPlan) -> StepInputs:
        """Flatten a plan's SeqSteps into device tensors (host work in numpy, one copy per tensor)."""
        block_size = self.config.block_size
        num_seqs = len(plan.seqs)
        if num_seqs == 0:
            raise ValueError("a StepPlan needs at least one SeqStep")
        max_blocks = max(len(s.block_table) for s in plan.seqs)
        block_tables = np.zeros((num_seqs, max(max_blocks, 1)), dtype=np.int32)
        cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int32)
        context_lens = np.empty(num_seqs, dtype=np.int32)
        positions, slots, sample_rows, specs, seq_ids = [], [], [], [], []
        for i, seq in enumerate(plan.seqs):
            if seq.context_len > self.max_model_len or seq.context_len > len(seq.block_table) * block_size:
                raise ValueError(
                    f"seq {seq.seq_id}: context {seq.context_len} exceeds max_model_len {self.max_model_len} "
                    f"or its {len(seq.block_table)} blocks"
                )
            table = np.asarray(seq.block_table, dtype=np.int64)
            block_tables[i, : len(table)] = table
            pos = np.arange(seq.start_pos, seq.context_len, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            cu_seqlens[i + 1] = cu_seqlens[i] + seq.num_tokens
            context_lens[i] = seq.context_len
            if seq.sample is not None:
                sample_rows.append(int(cu_seqlens[i + 1]) - 1)
                specs.append(seq.sample)
                seq_ids.append(seq.seq_id)
        input_ids = np.fromiter((t for s in plan.seqs for t in s.token_ids), dtype=np.int64, count=plan.num_tokens)
        if self.is_random:  # random presets borrow SmolLM2's tokenizer, whose ids may exceed a preset's vocabulary
            input_ids %= self.vocab_size
        elif input_ids.size and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {input_ids.min()}..{input_ids.max()}")

        def to_device(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device, non_blocking=True)

        meta = AttnMeta(
            slot_mapping=to_device(np.concatenate(slots)),
            block_tables=to_device(block_tables),
            context_lens=to_device(context_lens),
            cu_seqlens_q=to_device(cu_seqlens),
            is_decode=plan.is_decode_only,
        )
        return StepInputs(
            input_ids=to_device(input_ids),
            positions=to_device(np.concatenate(positions)),
            meta=meta,
            sample_rows=to_device(np.asarray(sample_rows, dtype=np.int64)),
            specs=tuple(specs),
            sample_seq_ids=tuple(seq_ids),
        )

    @torch.inference_mode()
    def forward_logits(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run the model; rank 0 returns the sampled rows' logits [num_sampled, vocab] float32, others None."""
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)  # [num_tokens, hidden]
        if self.rank != 0 or not inputs.specs:
            return None
        return self.model.compute_logits(hidden[inputs.sample_rows])  # [num_sampled, vocab]

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepResult:
        """Run one StepPlan; rank 0 returns the sampled tokens in plan order, other ranks an empty acknowledgement."""
        start = time.perf_counter()
        inputs = self.prepare(plan)
        logits = self.forward_logits(inputs)
        sampled: tuple[SampledToken, ...] = ()
        if logits is not None:
            drawn = sample(logits, inputs.specs)
            sampled = tuple(
                SampledToken(seq_id=seq_id, token_id=token_id, logprob=logprob)
                for seq_id, (token_id, logprob) in zip(inputs.sample_seq_ids, drawn, strict=True)
            )
        return StepResult(step_id=plan.step_id, sampled=sampled, elapsed_s=time.perf_counter() - start)

    def close(self) -> None:
        """Drop the model and caches and leave the tensor-parallel group."""
        self.kv_caches = []
        self.comm.close()
