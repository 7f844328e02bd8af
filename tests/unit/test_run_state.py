"""Run state for resume: the prompt order (and an older checkpoint's per-generator sampler states), buffered groups
round-trip, whole checkpoints only; children stop when their supervisor is killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from prorl_async.learner.buffer import ReplayBuffer
from prorl_async.learner.prompts import Admission, PromptSampler, PromptSource
from prorl_async.transport.messages import Sample, TrajectoryGroup
from prorl_async.utils.run_dir import begin, commit, latest_checkpoint, load_run_state, save_run_state


def _source() -> PromptSource:
    sampler = PromptSampler(seed=3, shard=0, num_shards=1, sizes=[50, 40], weights=[1.0, 2.0])
    return PromptSource(sampler, Admission(budget=8, max_staleness=1), per_generator=4)


def _group(seq: int, version: int) -> TrajectoryGroup:
    samples = [Sample(np.array([4, 5], np.int32), np.array([-0.1, -0.2], np.float32), np.full(2, version, np.int32),
                      "stop", float(i % 2)) for i in range(4)]
    return TrajectoryGroup(f"p{seq}", "chain_sum", "math", np.arange(6, dtype=np.int32), samples, 0, seq)


def test_run_state_round_trip_and_only_whole_checkpoints(tmp_path: Path) -> None:
    buffer = ReplayBuffer(batch_groups=2, max_staleness=1, min_reward_std=0.0)
    for seq in range(3):
        buffer.put(_group(seq, 0))
    source = _source()
    issued = [source.issue(0, 0, 0) for _ in range(3)]  # three requests in flight, one answered
    source.answered(issued[0][0], kept=True)  # type: ignore[index]
    prompts = source.state()
    final = tmp_path / "checkpoints" / "step-000004"
    final.parent.mkdir()
    tmp = begin(final)
    tmp.mkdir()
    save_run_state(tmp, buffer.state(), prompts, {"groups_arrived": 3, "outcomes": {"admitted": 3},
                                                  "learner_idle_s": 1.5})
    assert latest_checkpoint(tmp_path) is None  # a checkpoint being written is not one
    commit(tmp, final)
    (tmp_path / "checkpoints" / "step-000009.partial").mkdir()  # torn by a crash
    assert latest_checkpoint(tmp_path) == final
    assert sorted(p.name for p in final.iterdir()) == ["buffer.msgpack", "prompts.json", "service.json"]

    buffer_state, got_prompts, service = load_run_state(final)
    again = ReplayBuffer(batch_groups=2, max_staleness=1, min_reward_std=0.0)
    again.restore(buffer_state)
    assert again.state() == buffer.state()
    assert [g.seq for g in again.pull(2, 0)] == [0, 1]
    assert got_prompts == prompts and service["groups_arrived"] == 3
    resumed = _source()
    resumed.restore(got_prompts)  # the two unanswered requests come out first, under new request ids
    assert [resumed.issue(1, 0, 0) for _ in range(2)] == [(3, issued[1][1], 0), (4, issued[2][1], 0)]  # type: ignore[index]
    with pytest.raises(ValueError, match="not a run checkpoint"):
        load_run_state(tmp_path)


def test_a_checkpoint_from_before_the_learner_owned_the_prompt_order_loads_its_sampler_states(tmp_path: Path) -> None:
    shards = {f"generator-{g}": PromptSampler(seed=3, shard=g, num_shards=2, sizes=[50, 40],
                                              weights=[1.0, 2.0]).state() for g in range(2)}
    buffer = ReplayBuffer(batch_groups=2, max_staleness=1, min_reward_std=0.0)
    (tmp_path / "buffer.msgpack").write_bytes(msgpack.packb(buffer.state(), use_bin_type=True))
    (tmp_path / "samplers.json").write_text(json.dumps(shards))
    (tmp_path / "service.json").write_text(json.dumps({"groups_arrived": 0, "outcomes": {}, "learner_idle_s": 0.0}))
    _, prompts, _ = load_run_state(tmp_path)
    assert prompts == {"shards": shards}
    (tmp_path / "prompts.json").write_text(json.dumps(_source().state()))  # both: the new file wins
    assert load_run_state(tmp_path)[1] == _source().state()
    for name in ("prompts.json", "samplers.json"):
        (tmp_path / name).unlink()
    with pytest.raises(ValueError, match=r"samplers\.json"):  # neither: not a checkpoint
        load_run_state(tmp_path)


def test_a_child_stops_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    """The supervisor is SIGKILLed: its child, re-parented, notices within about a second and stops cleanly."""
    marker = tmp_path / "child-stopped"
    child = textwrap.dedent(f"""
        import signal, sys, time, pathlib
        from prorl_async.supervisor.lifecycle import exit_with_parent
        def stop(*_):
            pathlib.Path({str(marker)!r}).write_text("sigterm")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        assert exit_with_parent(interval_s=0.2) is not None
        print("watching", flush=True)
        time.sleep(60)
    """)
    supervisor = textwrap.dedent(f"""
        import os, subprocess, sys
        from prorl_async.supervisor.lifecycle import supervisor_env
        p = subprocess.Popen([sys.executable, "-c", {child!r}], env=supervisor_env(dict(os.environ)),
                             start_new_session=True, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "watching"
        print(p.pid, flush=True)
        import time; time.sleep(60)
    """)
    sup = subprocess.Popen([sys.executable, "-c", supervisor], stdout=subprocess.PIPE, text=True)
    child_pid = int(sup.stdout.readline())
    try:
        sup.send_signal(signal.SIGKILL)
        sup.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not marker.exists():
            time.sleep(0.1)
        assert marker.read_text() == "sigterm"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the child is ours (our supervisor's): never leave it
            os.kill(child_pid, signal.SIGKILL)


def test_what_a_child_started_stops_too_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """The child's own processes (vLLM's engine core, the scoring pool) live in its process group; when the
    supervisor is gone they must stop with the child, even when the child's clean stop forgets them (they were
    left running, re-parented to init, when a Ray node died or the supervisor was killed)."""
    child = textwrap.dedent("""
        import signal, subprocess, sys, time
        from prorl_async.supervisor.lifecycle import exit_with_parent
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean stop that leaves the grandchild behind
        assert exit_with_parent(interval_s=0.2) is not None
        print(grandchild.pid, flush=True)
        time.sleep(60)
    """)
    supervisor = textwrap.dedent(f"""
        import os, subprocess, sys
        from prorl_async.supervisor.lifecycle import supervisor_env
        p = subprocess.Popen([sys.executable, "-c", {child!r}], env=supervisor_env(dict(os.environ)),
                             start_new_session=True, stdout=subprocess.PIPE, text=True)
        print(p.pid, p.stdout.readline().strip(), flush=True)
        import time; time.sleep(60)
    """)
    sup = subprocess.Popen([sys.executable, "-c", supervisor], stdout=subprocess.PIPE, text=True)
    child_pid, grandchild_pid = (int(x) for x in sup.stdout.readline().split())
    try:
        sup.send_signal(signal.SIGKILL)
        sup.wait(10)
        assert _gone(grandchild_pid), "the child's own process outlived the supervisor"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is ours (our supervisor's child's): never leave it
            os.killpg(child_pid, signal.SIGKILL)


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
    """Whether ``pid`` stops running within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.2)
    return not _running(pid)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a re-parented zombie may never be reaped here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_what_a_child_started_stops_when_the_child_is_killed_outright(tmp_path: Path) -> None:
    """SIGKILL to the child itself (Ray killing an actor's process tree, the OOM killer): nothing runs its clean
    stop, yet what it started (vLLM's engine core) must not keep a core or a GPU: the group's guard stops it."""
    child = textwrap.dedent("""
        import subprocess, sys, time
        from prorl_async.supervisor.lifecycle import exit_with_parent
        assert exit_with_parent(interval_s=0.2) is not None
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(grandchild.pid, flush=True)
        time.sleep(60)
    """)
    from prorl_async.supervisor.lifecycle import supervisor_env

    proc = subprocess.Popen([sys.executable, "-c", child], env=supervisor_env(dict(os.environ)),
                            start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        grandchild_pid = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _gone(grandchild_pid), "the child's own process outlived it"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is ours: never leave it
            os.killpg(proc.pid, signal.SIGKILL)
