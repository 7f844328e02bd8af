"""Reward scoring throughput per domain, and the code sandbox's per-sample overhead.

    python bench/rewards.py [--samples 400] [--code-samples 40] [--json PATH]

Scores, in this process and on its main thread (as a scoring-pool worker does, so the time limit is
armed), half correct and half wrong responses per domain, after a warm-up that pays the imports. Task
generation is not timed. The sandbox overhead is the wall time of ``run_python("pass")``, end to end
(launcher start, namespaces, mounts, uid drop, teardown), and the part the launcher itself measures.

``--json PATH`` writes ``{"samples_per_s": {domain: float}, "tasks": {...}, "sandbox": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs.domains.extract import parse_number
from prorl_async.envs.sandbox import run_python
from prorl_async.envs.score import score
from prorl_async.envs.tasks import Task, TaskMix

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
FILLER = "Let me work through this step by step, checking each part of the question carefully. " * 3
SPECS = {  # domain -> task specs measured for it (the domain's rate is over all of its samples)
    "logic": [TaskSpec(domain="logic", name="chain_sum", params=EASY),
              TaskSpec(domain="logic", name="family_relationships")],
    "math": [TaskSpec(domain="math", name="basic_arithmetic", params=EASY),
             TaskSpec(domain="math", name="gsm_symbolic"), TaskSpec(domain="math", name="champ")],
    "code": [TaskSpec(domain="code", name="humaneval")],
    "stem": [TaskSpec(domain="stem", name="mmlu_stem")],
    "instruction": [TaskSpec(domain="instruction", name="ifeval")],
}


def responses(task: Task, k: int) -> str:
    """Response k for ``task``: even k correct (when the domain has a reference), odd k wrong."""
    correct = k % 2 == 0
    if task.domain == "code":
        body = task.answer if correct else "    return None\n"
        return f"{FILLER}\n```python\n{task.question}{body}```"
    if task.domain == "instruction":
        return FILLER if correct else FILLER.upper() + ", with a comma"
    if task.domain == "stem":
        answer = task.answer if correct else "ABCD"[("ABCD".index(task.answer) + 1) % 4]
    elif correct or task.answer is None:
        answer = task.answer
    elif (number := parse_number(task.answer)) is not None:
        answer = str(number + 1)  # a wrong number, the common case
    else:
        answer = f"{task.answer}+1" if task.domain == "math" else f"not {task.answer}"
    return f"{FILLER}<answer>{answer}</answer>"


def bench_spec(spec: TaskSpec, samples: int) -> dict:
    start = time.perf_counter()
    mix = TaskMix(TasksConfig(mix=[spec], validation_size=8, train_size=max(samples, 64)))
    tasks = [mix.train_problem(0, j % mix.train_size(0)) for j in range(samples)]
    texts = [responses(task, k) for k, task in enumerate(tasks)]
    setup_s = time.perf_counter() - start
    pairs = list(zip(tasks, texts, strict=True))
    for task, text in pairs[:2]:  # warm-up: imports, caches
        score(text, task)
    start = time.perf_counter()
    rewards = [score(text, task)[0] for task, text in pairs]
    elapsed = time.perf_counter() - start
    return {"samples": samples, "seconds": round(elapsed, 4), "samples_per_s": round(samples / elapsed, 1),
            "mean_reward": round(sum(rewards) / samples, 3), "setup_s": round(setup_s, 2)}


def bench_sandbox(runs: int) -> dict:
    run_python("pass")
    walls, inner = [], []
    for _ in range(runs):
        start = time.perf_counter()
        result = run_python("pass")
        walls.append(time.perf_counter() - start)
        inner.append(result.wall_s)
    return {"runs": runs, "isolation": result.isolation, "overhead_s_mean": round(statistics.mean(walls), 4),
            "overhead_s_p50": round(statistics.median(walls), 4),
            "overhead_s_p90": round(sorted(walls)[int(0.9 * runs)], 4),
            "launcher_measured_s_p50": round(statistics.median(inner), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400, help="samples per task for non-code domains")
    parser.add_argument("--code-samples", type=int, default=40, help="samples per task for code (sandboxed)")
    parser.add_argument("--sandbox-runs", type=int, default=30, help="runs of run_python('pass')")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    tasks: dict[str, dict] = {}
    per_domain: dict[str, float] = {}
    for domain, specs in SPECS.items():
        n = args.code_samples if domain == "code" else args.samples
        total_samples, total_seconds = 0, 0.0
        for spec in specs:
            result = bench_spec(spec, n)
            tasks[f"{domain}/{spec.name}"] = result
            total_samples += result["samples"]
            total_seconds += result["seconds"]
            print(f"{domain:12s} {spec.name:22s} {result['samples_per_s']:9.1f} samples/s "
                  f"(mean reward {result['mean_reward']:.2f}, {n} samples)", flush=True)
        per_domain[domain] = round(total_samples / total_seconds, 1)
    sandbox = bench_sandbox(args.sandbox_runs)
    print(f"sandbox overhead per sample: p50 {sandbox['overhead_s_p50'] * 1e3:.0f} ms, mean "
          f"{sandbox['overhead_s_mean'] * 1e3:.0f} ms, p90 {sandbox['overhead_s_p90'] * 1e3:.0f} ms "
          f"(isolation: {sandbox['isolation']}; "
          f"launcher-measured p50 {sandbox['launcher_measured_s_p50'] * 1e3:.0f} ms)")
    print("samples/s per domain:", json.dumps(per_domain))
    if args.json:
        report = {"samples_per_s": per_domain, "tasks": tasks, "sandbox": sandbox,
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "load_avg_1m": round(os.getloadavg()[0], 2)}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
