"""Model runner: one rank's step loop, StepPlan → batch inputs → forward → logits → sampling → StepResult.

Runs outside the event loop, inside a rank process (gpu/rank.py), or in a test's own thread. One `ModelRunner` per
tensor-parallel rank; every rank runs every step's forward (the row-parallel layers all-reduce). Its parts live in
modules of their own: `model_builder.py` builds the model and picks the op set (the CuPy kernels of `gpu/kernels/`
on CUDA where they fit, `gpu/reference.py` otherwise), `kv_cache.py` sizes and allocates the paged KV cache,
`batch_inputs.py` turns a plan into device tensors. On CUDA the runner compiles the kernels and captures the decode
graphs of `gpu/cuda_graphs.py` over the builder's static decode buffers; a decode step replays the graph of its
padded batch size (or runs eagerly on those buffers: graphs off or batch too large); with tensor parallelism the
graphs hold the NCCL all-reduces as well. Only the sampled token ids (and logprobs when asked) come back to the host.

Step overlap. A decode planned before the previous step's sample was known carries `PREVIOUS_TOKEN`; the batch-input
builder substitutes the token this rank sampled for that seq_id in the previous plan (`batch_inputs.py`). Every rank
must substitute the same id, so with tensor parallelism every rank computes the logits and samples, not only rank 0:
after the all-reduce every rank holds the same hidden rows (the all-reduce hands every rank the same sums), the
lm_head is replicated and a draw depends only on (seed, output index), so all ranks draw the same tokens; ranks other
than 0 keep them and still answer with an empty acknowledgement. This costs no wall time (the ranks run in parallel)
and no extra message or collective per step.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from trillm.config import RunnerConfig
from trillm.gpu import cpu_ops, deterministic_ops, kernels
from trillm.gpu.kernels import deterministic as det_kernels
from trillm.gpu.batch_inputs import BatchInputBuilder, StepInputs
from trillm.gpu.comm import Communicator, open_communicator
from trillm.gpu.cpu_decode import CpuDecodeStep
from trillm.gpu.cuda_graphs import DecodeGraphs, graph_batch_sizes
from trillm.gpu.kv_cache import allocate_kv_cache
from trillm.gpu.model_builder import DTYPES, build_model, read_model_args, select_ops
from trillm.gpu.prompt_logprobs import score_prompts
from trillm.gpu.sampling import PendingSample, sample_on_device
from trillm.structured.matchers import GrammarMatchers
from trillm.models.layers import AttnMeta
from trillm.models.presets import RANDOM_PREFIX
from trillm.protocol.api import SamplingParams
from trillm.protocol.step import PromptLogprobs, SampleSpec, SampledToken, SeqStep, StepPlan, StepResult

log = logging.getLogger(__name__)

# Step chaining (launch N+1 behind N before N's tokens reach the host) is off unless TRILLM_RANK_CHAINING=1: on two
# H200s it doubled batch-1 inter-token latency through the engine (4.67 → 9.59 ms at tp=1, 3.52 → 7.28 at tp=2;
# bench/results/nvidia-h200-x2-chaining-2026-11-26-cd2eade.log) while its tokens stayed exact; not yet understood.
CHAINING = os.environ.get("TRILLM_RANK_CHAINING", "0") == "1"


def _to_device(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 `values` on `device` without a host sync (pinned, non-blocking: a pageable copy would wait for the GPU)."""
    host = torch.tensor(values, dtype=torch.int64)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


@attrs.define
class LaunchedStep:
    """A step whose device work is enqueued (`ModelRunner.launch`) and whose tokens are not yet on the host."""

    plan: StepPlan
    inputs: StepInputs
    drawn: PendingSample | None  # None: nothing in the step samples
    grammar_mask: tuple[torch.Tensor, torch.Tensor] | None
    scored: tuple[PromptLogprobs, ...]
    done: Any  # torch.cuda.Event recorded after the step's work, or None on CPU
    start: float

    def is_done(self) -> bool:
        """Whether the device has finished the step (always on CPU, where launching ran it)."""
        return self.done is None or bool(self.done.query())

WARM_UP_TOKENS = 128  # prompt length of the start-up warm-up prefill


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
        self.args = read_model_args(config.model_path, is_random=is_random)
        self.ops = ops if ops is not None else select_ops(self.args, self.dtype, self.device,
                                                          deterministic=config.deterministic)
        self.max_model_len = min(config.max_model_len, self.args.max_model_len)
        self.model = build_model(
            self.args,
            model_path=config.model_path,
            is_random=is_random,
            ops=self.ops,
            dtype=self.dtype,
            device=self.device,
            rank=config.rank,
            world_size=config.world_size,
            all_reduce=self.comm.all_reduce,
            max_positions=self.max_model_len,
        )
        self.kv_caches, self.layout = allocate_kv_cache(
            config,
            self.args,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            all_reduce_min=self.comm.all_reduce_min,
        )
        self.device_name = (
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else (platform.processor() or "cpu")
        )
        self.inputs = BatchInputBuilder(  # on CUDA: pinned staging and the static decode buffers
            block_size=config.block_size,
            max_model_len=self.max_model_len,
            vocab_size=self.args.vocab_size,
            is_random=is_random,
            max_batch_size=config.max_batch_size,
            device=self.device,
        )
        self._graphs: DecodeGraphs | None = None
        tokenizer_file = Path(config.model_path) / "tokenizer.json"
        self.grammars = None if is_random or not tokenizer_file.is_file() else GrammarMatchers(
            tokenizer_file, vocab_size=self.args.vocab_size, device=self.device)  # constrained decoding
        self._cpu_decode: CpuDecodeStep | None = None  # a CPU decode step's layers in one C call (cpu_decode.py)
        if self.device.type == "cuda":
            self._prepare_cuda()
        elif self.ops is cpu_ops:
            self._cpu_decode = CpuDecodeStep.build(self.model, self.kv_caches, world_size=config.world_size)
        self._warm_up()
        log.info("rank %d ready: %s, %s", self.rank, self.layout, self.device_name)

    def _warm_up(self) -> None:
        """Run throwaway prefills and a decode so the first request does not pay for lazy initialisation.

        The first forward of a process is slow (oneDNN/cuBLAS handles and heuristics per shape, the caching allocator
        growing to a full prefill chunk's activations, first touch of the weights): 4.7 s for SmolLM2 on our CPU
        machine against 0.4 s afterwards, and 2.9 s for the first 2,100-token turn on an H100 when the warm-up was
        only 128 tokens. On CUDA the warm-up therefore prefills a whole chunk (`max_prefill_token_num`), continues it
        with a second, short chunk (the chunked-prefill / prefix-hit kernel path), then decodes; on a CPU one short
        prefill keeps start-up quick. Every rank runs the same plans, so tensor-parallel all-reduces pair up. The KV
        written here sits in blocks nobody owns yet and is overwritten before any request reads it.
        """
        block_size = self.layout.block_size
        capacity = self.layout.num_blocks * block_size
        first = self.config.max_prefill_token_num if self.device.type == "cuda" else WARM_UP_TOKENS
        first = max(1, min(first, self.config.max_prefill_token_num, self.max_model_len - 2, capacity - 2))
        second = max(0, min(WARM_UP_TOKENS, self.max_model_len - 2 - first, capacity - 2 - first))
        if self.device.type != "cuda":
            second = 0
        num_tokens = first + second
        table = tuple(range(-(-(num_tokens + 1) // block_size)))
        greedy = SampleSpec(sampling=SamplingParams(temperature=0.0, logprobs=1), output_index=0)
        drawn = SampleSpec(sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=0), output_index=1)
        prompt = tuple(i % self.args.vocab_size for i in range(num_tokens))
        chunks = [(0, first)] + ([(first, num_tokens)] if second else [])
        for step_id, (start, end) in enumerate(chunks, start=-3):
            self.step(StepPlan(step_id=step_id, seqs=(SeqStep(seq_id=-1, token_ids=prompt[start:end], start_pos=start,
                                                                block_table=table, sample=greedy),)))
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

    def _prepare_cuda(self) -> None:
        """Kernel compilation and (if enabled and possible) decode graph capture over the static decode buffers."""
        cfg, args = self.config, self.args
        if self.ops is not kernels and self.ops is not deterministic_ops:
            return
        head_dim, num_heads = args.head_dim, args.num_heads // cfg.world_size
        num_kv_heads = self.layout.num_kv_heads  # per rank (replicated KV heads: 1)
        if self.ops is deterministic_ops:
            names = kernels.kernel_names(self.dtype, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
            names += det_kernels.kernel_names(self.dtype, head_dim=head_dim, num_heads=num_heads,
                                              num_kv_heads=num_kv_heads)  # fmt: skip
            kernels.compile_kernels(names, device=self.device)
        else:
            kernels.compile_for_model(self.dtype, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                      device=self.device)  # fmt: skip
        if not cfg.enable_cuda_graph:
            return
        # With tensor parallelism the graphs hold the NCCL all-reduces too (NCCL supports stream capture): every rank
        # captures the same batch sizes in the same order, so their collectives pair up during capture and replay.

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
            return self.model(input_ids, positions, self.kv_caches, meta)  # type: ignore[no-any-return]

        assert self.inputs.decode_buffers is not None
        self._graphs = DecodeGraphs(forward, self.inputs.decode_buffers, graph_batch_sizes(cfg.max_batch_size))
        with torch.inference_mode():
            self._graphs.capture()
        self.inputs.use_graphs(self._graphs)

    # -----------------------------------------------------------------------------------------------------------------
    # Inputs, forward and step

    def prepare(self, plan: StepPlan) -> StepInputs:
        """The plan's device inputs (`BatchInputBuilder.prepare`: decode inputs live until the next decode plan)."""
        return self.inputs.prepare(plan)

    @torch.inference_mode()
    def forward_logits(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run the model; returns the sampled rows' logits [num_sampled, vocab] float32 (None if nothing samples).

        Every rank computes them: each must know the sampled tokens to substitute `PREVIOUS_TOKEN` (module docstring).
        """
        return self._sampled_logits(inputs, self._forward_hidden(inputs))

    def _forward_hidden(self, inputs: StepInputs) -> torch.Tensor:  # [num_tokens or graph_rows, hidden]
        if inputs.graph_rows:
            assert self._graphs is not None
            return self._graphs.replay(inputs.graph_rows)
        if self._cpu_decode is not None and (
            hidden := self._cpu_decode.forward(inputs.input_ids, inputs.positions, inputs.meta)
        ) is not None:
            return hidden
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)  # type: ignore[no-any-return]

    def _sampled_logits(self, inputs: StepInputs, hidden: torch.Tensor) -> torch.Tensor | None:
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
        return self.finish(self.launch(plan))

    def can_chain(self, plan: StepPlan, previous: LaunchedStep) -> bool:
        """Whether `plan` may be launched before `previous` finishes: its PREVIOUS_TOKENs then come from the device.

        Not with grammars in either step: a matcher must consume a step's token on the host before it can mask the
        next (structured/matchers.py). Off unless TRILLM_RANK_CHAINING=1 (see CHAINING).
        """
        if not CHAINING or previous.drawn is None:
            return False
        if self.grammars is None:
            return True
        return previous.grammar_mask is None and all(
            s.sample is None or s.sample.sampling.grammar is None for s in plan.seqs
        )

    @torch.inference_mode()
    def launch(self, plan: StepPlan, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Enqueue a step's device work (inputs, forward, sampling) without waiting for it; `finish` collects it.

        With `previous` (a launched step not finished yet, `can_chain` true) the plan's PREVIOUS_TOKENs for the
        sequences `previous` sampled are copied from its draw on the device, so the device runs the two steps back to
        back while the host is still turning the first one's tokens into a StepResult.
        """
        start = time.perf_counter()
        self.inputs.forget_absent_sequences(plan)
        chained = None if previous is None else {seq_id: row for row, seq_id in enumerate(previous.inputs.sample_seq_ids)}
        inputs = self.inputs.prepare(plan, chained)
        if inputs.deferred_positions:
            assert previous is not None and previous.drawn is not None
            device = inputs.input_ids.device
            positions, rows = (_to_device(values, device) for values in (inputs.deferred_positions, inputs.deferred_rows))
            inputs.input_ids[positions] = previous.drawn.token_ids[rows].to(inputs.input_ids.dtype)
        hidden = self._forward_hidden(inputs)
        grammar_mask = None
        if self.grammars is not None:  # host work while the device runs the forward (structured/matchers.py)
            self.grammars.forget_absent(plan)
            grammar_mask = self.grammars.fill(inputs.sample_seq_ids, inputs.specs)
        scored: tuple[PromptLogprobs, ...] = ()
        if self.rank == 0 and any(seq.prompt_logprobs is not None for seq in plan.seqs):
            scored = score_prompts(plan, hidden, self.model.compute_logits)
        logits = self._sampled_logits(inputs, hidden)
        drawn = None if logits is None else sample_on_device(logits, inputs.specs, grammar_mask)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        return LaunchedStep(plan=plan, inputs=inputs, drawn=drawn, grammar_mask=grammar_mask, scored=scored,
                            done=done, start=start)  # fmt: skip

    def finish(self, launched: LaunchedStep) -> StepResult:
        """Wait for a launched step's tokens (the host sync) and answer it."""
        sampled: tuple[SampledToken, ...] = ()
        inputs = launched.inputs
        if launched.drawn is not None:
            drawn = launched.drawn.results()
            if launched.grammar_mask is not None:
                assert self.grammars is not None
                self.grammars.commit(inputs.sample_seq_ids, inputs.specs, [token_id for token_id, _ in drawn])
            self.inputs.remember_sampled(inputs.sample_seq_ids, drawn)
            if self.rank == 0:
                sampled = tuple(
                    SampledToken(seq_id=seq_id, token_id=token_id, logprob=logprob)
                    for seq_id, (token_id, logprob) in zip(inputs.sample_seq_ids, drawn, strict=True)
                )
        return StepResult(step_id=launched.plan.step_id, sampled=sampled,
                          elapsed_s=time.perf_counter() - launched.start, prompt_logprobs=launched.scored)

    def close(self) -> None:
        """Drop the graphs, model and caches and leave the tensor-parallel group."""
        self._graphs = self._cpu_decode = None
        self.kv_caches = []
        self.comm.close()
