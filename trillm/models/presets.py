"""Random-weight presets: Hugging Face-style configs of benchmark shapes, and their seeded random weights.

A spec "random:<name>" skips every download: the runner builds the model from `PRESETS[name]` and fills it with
`random_weights`' sources (models/weights.py `RandomWeight`): each rank draws only its own slice of each tensor, on
the target device, from a counter-based hash of (seed, tensor name, element index). Every tensor-parallel degree
therefore sees exactly the same model (tp=1 and tp=N runs are comparable), and a 70B-shaped preset at tp=8 never
exists whole on any GPU or host.

Random presets have no tokenizer of their own: the engine uses the default model's (SmolLM2, 49152 tokens). Ids the
model samples above that vocabulary decode to nothing; tokenizer ids above a preset's vocabulary (llama2-7b has 32000)
are folded into it by the runner (`id % vocab_size`), since random weights give no id a meaning anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from trillm.config import RANDOM_MODEL_PREFIX
from trillm.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RANDOM_PREFIX = RANDOM_MODEL_PREFIX


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(extra)
    return config


PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": _llama(4096, 32, 32, 32, 11008, 32000),
    "llama3-8b": _llama(4096, 32, 32, 8, 14336, 128256, rope_theta=500000.0, max_position_embeddings=8192),
    # InternLM2-7B's shapes, run through the Llama blocks (same math; only the checkpoint names differ).
    "internlm2-7b": _llama(4096, 32, 32, 8, 14336, 92544, rope_theta=1000000.0, max_position_embeddings=32768),
    # A node of 8 GPUs (tp 4 or 8): Llama-2-70B and Llama-3-70B (3.1's rope scaling left out), GQA 64 heads / 8 KV.
    "llama2-70b": _llama(8192, 80, 64, 8, 28672, 32000),
    "llama3-70b": _llama(8192, 80, 64, 8, 28672, 128256, rope_theta=500000.0, max_position_embeddings=8192),
    # Tests: 12 heads of 32 / 6 KV heads (GQA), so that tensor parallelism of 1, 2, 3 and 6 all divide it.
    "tiny": _llama(384, 2, 12, 6, 768, 512, max_position_embeddings=1024),
    # GPU tests: the CUDA attention kernels need head_dim 64 or 128; 8 heads of 64 over 2 KV heads (GQA 4).
    "tiny-gpu": _llama(512, 2, 8, 2, 1024, 1024, max_position_embeddings=2048),
    # Tests of tp 4 and 8: 8 heads of 32 over 2 KV heads, so that KV heads are replicated (2 or 4 ranks each).
    "tiny-tp8": _llama(256, 4, 8, 2, 512, 512, max_position_embeddings=1024),
}


def preset_config(spec: str) -> dict[str, Any]:
    """The HF-style config dict of "random:<name>" (a fresh copy)."""
    name = spec.removeprefix(RANDOM_PREFIX)
    if name not in PRESETS:
        raise ModelLoadError(f"unknown random preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


def random_weights(
    shapes: dict[str, tuple[int, ...]], *, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """The seeded random tensors of checkpoint `shapes`, whole, one at a time on `device` (runs outside the event loop).

    Tests and tools that want a full tensor (e.g. to save a checkpoint) use this; the runner loads the lazy sources of
    `weights.iter_random_weights` instead, which hold the same values.
    """
    from trillm.models.weights import iter_random_weights, read_whole  # torch: not imported by the serving process

    for name, source in iter_random_weights(shapes, device=device, dtype=dtype, seed=seed):
        yield name, read_whole(source)
