"""The supervisor's closing lines, and Ctrl-C during start-up with a stand-in learner process (no model, no vLLM):
what a user sees after ``^C`` — the stop as it happens, then the steps and the checkpoint, or that there is none."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from prorl_async.config import Config
from prorl_async.supervisor.summary import closing_lines
from prorl_async.supervisor.supervisor import Supervisor, make_run_dir

RUN = Path("runs/default-x")
METRICS = RUN / "metrics.jsonl"


def _step(version: int, arrived: float | None, batch: float, samples: int = 64) -> dict[str, Any]:
    return {"kind": "step", "version": version, "reward_mean": batch, "reward_arrived_mean": arrived,
            "samples_arrived": samples if arrived is not None else 0}


def _validation(version: int, p1: float, complete: bool = True) -> dict[str, Any]:
    return {"kind": "validation", "version": version, "complete": complete, "pass_at_1": p1}


def test_closing_line_says_whether_the_policy_learned() -> None:
    steps = [_step(1, 0.17, 0.359), *(_step(v, 0.5, 0.5) for v in range(2, 20)),
             *(_step(v, 0.82, 0.5) for v in range(20, 24)), _step(24, 0.82, 0.609)]
    records = [_validation(0, 0.25), *steps, _validation(12, 0.5, complete=False), _validation(24, 0.63)]
    lines = closing_lines(records, metrics_path=METRICS, run_dir=RUN, checkpoint=RUN / "checkpoints" / "step-000024",
                          interrupted=False)
    assert lines == [
        "done: 24 steps; policy reward 0.170 -> 0.820 (every scored sample, last 5 steps pooled); validation pass@1 "
        f"0.250 -> 0.630 (v0 -> v24); batch reward (filtered) 0.359 -> 0.609; metrics: {METRICS}",
        f"checkpoint: {RUN / 'checkpoints' / 'step-000024'} (continue with: prorl-async run --resume {RUN})",
    ]


def test_closing_line_without_validation_arrivals_or_steps() -> None:
    steps = [_step(1, 0.2, 0.4), _step(2, 0.4, 0.6)]
    [line, _] = closing_lines(steps, metrics_path=METRICS, run_dir=RUN, checkpoint=None, interrupted=False)
    assert line == ("done: 2 steps; policy reward 0.200 -> 0.300 (every scored sample, last 2 steps pooled); "
                    "validation pass@1 n/a (no round finished); batch reward (filtered) 0.400 -> 0.600; "
                    f"metrics: {METRICS}")
    [line, _] = closing_lines([_step(1, None, 0.5), _validation(0, 0.25, complete=False)], metrics_path=METRICS,
                              run_dir=RUN, checkpoint=None, interrupted=False)
    assert "done: 1 step; policy reward n/a (no scored sample arrived); validation pass@1 0.250 (v0);" in line
    lines = closing_lines([], metrics_path=METRICS, run_dir=RUN, checkpoint=None, interrupted=True)
    assert lines == [f"stopped: 0 steps; policy reward n/a (no scored sample arrived); validation pass@1 n/a (no round "
                     f"finished); metrics: {METRICS}", "checkpoint: none written (nothing to resume)"]


# A learner stand-in: says it runs (the flag file), then on SIGINT does what the learner does when interrupted before
# its first step (the events, and a checkpoint when asked to) and exits with the given code.
_FAKE_LEARNER = r"""
import json, pathlib, signal, sys, time
run, flag, checkpoint, code = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])

def write(**record):
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"time_s": time.time(), "elapsed_s": 1.0, **record}) + "\n")

def stop(*_):
    write(kind="event", event="interrupted", signal=2, version=0, checkpoint=checkpoint)
    if checkpoint:
        path = run / "checkpoints" / "step-000000"
        (path / "policy").mkdir(parents=True)
        (path / "policy" / "config.json").write_text("{}")
        write(kind="event", event="checkpoint", path=str(path), version=0)
    sys.exit(code)

signal.signal(signal.SIGINT, stop)
flag.write_text("up")
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize(("checkpoint", "code"), [(True, 0), (False, 1)])
def test_ctrl_c_during_start_up_says_what_happens_and_where_the_checkpoint_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: bool, code: int) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config()
    cfg.run.tui = "off"
    supervisor = Supervisor(cfg, run)
    flag = tmp_path / "learner-up"
    supervisor.learner.argv = ["-c", _FAKE_LEARNER, str(run), str(flag), str(int(checkpoint)),
                               str(code)]

    async def main() -> int:
        async def ctrl_c() -> None:
            with trio.fail_after(30):
                while not flag.exists():  # the learner runs: it is loading its model, start-up has begun
                    await trio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # what a terminal's ^C sends the supervisor

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctrl_c)
            with trio.fail_after(60):
                return await supervisor.main()

    assert trio.run(main) == 130
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert any(line.startswith("prorl-async: stopping: the learner ends the step in progress") for line in lines), out
    if checkpoint:
        assert any("stopping: learner interrupted (v0), before the first step: it writes a checkpoint" in line
                   for line in lines), out
        assert any(f"stopping: checkpoint written: {run / 'checkpoints' / 'step-000000'}" in line for line in lines)
    assert lines[-2].startswith("stopped: 0 steps; policy reward n/a")
    assert lines[-1] == (f"checkpoint: {run / 'checkpoints' / 'step-000000'} (continue with: prorl-async run --resume "
                         f"{run})" if checkpoint else "checkpoint: none written (nothing to resume)")
    assert "the learner exited with" not in err  # an interrupt is not a failure, whatever the exit code
    assert json.loads((run / "pids.json").read_text())["learner"] > 0


def test_a_run_directory_used_again_drops_the_last_runs_endpoints(tmp_path: Path) -> None:
    """A fixed ``run.run_dir`` used by an earlier run: its endpoints.json would send the generators to a learner
    that is gone (they waited for it until the handshake timed out, again and again)."""
    cfg = Config()
    cfg.run.run_dir = str(tmp_path / "fixed")
    first = make_run_dir(cfg)
    (first / "endpoints.json").write_text('{"groups": "tcp://127.0.0.1:1"}')
    assert make_run_dir(cfg) == first and not (first / "endpoints.json").exists()


def test_a_learner_of_several_ranks_starts_each_rank_once_with_its_own_rank_and_device(tmp_path: Path) -> None:
    cfg = Config()
    cfg.cluster.learner_ranks_per_node = 3
    supervisor = Supervisor(cfg, tmp_path)
    ranks = [supervisor.learner, *supervisor.learner_ranks]
    assert [c.name for c in ranks] == ["learner", "learner-1", "learner-2"]
    nonces = set()
    for rank, child in enumerate(ranks):
        assert child.argv.count("--rank") == 1 and child.argv[child.argv.index("--rank") + 1] == str(rank)
        assert child.argv[child.argv.index("--world") + 1] == "3"
        nonces.add(child.argv[child.argv.index("--rendezvous") + 1])
        assert child.extra_env == {"LOCAL_RANK": str(rank)}
    assert len(nonces) == 1  # one launch: the ranks meet each other, never an earlier launch's
