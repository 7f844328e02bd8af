"""Staleness sweep: how far behind the learner may the generators run? Throughput against off-policy cost.

    python bench/staleness.py --quick --json /tmp/prorl-bench/staleness-quick.json   # tiny model, minutes
    python bench/staleness.py --json /tmp/prorl-bench/staleness.json                 # SmolLM2-135M, ~1 h

What it measures and why: a larger ``buffer.max_staleness`` keeps both sides busier (throughput) but trains on
older samples: more groups dropped as stale, more importance weights truncated, a lower effective sample size,
and possibly less reward per sample. Each bound is one real ``prorl-async run`` of the same config for the same
number of steps (so the same sample budget), generator and learner pinned to one core each (``bench/_runs.py``).
Per bound: samples/s, the stale-drop fraction (groups dropped as stale / received), the IS-truncated fraction and
ESS (means over the timed steps), and the reward reached at the budget (mean ``reward_mean`` of the last three
steps). A PNG (``--plot``) has four panels, left to right: samples/s, stale-drop fraction, reward at the budget
(each against the bound, in sweep order), and reward against samples seen, one line per bound (a legend names
them); each panel is titled. Recommended: among the bounds whose reward at the budget is within
0.02 of the best, the smallest one within 5% of the fastest of them. ``auto`` in ``--bounds`` (e.g.
``0,1,2,4,auto``) adds a run with ``max_staleness = "auto"`` (the learner picks the bound each step; the table shows
the mean bound it used): it is recommended only when it is more than 5% faster than every fixed bound that keeps the
reward — then it should be the default.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import _runs

FULL = {
    "config": None,  # the embedded default: it learns (reward rises) within the budget
    "overrides": ["run.max_steps=24", "run.time_budget_s=0", "eval.every_steps=0", "run.checkpoint_every_steps=0"],
    "bounds": "0,1,2,4", "warmup_steps": 2, "timeout_s": 3000.0,
}
QUICK = {
    "config": "configs/tiny.toml",
    "overrides": ["sampling.max_response_tokens=64", "sampling.stop=[]", "run.max_steps=8",
                  "run.checkpoint_every_steps=0"],
    "bounds": "0,1,4", "warmup_steps": 2, "timeout_s": 400.0,
}
THROUGHPUT_TOLERANCE = 0.05
REWARD_TOLERANCE = 0.02


Bound = int | str  # a fixed bound, or "auto"


def _order(bound: Bound) -> tuple[bool, int]:
    """Fixed bounds by size, then ``auto``: among equally fast runs the smallest fixed bound wins."""
    return (bound == "auto", bound if isinstance(bound, int) else 0)


def parse_bounds(text: str) -> list[Bound]:
    out: set[Bound] = set()
    for part in text.split(","):
        part = part.strip()
        if part != "auto" and not part.isdigit():
            raise SystemExit(f"--bounds: {part!r} is neither a bound >= 0 nor auto")
        out.add(part if part == "auto" else int(part))
    return sorted(out, key=_order)


def recommend(rows: dict[Bound, dict[str, Any]]) -> Bound | None:
    """The smallest bound within 5% of the fastest bound that keeps the reward; the fastest when none keeps it.

    "Keeps the reward": reward at the budget within ``REWARD_TOLERANCE`` of the best bound's (every bound when no
    run has a reward figure).
    """
    speed = {b: r["samples_per_s"] for b, r in rows.items() if _finite(r.get("samples_per_s"))}
    if not speed:
        return None
    rewards = {b: rows[b].get("reward_at_budget") for b in speed}
    finite = [r for r in rewards.values() if _finite(r)]
    keeps = [b for b in speed if not finite or (_finite(rewards[b]) and rewards[b] >= max(finite) - REWARD_TOLERANCE)]
    fastest = max(keeps or speed, key=lambda b: speed[b])
    near = [b for b in (keeps or speed) if speed[b] >= (1 - THROUGHPUT_TOLERANCE) * speed[fastest]]
    return min(near, key=_order)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def print_table(rows: dict[Bound, dict[str, Any]], budget: int) -> None:
    header = ["max_staleness", "mean bound", "samples/s", "tokens/s", "stale drop", "IS truncated", "ESS", "staleness",
              f"reward@{budget}", "learner idle", "gen idle", "steps"]
    keys = ["bound_mean", "samples_per_s", "tokens_per_s", "stale_drop_frac", "is_truncated_frac", "ess",
            "staleness_mean", "reward_at_budget", "learner_idle_ratio", "generator_idle_ratio", "steps"]
    print(_runs.table(header, [[b, *(r.get(k) for k in keys)] for b, r in rows.items()], digits=3))


def plot(path: Path, rows: dict[Bound, dict[str, Any]], curves: dict[Bound, list[dict[str, float]]]) -> None:
    bounds = sorted(rows, key=_order)

    def against_bound(key: str) -> list[tuple[float, float]]:
        return [(float(i), float(rows[b].get(key) if _finite(rows[b].get(key)) else math.nan))
                for i, b in enumerate(bounds)]

    ticks = [(float(i), str(b)) for i, b in enumerate(bounds)]
    bound_axis = {"xlabel": "buffer.max_staleness (policy versions)", "xticks": ticks}
    _runs.plot_lines(path, [
        {"title": "samples/s by bound", "ylabel": "throughput (samples/s)",
         "series": [against_bound("samples_per_s")], **bound_axis},
        {"title": "stale-drop fraction by bound", "ylabel": "groups dropped as stale (fraction of received)",
         "series": [against_bound("stale_drop_frac")], **bound_axis},
        {"title": "reward at the budget by bound", "ylabel": "step reward (mean of the last 3 steps)",
         "series": [against_bound("reward_at_budget")], **bound_axis},
        {"title": "step reward vs samples", "xlabel": "samples trained on (cumulative)",
         "ylabel": "step reward (batch mean)",
         "series": [[(p["samples"], p["reward"]) for p in curves[b]] for b in bounds],
         "legend": [f"max_staleness {b}" for b in bounds]},
    ], title="Staleness sweep: throughput against off-policy cost, one run per bound")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, three bounds: a few minutes")
    parser.add_argument("--config", help="TOML config (default: the embedded default; --quick: configs/tiny.toml)")
    parser.add_argument("--bounds", help="comma-separated staleness bounds (default 0,1,2,4; --quick 0,1,4)")
    parser.add_argument("--steps", type=int, help="run.max_steps per run (the sample budget)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--no-pin", action="store_true", help="leave processes unpinned")
    parser.add_argument("--out-dir", default="/tmp/prorl-bench/staleness", help="run directories go here")
    parser.add_argument("--plot", default="/tmp/prorl-bench/staleness.png", help="PNG path")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    config = args.config or plan["config"]
    overrides = [*plan["overrides"], *([f"run.max_steps={args.steps}"] if args.steps else []), *args.overrides]
    bounds = parse_bounds(args.bounds or plan["bounds"])
    pin = None if args.no_pin else _runs.default_pin()
    machine = _runs.machine_header("bench/staleness.py: staleness bound sweep")
    print(f"config: {config or 'embedded default'}; overrides: {' '.join(overrides)}; pin: {pin}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: dict[Bound, dict[str, Any]] = {}
    curves: dict[Bound, list[dict[str, float]]] = {}
    records: dict[Bound, list[dict[str, Any]]] = {}
    for bound in bounds:
        run_dir = Path(args.out_dir) / f"{stamp}-s{bound}"
        run = _runs.launch(config, [*overrides, f"buffer.max_staleness={bound}"], run_dir, pin=pin,
                           timeout_s=plan["timeout_s"], quiet=False)
        records[bound], curves[bound] = run.records, _runs.reward_curve(run.records)
        used = [r["max_staleness"] for r in run.records
                if r.get("kind") == "step" and isinstance(r.get("max_staleness"), int)]
        rows[bound] = {**_runs.summarize(run.records, plan["warmup_steps"]), "returncode": run.returncode,
                       "run_dir": str(run_dir), "bound_mean": sum(used) / len(used) if used else math.nan}
        print(f"  bound {bound}: {rows[bound].get('steps', 0)} steps in {run.seconds:.0f} s (exit {run.returncode})",
              flush=True)
    budget = min((r.get("samples_total", 0) for r in rows.values()), default=0)
    for bound, row in rows.items():
        row["reward_at_budget"] = _runs.reward_at_budget(records[bound], budget) if budget else math.nan
    print_table(rows, budget)
    best = recommend(rows)
    print(f"recommended max_staleness on this machine: {best} (of the bounds whose reward at {budget} samples is "
          f"within {REWARD_TOLERANCE} of the best, the smallest within {THROUGHPUT_TOLERANCE:.0%} of the fastest)")
    plot(Path(args.plot), rows, curves)
    _runs.write_json(args.json, {"recommended_max_staleness": best, "sample_budget": budget,
                                 "runs": {str(b): r for b, r in rows.items()},
                                 "curves": {str(b): c for b, c in curves.items()}, "machine": machine,
                                 "config": config, "overrides": overrides, "plot": args.plot,
                                 "pin": {k: sorted(v) for k, v in pin.items()} if pin else None})
    return 0 if all(r["returncode"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
