"""Llama-family model vs Hugging Face transformers: same weights, same greedy tokens (float32, CPU).

The runner is driven by StepPlans built here with a trivial block allocator (sequence i owns a fixed run of blocks),
so these tests exercise the model, the paged cache and batching without the Batcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from trillm.protocol.api import SamplingParams
from trillm.protocol.step import SampleSpec, SeqStep, StepPlan
from trillm.config import RunnerConfig
from trillm.gpu.runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0)
BLOCK_SIZE = 8
MAX_MODEL_LEN = 256


def make_runner(model_path: str, **overrides: Any) -> ModelRunner:
    fields: dict[str, Any] = dict(
        model_path=model_path,
        rank=0,
        world_size=1,
        dist_init_method="",
        device="cpu",
        dtype="float32",
        block_size=BLOCK_SIZE,
        max_model_len=MAX_MODEL_LEN,
        max_batch_size=8,
        max_prefill_token_num=4096,
        cache_max_entry_count=1.0,
        cpu_memory_budget_bytes=1 << 30,
        enable_cuda_graph=False,
    )
    fields.update(overrides)
    return ModelRunner(RunnerConfig(**fields))


def greedy_generate(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    prefill_chunk: int | None = None,
    eos_token_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """All prompts in one batch: (chunked) prefill steps, then decode steps; a sequence leaves at EOS."""
    blocks_per_seq = MAX_MODEL_LEN // BLOCK_SIZE
    tables = [tuple(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(prompts))]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [0] * len(prompts)  # prompt tokens already prefilled
    step_id = 0
    while any(
        d < len(p) for d, p in zip(done, prompts, strict=True)
    ):  # prefill, `prefill_chunk` tokens per sequence per step
        seqs = []
        for i, prompt in enumerate(prompts):
            if done[i] < len(prompt):
                end = len(prompt) if prefill_chunk is None else min(len(prompt), done[i] + prefill_chunk)
                spec = SampleSpec(sampling=GREEDY, output_index=0) if end == len(prompt) else None
                seqs.append(
                    SeqStep(
                        seq_id=i,
                        token_ids=tuple(prompt[done[i] : end]),
                        start_pos=done[i],
                        block_table=tables[i],
                        sample=spec,
                    )
                )
                done[i] = end
        result = runner.step(StepPlan(step_id=step_id, seqs=tuple(seqs)))
        step_id += 1
        for token in result.sampled:
            outputs[token.seq_id].append(token.token_id)
    while True:
        running = [i for i, out in enumerate(outputs) if len(out) < max_new_tokens and out[-1] not in eos_token_ids]
        if not running:
            return outputs
        seqs = [
            SeqStep(
                seq_id=i,
                token_ids=(outputs[i][-1],),
                start_pos=len(prompts[i]) + len(outputs[i]) - 1,
                block_table=tables[i],
                sample=SampleSpec(sampling=GREEDY, output_index=len(outputs[i])),
            )
            for i in running
        ]
        result = runner.step(StepPlan(step_id=step_id, seqs=tuple(seqs)))
        step_id += 1
        for token in result.sampled:
            outputs[token.seq_id].append(token.token_id)


def hf_greedy(model: Any, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
)


def _tiny_models() -> dict[str, Any]:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    llama3_rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    configs = {
        "llama3": LlamaForCausalLM(
            LlamaConfig(**TINY, rope_scaling=llama3_rope, rope_theta=500000.0, max_position_embeddings=512)
        ),
        "llama-linear": LlamaForCausalLM(
            LlamaConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0}, max_position_embeddings=512)
        ),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True, max_position_embeddings=512)),
        "mistral": MistralForCausalLM(MistralConfig(**TINY, sliding_window=None, max_position_embeddings=512)),
    }
    for model in configs.values():
        model.generation_config.eos_token_id = None  # never stop early: compare every token
        model.generation_config.pad_token_id = 0
    return configs


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, str]]:
    torch.manual_seed(0)
    models = {}
    for name, model in _tiny_models().items():
        with torch.no_grad():  # HF's init (std 0.02, zero biases, unit norms) gives near-uniform logits: spread them
            for param_name, param in model.named_parameters():
                if param_name.endswith("bias"):
                    param.normal_(0.0, 0.5)
                elif "norm" in param_name:
                    param.normal_(1.0, 0.2)
                else:
                    param.mul_(4.0)
        folder = tmp_path_factory.mktemp(name)
        model.eval().save_pretrained(folder)
        models[name] = (model, str(folder))
    return models


PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 65, 66, 1, 2, 3, 4, 31, 8], [300, 12, 13], [77] * 9 + [78, 79]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "llama-linear", "qwen2", "mistral"])
def test_greedy_tokens_match_transformers(tiny_models: dict[str, tuple[Any, str]], name: str) -> None:
    model, folder = tiny_models[name]
    expected = [hf_greedy(model, prompt, 12) for prompt in PROMPTS]
    runner = make_runner(folder)
    assert_same_greedy(model, greedy_generate(runner, PROMPTS, 12), expected)
    assert_same_greedy(model, greedy_generate(make_runner(folder), PROMPTS, 12, prefill_chunk=5), expected)


def assert_same_greedy(model: Any, ours: list[list[int]], expected: list[list[int]]) -> None:
    """Equal greedy tokens, except after a step where transformers' own top two logits tie within float32 noise
    (random weights make such ties possible; which side of one a run lands on depends on the reduction order)."""
    assert len(ours) == len(expected)
    for prompt, got, want in zip(PROMPTS, ours, expected, strict=True):
        if got == want:
            continue
        i = next(k for k, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([list(prompt) + want[:i]])).logits[0, -1].float()
        first, second = logits.topk(2).values.tolist()
        assert first - second < 1e-4 * max(1.0, abs(first)), f"diverged at token {i} without a tie: {got} vs {want}"


@pytest.mark.slow
def test_qwen2_bias_is_loaded(tiny_models: dict[str, tuple[Any, str]]) -> None:
    model, folder = tiny_models["qwen2"]
    runner = make_runner(folder)
    q_bias = model.model.layers[0].self_attn.q_proj.bias
    ours = runner.model.model.layers[0].self_attn.qkv_proj.bias
    assert ours is not None and torch.equal(ours[: q_bias.shape[0]], q_bias)
    assert runner.model.lm_head is None  # tied to the embedding


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2 (the acceptance test): 8 chat prompts × 32 greedy tokens, batched, == transformers.

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers and say why they are prime.",
    "Translate 'good morning' into Spanish and German.",
    "What is 12 times 7? Show your work.",
    "Give me a tip for learning to play the guitar.",
    "Describe a cat to someone who has never seen one. 🐱",
]


@pytest.mark.slow
def test_smollm2_chat_greedy_matches_transformers(smollm2_folder: str) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for c in CHATS
    ]
    eos = (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    ours = greedy_generate(make_runner(smollm2_folder), prompts, 32, eos_token_ids=eos)

    model = LlamaForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=32, do_sample=False, eos_token_id=eos[0], pad_token_id=eos[0])
    for i, prompt_out in enumerate(generated[:, batch["input_ids"].shape[1] :].tolist()):
        expected = prompt_out[: prompt_out.index(eos[0]) + 1] if eos[0] in prompt_out else prompt_out
        assert ours[i] == expected, (CHATS[i], tokenizer.decode(ours[i]), tokenizer.decode(expected))
    assert sum(len(o) for o in ours) > 8 * 16  # the answers are long enough to mean something
    assert "Paris" in tokenizer.decode(ours[0])  # the GGUF's Q/K rows were un-permuted: the model makes sense
