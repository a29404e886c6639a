"""The sampler never synchronises with the GPU before its one final copy to the host (issue #8).

`torch.cuda.set_sync_debug_mode("error")` makes any synchronising CUDA call raise, so every processing stage runs
under it on rows that use every feature: logit bias, penalties, stop masking (min_tokens, ignore_eos), temperature,
top-k, top-p and min-p draws.
"""

from __future__ import annotations

import pytest
import torch

from trillm.gpu import sampling
from trillm.protocol.api import SamplingParams
from trillm.protocol.step import SampleSpec

pytestmark = pytest.mark.gpu
VOCAB = 1000


def specs() -> list[SampleSpec]:
    return [
        SampleSpec(sampling=SamplingParams(temperature=0.0, ignore_eos=True), output_index=3, eos_token_ids=(2,)),
        SampleSpec(sampling=SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, seed=7, min_tokens=4,
                                           stop_token_ids=(5,), logit_bias=((9, 2.0),)),
                   output_index=1, eos_token_ids=(2,)),
        SampleSpec(sampling=SamplingParams(temperature=1.0, seed=3, repetition_penalty=1.2, presence_penalty=0.5,
                                           frequency_penalty=0.3),
                   output_index=2, eos_token_ids=(2,), history_token_ids=(10, 11, 12, 11), num_prompt_tokens=2),
    ]


STAGES = {
    "logit_bias": lambda logits, batch: sampling._apply_logit_bias(logits, batch),
    "penalties": lambda logits, batch: sampling._apply_penalties(logits, batch),
    "stop_masking": lambda logits, batch: sampling._mask_stop_tokens(logits, batch),
    "draw": lambda logits, batch: sampling._draw(logits[1:], batch[1:]),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_runs_without_a_host_sync(stage: str) -> None:
    batch = specs()
    logits = torch.randn(len(batch), VOCAB, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        STAGES[stage](logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_masking_still_masks_after_the_non_blocking_copies() -> None:
    batch = specs()
    logits = torch.zeros(len(batch), VOCAB, device="cuda")
    sampling._mask_stop_tokens(logits, batch)
    masked = torch.isinf(logits).nonzero().tolist()
    assert masked == [[0, 2], [1, 2], [1, 5]]
