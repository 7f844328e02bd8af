"""Informative groups and the learning signal: the same run with and without the sampling that follows the policy.

    python bench/informative.py --json bench/results/informative-DATE.json      # embedded default, 2 x 30 min
    python bench/informative.py --quick --json /tmp/prorl-bench/informative.json  # tiny model, 2 x 90 s
    python bench/informative.py --arms new --budget-s 1800 ...                  # one arm only

Each arm is one real ``prorl-async run`` of the config under a wall-clock budget (``run.time_budget_s``), with
validation at start and then on the config's schedule (``eval.at_start``, ``eval.every_steps`` /
``eval.every_minutes``):

- ``new``: the config as it is (``tasks.curriculum``, ``tasks.skip`` and ``tasks.balance`` on by default; the
  balance draws each task by its weight times its recent share of informative groups, and does nothing with one
  task, as in ``--quick``'s tiny config);
- ``old``: all three off (``tasks.curriculum.enabled=false``, ``tasks.skip.enabled=false``,
  ``tasks.balance.enabled=false``): what every run did before.

Per arm, from ``RUN_DIR/metrics.jsonl``:

- **fraction of generated groups that reach the learner**: the buffer's admitted groups over the groups it
  received (``buffer_counters``: received less the variance filter's ``all_correct`` / ``all_wrong`` /
  ``no_variance``, ``stale`` and ``untrainable``), over the whole run and over its last quarter of training time
  (the counters' change from the last step before 75% of the training time to the last step);
- **held-out validation pass@1** at the first validation record (the start) and at the last, and its gain; pass@k
  at the largest k per task, first and last (validation stays on the level-0 difficulty, so these compare);
- the policy reward (``reward_arrived_mean``, every scored sample) of the first and last quarter, the curriculum's
  levels at the end, the prompt skip rate, and the task balance's shares at the end (``task_shares``).

The PNG has two panels: the fraction reaching the learner per step window, and validation pass@1, against
training time, a line per arm. Nothing is shaped to a goal: the figures are what the run logged.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import _runs

FULL = {"config": None, "overrides": ["run.max_steps=0", "run.checkpoint_every_steps=0"], "budget_s": 1800.0}
QUICK = {"config": "configs/tiny.toml",
         "overrides": ["run.max_steps=0", "run.checkpoint_every_steps=0", "eval.every_minutes=0.5"],
         "budget_s": 90.0}
ARMS = {"new": [], "old": ["tasks.curriculum.enabled=false", "tasks.skip.enabled=false", "tasks.balance.enabled=false"]}
DROPS = ("all_correct", "all_wrong", "no_variance", "stale", "untrainable")


def admitted(counters: dict[str, int]) -> int:
    """Groups the buffer took: received less every drop."""
    return int(counters.get("received", 0)) - sum(int(counters.get(k, 0)) for k in DROPS)


def reach_fraction(before: dict[str, int] | None, after: dict[str, int]) -> float | None:
    """Admitted over received between two ``buffer_counters`` snapshots (``before`` None: from the start)."""
    before = before or {}
    received = int(after.get("received", 0)) - int(before.get("received", 0))
    if received <= 0:
        return None
    return (admitted(after) - admitted(before)) / received


def steps_with_time(records: list[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    t0 = _runs.training_start(records)
    if t0 is None:
        return []
    return [(r["time_s"] - t0, r) for r in records if r.get("kind") == "step"]


def reach_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Fraction reaching the learner over the run and over its last quarter of training time."""
    steps = steps_with_time(records)
    if not steps:
        return {"reach_fraction": None, "reach_fraction_last_quarter": None, "received": 0}
    end_t, last = steps[-1]
    before = [r for t, r in steps if t < 0.75 * end_t]
    quarter_start = before[-1]["buffer_counters"] if before else None
    return {"reach_fraction": reach_fraction(None, last["buffer_counters"]),
            "reach_fraction_last_quarter": reach_fraction(quarter_start, last["buffer_counters"]),
            "received": int(last["buffer_counters"].get("received", 0)), "training_s": end_t}


def reach_curve(records: list[dict[str, Any]], window: int = 4) -> list[tuple[float, float]]:
    """(training seconds, fraction reaching the learner) per window of ``window`` steps."""
    steps = steps_with_time(records)
    curve, prev = [], None
    for i in range(window - 1, len(steps), window):
        t, r = steps[i]
        value = reach_fraction(prev, r["buffer_counters"])
        if value is not None:
            curve.append((t, value))
        prev = r["buffer_counters"]
    return curve


def validation_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """pass@1 at the first and last validation record, the gain, and pass@(largest k) per task at both."""
    rounds = [r for r in records if r.get("kind") == "validation" and isinstance(r.get("pass_at_1"), int | float)]
    if not rounds:
        return {"validations": 0}
    first, last = rounds[0], rounds[-1]

    def top_k(record: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for task, stats in (record.get("by_task") or {}).items():
            ks = sorted(int(k.split("_at_")[1]) for k in stats if k.startswith("pass_at_"))
            if ks:
                out[task] = {"k": ks[-1], "pass_at_k": stats[f"pass_at_{ks[-1]}"], "pass_at_1": stats.get("pass_at_1")}
        return out

    return {"validations": len(rounds), "first_step": first.get("step"), "last_step": last.get("step"),
            "pass_at_1_first": first["pass_at_1"], "pass_at_1_last": last["pass_at_1"],
            "pass_at_1_gain": last["pass_at_1"] - first["pass_at_1"],
            "by_task_first": top_k(first), "by_task_last": top_k(last)}


def validation_curve(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    t0 = _runs.training_start(records)
    if t0 is None:
        return []
    return [(r["time_s"] - t0, r["pass_at_1"]) for r in records
            if r.get("kind") == "validation" and isinstance(r.get("pass_at_1"), int | float)]


def policy_reward(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ``reward_arrived_mean`` (weighted by samples) over the first and the last quarter of the steps."""
    steps = [r for r in records if r.get("kind") == "step" and r.get("reward_arrived_mean") is not None]
    if not steps:
        return {}
    quarter = max(1, len(steps) // 4)

    def mean(part: list[dict[str, Any]]) -> float | None:
        n = sum(r.get("samples_arrived", 0) for r in part)
        return sum(r["reward_arrived_mean"] * r.get("samples_arrived", 0) for r in part) / n if n else None

    return {"policy_reward_first_quarter": mean(steps[:quarter]), "policy_reward_last_quarter": mean(steps[-quarter:])}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [r for r in records if r.get("kind") == "step"]
    last = steps[-1] if steps else {}
    return {"steps": len(steps), **reach_figures(records), **validation_figures(records), **policy_reward(records),
            "curriculum": last.get("curriculum"), "prompt_skip_rate": last.get("prompt_skip_rate"),
            "task_shares": last.get("task_shares"),
            "level_changes": sum(1 for r in records if r.get("event") == "curriculum_level")}


def plot(path: Path, records: dict[str, list[dict[str, Any]]]) -> None:
    names = list(records)
    _runs.plot_lines(path, [
        {"title": "groups that reach the learner", "xlabel": "training time (s)",
         "ylabel": "admitted / received (4-step windows)",
         "series": [reach_curve(records[n]) for n in names], "legend": names},
        {"title": "held-out validation pass@1", "xlabel": "training time (s)", "ylabel": "pass@1",
         "series": [validation_curve(records[n]) for n in names], "legend": names},
    ], title="Sampling that follows the policy (new) vs fixed difficulty, no skipping, fixed task shares (old)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 90 s per arm")
    parser.add_argument("--config", help="TOML config (default: the embedded default; --quick: configs/tiny.toml)")
    parser.add_argument("--arms", default="new,old", help="which arms to run, in order")
    parser.add_argument("--budget-s", type=float, help="wall-clock training budget per arm (default 1800; --quick 90)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--no-pin", action="store_true", help="leave processes unpinned")
    parser.add_argument("--out-dir", default="/tmp/prorl-bench/informative", help="run directories go here")
    parser.add_argument("--plot", default="/tmp/prorl-bench/informative.png", help="PNG path")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    config = args.config or plan["config"]
    budget = args.budget_s or plan["budget_s"]
    overrides = [*plan["overrides"], f"run.time_budget_s={budget}", "eval.at_start=true", *args.overrides]
    pin = None if args.no_pin else _runs.default_pin()
    machine = _runs.machine_header("bench/informative.py: informative groups and validation, new vs old sampling")
    print(f"config: {config or 'embedded default'}; overrides: {' '.join(overrides)}; pin: {pin}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: dict[str, dict[str, Any]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for arm in args.arms.split(","):
        run_dir = Path(args.out_dir) / f"{stamp}-{arm}"
        run = _runs.launch(config, [*overrides, *ARMS[arm]], run_dir, pin=pin, timeout_s=budget + 900, quiet=False)
        records[arm] = run.records
        rows[arm] = {**summarize(run.records), "returncode": run.returncode, "run_dir": str(run_dir),
                     "wall_s": run.seconds}
        print(f"  {arm}: {rows[arm]['steps']} steps in {run.seconds:.0f} s (exit {run.returncode})", flush=True)
    header = ["arm", "steps", "received", "reach", "reach last 25%", "val pass@1 first", "last", "gain",
              "policy reward first 25%", "last 25%", "skip rate", "level moves"]
    print(_runs.table(header, [[a, r["steps"], r.get("received"), r.get("reach_fraction"),
                                r.get("reach_fraction_last_quarter"), r.get("pass_at_1_first"),
                                r.get("pass_at_1_last"), r.get("pass_at_1_gain"),
                                r.get("policy_reward_first_quarter"), r.get("policy_reward_last_quarter"),
                                r.get("prompt_skip_rate"), r.get("level_changes")] for a, r in rows.items()]))
    for arm, row in rows.items():
        for when in ("first", "last"):
            tasks = row.get(f"by_task_{when}") or {}
            shown = ", ".join(f"{t} pass@1 {_runs.fmt(v['pass_at_1'])} pass@{v['k']} {_runs.fmt(v['pass_at_k'])}"
                              for t, v in tasks.items())
            print(f"  {arm} validation {when}: {shown or 'none'}")
    plot(Path(args.plot), records)
    _runs.write_json(args.json, {"arms": rows, "budget_s": budget, "machine": machine, "config": config,
                                 "overrides": overrides, "plot": args.plot})
    return 0 if all(r["returncode"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
