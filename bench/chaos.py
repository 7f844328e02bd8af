"""Nothing lost under faults, and memory that stays flat: two end-to-end runs of ``prorl-async run``.

Chaos (the default): the tiny model with two generators trains for ``--minutes`` of training time
(``run.time_budget_s``, which spans resumes). Every ``--generator-kill-every-s`` one generator is SIGKILLed
(alternating; the supervisor restarts it and the learner hands the requests it held out again), and
``--learner-kills`` times, evenly spread, the learner is SIGKILLed: the supervisor stops the run and names the
last checkpoint, and the bench continues it with ``prorl-async run --resume RUN_DIR``. At the end every prompt
drawn is accounted for from the run's own records:

- *drawn*: the learner's prompt order replayed (``PromptSampler``, deterministic) up to the draw count its
  state holds in the final checkpoint;
- *trained*: the prompt ids of the step records on the final timeline (steps a killed learner took after its
  last checkpoint are rolled back by the resume: those records are left out);
- *buffered*: the groups the final checkpoint holds (in the buffer, or parked waiting for room);
- *re-queued*: the draws the final checkpoint hands out again first (requests in flight when it was taken);
- *dropped*: the replay buffer's drop counters (stale, filtered, untrainable): counted, not identified.

lost = drawn - trained - buffered - re-queued - dropped (goal 0); twice = prompt ids found more than once
among trained, buffered and re-queued (goal 0); unknown = ids in those not drawn at all (goal 0).

Soak (``--soak``): the embedded default (SmolLM2-135M) for ``--minutes`` (default 60); the resident memory
(RSS) of every process of the run — supervisor, learner, generators and their vLLM engine cores — is read
from /proc each ``--sample-s`` (60). Reported per process: RSS after warm-up (``--warmup-min``, default 10)
and at the end, and the growth between them (goal: flat).

    python bench/chaos.py --json /tmp/chaos.json                      # ~25 min on 2 cores
    python bench/chaos.py --soak --json /tmp/soak.json                # ~65 min

Processes are stopped by the ids this script started (the run's process group), never by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import _ENTRY, REPO, fmt, machine_header, table, write_json

# ------------------------------------------------------------------------------------------- processes


class Supervised:
    """One ``prorl-async run`` (or ``--resume``) in a process group of its own, its output in a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", _ENTRY, *argv], cwd=REPO, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        """SIGINT (checkpoint, clean stop), then the whole group this script started if it does not end."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run_pids(run_dir: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads((run_dir / "pids.json").read_text()).items()}
    except (FileNotFoundError, json.JSONDecodeError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    from prorl_async.supervisor.lifecycle import process_table

    entry = process_table().get(pid)
    return entry is not None and entry[0] not in ("Z", "X")


def rss_by_process(root_pid: int, names: dict[int, str]) -> dict[str, float]:
    """RSS in MiB of ``root_pid`` and every descendant, named by ``names`` (pids.json) or by parent + command."""
    from prorl_async.supervisor.lifecycle import process_table

    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in process_table().items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    todo = [(root_pid, "supervisor")]
    while todo:
        pid, name = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        out[name] = out.get(name, 0.0) + rss_kb / 1024
        for i, child in enumerate(sorted(children.get(pid, []))):
            todo.append((child, names.get(child, f"{name}/child{i}")))
    return out


# ------------------------------------------------------------------------------------------- accounting


def final_timeline(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step records of the final timeline: a ``resumed`` event at version N rolls back the steps after N."""
    steps: list[dict[str, Any]] = []
    for r in records:
        if r.get("kind") == "event" and r.get("event") == "resumed":
            steps = [s for s in steps if s["version"] <= int(r["version"])]
        elif r.get("kind") == "step":
            steps.append(r)
    return steps


def drawn_prompt_ids(cfg: Any, samplers: dict[str, dict[str, Any]]) -> tuple[list[str], int]:
    """Every prompt drawn on the final timeline (replayed), and the highest epoch reached."""
    from prorl_async.envs.tasks import task_id
    from prorl_async.learner.prompts import PromptSampler

    ids, epoch = [], 0
    for state in samplers.values():
        sampler = PromptSampler(state["seed"], state["shard"], state["num_shards"], state["sizes"],
                                [spec.weight for spec in cfg.tasks.mix])
        for _ in range(int(state["draws"])):
            d = sampler.next()
            spec = cfg.tasks.mix[d.spec]
            ids.append(task_id(spec.domain, spec.name, d.spec, "train", d.index))
            epoch = max(epoch, d.epoch)
    return ids, epoch


def account(run_dir: Path) -> dict[str, Any]:
    """The prompt ledger of a finished run (module docstring)."""
    from prorl_async.config import load_config
    from prorl_async.envs.tasks import task_id
    from prorl_async.monitor.metrics import read_metrics
    from prorl_async.transport.messages import decode
    from prorl_async.utils.run_dir import latest_checkpoint, load_run_state

    cfg = load_config(run_dir / "config.toml")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise SystemExit(f"{run_dir}: no checkpoint to account from")
    buffer_state, prompts, _ = load_run_state(checkpoint)
    # The learner's one prompt order (or, from an older checkpoint, one per generator).
    samplers = prompts["shards"] if "shards" in prompts else {"learner": prompts["sampler"]}
    version = json.loads((checkpoint / "learner.json").read_text()).get("policy_version")
    steps = [s for s in final_timeline(read_metrics(run_dir / "metrics.jsonl")) if s["version"] <= version]
    trained = [p for s in steps for p in s["prompt_ids"]]
    buffered = [decode(f).prompt_id for f in [*buffer_state["groups"], *buffer_state.get("parked", [])]]
    mix = cfg.tasks.mix
    requeued = [task_id(mix[d[0]].domain, mix[d[0]].name, d[0], "train", d[1])
                for st in samplers.values() for d in st["requeued"]]
    drawn, epoch = drawn_prompt_ids(cfg, samplers)
    counters = buffer_state["counters"]
    dropped = {k: int(v) for k, v in counters.items() if k not in ("received", "yielded") and v}
    seen = Counter([*trained, *buffered, *requeued])
    drawn_set = set(drawn)
    return {
        "checkpoint": checkpoint.name,
        "steps": len(steps),
        "drawn": len(drawn),
        "trained": len(trained),
        "buffered": len(buffered),
        "requeued": len(requeued),
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dropped,
        "lost": len(drawn) - len(trained) - len(buffered) - len(requeued) - sum(dropped.values()),
        "twice": sum(n - 1 for n in seen.values() if n > 1),
        "twice_examples": [p for p, n in seen.items() if n > 1][:5],
        "unknown": sum(1 for p in seen if p not in drawn_set),
        "epochs_wrapped": epoch,
        "buffer_conservation_ok": int(counters["received"]) == len(buffer_state["groups"]) + int(counters["yielded"])
        + sum(dropped.values()),
    }


# ------------------------------------------------------------------------------------------- the runs


def chaos(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from prorl_async.utils.run_dir import latest_checkpoint

    run_dir = out_dir / "run"
    budget_s = args.minutes * 60
    overrides = ["generator.num_generators=2", "run.max_steps=0", f"run.time_budget_s={budget_s}",
                 f"run.checkpoint_every_steps={args.checkpoint_every}", "eval.every_steps=0", 'run.tui="off"',
                 f"run.run_dir={json.dumps(str(run_dir))}", *args.set]
    sets = [a for o in overrides for a in ("--set", o)]
    log = out_dir / "supervisor.log"
    started = time.monotonic()
    run = Supervised(["run", args.config, *sets], log)
    learner_kills_at = [started + budget_s * (i + 1) / (args.learner_kills + 1) for i in range(args.learner_kills)]
    next_generator_kill = started + args.generator_kill_every_s
    events: list[dict[str, Any]] = []
    victim = 0
    killed_learner: dict[str, Any] | None = None  # until the run it killed has ended and been resumed
    deadline = started + budget_s * 3 + 900  # resumes redo work: generous, but never endless
    try:
        while time.monotonic() < deadline:
            code = run.proc.poll()
            now = time.monotonic()
            if code is not None:
                if code == 0:
                    break
                if not killed_learner:
                    raise SystemExit(f"the run ended with {code} without a learner kill; see {log}")
                killed_learner["supervisor_exit"] = code
                killed_learner = None
                run = Supervised(["run", "--resume", str(run_dir)], log)  # same config, same budget
                events.append({"kind": "resume", "t_s": round(now - started, 1)})
                print(f"  {now - started:6.0f} s  resumed", flush=True)
                continue
            if killed_learner:  # the supervisor is stopping the run: nothing else to kill until the resume
                time.sleep(1.0)
                continue
            pids = run_pids(run_dir)
            due = learner_kills_at and now >= learner_kills_at[0] and latest_checkpoint(run_dir) is not None
            if due and "learner" in pids and _alive(pids["learner"]):  # after a checkpoint: a resume needs one
                learner_kills_at.pop(0)
                os.kill(pids["learner"], signal.SIGKILL)
                killed_learner = {"kind": "learner", "t_s": round(now - started, 1), "pid": pids["learner"]}
                events.append(killed_learner)
                print(f"  {now - started:6.0f} s  SIGKILL learner {pids['learner']}", flush=True)
            elif now >= next_generator_kill:
                name = f"generator-{victim}"
                if name in pids and _alive(pids[name]):
                    os.kill(pids[name], signal.SIGKILL)
                    events.append({"kind": "generator", "t_s": round(now - started, 1), "name": name,
                                   "pid": pids[name]})
                    print(f"  {now - started:6.0f} s  SIGKILL {name} {pids[name]}", flush=True)
                    victim = 1 - victim
                next_generator_kill = now + args.generator_kill_every_s
            time.sleep(1.0)
        else:
            raise SystemExit(f"the run did not finish within {deadline - started:.0f} s; see {log}")
    finally:
        run.stop()
    ledger = account(run_dir)
    return {"run_dir": str(run_dir), "wall_s": round(time.monotonic() - started, 1), "kills": events, **ledger}


def soak(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    run_dir = out_dir / "run"
    overrides = [f"run.time_budget_s={args.minutes * 60}", "run.max_steps=0", 'run.tui="off"',
                 f"run.run_dir={json.dumps(str(run_dir))}", *args.set]
    sets = [a for o in overrides for a in ("--set", o)]
    argv = ["run", *([args.config] if args.config else []), *sets]  # no config: the embedded default
    run = Supervised(argv, out_dir / "supervisor.log")
    started = time.monotonic()
    samples: list[dict[str, Any]] = []
    try:
        while run.proc.poll() is None:
            names = {pid: name for name, pid in run_pids(run_dir).items()}
            samples.append({"t_min": round((time.monotonic() - started) / 60, 2),
                            "rss_mib": rss_by_process(run.proc.pid, names)})
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(timeout=args.sample_s)
    finally:
        run.stop()
    growth: dict[str, dict[str, float]] = {}
    after = [s for s in samples if s["t_min"] >= args.warmup_min]
    if len(after) >= 2:
        for name in after[0]["rss_mib"]:
            series = [s["rss_mib"].get(name) for s in after if name in s["rss_mib"]]
            if len(series) >= 2:
                growth[name] = {"rss_after_warmup_mib": round(series[0], 1), "rss_end_mib": round(series[-1], 1),
                                "growth_frac": round(series[-1] / series[0] - 1, 4)}
    return {"run_dir": str(run_dir), "returncode": run.proc.returncode, "samples": samples, "growth": growth}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak", action="store_true", help="record RSS of the default run instead of killing")
    parser.add_argument("--minutes", type=float, default=None, help="training time (chaos 20, soak 60)")
    parser.add_argument("--config", default=None, help="chaos: configs/tiny.toml; soak: the embedded default")
    parser.add_argument("--generator-kill-every-s", type=float, default=120.0)
    parser.add_argument("--learner-kills", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=10, help="chaos: run.checkpoint_every_steps")
    parser.add_argument("--sample-s", type=float, default=60.0, help="soak: seconds between RSS samples")
    parser.add_argument("--warmup-min", type=float, default=10.0, help="soak: growth is measured from here")
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    parser.add_argument("--out", default="/tmp/prorl-bench/chaos", help="run directories go under here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.minutes = args.minutes if args.minutes is not None else (60.0 if args.soak else 20.0)
    if not args.soak:
        args.config = args.config or "configs/tiny.toml"
    info = machine_header("soak: RSS of every process of the default run" if args.soak
                          else "chaos: SIGKILL generators and the learner, then account for every prompt")
    out_dir = Path(args.out) / time.strftime(f"{'soak' if args.soak else 'chaos'}-%Y%m%d-%H%M%S")
    if args.soak:
        doc = {"bench": "soak", "machine": info, "minutes": args.minutes, **soak(args, out_dir)}
        rows = [[name, g["rss_after_warmup_mib"], g["rss_end_mib"], g["growth_frac"]]
                for name, g in sorted(doc["growth"].items())]
        print(table(["process", "RSS after warm-up MiB", "RSS at end MiB", "growth"], rows))
    else:
        doc = {"bench": "chaos", "machine": info, "minutes": args.minutes, **chaos(args, out_dir)}
        kills = Counter(e["kind"] for e in doc["kills"])
        print(f"kills: {kills.get('generator', 0)} generators, {kills.get('learner', 0)} learner "
              f"({kills.get('resume', 0)} resumes); {doc['steps']} steps; wall {fmt(doc['wall_s'], 0)} s")
        print(table(["drawn", "trained", "buffered", "re-queued", "dropped", "lost", "twice", "unknown"],
                    [[doc[k] for k in ("drawn", "trained", "buffered", "requeued", "dropped", "lost", "twice",
                                       "unknown")]]))
        if doc["epochs_wrapped"]:
            print(f"note: the prompt order wrapped into epoch {doc['epochs_wrapped']}: ids repeat legitimately")
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
