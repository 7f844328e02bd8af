"""Async vs sync speedup: the same config trained with staleness bound 0 (synchronous) and bounds 1, 2, 4.

    python bench/speedup.py --quick --json /tmp/prorl-bench/speedup-quick.json      # tiny model, minutes
    python bench/speedup.py --json /tmp/prorl-bench/speedup.json                    # SmolLM2-135M, ~40 min

What it measures and why: asynchrony pays only by overlapping generation with training. Each run is a real
``prorl-async run`` (learner + vLLM generator processes) with the generator pinned to one core and the learner to
the other, so that the two behave like separate devices (see ``bench/_runs.py`` for how), and with realistic,
variable response lengths (a higher ``sampling.max_response_tokens`` and no stop string, so responses end at EOS
or the limit). Per run, over the steps after a warm-up: samples/s, tokens/s, learner and generator idle ratios.
The synchronous run also gives the per-phase times: its learner waits exactly one batch's generation (``t_gen``
= mean ``wait_s``) and then trains and broadcasts (``t_train`` = mean ``step_time_s + sync_s``), so the best any
overlap can do is the ideal bound ``(t_gen + t_train) / max(t_gen, t_train)``. ``--json`` has top-level
``speedup_over_sync`` (best async samples/s over sync samples/s) and ``fraction_of_ideal`` (that / the bound;
goal >= 0.9).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import _runs

FULL = {
    "config": None,  # the embedded default: SmolLM2-135M-Instruct on chain_sum + letter_counting
    # 4 groups x 8 samples of up to 96 tokens: ~1 min per step with the learner on one core, so 10 steps per
    # bound keep the whole sweep near 40 min; the variance filter is off so every bound trains the same batches.
    "overrides": ["sampling.max_response_tokens=96", "sampling.stop=[]", "learner.batch_groups=4", "run.max_steps=10",
                  "run.time_budget_s=0", "eval.every_steps=0", "run.checkpoint_every_steps=0",
                  "reset.interval_steps=0", "buffer.variance_filter=false"],
    "warmup_steps": 2, "timeout_s": 1500.0,
}
QUICK = {
    "config": "configs/tiny.toml",
    "overrides": ["sampling.max_response_tokens=96", "sampling.stop=[]", "run.max_steps=8",
                  "run.checkpoint_every_steps=0", "learner.batch_groups=8", "generator.max_inflight_groups=16"],
    "warmup_steps": 2, "timeout_s": 400.0,
}


def assemble(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Speedups over the sync run (bound 0), the ideal bound from its phase times, and the headline figures."""
    sync = rows[0]
    t_gen, t_train = sync.get("t_wait_s", float("nan")), sync.get("t_train_s", float("nan"))
    ideal = _runs.ideal_bound(t_gen, t_train)
    for bound, row in rows.items():
        row["speedup_over_sync"] = _runs.ratio(row.get("samples_per_s"), sync.get("samples_per_s"))
        row["fraction_of_ideal"] = _runs.ratio(row["speedup_over_sync"], ideal) if bound else None
    asyncs = {b: r for b, r in rows.items() if b > 0 and r.get("speedup_over_sync") is not None}
    best = max(asyncs, key=lambda b: asyncs[b]["speedup_over_sync"]) if asyncs else None
    return {
        "speedup_over_sync": asyncs[best]["speedup_over_sync"] if best is not None else None,
        "fraction_of_ideal": asyncs[best]["fraction_of_ideal"] if best is not None else None,
        "best_bound": best, "ideal_bound": ideal, "t_gen_s": t_gen, "t_train_s": t_train,
        "runs": {str(b): r for b, r in rows.items()},
    }


def print_table(doc: dict[str, Any]) -> None:
    header = ["max_staleness", "samples/s", "tokens/s", "speedup", "of ideal", "learner idle", "gen idle",
              "t_train s", "t_wait s", "stale drop", "steps"]
    rows = [[b, r.get("samples_per_s"), r.get("tokens_per_s"), r.get("speedup_over_sync"), r.get("fraction_of_ideal"),
             r.get("learner_idle_ratio"), r.get("generator_idle_ratio"), r.get("t_train_s"), r.get("t_wait_s"),
             r.get("stale_drop_frac"), r.get("steps")] for b, r in doc["runs"].items()]
    print(_runs.table(header, rows, digits=2))
    print(f"sync phases: t_gen {_runs.fmt(doc['t_gen_s'], 2)} s, t_train {_runs.fmt(doc['t_train_s'], 2)} s -> "
          f"ideal bound {_runs.fmt(doc['ideal_bound'], 2)}x; best async (bound {doc['best_bound']}): "
          f"{_runs.fmt(doc['speedup_over_sync'], 2)}x = {_runs.fmt(doc['fraction_of_ideal'], 2)} of ideal (goal 0.9)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short responses: a few minutes")
    parser.add_argument("--config", help="TOML config (default: the embedded default; --quick: configs/tiny.toml)")
    parser.add_argument("--bounds", default="0,1,2,4", help="staleness bounds; 0 (sync) is always run first")
    parser.add_argument("--steps", type=int, help="run.max_steps per run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--compare-overlap", action="store_true",
                        help="also run each bound >= 1 with weight_sync.overlap=false (rows '<bound>-sync-handoff')")
    parser.add_argument("--no-pin", action="store_true", help="leave processes unpinned")
    parser.add_argument("--out-dir", default="/tmp/prorl-bench/speedup", help="run directories go here")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    config = args.config or plan["config"]
    overrides = [*plan["overrides"], *([f"run.max_steps={args.steps}"] if args.steps else []), *args.overrides]
    bounds = sorted({0, *(int(b) for b in args.bounds.split(","))})
    pin = None if args.no_pin else _runs.default_pin()
    machine = _runs.machine_header("bench/speedup.py: async vs sync throughput")
    print(f"config: {config or 'embedded default'}; overrides: {' '.join(overrides)}; pin: {pin}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: dict[int, dict[str, Any]] = {}
    handoff_rows: dict[str, dict[str, Any]] = {}  # --compare-overlap: the same bound, weights handed off after the step
    variants = [(b, True) for b in bounds] + [(b, False) for b in bounds if b and args.compare_overlap]
    for bound, overlap in variants:
        name = f"{bound}" if overlap else f"{bound}-sync-handoff"
        run_dir = Path(args.out_dir) / f"{stamp}-s{name}"
        extra = [] if overlap else ["weight_sync.overlap=false"]
        run = _runs.launch(config, [*overrides, f"buffer.max_staleness={bound}", *extra], run_dir, pin=pin,
                           timeout_s=plan["timeout_s"], quiet=False)
        row = {**_runs.summarize(run.records, plan["warmup_steps"]), "returncode": run.returncode,
               "run_dir": str(run_dir)}
        if overlap:
            rows[bound] = row
        else:
            handoff_rows[name] = row
        print(f"  bound {name}: {row.get('steps', 0)} steps in {run.seconds:.0f} s, "
              f"{_runs.fmt(row.get('samples_per_s'), 2)} samples/s (exit {run.returncode})", flush=True)
    doc = assemble(rows)
    print_table(doc)
    for name, row in handoff_rows.items():
        overlapped = rows[int(name.split("-")[0])]
        row["overlap_speedup"] = _runs.ratio(overlapped.get("samples_per_s"), row.get("samples_per_s"))
        fmt = _runs.fmt
        print(f"bound {name}: {fmt(row.get('samples_per_s'), 2)} samples/s, t_train {fmt(row.get('t_train_s'), 2)} s; "
              f"overlapped handoff: {fmt(overlapped.get('samples_per_s'), 2)} samples/s, t_train "
              f"{fmt(overlapped.get('t_train_s'), 2)} s -> overlap bought {fmt(row['overlap_speedup'], 2)}x",
              flush=True)
    if handoff_rows:
        doc["sync_handoff_runs"] = handoff_rows
    _runs.write_json(args.json, {**doc, "machine": machine, "config": config, "overrides": overrides,
                                 "pin": {k: sorted(v) for k, v in pin.items()} if pin else None,
                                 "warmup_steps": plan["warmup_steps"]})
    return 0 if all(r["returncode"] == 0 for r in [*rows.values(), *handoff_rows.values()]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
