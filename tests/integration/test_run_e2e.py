"""End to end: ``prorl-async run`` with real processes, real vLLM (CPU), real sockets and weight broadcasts.

The tiny random model learns nothing useful; what is checked is the machinery: the learner's version
advances, groups from both generators are consumed, every step is logged, weights reach the generators,
a checkpoint is written, every process ends; ``--resume`` continues from the checkpoint with the same
counters and trains on no prompt twice; a generator killed mid-run is restarted, caught up to the current
weights, and contributes groups again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prorl_async.monitor.metrics import read_metrics
from prorl_async.supervisor.lifecycle import process_table

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


EXE = Path(sys.executable).with_name("prorl-async")


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((run_dir / "logs").glob("*.log")))


def _run(argv: list[str], run_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + _logs(run_dir)
    return out


def test_run_tiny_two_generators_then_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = ["run.max_steps=2", "run.checkpoint_every_steps=0", "generator.num_generators=2",
                 f"run.run_dir={json.dumps(str(run_dir))}", "run.log_every_s=2", "eval.every_steps=2"]
    out = _run([str(EXE), "run", "configs/tiny.toml", *_sets(*overrides)], run_dir, tmp_path)

    steps = read_metrics(run_dir / "metrics.jsonl", kind="step")
    assert [s["version"] for s in steps] == [1, 2]
    for s in steps:
        assert s["samples"] == 16 and s["tokens"] > 0  # 4 groups x 4 samples per step (configs/tiny.toml)
    # Bound 1: the broadcast of version v overlaps step v + 1 and is reported in its record; the last one in an event.
    syncs = [s for s in steps if "sync_version" in s]
    syncs += [e for e in read_metrics(run_dir / "metrics.jsonl", kind="event") if e["event"] == "weights_sync"]
    assert [s["sync_version"] for s in syncs] == [1, 2], syncs
    assert all(s["sync_delivered"] == 2 and not s["sync_failed"] for s in syncs)  # both generators got them
    events = {e["event"] for e in read_metrics(run_dir / "metrics.jsonl", kind="event")}
    assert {"learner_ready", "generator_ready", "generators_joined", "checkpoint"} <= events
    sources = {r["source"] for r in read_metrics(run_dir / "metrics.jsonl", kind="generator")}
    assert sources == {"generator-0", "generator-1"}
    assert (run_dir / "checkpoints" / "step-000002" / "policy" / "config.json").is_file()
    assert (run_dir / "config.toml").is_file()
    assert set(json.loads((run_dir / "pids.json").read_text())) == {"learner", "generator-0", "generator-1"}
    assert "done: 2 steps" in out.stdout
    # periodic validation: both generators' shards of the 16 held-out prompts, 4 samples each
    [val] = [v for v in read_metrics(run_dir / "metrics.jsonl", kind="validation") if v["version"] == 2]
    assert val["complete"] and val["prompts"] == 16 and val["samples"] == 64 and 0 <= val["pass_at_1"] <= 1
    low, high = val["weights_versions"]  # what its sampled tokens were drawn under: version 2 or newer
    assert 2 <= low <= high, val["weights_versions"]
    checkpoint = [e for e in read_metrics(run_dir / "metrics.jsonl", kind="event") if e["event"] == "checkpoint"][-1]
    saved = json.loads((run_dir / "checkpoints" / "step-000002" / "service.json").read_text())
    assert saved["groups_arrived"] >= steps[-1]["groups_arrived"]
    prompts = json.loads((run_dir / "checkpoints" / "step-000002" / "prompts.json").read_text())
    assert set(prompts) == {"sampler", "next_request_id", "curriculum", "skips", "balance"}
    assert prompts["next_request_id"] >= 8

    # --resume: same directory, config and metrics file; two more steps
    out = _run([str(EXE), "run", "--resume", str(run_dir), *_sets("run.max_steps=4")], run_dir, tmp_path)
    assert f"resuming {run_dir}" in out.stdout
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert [s["version"] for s in steps] == [1, 2, 3, 4]
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["version"] == 2
    assert resumed[0]["buffer_held"] == checkpoint["buffer_held"]  # the buffered groups came back
    assert resumed[0]["groups_arrived"] == saved["groups_arrived"]  # and the counters
    assert steps[2]["groups_arrived"] >= saved["groups_arrived"]
    assert steps[2]["buffer_counters"]["yielded"] == steps[1]["buffer_counters"]["yielded"] + 4
    trained = [p for s in steps for p in s["prompt_ids"]]
    assert len(trained) == 16 and len(set(trained)) == 16, trained  # no prompt trained on twice
    assert (run_dir / "checkpoints" / "step-000004" / "policy" / "config.json").is_file()


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively."""
    children: dict[int, list[int]] = {}
    for child, (_, parent, _) in process_table().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    entry = process_table().get(pid)
    return entry is not None and entry[0] not in ("Z", "X")


def test_a_killed_generator_is_restarted_caught_up_and_contributes_again(tmp_path: Path) -> None:
    """One generator, staleness bound 1, killed with requests in flight: after the kill the run can only go on if
    the restarted generator gets the current weights at once (it starts from the base weights, which the bound no
    longer admits), and the requests the dead process held are handed to the new one: none lost, none twice."""
    run_dir = tmp_path / "run"
    # Generator-bound on purpose (one group in the engine at a time, answers to the length cap: a tiny step takes
    # ~0.25 s, a batch of groups longer), so the learner always has requests out at the generator when it dies,
    # and the buffer (at most K + 1 = 2 batches) cannot finish the run without the restarted one.
    max_steps = 6
    overrides = [f"run.max_steps={max_steps}", "run.checkpoint_every_steps=0", "generator.num_generators=1",
                 "generator.max_inflight_groups=1", "sampling.max_response_tokens=64",
                 f"run.run_dir={json.dumps(str(run_dir))}", "run.log_every_s=2"]
    env = dict(os.environ)
    proc = subprocess.Popen([str(EXE), "run", "configs/tiny.toml", *_sets(*overrides)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    victims: list[int] = []
    try:
        deadline, killed_at = time.monotonic() + 400, 0
        while time.monotonic() < deadline and proc.poll() is None:
            versions = [s["version"] for s in read_metrics(metrics, kind="step")] if metrics.exists() else []
            killed_at = max(versions, default=0)
            if killed_at >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before the kill"
        assert killed_at <= max_steps - 3, f"killed at version {killed_at}: the buffer alone could finish the run"
        pid = json.loads((run_dir / "pids.json").read_text())["generator-0"]
        victims = [pid, *_descendants(pid)]  # vLLM's engine core runs in a child of the generator
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:  # the test failed while the run was going: stop what we started
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    assert proc.returncode == 0, out[-3000:] + _logs(run_dir)
    assert f"generator-0 exited with {-signal.SIGKILL}" in out
    records = read_metrics(metrics)
    steps = [r for r in records if r["kind"] == "step"]
    assert [s["version"] for s in steps] == list(range(1, max_steps + 1))
    catch_up = [r for r in records if r.get("event") == "weights_catch_up"]
    assert catch_up and catch_up[0]["delivered"] == ["gen0.rank0"] and catch_up[0]["version"] >= 2
    readies = [r for r in records if r.get("event") == "generator_ready"]
    assert len(readies) == 2  # the first generator and its restart
    assert readies[0]["requests_reissued"] == 0 and readies[1]["requests_reissued"] > 0, readies
    trained = [p for s in steps for p in s["prompt_ids"]]
    assert len(trained) == len(set(trained)) == 4 * max_steps, trained  # 4 groups a step, no prompt twice
    sent = [r["groups_sent"] for r in records if r["kind"] == "generator" and r["time_s"] > readies[1]["time_s"]]
    assert sent and max(sent) > 0  # the restarted generator's own counter: it contributed groups again
    restarted_pid = json.loads((run_dir / "pids.json").read_text())["generator-0"]
    assert restarted_pid != victims[0]
    time.sleep(2)
    left = [p for p in victims if _alive(p)]
    for p in left:  # ours (the killed generator's engine): never leave them behind, then fail
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes of the killed generator outlived it: {left}"



def test_run_tiny_auto_staleness(tmp_path: Path) -> None:
    # max_staleness "auto" through the supervisor: every step records the bound it used, the generator obeys the
    # announced one, the checkpoint keeps the controller's state. (The tiny generator outruns the learner, so
    # the learner never waits and the bound rightly stays at 1; the raise is checked in test_generator.py.)
    run_dir = tmp_path / "run"
    overrides = ["run.max_steps=4", "run.checkpoint_every_steps=0", f"run.run_dir={json.dumps(str(run_dir))}",
                 'buffer.max_staleness="auto"', "buffer.auto_max_staleness=2", "generator.heartbeat_s=0.5",
                 "eval.every_steps=0"]
    _run([str(EXE), "run", "configs/tiny.toml", *_sets(*overrides)], run_dir, tmp_path)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert [s["version"] for s in steps] == [1, 2, 3, 4]
    bounds = [s["max_staleness"] for s in steps]
    assert all(b in (1, 2) for b in bounds) and all(s["group_staleness_max"] <= 2 for s in steps), bounds
    # the learner admits requests under the bound it announced (the admission is the learner's own)
    assert [s["admission_bound"] for s in steps] == bounds
    saved = json.loads((run_dir / "checkpoints" / "step-000004" / "service.json").read_text())
    assert saved["auto_staleness"]["bound"] == bounds[-1]


def _hostile_frames(vocab: int) -> list[list[bytes]]:
    """What a broken or hostile peer might push at the groups socket: junk, a group with an empty response,
    a group with token ids outside the model's vocabulary (but below 2**31)."""
    import numpy as np

    from prorl_async.transport.messages import Sample, TrajectoryGroup, encode

    def group(seq: int, ids: list[int]) -> TrajectoryGroup:
        n = len(ids)
        samples = [Sample(np.asarray(ids, np.int32), np.full(n, -0.5, np.float32), np.zeros(n, np.int32), "stop",
                          float(i % 2)) for i in range(4)]
        return TrajectoryGroup(prompt_id=f"hostile-{seq}", task="chain_sum", domain="logic",
                               prompt_token_ids=np.array([1, 2], np.int32), samples=samples, generator_id=0,
                               seq=10**9 + seq, min_version=0, max_version=0)

    return [[b"G", b"\xc1 not msgpack"], [b"G"], encode(group(0, [])), encode(group(1, [vocab + 5, 3]))]


def test_mini_batches_advance_one_version_per_batch_and_hostile_groups_cost_nothing(tmp_path: Path) -> None:
    """The paper's shape (several mini-batches per batch, bound 1) at tiny scale: a batch is one policy version, so
    groups go stale only as rare stragglers; a peer pushing malformed frames, an empty response and out-of-vocabulary
    ids at the learner's groups socket is counted and the run completes every step."""
    import zmq

    run_dir = tmp_path / "run"
    overrides = ["run.max_steps=8", "run.checkpoint_every_steps=0", "learner.mini_batches=2",
                 "buffer.max_staleness=1", f"run.run_dir={json.dumps(str(run_dir))}", "eval.every_steps=0"]
    proc = subprocess.Popen([str(EXE), "run", "configs/tiny.toml", *_sets(*overrides)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    context = zmq.Context()
    try:
        endpoints = run_dir / "endpoints.json"
        deadline = time.monotonic() + 300
        while not endpoints.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert endpoints.exists(), "the learner never listened"
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(json.loads(endpoints.read_text())["groups"])
        for frames in _hostile_frames(vocab=1024):
            push.send_multipart(frames)
        push.close()
        out, _ = proc.communicate(timeout=500)
    finally:
        context.term()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    assert proc.returncode == 0, out[-3000:] + _logs(run_dir)
    steps = read_metrics(run_dir / "metrics.jsonl", kind="step")
    assert [s["version"] for s in steps] == list(range(1, 9))
    assert [s["optimizer_step"] for s in steps] == list(range(2, 17, 2))
    # Counting versions per mini-batch made about every group that waited one batch stale (stale ~ yielded). A
    # straggler can still miss its batch under load (it started on weights v - 1 and arrived after step v + 1 took
    # its batch: seen once in CI), so the bound here is "rare", not zero.
    counters = steps[-1]["buffer_counters"]
    assert 4 * counters["stale"] <= counters["yielded"], [s["buffer_counters"] for s in steps]
    assert sum(steps[-1]["messages_rejected"].values()) == 4, steps[-1]["messages_rejected"]
    trained = [p for s in steps for p in s["prompt_ids"]]
    assert not any(p.startswith("hostile") for p in trained) and len(trained) == len(set(trained)) == 32
