"""The cache of converted GGUF models (issue 13): a damaged folder (truncated or garbled file) is found before use,
discarded with a warning and converted again; a whole one is reused as is.

`convert_gguf` is replaced by a writer of a tiny folder (config, tokenizer, one safetensors file), counting calls,
so the tests need no real model; one slow test checks the real SmolLM2 conversion passes the check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from trillm.models import loader
from trillm.models.loader import converted_folder_problem, resolve_model


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the GGUF conversion with a tiny folder writer; the list holds each folder it wrote."""
    written: list[Path] = []

    def convert(gguf_path: object, out_dir: str | Path) -> None:
        out = Path(out_dir)
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (out / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
        save_file({"model.embed_tokens.weight": np.ones((64, 16), dtype=np.float32)}, str(out / "model.safetensors"))
        written.append(out)

    monkeypatch.setattr(loader, "convert_gguf", convert)
    return written


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF fake")
    return path


def test_a_whole_converted_folder_is_reused(conversions: list[Path], gguf_file: Path, tmp_path: Path) -> None:
    first = resolve_model(str(gguf_file), cache_dir=str(tmp_path / "cache"))
    assert resolve_model(str(gguf_file), cache_dir=str(tmp_path / "cache")) == first
    assert len(conversions) == 1 and converted_folder_problem(Path(first)) is None


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda folder: _truncate(folder / "model.safetensors", 100), "model.safetensors is"),
    (lambda folder: _truncate(folder / "model.safetensors", 4), "model.safetensors is cut short"),
    (lambda folder: (folder / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}"), "model.safetensors is cut"),
    (lambda folder: _truncate(folder / "tokenizer.json", 10), "tokenizer.json is not valid JSON"),
    (lambda folder: (folder / "config.json").write_text("{"), "config.json is not valid JSON"),
    (lambda folder: (folder / "model.safetensors").unlink(), "it holds no safetensors file"),
], ids=["truncated-weights", "truncated-header", "garbled-header", "truncated-tokenizer", "garbled-config",
        "missing-weights"])
def test_a_damaged_converted_folder_is_discarded_and_converted_again(
        conversions: list[Path], gguf_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        damage: object, problem: str) -> None:
    folder = Path(resolve_model(str(gguf_file), cache_dir=str(tmp_path / "cache")))
    damage(folder)  # type: ignore[operator]
    found = converted_folder_problem(folder)
    assert found is not None and found.startswith(problem), found
    with caplog.at_level(logging.WARNING, logger="trillm.models.loader"):
        again = Path(resolve_model(str(gguf_file), cache_dir=str(tmp_path / "cache")))
    assert again == folder and len(conversions) == 2
    assert converted_folder_problem(again) is None
    assert "is damaged" in caplog.text and problem in caplog.text
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the damaged copy is gone


def _truncate(path: Path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


@pytest.mark.slow
def test_the_real_smollm2_conversion_passes_the_check(smollm2_folder: str) -> None:
    assert converted_folder_problem(Path(smollm2_folder)) is None
