"""Model resolution: GGUF conversion, the conversion cache, folders, hub ids, and the errors for what is unusable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trillm.errors import ModelLoadError
from trillm.models import loader
from trillm.models.loader import iter_safetensors, resolve_model, unpermute_rotary_rows


def _write_config(folder: Path, architecture: str = "LlamaForCausalLM") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "llama"}))


def test_smollm2_converts_to_a_llama_config(smollm2_folder: str) -> None:
    config = json.loads((Path(smollm2_folder) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert (config["rope_theta"], config["rms_norm_eps"]) == (100000.0, 1e-5)
    assert config["tie_word_embeddings"] is True


def test_smollm2_tokenizer_files_carry_the_gguf_metadata(smollm2_folder: str) -> None:
    tokenizer_config = json.loads((Path(smollm2_folder) / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer_config["add_bos_token"] is False
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    generation = json.loads((Path(smollm2_folder) / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_smollm2_weights_have_hf_names_and_shapes(smollm2_folder: str) -> None:
    from safetensors import safe_open

    with safe_open(str(Path(smollm2_folder) / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.29.mlp.down_proj.weight").get_dtype() == "F32"
    assert len(names) == 30 * 9 + 2 and "lm_head.weight" not in names  # tied: no lm_head tensor


def test_smollm2_tokenizer_ids(smollm2_folder: str) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(smollm2_folder) / "tokenizer.json"))
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids == [1, 4093, 198, 6004, 2]
    assert tokenizer.encode("Hello world!").ids == [19556, 905, 17]  # as transformers' own GGUF conversion gives
    assert tokenizer.encode("2024").ids == [34, 32, 34, 36]  # digits one by one, as SmolLM's pre-tokenizer splits
    text = "emoji 😀🎉 and 中文字符 日本語\n\ttabs  spaces"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.decode([1, 2], skip_special_tokens=True) == ""


@pytest.mark.slow
def test_smollm2_chat_template_renders_with_transformers(smollm2_folder: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.encode("Hi there") == [26843, 665]  # no BOS added


def test_second_resolve_reuses_the_converted_folder(smollm2_folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(loader, "convert_gguf", fail)
    cache_dir = Path(smollm2_folder).parent.parent  # <cache>/gguf/<key>
    assert resolve_model("smollm2", cache_dir=str(cache_dir)) == smollm2_folder


def test_unpermute_inverts_llama_cpp_rotary_permutation() -> None:
    num_heads, head_dim, hidden = 3, 8, 5
    hf = np.arange(num_heads * head_dim * hidden, dtype=np.float32).reshape(num_heads * head_dim, hidden)
    # llama.cpp convert_hf_to_gguf.py: reshape(heads, 2, half, ...) then swap axes 1 and 2
    gguf_rows = hf.reshape(num_heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(gguf_rows, hf)
    assert np.array_equal(unpermute_rotary_rows(gguf_rows, num_heads), hf)


def test_local_folder_is_returned_as_is(tmp_path: Path) -> None:
    _write_config(tmp_path / "model")
    assert resolve_model(str(tmp_path / "model")) == str(tmp_path / "model")


def test_folder_without_config_names_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"has no config.json \(found: weights.bin\)"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    _write_config(tmp_path, "GPT2LMHeadModel")
    with pytest.raises(ModelLoadError) as info:
        resolve_model(str(tmp_path))
    assert str(info.value) == (
        f"unsupported architecture GPT2LMHeadModel in {tmp_path}; "
        "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    )


def test_unsupported_gguf_architecture_is_named(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF architecture 'gpt2'; supported: llama"):
        resolve_model(str(path), cache_dir=str(tmp_path / "cache"))
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # the failed conversion left nothing behind


def _fake_hub_cache(root: Path, repo_id: str, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    _write_config(snapshot)
    (snapshot / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_id_resolves_offline_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    snapshot = _fake_hub_cache(tmp_path, "acme/tiny-llama")
    assert Path(resolve_model("acme/tiny-llama", hub_cache_dir=str(tmp_path))) == snapshot


def test_hub_id_missing_offline_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"^cannot fetch hub model 'acme/absent'"):
        resolve_model("acme/absent", hub_cache_dir=str(tmp_path))


def test_unresolvable_spec_and_random_presets() -> None:
    assert resolve_model("random:tiny") == "random:tiny"
    with pytest.raises(ModelLoadError, match=r"^cannot resolve model './no/such'"):
        resolve_model("./no/such")
    with pytest.raises(ModelLoadError, match=r"^GGUF file 'missing.gguf' does not exist"):
        resolve_model("missing.gguf")


def test_iter_safetensors_yields_every_tensor(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"b": torch.ones(2), "a": torch.zeros(3)}, str(tmp_path / "model-1.safetensors"))
    save_file({"c": torch.full((1,), 7.0)}, str(tmp_path / "model-2.safetensors"))
    assert {name: t.tolist() for name, t in iter_safetensors(tmp_path)} == {"a": [0.0] * 3, "b": [1.0] * 2, "c": [7.0]}
