"""End to end: ``prorl-async run`` with real processes, real vLLM (CPU), real sockets and weight broadcasts.

The tiny random model learns nothing useful; what is checked is the machinery: the learner's version
advances, groups from both generators are consumed, every step is logged, weights reach the generators,
a checkpoint is written, and every process ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prorl_async.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_run_tiny_two_generators(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    exe = Path(sys.executable).with_name("prorl-async")
    overrides = ["run.max_steps=2", "run.checkpoint_every_steps=0", "generator.num_generators=2",
                 f"run.run_dir={json.dumps(str(run_dir))}", "run.log_every_s=2"]
    argv = [str(exe), "run", "configs/tiny.toml"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((run_dir / "logs").glob("*.log")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + logs

    steps = read_metrics(run_dir / "metrics.jsonl", kind="step")
    assert [s["version"] for s in steps] == [1, 2]
    for s in steps:
        assert s["samples"] == 16 and s["tokens"] > 0  # 4 groups x 4 samples per step (configs/tiny.toml)
        assert s["sync_delivered"] == 2 and not s["sync_failed"]  # both generators got the new weights
    events = {e["event"] for e in read_metrics(run_dir / "metrics.jsonl", kind="event")}
    assert {"learner_ready", "generator_ready", "generators_joined", "checkpoint"} <= events
    sources = {r["source"] for r in read_metrics(run_dir / "metrics.jsonl", kind="generator")}
    assert sources == {"generator-0", "generator-1"}
    assert (run_dir / "checkpoints" / "step-000002" / "policy" / "config.json").is_file()
    assert (run_dir / "config.toml").is_file()
    assert set(json.loads((run_dir / "pids.json").read_text())) == {"learner", "generator-0", "generator-1"}
    assert "done: 2 steps" in out.stdout

