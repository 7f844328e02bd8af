"""Learning curves over wall-clock time: the same config trained synchronously and asynchronously.

    python bench/learning.py --quick --json /tmp/prorl-bench/learning-quick.json   # tiny model, minutes
    python bench/learning.py --json /tmp/prorl-bench/learning.json                 # embedded default, ~2 x 15 min

What it measures and why: throughput alone does not say whether asynchrony helps; what a user wants is more reward
per hour. Each mode is one real ``prorl-async run`` of the embedded default (SmolLM2-135M on chain_sum +
letter_counting), shortened by a wall-clock budget (``run.time_budget_s``), with ``buffer.max_staleness`` 0 (sync)
and ``--bound`` (async, default 1), generator and learner pinned to one core each (``bench/_runs.py``). Per mode:
the reward curve (``reward_mean`` per step against seconds since the training loop began: the budget counts from
there, and process and engine start, which vary with the machine's load, are reported apart as ``startup s``),
the reward averaged over the last quarter of the budget, samples trained, and — when the run logs ``validation``
records (``eval.every_steps``) — validation pass@1 against time. The PNG has two
panels: reward against seconds (blue sync, orange async) and reward against samples seen.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import _runs

FULL = {"config": None, "overrides": ["run.max_steps=0", "run.checkpoint_every_steps=0"], "budget_s": 900.0}
QUICK = {"config": "configs/tiny.toml", "overrides": ["run.max_steps=0", "run.checkpoint_every_steps=0"],
         "budget_s": 90.0}


def late_reward(curve: list[dict[str, float]], budget_s: float) -> float:
    """Mean reward of the steps in the last quarter of the budget (nan when none finished there)."""
    late = [p["reward"] for p in curve if p["t_s"] >= 0.75 * budget_s and math.isfinite(p["reward"])]
    return statistics.fmean(late) if late else math.nan


def time_to_reward(curve: list[dict[str, float]], target: float, window: int = 3) -> float | None:
    """Seconds until the running mean of ``window`` steps' reward first reaches ``target`` (None if never)."""
    rewards = [p["reward"] for p in curve]
    for i in range(len(curve)):
        recent = [r for r in rewards[max(0, i - window + 1): i + 1] if math.isfinite(r)]
        if recent and statistics.fmean(recent) >= target:
            return curve[i]["t_s"]
    return None


def validation_curve(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    t0 = _runs.training_start(records)
    if t0 is None:
        return []
    return [{"t_s": r["time_s"] - t0, "pass@1": r["pass_at_1"]} for r in records
            if r.get("kind") == "validation" and isinstance(r.get("pass_at_1"), int | float)]


def startup_s(records: list[dict[str, Any]]) -> float | None:
    """Seconds from the learner's first record to the start of training (model load, engine start, first batch)."""
    start = _runs.training_start(records)
    return start - records[0]["time_s"] if start is not None else None


def plot(path: Path, curves: dict[str, list[dict[str, float]]], bounds: dict[str, int], budget_s: float) -> None:
    """Two panels: step reward against seconds since training began, and against samples trained on; a line per
    mode (``curves[mode]``: :func:`_runs.reward_curve`), named with its ``max_staleness`` (``bounds[mode]``)."""
    names = [f"{m} (max_staleness {bounds[m]})" for m in curves]
    _runs.plot_lines(path, [
        {"title": "step reward vs seconds", "xlabel": "time since training began (s)",
         "ylabel": "step reward (batch mean)",
         "series": [[(p["t_s"], p["reward"]) for p in c] for c in curves.values()], "legend": names},
        {"title": "step reward vs samples", "xlabel": "samples trained on (cumulative)",
         "ylabel": "step reward (batch mean)",
         "series": [[(p["samples"], p["reward"]) for p in c] for c in curves.values()], "legend": names},
    ], title=f"Reward over wall-clock, sync vs async ({budget_s:.0f} s training budget per mode)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 90 s per mode")
    parser.add_argument("--config", help="TOML config (default: the embedded default; --quick: configs/tiny.toml)")
    parser.add_argument("--bound", type=int, default=1, help="max_staleness of the async run")
    parser.add_argument("--budget-s", type=float, help="wall-clock budget per run (default 900; --quick 90)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--no-pin", action="store_true", help="leave processes unpinned")
    parser.add_argument("--out-dir", default="/tmp/prorl-bench/learning", help="run directories go here")
    parser.add_argument("--plot", default="/tmp/prorl-bench/learning.png", help="PNG path")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    config = args.config or plan["config"]
    budget = args.budget_s or plan["budget_s"]
    overrides = [*plan["overrides"], f"run.time_budget_s={budget}", *args.overrides]
    pin = None if args.no_pin else _runs.default_pin()
    machine = _runs.machine_header("bench/learning.py: reward over wall-clock, sync vs async")
    print(f"config: {config or 'embedded default'}; overrides: {' '.join(overrides)}; pin: {pin}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    modes = {"sync": 0, "async": args.bound}
    out: dict[str, dict[str, Any]] = {}
    for mode, bound in modes.items():
        run_dir = Path(args.out_dir) / f"{stamp}-{mode}"
        run = _runs.launch(config, [*overrides, f"buffer.max_staleness={bound}"], run_dir, pin=pin,
                           timeout_s=budget + 600, quiet=False)
        curve = _runs.reward_curve(run.records)
        out[mode] = {"max_staleness": bound, "curve": curve, "validation": validation_curve(run.records),
                     "late_reward": late_reward(curve, budget), "steps": len(curve),
                     "samples": curve[-1]["samples"] if curve else 0,
                     "startup_s": startup_s(run.records),
                     "returncode": run.returncode, "run_dir": str(run_dir)}
        print(f"  {mode}: {len(curve)} steps in {run.seconds:.0f} s (exit {run.returncode})", flush=True)
    target = out["sync"]["late_reward"]
    for row in out.values():
        row["time_to_sync_final_reward_s"] = time_to_reward(row["curve"], target) if math.isfinite(target) else None
    header = ["mode", "max_staleness", "steps", "samples", "startup s", "reward (last 25%)",
              "s to sync's final reward", "validation points"]
    print(_runs.table(header, [[m, r["max_staleness"], r["steps"], r["samples"], r["startup_s"], r["late_reward"],
                                r["time_to_sync_final_reward_s"], len(r["validation"])] for m, r in out.items()]))
    plot(Path(args.plot), {m: out[m]["curve"] for m in modes}, modes, budget)
    sync_samples, async_samples = out["sync"]["samples"], out["async"]["samples"]
    _runs.write_json(args.json, {"samples_ratio_async_over_sync": _runs.ratio(async_samples, sync_samples),
                                 "late_reward": {m: r["late_reward"] for m, r in out.items()}, "budget_s": budget,
                                 "modes": out, "machine": machine, "config": config, "overrides": overrides,
                                 "plot": args.plot, "pin": {k: sorted(v) for k, v in pin.items()} if pin else None})
    return 0 if all(r["returncode"] == 0 for r in out.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
