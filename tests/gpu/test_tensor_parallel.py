"""Tensor parallelism on the CPU: tp = 2, 3, 4, 6 and 8 give tp=1's greedy tokens and logits in float32.

Each rank's model runs in a thread of this process, with an all-reduce that sums the ranks' tensors in rank order
(threads: no process start-up, so every degree up to 8 fits in a second). The rank processes over gloo are tested in
test_rank.py (tp=3 and tp=4). random:tiny-tp8 has 2 KV heads, so at tp 4 and 8 its KV heads are replicated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from trillm.gpu import cpu_ops
from trillm.models.layers import AttnMeta
from trillm.models.llama import LlamaArgs, LlamaForCausalLM, checkpoint_shapes
from trillm.models.presets import preset_config
from trillm.models.sharding import kv_heads_per_rank
from trillm.models.weights import iter_random_weights

BLOCK_SIZE = 8
PROMPT = (9, 8, 7, 6, 5, 4, 3, 200, 100)
NUM_TOKENS = 6
BARRIER_TIMEOUT_S = 60.0


class ThreadGroup:
    """The all-reduce of `world_size` threads: every rank gets the rank-order sum of everyone's tensor."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=BARRIER_TIMEOUT_S)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def all_reduce_for(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = x
            self.barrier.wait()
            total = torch.stack([s for s in self.slots if s is not None]).sum(0)  # same order on every rank
            self.barrier.wait()  # everyone has summed before anyone overwrites its tensor
            return x.copy_(total)

        return all_reduce


def greedy_decode(args: LlamaArgs, rank: int, world_size: int, all_reduce: Callable[[torch.Tensor], torch.Tensor]
                  ) -> tuple[list[int], torch.Tensor]:  # fmt: skip
    """Prefill PROMPT then decode NUM_TOKENS greedily on paged KV; the tokens and every step's logits [steps, vocab]."""
    model = LlamaForCausalLM(args, ops=cpu_ops, rank=rank, world_size=world_size, all_reduce=all_reduce,
                             max_positions=64)  # fmt: skip
    model.load_weights(iter_random_weights(checkpoint_shapes(args), device=torch.device("cpu"), dtype=torch.float32,
                                           seed=0))  # fmt: skip
    kv_heads = kv_heads_per_rank(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, world_size=world_size)
    shape = (8, kv_heads, BLOCK_SIZE, args.head_dim)  # [num_blocks, num_kv_heads, block_size, head_dim]
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(args.num_layers)]
    table = torch.arange(8, dtype=torch.int32)[None, :]  # [1 seq, 8 blocks]
    tokens, all_logits, ids = list[int](), [], list(PROMPT)
    with torch.inference_mode():
        for step in range(NUM_TOKENS):
            start = 0 if step == 0 else len(PROMPT) + step - 1
            positions = torch.arange(start, start + len(ids))
            meta = AttnMeta(slot_mapping=positions.clone(), block_tables=table,
                            context_lens=torch.tensor([start + len(ids)], dtype=torch.int32),
                            cu_seqlens_q=torch.tensor([0, len(ids)], dtype=torch.int32), is_decode=step > 0,
                            fresh_lens=(len(ids),) if step == 0 else ())  # fmt: skip
            hidden = model(torch.tensor(ids), positions, caches, meta)  # [len(ids), hidden]
            logits = model.compute_logits(hidden[-1:])  # [1, vocab]
            all_logits.append(logits[0])
            tokens.append(int(logits.argmax()))
            ids = [tokens[-1]]
    return tokens, torch.stack(all_logits)


def run_ranks(args: LlamaArgs, world_size: int) -> list[tuple[list[int], torch.Tensor]]:
    group = ThreadGroup(world_size)

    def rank_main(rank: int) -> tuple[list[int], torch.Tensor]:
        try:
            return greedy_decode(args, rank, world_size, group.all_reduce_for(rank))
        except BaseException:
            group.barrier.abort()  # the other ranks stop waiting for this one
            raise

    with ThreadPoolExecutor(world_size) as pool:
        return list(pool.map(rank_main, range(world_size)))


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "world_size"), [("tiny-tp8", 2), ("tiny-tp8", 4), ("tiny-tp8", 8), ("tiny", 3),
                                                    ("tiny", 6)])  # fmt: skip
def test_tp_ranks_match_one_rank_in_float32(preset: str, world_size: int) -> None:
    args = LlamaArgs.from_hf_config(preset_config(f"random:{preset}"))
    expected_tokens, expected_logits = greedy_decode(args, 0, 1, lambda x: x)
    results = run_ranks(args, world_size)
    for tokens, logits in results:
        assert tokens == expected_tokens
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=2e-5)
    assert all(torch.equal(logits, results[0][1]) for _, logits in results)  # the ranks agree bit for bit
    assert len(set(expected_tokens)) > 1  # a model that repeats one token would prove little
