"""End to end: the user's own data and reward functions, through ``prorl-async run`` and ``prorl-async eval``.

One tiny run trains on three sources at once: a JSONL file scored by a reward function in a file (some of its rows
make the function raise), a parquet file in verl's schema (chat prompts, ``reward_model.ground_truth``) read with
nothing but its path and scored by the built-in math verifier, and a saved Hugging Face data set scored by a
function named by module, and a verifiers taskset (``format = "verifiers"``: its tasks as rows, scored by its own
rewards). Real vLLM (CPU), real scoring worker processes, real sockets. Then ``prorl-async eval`` scores the run's
checkpoint on the same sources' held-out rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from prorl_async.monitor.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("prorl-async")
pytestmark = pytest.mark.integration

REWARDS = '''
def reward(completion, a, kind, **row):
    if kind == "poison":
        raise ValueError("a poisoned row")
    return {"reward": float(a in completion), "tagged": float("<answer>" in completion)}
'''
MODULE = '''
def score(completion, solution):
    return float(solution in completion)
'''


def _data(tmp_path: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    sums = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    jsonl = tmp_path / "sums.jsonl"
    with jsonl.open("w") as f:
        for i, (a, b) in enumerate(sums):
            f.write(json.dumps({"q": f"What is {a} + {b}?", "a": str(a + b), "kind": "poison" if i % 3 == 0 else "ok"})
                    + "\n")
    verl = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "sums", "prompt": [{"role": "user", "content": f"Compute {a} times {b}."}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": str(a * b)}, "extra_info": {"index": i}}
        for i, (a, b) in enumerate(sums)]), verl)
    saved = tmp_path / "saved"
    Dataset.from_dict({"problem": [f"What is {a} minus {b}?" for a, b in sums],
                       "solution": [str(a - b) for a, b in sums]}).save_to_disk(str(saved))
    (tmp_path / "user_rewards.py").write_text(REWARDS)
    (tmp_path / "user_module.py").write_text(MODULE)
    (tmp_path / "vf_tiny_sums.py").write_text((ROOT / "tests" / "unit" / "vf_tiny_sums.py").read_text())
    return {"jsonl": jsonl, "verl": verl, "saved": saved}


def _config(tmp_path: Path, data: dict[str, Path]) -> Path:
    cfg = tomllib.loads((ROOT / "configs" / "tiny.toml").read_text())
    cfg["run"].update(run_dir=str(tmp_path / "run"), max_steps=6, checkpoint_every_steps=0)
    cfg["tasks"]["validation_size"] = 4
    cfg["tasks"]["mix"] = [
        {"name": "sums", "reward": "user_rewards.py:reward",  # a file, relative to the working directory
         "source": {"path": data["jsonl"].name, "prompt": "q", "answer": "a"}},
        {"source": {"path": str(data["verl"])}},  # verl's schema: nothing else needed
        {"name": "differences", "reward": "user_module:score", "source": {"path": str(data["saved"])}},
        {"source": {"format": "verifiers", "path": "vf-tiny-sums", "options": {"count": 40}}},
    ]
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def _logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((run_dir / "logs").glob("*.log")))


def test_own_data_sources_and_reward_functions_train_and_evaluate(tmp_path: Path) -> None:
    data = _data(tmp_path)
    config = _config(tmp_path, data)
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(EXE), "run", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + (_logs(run_dir) if run_dir.exists()
                                                                               else "")

    # the run's config names its files absolutely: a resume or an eval from another directory finds them
    resolved = tomllib.loads((run_dir / "config.toml").read_text())
    assert resolved["tasks"]["mix"][0]["source"]["path"] == str(data["jsonl"])
    assert resolved["tasks"]["mix"][0]["reward"] == f"{tmp_path / 'user_rewards.py'}:reward"

    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert [s["version"] for s in steps] == [1, 2, 3, 4, 5, 6], _logs(run_dir)
    trained = {pid.split("/")[1] for s in steps for pid in s["prompt_ids"]}
    assert trained == {"sums", "verl", "differences", "vf-tiny-sums"}, trained  # every source reached the learner
    last = [r for r in records if r["kind"] == "generator"][-1]
    assert last["reward_raised"] > 0  # the poisoned rows: scored 0, counted, and the run went on
    assert last["score_ok"] > 0 and last["score_crash"] == 0
    extras = [r for r in records if r["kind"] == "generator" and "reward_extras/tagged" in r]
    assert extras and all(0.0 <= r["reward_extras/tagged"] <= 1.0 for r in extras)
    lengths = [r["reward_extras/length"] for r in records if r["kind"] == "generator" and "reward_extras/length" in r]
    assert lengths and max(lengths) > 0  # the taskset's own metric: its scoring ran on the samples

    out = tmp_path / "eval"
    proc = subprocess.run([str(EXE), "eval", str(run_dir), "--samples", "2", "--k", "1,2", "--prompts", "2", "--out",
                           str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    logs = "\n".join(p.read_text()[-3000:] for p in (out / "logs").glob("*.log")) if (out / "logs").is_dir() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    report = json.loads((out / "eval.json").read_text())
    assert [t["label"] for t in report["tasks"]] == ["math/sums", "math/verl", "math/differences", "math/vf-tiny-sums"]
    assert [t["reward"] for t in report["tasks"]][1] == "built-in math verifier"
    results = next(iter(report["results"].values()))
    assert all(results[label]["prompts"] == 2 for label in ("math/sums", "math/verl", "math/differences",
                                                            "math/vf-tiny-sums"))
