"""Constrained decoding benchmark: the per-step cost of grammar masks for a batch of constrained sequences.

Times what constrained decoding adds to one engine step on the rank, without the model: `GrammarMatchers.fill`
(llguidance computes each sequence's token bitmask on the host, in parallel, into pinned memory; the upload is
non-blocking), the sampler with the masks applied on the logits' device (`gpu/sampling.py`), and `commit` (each
matcher consumes its sampled token). The baseline is the same sampler on the same logits without grammars. Every
sequence follows the nested JSON schema below at temperature 1 over random logits (so the grammar, not the model,
decides how long an answer is); a sequence that ends (EOS) restarts, as a new request would.

    python -m bench.constrained                       # CUDA when present, else CPU; prints JSON, then one line
    python -m bench.constrained --batch 32 --steps 200 --device cuda --vocab 128256

`--vocab` widens the mask and logits beyond the tokenizer's (a Llama-3-sized vocabulary); `--tokenizer` names a
tokenizer.json (default: the SmolLM2 GGUF's, converted on first use).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from trillm.gpu.sampling import sample
from trillm.protocol.api import SamplingParams
from trillm.protocol.step import SampleSpec
from trillm.structured.grammar import json_schema_grammar
from trillm.structured.matchers import GrammarMatchers

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "kind": {"enum": ["cat", "dog", "bird", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "home": {"type": "object", "properties": {"city": {"type": "string"}, "floor": {"type": "integer"}},
                 "required": ["city", "floor"], "additionalProperties": False},
    },
    "required": ["name", "kind", "tags", "home"],
    "additionalProperties": False,
}
EOS = 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokenizer_file(path: str | None) -> Path:
    if path is not None:
        return Path(path)
    from trillm.models.loader import resolve_model

    return Path(resolve_model("smollm2")) / "tokenizer.json"


def run(batch: int, steps: int, device: torch.device, tokenizer: Path, vocab: int | None) -> dict[str, object]:
    """Median per-step milliseconds of the free and the constrained sampler, and the constrained path's parts."""
    vocab_size = vocab or Tokenizer.from_file(str(tokenizer)).get_vocab_size(with_added_tokens=True)
    matchers = GrammarMatchers(tokenizer, vocab_size=vocab_size, device=device)
    grammar = json_schema_grammar(SCHEMA)
    free = [SampleSpec(sampling=SamplingParams(temperature=1.0, seed=i), output_index=0, eos_token_ids=(EOS,))
            for i in range(batch)]
    seq_ids = list(range(batch))
    outputs = [0] * batch
    restart = [True] * batch
    generator = torch.Generator(device=device).manual_seed(0)
    timings: dict[str, list[float]] = {"free": [], "fill": [], "sample": [], "commit": [], "constrained": []}
    num_tokens = 0
    for step in range(steps + 10):  # the first 10 steps warm up (tokenizer, grammar compile, kernels)
        logits = torch.randn(batch, vocab_size, generator=generator, device=device)
        specs = [SampleSpec(sampling=SamplingParams(temperature=1.0, seed=i, grammar=grammar), output_index=outputs[i],
                            eos_token_ids=(EOS,), grammar_replay=() if restart[i] else None) for i in range(batch)]
        _sync(device)
        start = time.perf_counter()
        sample(logits, free)
        _sync(device)
        free_s = time.perf_counter() - start
        start = time.perf_counter()
        mask = matchers.fill(seq_ids, specs)
        filled = time.perf_counter()
        drawn = sample(logits, specs, mask)  # ends in the host copy of the token ids: a sync
        sampled = time.perf_counter()
        token_ids = [token_id for token_id, _ in drawn]
        matchers.commit(seq_ids, specs, token_ids)
        done = time.perf_counter()
        for i, token_id in enumerate(token_ids):
            restart[i] = token_id == EOS
            outputs[i] = 0 if restart[i] else outputs[i] + 1
        if step >= 10:
            num_tokens += batch
            for name, value in (("free", free_s), ("fill", filled - start), ("sample", sampled - filled),
                                ("commit", done - sampled), ("constrained", done - start)):
                timings[name].append(value * 1e3)
    medians = {f"{name}_ms": round(statistics.median(values), 4) for name, values in timings.items()}
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "batch": batch,
            "steps": steps, "vocab": vocab_size, "tokens": num_tokens, **medians,
            "added_ms_per_step": round(medians["constrained_ms"] - medians["free_ms"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: SmolLM2's)")
    parser.add_argument("--vocab", type=int, help="mask and logits width (default: the tokenizer's vocabulary)")
    args = parser.parse_args()
    result = run(args.batch, args.steps, torch.device(args.device), _tokenizer_file(args.tokenizer), args.vocab)
    print(json.dumps(result, indent=2))
    seconds = result["constrained_ms"] * args.steps / 1e3  # type: ignore[operator]
    print(f"constrained batch={args.batch} vocab={result['vocab']} {result['device']}: {result['tokens']} tokens "
          f"{seconds:.2f} s {result['tokens'] / seconds:.0f} tok/s (sampler only), "
          f"+{result['added_ms_per_step']} ms/step over free sampling")


if __name__ == "__main__":
    main()
