"""Launcher comparison: the same run with ``cluster.launcher = "local"`` and ``"ray"`` on one machine.

    python bench/launchers.py [--configs tiny,default] [--json PATH]

For each config, both launchers run the same ``prorl-async run`` (same steps, same seed, validation off), one after
the other, in the order given by ``--order`` (``local,ray`` by default; ``--repeats 2`` runs the second round in the
opposite order). The Ray arm starts a Ray instance on this machine (``cluster.address = "local"``), as a user
without a cluster gets it; its start-up includes Ray's.

``--ray-idle-s N`` also measures what an idle Ray instance started as the launcher starts it costs: the CPU time of
every process it runs (GCS, raylet, agents, idle workers) over N seconds, as a share of one core.

Reported per arm: start-up (from launch to the first step record, wall clock), trained samples/s in steady state
(steps after ``--warmup-steps``, :func:`_runs.summarize`), and wall time; per config the ratio ray / local of trained
samples/s (the goal: >= 0.9, Ray's overhead must not show) and the difference in start-up. The figures are what they
are: nothing here is shaped to the goal.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import fmt, launch, machine_header, ratio, summarize, table, write_json

CONFIGS = {
    # name: (config file, steps, extra overrides)
    "tiny": ("configs/tiny.toml", 60, ["run.checkpoint_every_steps=0"]),
    "default": (None, 8, ["run.checkpoint_every_steps=0", "eval.every_steps=0", "eval.every_minutes=0",
                          "eval.at_start=false"]),
}


def one_arm(name: str, launcher: str, root: Path, steps: int, warmup: int, timeout_s: float) -> dict:
    config, _, extra = CONFIGS[name]
    overrides = [*extra, f"run.max_steps={steps}", f"cluster.launcher=\"{launcher}\""]
    if launcher == "ray":
        overrides.append("cluster.address=\"local\"")
    run_dir = root / f"{name}-{launcher}-{int(time.time())}"
    started = time.time()
    run = launch(config, overrides, run_dir, timeout_s=timeout_s, quiet=False)
    steps_done = [r for r in run.records if r.get("kind") == "step"]
    summary = summarize(run.records, warmup_steps=warmup)
    out = {"config": name, "launcher": launcher, "returncode": run.returncode, "wall_s": run.seconds,
           "steps": len(steps_done),
           "startup_s": steps_done[0]["time_s"] - started if steps_done else None,
           "samples_per_s": summary.get("samples_per_s"), "step_period_s": summary.get("step_period_s"),
           "timed_steps": summary.get("timed_steps"), "run_dir": str(run_dir)}
    print(f"  {name} / {launcher}: exit {run.returncode}, {len(steps_done)} steps, start-up {fmt(out['startup_s'])} s, "
          f"{fmt(out['samples_per_s'])} trained samples/s", flush=True)
    return out


def ray_idle_cpu(seconds: float) -> dict:
    """CPU share of one core used by an idle local Ray instance (every descendant of this process) over ``seconds``."""
    import os

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        time.sleep(10)  # start-up settles
        before = _cpu_ticks()
        started = time.monotonic()
        time.sleep(seconds)
        after, span = _cpu_ticks(), time.monotonic() - started
    finally:
        ray.shutdown()
    ticks = sum(after[pid] - before[pid] for pid in before if pid in after)
    share = ticks / os.sysconf("SC_CLK_TCK") / span
    print(f"  idle Ray: {len(before)} processes use {100 * share:.1f}% of one core", flush=True)
    return {"processes": len(before), "core_share": share, "seconds": span}


def _cpu_ticks() -> dict[int, int]:
    """utime + stime of this process and every descendant, from /proc."""
    import os

    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
            except (OSError, IndexError, ValueError):
                continue
    mine, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        mine[pid] = table.get(pid, (0, 0))[1]
        todo += [child for child, (parent, _) in table.items() if parent == pid]
    return mine


def compare(arms: list[dict], names: list[str]) -> tuple[list[list], dict[str, dict]]:
    """Table rows and the JSON summary per config: means over the arms that finished (exit 0), and ray / local."""

    def mean(key: str, runs: list[dict]) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None and r["returncode"] == 0]
        return sum(values) / len(values) if values else None

    rows, summary = [], {}
    for name in names:
        by = {lch: [a for a in arms if a["config"] == name and a["launcher"] == lch] for lch in ("local", "ray")}
        local_sps, ray_sps = mean("samples_per_s", by["local"]), mean("samples_per_s", by["ray"])
        local_up, ray_up = mean("startup_s", by["local"]), mean("startup_s", by["ray"])
        summary[name] = {"samples_per_s_ratio_ray_over_local": ratio(ray_sps, local_sps),
                         "local_samples_per_s": local_sps, "ray_samples_per_s": ray_sps,
                         "local_startup_s": local_up, "ray_startup_s": ray_up}
        rows.append([name, local_sps, ray_sps, ratio(ray_sps, local_sps), local_up, ray_up])
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,default", help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--order", default="local,ray")
    p.add_argument("--repeats", type=int, default=1, help="rounds; each later round reverses the order")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per run")
    p.add_argument("--ray-idle-s", type=float, default=0.0, help="also measure an idle Ray instance this long")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    machine = machine_header("launcher comparison: local vs Ray on one machine")
    idle = ray_idle_cpu(args.ray_idle_s) if args.ray_idle_s > 0 else None
    root = Path(tempfile.mkdtemp(prefix="bench-launchers-"))
    arms = []
    for name in [n for n in args.configs.split(",") if n]:
        if name not in CONFIGS:
            p.error(f"unknown config {name!r} (known: {', '.join(CONFIGS)})")
        order = args.order.split(",")
        for round_ in range(args.repeats):
            for launcher in (order if round_ % 2 == 0 else order[::-1]):
                arms.append(one_arm(name, launcher, root, CONFIGS[name][1], args.warmup_steps, args.timeout_s))
    rows, summary = compare(arms, [n for n in args.configs.split(",") if n])
    print(table(["config", "local samples/s", "ray samples/s", "ray/local", "local start-up s", "ray start-up s"],
                rows))
    write_json(args.json, {"machine": machine, "arms": arms, "summary": summary, "ray_idle": idle, "args": vars(args)})
    return 0 if all(a["returncode"] == 0 for a in arms) else 1


if __name__ == "__main__":
    sys.exit(main())
