"""End to end: ``prorl-async eval`` of the tiny model on one task, real vLLM (CPU) in its own process.

The tiny random model never answers correctly, so the run scores with a reward function of this module
(``generator.reward_function = "test_eval_e2e:reward"``): the built-in verifier runs, and the reward is 1 for
completions of even length, which gives mixed rewards; the statistics in ``eval.json`` are then checked
against the samples file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def reward(text: str, task: dict) -> tuple[float, str]:
    from prorl_async.envs.score import score

    _, reason = score(text, task)
    return float(len(text) % 2 == 0), f"even length test reward (verifier: {reason})"


def test_eval_tiny_model_writes_json_report_and_png(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    exe = Path(sys.executable).with_name("prorl-async")
    argv = [str(exe), "eval", "tiny-random", "--config", "configs/tiny.toml", "--tasks", "chain_sum", "--samples", "4",
            "--k", "1,2", "--prompts", "4", "--out", str(out),
            "--set", 'generator.reward_function="test_eval_e2e:reward"']
    # VLLM_CACHE_ROOT left as is: vLLM's cached model inspection spares a process that imports vllm again
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=280, env=env)
    logs = "\n".join(p.read_text()[-3000:] for p in (out / "logs").glob("*.log")) if (out / "logs").is_dir() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs

    data = json.loads((out / "eval.json").read_text())
    assert data["model"] == "tiny-random" and data["other"] is None
    assert data["settings"]["temperature"] == 0.6 and data["settings"]["top_p"] == 0.95  # eval.* defaults
    assert [t["label"] for t in data["tasks"]] == ["logic/chain_sum"] and data["tasks"][0]["prompts"] == 4
    assert data["models"]["tiny-random"]["scoring"]["ok"] == 16

    rows = [json.loads(line) for line in (out / "samples-tiny-random.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["samples"]) == 4 for r in rows)
    assert all("/validation/" in r["id"] for r in rows)  # the held-out split
    assert all(s["reward"] == float(len(s["text"]) % 2 == 0) for r in rows for s in r["samples"])
    counts = [sum(s["reward"] == 1.0 for s in r["samples"]) for r in rows]
    task = data["results"]["tiny-random"]["logic/chain_sum"]
    assert task["prompts"] == 4 and task["samples_per_prompt"] == 4
    assert task["pass_at_k"]["1"] == pytest.approx(sum(c / 4 for c in counts) / 4)
    assert task["pass_at_k"]["2"] == pytest.approx(sum(1 - comb(4 - c, 2) / comb(4, 2) for c in counts) / 4)
    assert sum(task["histogram"]["counts"]) == 4 and "2" in task["dang_bound"]
    assert task["dang_bound_debiased"]["2"] == pytest.approx(task["pass_at_k"]["2"])

    report = (out / "report.md").read_text()
    assert "| logic/chain_sum | 4 |" in report and "pass@2 / bound / debiased" in report
    for png in ("pass1_hist.png", "pass_at_k.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("generations-*"))  # the raw generation file is folded into samples-*.jsonl
