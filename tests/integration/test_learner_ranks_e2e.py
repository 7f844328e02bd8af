"""End to end: ``prorl-async run`` with a learner of two ranks (FSDP2 over gloo, ``cluster.learner_ranks_per_node``).

Real processes throughout: rank 0 runs the service and leads, rank 1 follows; a real vLLM generator. A run trains
and checkpoints every step; rank 1 is killed mid-run: the run stops with exit 1, naming the rank and the last
complete checkpoint, and leaves no process behind. (Two ranks resuming from a checkpoint: the Ray cluster test, whose
learner has two ranks on two nodes; one rank resuming under FSDP: ``tests/unit/test_learner_fsdp.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_run_e2e import EXE, ROOT, _alive, _descendants, _logs, _sets

from prorl_async.monitor.metrics import read_metrics
from prorl_async.utils.run_dir import latest_checkpoint

pytestmark = pytest.mark.integration


def test_two_learner_ranks_train_and_a_dead_rank_stops_the_run_naming_the_last_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = ["cluster.learner_ranks_per_node=2", "run.max_steps=40", "run.checkpoint_every_steps=1",
                 "generator.num_generators=1", f"run.run_dir={json.dumps(str(run_dir))}", "run.log_every_s=5"]
    proc = subprocess.Popen([str(EXE), "run", "configs/tiny.toml", *_sets(*overrides)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    ours: list[int] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(read_metrics(metrics, kind="step")) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the kill"
        pids = json.loads((run_dir / "pids.json").read_text())
        assert set(pids) == {"learner", "learner-1", "generator-0"}
        ours = [p for pid in pids.values() for p in (pid, *_descendants(pid))]
        os.kill(pids["learner-1"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the test failed while the run was going: stop what we started
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    assert proc.returncode == 1, out[-3000:] + _logs(run_dir)
    last = latest_checkpoint(run_dir)
    assert last is not None
    assert f"learner-1 exited with {-signal.SIGKILL}" in out
    assert f"the learner was stopped: learner-1 exited with {-signal.SIGKILL}" in out
    assert f"last checkpoint: {last}" in out
    steps = read_metrics(metrics, kind="step")
    assert [s["version"] for s in steps] == list(range(1, len(steps) + 1))
    assert all(s["samples"] == 16 for s in steps)
    time.sleep(2)
    left = [p for p in ours if _alive(p)]
    for p in left:  # never leave ours behind, then fail
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes outlived the run: {left}"
