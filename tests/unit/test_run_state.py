"""Run state for resume: exact sampler positions, buffered groups round-trip, whole checkpoints only;
children stop when their supervisor is killed."""

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

import numpy as np
import pytest

from prorl_async.learner.buffer import ReplayBuffer
from prorl_async.learner.prompts import PromptSampler
from prorl_async.transport.messages import Sample, TrajectoryGroup
from prorl_async.utils.run_dir import (
    SamplerLedger,
    begin,
    commit,
    latest_checkpoint,
    load_run_state,
    save_run_state,
)


def _sampler() -> PromptSampler:
    return PromptSampler(seed=3, shard=0, num_shards=1, sizes=[50, 40], weights=[1.0, 2.0])


def _status(sampler: PromptSampler, inflight: dict[int, object], next_seq: int) -> tuple[str, str, int]:
    state = sampler.state(in_flight=list(inflight.values()))  # type: ignore[arg-type]
    return json.dumps(state), json.dumps(list(inflight)), next_seq


def test_ledger_requeues_exactly_the_prompts_the_learner_never_received() -> None:
    gen = _sampler()
    draws = {seq: gen.next() for seq in range(5)}  # five groups started, seqs 0..4
    ledger = SamplerLedger()
    assert ledger.on_group(0, 0) is False  # group 0 arrives *before* the status that still lists it (race)
    ledger.on_status("generator-0", *_status(gen, dict(draws), 5))
    assert ledger.on_group(0, 3) is True  # listed in flight, received: the saved state changes
    assert ledger.on_group(0, 3) is False  # twice changes nothing
    assert ledger.on_group(0, 99) is False  # not listed: started after the status
    assert ledger.on_group(1, 1) is False  # another generator

    restored = _sampler()
    restored.restore(ledger.states()["generator-0"])
    again = [restored.next() for _ in range(3)]
    assert again == [draws[1], draws[2], draws[4]]  # the unreceived ones, re-queued first
    fresh = _sampler()
    stream = [fresh.next() for _ in range(6)]
    assert restored.next() == stream[5]  # then the stream continues where the generator was


def test_ledger_forgets_received_seqs_no_longer_in_flight() -> None:
    gen = _sampler()
    draws = {seq: gen.next() for seq in range(3)}
    ledger = SamplerLedger()
    ledger.on_status("generator-2", *_status(gen, draws, 3))
    ledger.on_group(2, 1)
    ledger.on_status("generator-2", *_status(gen, {2: draws[2]}, 3))  # 0 and 1 finished
    assert ledger.states()["generator-2"]["requeued"] == [draws[2].as_list()]
    # a group started and sent between two statuses, received before the one that still lists it
    draws[3] = gen.next()
    ledger.on_group(2, 3)
    ledger.on_status("generator-2", *_status(gen, {2: draws[2], 3: draws[3]}, 4))
    assert ledger.states()["generator-2"]["requeued"] == [draws[2].as_list()]
    with pytest.raises(ValueError, match="malformed"):
        ledger.on_status("generator-2", json.dumps(gen.state()), json.dumps([7]), 8)  # more seqs than draws


def _group(seq: int, version: int) -> TrajectoryGroup:
    samples = [Sample(np.array([4, 5], np.int32), np.array([-0.1, -0.2], np.float32), np.full(2, version, np.int32),
                      "stop", float(i % 2)) for i in range(4)]
    return TrajectoryGroup(f"p{seq}", "chain_sum", "math", np.arange(6, dtype=np.int32), samples, 0, seq)


def test_run_state_round_trip_and_only_whole_checkpoints(tmp_path: Path) -> None:
    buffer = ReplayBuffer(batch_groups=2, max_staleness=1, min_reward_std=0.0)
    for seq in range(3):
        buffer.put(_group(seq, 0))
    samplers = {"generator-0": _sampler().state()}
    final = tmp_path / "checkpoints" / "step-000004"
    final.parent.mkdir()
    tmp = begin(final)
    tmp.mkdir()
    save_run_state(tmp, buffer.state(), samplers, {"groups_arrived": 3, "outcomes": {"admitted": 3},
                                                   "learner_idle_s": 1.5})
    assert latest_checkpoint(tmp_path) is None  # a checkpoint being written is not one
    commit(tmp, final)
    (tmp_path / "checkpoints" / "step-000009.partial").mkdir()  # torn by a crash
    assert latest_checkpoint(tmp_path) == final

    buffer_state, got_samplers, service = load_run_state(final)
    again = ReplayBuffer(batch_groups=2, max_staleness=1, min_reward_std=0.0)
    again.restore(buffer_state)
    assert again.state() == buffer.state()
    assert [g.seq for g in again.pull(2, 0)] == [0, 1]
    assert got_samplers == samplers and service["groups_arrived"] == 3
    with pytest.raises(ValueError, match="not a run checkpoint"):
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
