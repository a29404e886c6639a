"""KV cache: one rank's paged K and V tensors per layer, sized from its memory budget, with the layout it reports.

Runs outside the event loop, inside a rank process (`ModelRunner.__init__` allocates once, after the weights).

Sizing (per rank; every rank ends up with the same block count):
- budget: `cache_max_entry_count` × (free device memory after the weights on CUDA; `cpu_memory_budget_bytes` on CPU),
- never more blocks than `max_batch_size` sequences of `max_model_len` tokens need,
- at least one `max_model_len` sequence's worth, or ModelLoadError saying how much memory that needs,
- with several ranks, the minimum over ranks (all_reduce MIN).

The block count and shapes go back to the serving process as a frozen `KVCacheLayout`, never into the config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from trillm.config import RunnerConfig
from trillm.errors import ModelLoadError
from trillm.models.layers import KVCache
from trillm.models.llama import LlamaArgs
from trillm.models.sharding import kv_heads_per_rank
from trillm.protocol.step import KVCacheLayout

log = logging.getLogger(__name__)


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


def allocate_kv_cache(
    config: RunnerConfig,
    args: LlamaArgs,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    all_reduce_min: Callable[[int], int],
) -> tuple[list[KVCache], KVCacheLayout]:
    """Zeroed (k_cache, v_cache) pairs, one per layer, each [num_blocks, num_kv_heads, block_size, head_dim]."""
    num_kv_heads = kv_heads_per_rank(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                                     world_size=config.world_size)  # replicated KV heads: 1 each, models/sharding.py
    bytes_per_block = 2 * args.num_layers * num_kv_heads * config.block_size * args.head_dim * dtype.itemsize
    if device.type == "cuda":
        torch.cuda.empty_cache()  # weight-loading temporaries go back to the driver before we measure
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = int(config.cache_max_entry_count * free_bytes)
    else:
        budget = int(config.cache_max_entry_count * config.cpu_memory_budget_bytes)
    num_blocks = plan_num_blocks(
        bytes_per_block=bytes_per_block,
        budget_bytes=budget,
        block_size=config.block_size,
        max_model_len=max_model_len,
        max_batch_size=config.max_batch_size,
    )
    num_blocks = all_reduce_min(num_blocks)
    shape = (num_blocks, num_kv_heads, config.block_size, args.head_dim)
    caches = [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(args.num_layers)
    ]
    layout = KVCacheLayout(
        num_blocks=num_blocks,
        block_size=config.block_size,
        num_layers=args.num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=args.head_dim,
        dtype=config.dtype,
    )
    return caches, layout
