"""vLLM (CPU) serves both built-in models; its sampled-token log-probs match a transformers forward pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("vllm_probe.py")
pytestmark = pytest.mark.integration


def _probe(model_dir: Path, n_prompts: int) -> dict:
    out = subprocess.run(
        [sys.executable, str(PROBE), str(model_dir), str(n_prompts)], capture_output=True, text=True, timeout=420
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("PROBE_RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE_RESULT "))


def test_vllm_logprobs_match_transformers_on_tiny_model(tiny_model_dir: Path) -> None:
    result = _probe(tiny_model_dir, n_prompts=4)
    assert result["tokens"] > 0
    assert result["max_abs_diff"] <= 1e-4, result


def test_vllm_serves_smollm2(smollm2_dir: Path) -> None:
    result = _probe(smollm2_dir, n_prompts=2)
    assert result["tokens"] > 0
    assert any(text.strip() for text in result["texts"])
    # 135M parameters accumulate more float32 rounding than the tiny model; still far below sampling noise.
    assert result["max_abs_diff"] <= 1e-2, result
