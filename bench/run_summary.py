"""How the reward moved in a run: per window of steps, from ``RUN_DIR/metrics.jsonl`` (or a copy of its records).

    python bench/run_summary.py runs/default-.../metrics.jsonl [--window 2] [--json PATH]

A step record's ``reward_mean`` is over the batch the learner trained on, which the variance filter restricts to
groups with mixed rewards: it cannot show a policy that gets better (a group it solves every time is filtered
out). What shows it is the reward over every group the generators produced: ``reward_arrived_mean`` in records
written since it exists; for older records it is estimated from the buffer's drop counters — all-correct groups
count 1, all-wrong 0, the admitted ones the window's batch reward — which is what this script prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def windows(steps: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    keys = ("received", "all_correct", "all_wrong", "no_variance")
    prev = dict.fromkeys(keys, 0)
    rows = []
    for i in range(0, len(steps), size):
        part = steps[i : i + size]
        counters = part[-1]["buffer_counters"]
        d = {k: counters[k] - prev[k] for k in keys}
        prev = {k: counters[k] for k in keys}
        batch = sum(s["reward_mean"] for s in part) / len(part)
        admitted = d["received"] - d["all_correct"] - d["all_wrong"] - d["no_variance"]
        exact = [s["reward_arrived_mean"] for s in part if s.get("reward_arrived_mean") is not None]
        if exact:
            weights = [s["samples_arrived"] for s in part if s.get("reward_arrived_mean") is not None]
            overall = sum(r * w for r, w in zip(exact, weights, strict=True)) / max(sum(weights), 1)
        else:
            overall = (d["all_correct"] + batch * admitted) / d["received"] if d["received"] else float("nan")
        rows.append({"steps": f"{part[0]['version']}-{part[-1]['version']}", "elapsed_s": part[-1]["elapsed_s"],
                     "groups": d["received"], "all_correct": d["all_correct"], "all_wrong": d["all_wrong"],
                     "batch_reward": batch, "reward_all_groups": overall, "exact": bool(exact),
                     "kl": part[-1]["kl"], "entropy": part[-1]["entropy"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", type=Path)
    p.add_argument("--window", type=int, default=2, help="steps per row")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    records = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("kind") == "step"]
    rows = windows(steps, args.window)
    print(f"{'steps':>6} {'elapsed_s':>9} {'groups':>6} {'all_ok':>6} {'all_0':>5} {'batch_r':>7} "
          f"{'reward(all)':>11} {'kl':>8} {'entropy':>7}")
    for r in rows:
        mark = "" if r["exact"] else "~"
        print(f"{r['steps']:>6} {r['elapsed_s']:>9.0f} {r['groups']:>6} {r['all_correct']:>6} {r['all_wrong']:>5} "
              f"{r['batch_reward']:>7.3f} {mark + format(r['reward_all_groups'], '.3f'):>11} {r['kl']:>8.3g} "
              f"{r['entropy']:>7.3f}")
    print("~: estimated from the drop counters (records without reward_arrived_mean)")
    if args.json:
        args.json.write_text(json.dumps({"windows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
