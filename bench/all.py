"""Every component bench from one entry point: transport, learner, weight sync, generator, native ops, rewards.

    python bench/all.py --quick --json /tmp/prorl-bench/all-quick.json    # small settings, a few minutes
    python bench/all.py --json /tmp/prorl-bench/all.json                  # each bench's own defaults (long)
    python bench/all.py --only transport,rewards                          # a subset

What it does and why: a newcomer (or CI on a new machine) gets one table of every component's headline figure
and its goal, measured on the same machine in one sitting. Each bench runs as its own subprocess, one after the
other (never two at once: they would measure each other), writes its ``--json`` into a temporary directory, and
this script collects those documents under ``benches.<name>`` of one JSON with the machine and the commands.
A bench that fails is reported with its exit code and the tail of its output; the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _runs

HERE = Path(__file__).resolve().parent

# name -> (arguments with --quick, arguments without, headline JSON key, goal as text)
BENCHES: dict[str, tuple[list[str], list[str], str, str]] = {
    "transport": (["--seconds", "1", "--tokens", "1024"], [], "tokens_per_s", ">= 20M tokens/s"),
    "learner": (["--models", "tiny-random", "--precisions", "fp32", "--steps", "2"], [], "train_tokens_per_s", "-"),
    "weight_sync": (["--models", "tiny-random", "--repeats", "3"], [], "ratio_to_raw_broadcast", ">= 0.8"),
    "generator": (["--models", "tiny-random", "--groups", "8", "--warmup", "2"], [], "ratio_to_raw_vllm", ">= 0.9"),
    "native": (["--quick", "--no-compile"], [], "cpu_speedup_vs_eager", "> 1"),
    "rewards": (["--samples", "50", "--code-samples", "4", "--sandbox-runs", "5"], [], "samples_per_s", "-"),
}


def command(name: str, quick: bool, json_path: Path) -> list[str]:
    quick_args, full_args, _, _ = BENCHES[name]
    return [sys.executable, str(HERE / f"{name}.py"), *(quick_args if quick else full_args), "--json", str(json_path)]


def headline(name: str, doc: dict[str, Any] | None) -> Any:
    """The bench's headline figure; a per-model or per-domain map is shown as ``key=value`` pairs."""
    if doc is None:
        return None
    value = doc.get(BENCHES[name][2])
    if isinstance(value, dict):
        return ", ".join(f"{k}={_runs.fmt(v, 1) if isinstance(v, float) else v}" for k, v in value.items())
    return value


def summary_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, r in results.items():
        key, goal = BENCHES[name][2], BENCHES[name][3]
        status = "ok" if r["returncode"] == 0 and r["json"] is not None else f"failed ({r['returncode']})"
        rows.append([name, status, key, headline(name, r["json"]), goal, r["seconds"]])
    return rows


def run_one(name: str, quick: bool, tmp: Path, timeout_s: float) -> dict[str, Any]:
    json_path = tmp / f"{name}.json"
    cmd = command(name, quick, json_path)
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout_s)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:  # subprocess.run kills the child it started
        code, output = 124, f"timed out after {timeout_s:.0f} s\n{err.stdout or ''}"
    seconds = time.monotonic() - started
    print(output if code == 0 else output[-3000:], flush=True)
    doc = json.loads(json_path.read_text()) if json_path.exists() else None
    return {"command": " ".join(["python", *cmd[1:-2]]), "returncode": code, "seconds": seconds, "json": doc}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each bench's small settings (tiny model)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per bench")
    parser.add_argument("--json", metavar="PATH", help="write the collected results as JSON")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench(es) {unknown}; choose from {', '.join(BENCHES)}")
    machine = _runs.machine_header(f"bench/all.py{' --quick' if args.quick else ''}: component benches")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prorl-bench-all-") as tmp:
        for name in names:
            results[name] = run_one(name, args.quick, Path(tmp), args.timeout_s)
    print("\n" + _runs.table(["bench", "status", "headline key", "value", "goal", "seconds"], summary_rows(results),
                             digits=2))
    _runs.write_json(args.json, {"quick": args.quick, "machine": machine, "benches": results,
                                 "failed": [n for n, r in results.items() if r["returncode"] != 0]})
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
