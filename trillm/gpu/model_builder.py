"""Model builder: one rank's LlamaForCausalLM, created empty in the serving dtype on its device, then filled.

Runs outside the event loop, inside a rank process (`ModelRunner.__init__` calls it once).

Op sets: CPU runs `gpu/cpu_ops.py` (the reference ops' results in fewer torch calls). CUDA runs the CuPy kernels of
`gpu/kernels/` in bfloat16/float16; float32, or a shape the kernels do not support (head_dim other than 64/128), runs
the reference ops on the GPU, eagerly (`kernels_support` says why). On CUDA the projection weights are stored column-major (`column_major_weights`):
cuBLAS streams them faster at decode batch sizes. On CPU in float32, weights that hold GGUF blocks exactly (a GGUF
model's, dequantized by the loader) are kept as those blocks too, for the decode kernels of `gpu/cpu_quant.py`
(TRILLM_CPU_BLOCKS=0: dense only, for benchmarks).

Weights: a random preset (`random:<name>`) draws its weights on the device from RANDOM_SEED; any other model path is
a HF-style folder whose safetensors files are streamed into the rank's shards. Either way each rank reads or draws
only its own slice of every sharded tensor (models/weights.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch

from trillm.errors import ModelLoadError
from trillm.gpu import cpu_ops, cpu_quant, deterministic_ops, kernels, reference
from trillm.models.layers import AllReduce, ColumnParallelLinear, RowParallelLinear
from trillm.models.llama import LlamaArgs, LlamaForCausalLM, checkpoint_shapes
from trillm.models.loader import check_architecture, read_hf_config
from trillm.models.presets import preset_config
from trillm.models.weights import WeightSource, iter_checkpoint, iter_random_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_SEED = 0  # random presets are the same model in every run and at every tensor-parallel degree


def read_model_args(model_path: str, *, is_random: bool) -> LlamaArgs:
    """The model's shape: its random preset's config, or its folder's config.json (ModelLoadError if unsupported)."""
    hf_config = preset_config(model_path) if is_random else read_hf_config(model_path)
    check_architecture(hf_config, model_path)
    return LlamaArgs.from_hf_config(hf_config)


def kernels_support(args: LlamaArgs, dtype: torch.dtype) -> str | None:
    """Why the CUDA kernels cannot run this model (None: they can)."""
    if dtype not in kernels.ELEMENT_TYPES:
        return f"dtype {dtype} (the kernels are bfloat16/float16)"
    if args.head_dim not in kernels.ATTENTION_HEAD_DIMS:
        return f"head_dim {args.head_dim} (the attention kernels take {kernels.ATTENTION_HEAD_DIMS})"
    if args.hidden_size % 8 or args.intermediate_size % 8:
        return "hidden or FFN size not a multiple of 8"
    return None


def select_ops(args: LlamaArgs, dtype: torch.dtype, device: torch.device, *, deterministic: bool = False) -> Any:
    """The op set this model runs on `device`: `cpu_ops` on CPU, the kernels package where they fit, the
    deterministic op set with `deterministic` (ModelLoadError where the kernels cannot run: the mode promises bits)."""
    if deterministic:
        unsupported = "a CPU" if device.type == "cpu" else kernels_support(args, dtype)
        if unsupported is not None:
            raise ModelLoadError(f"--deterministic needs the CUDA kernels, which do not support {unsupported}")
        return deterministic_ops
    if device.type == "cpu":
        return cpu_ops
    unsupported = kernels_support(args, dtype)
    if unsupported is None:
        return kernels
    log.warning("CUDA kernels do not support %s: running the reference ops eagerly on the GPU", unsupported)
    return reference


def column_major_weights(model: LlamaForCausalLM) -> None:
    """Store every projection weight (and an untied lm_head) column-major, in place: same values and shapes.

    Each weight becomes the transposed view of a contiguous [in, out] tensor, so F.linear hands cuBLAS an "NN" product
    that streams faster at decode batch sizes on the H100. Measured with CUDA graphs on the Llama-2-7B shapes (sum of
    the four projections of one layer): 151 vs 162 us at batch 1, 153 vs 163 us at batch 32, 568 vs 562 us at 1,024
    tokens; lm_head 90 vs 98 us at batch 1. One matrix at a time is copied.
    """
    if os.environ.get("TRILLM_WEIGHT_LAYOUT", "column") == "row":  # benchmarks: keep [out, in] storage (fused GEMV)
        return
    modules: list[Any] = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    if model.lm_head is not None:
        modules.append(model.lm_head)
    for module in modules:
        module.weight.data = module.weight.data.t().contiguous().t()  # [out, in] view of [in, out] storage


def build_model(
    args: LlamaArgs,
    *,
    model_path: str,
    is_random: bool,
    ops: Any,
    dtype: torch.dtype,
    device: torch.device,
    rank: int,
    world_size: int,
    all_reduce: AllReduce,
    max_positions: int,
) -> LlamaForCausalLM:
    """This rank's model with its weights loaded, in eval mode (column-major projections on CUDA)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created empty in the serving dtype, on the device
    try:
        with torch.device(device):
            model = LlamaForCausalLM(
                args,
                ops=ops,
                rank=rank,
                world_size=world_size,
                all_reduce=all_reduce,
                max_positions=max_positions,
            )
    finally:
        torch.set_default_dtype(default_dtype)
    # Lazy sources: each layer reads (or draws) only this rank's slice of a tensor (models/weights.py).
    weights: Iterable[tuple[str, WeightSource]]
    if is_random:
        weights = iter_random_weights(checkpoint_shapes(args), device=device, dtype=dtype, seed=RANDOM_SEED)
    else:
        weights = iter_checkpoint(model_path)
    model.load_weights(weights)
    if device.type == "cuda" and ops is not deterministic_ops:  # det_linear reads row-major weights
        column_major_weights(model)
    elif device.type == "cpu" and dtype == torch.float32 and os.environ.get("TRILLM_CPU_BLOCKS", "1") != "0":
        log.info("CPU decode reads GGUF blocks for %d weights (gpu/cpu_quant.py)", cpu_quant.pack_model(model))
    return model.eval()
