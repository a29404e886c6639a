"""Shared fixtures: the default model folder (converted once per session) and the GPU marker's skip rule."""

from __future__ import annotations

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The SmolLM2-135M-Instruct GGUF converted to a Hugging Face folder (config, tokenizer, safetensors)."""
    from trillm.models.loader import resolve_model

    return resolve_model("smollm2", cache_dir=str(tmp_path_factory.getbasetemp() / "trillm-cache"))
