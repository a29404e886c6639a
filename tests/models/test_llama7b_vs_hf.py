"""Llama-2-7B-shaped random model, bf16 on CUDA (kernels + decode graphs) vs Hugging Face transformers, same weights.

Both models get their weights from the same seeded generator on the GPU (`presets.random_weights`, drawn in bf16),
so nothing is written to disk and the comparison also checks our loader's q/k/v and gate/up fusion. The reference is
transformers' LlamaForCausalLM in float32 holding exactly those bf16 values (the "true" function of the weights);
transformers in bf16 is measured against the same reference, as the yardstick for bf16 error.

Metrics and why:
- Final prompt position logits: relative L2 error ||ours - ref|| / ||ref||, required below max(2e-2, 1.25 × the error
  of transformers' own bf16), i.e. at least about as accurate as the bf16 peer.
- Greedy continuation, 64 tokens for each of 3 prompts (one padded graph row): random weights give flat logits
  (std ≈ 1.3 over 32000 tokens, so the top-2 gap is often under 0.1), and bf16 noise flips near-ties, after which
  free-running sequences share nothing. So the reference is teacher-forced on OUR continuation (one forward over
  prompt + our tokens): at every position it says what it would pick given the same prefix. Where its top-2 margin
  exceeds MARGIN (several times the measured logit noise) our token must equal its choice; the first mismatch is
  exactly where free-running greedy decoding would diverge, and is reported with its margin. A wrong cache, position
  or stale graph input makes our tokens unrelated to the reference's and fails at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from trillm.protocol.api import SamplingParams
from trillm.protocol.step import SampleSpec, SeqStep, StepPlan
from trillm.config import RunnerConfig
from trillm.gpu.model_builder import RANDOM_SEED
from trillm.gpu.runner import ModelRunner
from trillm.models.llama import checkpoint_shapes
from trillm.models.presets import preset_config, random_weights

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

PRESET = "random:llama2-7b"
BLOCK_SIZE = 16
MAX_MODEL_LEN = 512
NEW_TOKENS = 64
PROMPT_LENS = (21, 64, 150)  # 3 sequences decode in the 4-row graph (one padding row)
MARGIN = 0.25  # logits; HF-fp32 top-2 margin above which our greedy token must match
MIN_AGREEMENT = 0.75  # fraction of all positions where the tokens must match anyway
GREEDY = SamplingParams(temperature=0.0)


def prompts() -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(7)
    vocab_size = _args().vocab_size
    return [tuple(torch.randint(3, vocab_size, (n,), generator=gen).tolist()) for n in PROMPT_LENS]


def our_greedy(runner: ModelRunner) -> tuple[torch.Tensor, list[list[int]]]:
    """Our final prompt-position logits [num_prompts, vocab] (float32, CPU) and NEW_TOKENS greedy tokens each."""
    blocks_per_seq = MAX_MODEL_LEN // BLOCK_SIZE
    tables = [tuple(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(PROMPT_LENS))]
    spec = SampleSpec(sampling=GREEDY, output_index=0)
    prefill = StepPlan(
        step_id=0,
        seqs=tuple(
            SeqStep(seq_id=i, token_ids=p, start_pos=0, block_table=tables[i], sample=spec)
            for i, p in enumerate(prompts())
        ),
    )
    logits = runner.forward_logits(runner.prepare(prefill))
    assert logits is not None
    outputs = [[int(t)] for t in logits.argmax(-1).tolist()]
    for step in range(1, NEW_TOKENS):
        seqs = tuple(
            SeqStep(seq_id=i, token_ids=(out[-1],), start_pos=n + step - 1, block_table=tables[i],
                    sample=SampleSpec(sampling=GREEDY, output_index=step))
            for i, (n, out) in enumerate(zip(PROMPT_LENS, outputs, strict=True))
        )  # fmt: skip
        assert runner.prepare(StepPlan(step_id=step, seqs=seqs)).graph_rows == 4
        for sampled in runner.step(StepPlan(step_id=step, seqs=seqs)).sampled:
            outputs[sampled.seq_id].append(sampled.token_id)
    return logits.float().cpu(), outputs


def hf_model(dtype: torch.dtype) -> Any:
    """transformers' LlamaForCausalLM of the preset's shape on the GPU, holding random_weights' bf16 values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = preset_config(PRESET)
    config.pop("model_type", None)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    params = dict(model.named_parameters())
    shapes = checkpoint_shapes(_args())
    weights = random_weights(shapes, device=torch.device("cuda"), dtype=torch.bfloat16, seed=RANDOM_SEED)
    with torch.no_grad():
        for name, tensor in weights:
            params.pop(name).copy_(tensor)
    assert not params, f"transformers parameters without a checkpoint tensor: {sorted(params)[:4]}"
    return model


def _args() -> Any:
    from trillm.models.llama import LlamaArgs

    return LlamaArgs.from_hf_config(preset_config(PRESET))


def to_bfloat16(model: Any) -> Any:
    """The model in bf16 as `from_pretrained(dtype=bfloat16)` would give it: rotary inverse frequencies stay float32."""
    saved = {name: b.clone() for name, b in model.named_buffers() if name.endswith("inv_freq")}
    model = model.to(torch.bfloat16)
    for name, buffer in saved.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, buffer)
    return model


@torch.no_grad()
def teacher_forced_logits(model: Any, prompt: tuple[int, ...], continuation: list[int]) -> torch.Tensor:
    """The model's logits [len(continuation), vocab] (float32, CPU) predicting each continuation token."""
    ids = torch.tensor([list(prompt) + continuation[:-1]], device="cuda")
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 :]  # [len(continuation), vocab]
    return logits.float().cpu()


@pytest.fixture(scope="module")
def comparison() -> Iterator[dict[str, Any]]:
    """Ours (bf16, graphs) and transformers (fp32 reference, then bf16) on the same prompts and weights."""
    runner = ModelRunner(
        RunnerConfig(
            model_path=PRESET, rank=0, world_size=1, dist_init_method="", device="cuda", dtype="bfloat16",
            block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, max_batch_size=len(PROMPT_LENS),
            max_prefill_token_num=4096, cache_max_entry_count=0.1, cpu_memory_budget_bytes=1 << 30,
            enable_cuda_graph=True,
        )
    )  # fmt: skip
    assert runner.graph_batch_sizes == (1, 2, 4)
    ours_final, ours_tokens = our_greedy(runner)
    qkv = runner.model.model.layers[-1].self_attn.qkv_proj.weight  # [q + k + v rows, hidden]
    model = hf_model(torch.float32)
    attn = model.model.layers[-1].self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).to(torch.bfloat16)
    assert torch.equal(qkv, fused), "our fused qkv rows differ from the HF q/k/v weights"
    runner.close()
    del runner, qkv
    ref = [teacher_forced_logits(model, p, t) for p, t in zip(prompts(), ours_tokens, strict=True)]
    model = to_bfloat16(model)
    hf_bf16 = [teacher_forced_logits(model, p, t) for p, t in zip(prompts(), ours_tokens, strict=True)]
    del model
    torch.cuda.empty_cache()
    yield {"ours_final": ours_final, "ours_tokens": ours_tokens, "ref": ref, "hf_bf16": hf_bf16}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_final_position_logits_within_bf16_tolerance(comparison: dict[str, Any]) -> None:
    ref_final = torch.stack([r[0] for r in comparison["ref"]])  # [num_prompts, vocab]
    hf_final = torch.stack([r[0] for r in comparison["hf_bf16"]])
    ours = rel_error(comparison["ours_final"], ref_final)
    theirs = rel_error(hf_final, ref_final)
    print(f"final-position logits, relative L2 error vs transformers fp32: ours bf16 {ours:.2e}, transformers bf16 "
          f"{theirs:.2e}; logit std {float(ref_final.std()):.2f}")
    assert ours < max(2e-2, 1.25 * theirs)
    top2 = ref_final.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > MARGIN
    assert torch.equal(comparison["ours_final"].argmax(-1)[clear], ref_final.argmax(-1)[clear])


def test_greedy_continuations_agree_where_the_reference_is_clear(comparison: dict[str, Any]) -> None:
    checked = agreed = hf_agreed = 0
    for i, (tokens, ref, hf) in enumerate(zip(comparison["ours_tokens"], comparison["ref"], comparison["hf_bf16"],
                                              strict=True)):  # fmt: skip
        ours = torch.tensor(tokens)
        top2 = ref.topk(2, dim=-1).values  # [NEW_TOKENS, 2]
        margins = top2[:, 0] - top2[:, 1]
        ref_tokens = ref.argmax(-1)
        match = ours == ref_tokens
        clear = margins > MARGIN
        checked += int(clear.sum())
        agreed += int(match.sum())
        hf_agreed += int((hf.argmax(-1) == ref_tokens).sum())
        first = int((~match).nonzero()[0]) if not match.all() else None
        where = "none" if first is None else f"token {first} (reference top-2 margin {float(margins[first]):.3f})"
        print(f"prompt {i} ({PROMPT_LENS[i]} tokens): {int(match.sum())}/{NEW_TOKENS} greedy tokens agree; "
              f"first divergence: {where}")
        bad = (clear & ~match).nonzero().flatten().tolist()
        assert not bad, f"prompt {i}: tokens differ where the reference's margin is clear: {bad}"
    total = NEW_TOKENS * len(PROMPT_LENS)
    print(f"{agreed}/{total} tokens agree ({checked} positions with margin > {MARGIN}); transformers bf16 agrees "
          f"with its fp32 on {hf_agreed}/{total}")
    assert agreed >= MIN_AGREEMENT * total
