"""Start-up cost of a large data source: load time and memory of a 1M-row parquet in verl's schema.

    python bench/data_load.py [--rows 1000000] [--prompt-chars 200] [--json PATH]

Writes the parquet (``data_source``, ``prompt`` as a one-message chat list of ~``--prompt-chars`` characters,
``ability``, ``reward_model`` {style, ground_truth}, ``extra_info`` {split, index}) into a temporary directory, then
measures, each in a fresh process (as the learner and every generator start), with ``datasets``' cache in that
directory:

- ``cold``: the first load, which converts the parquet into the Arrow cache;
- ``warm``: a second process, which maps that cache (what the second and later processes of a run pay);

and, per process: the ``datasets`` import, ``check(spec)`` (open, resolve columns), the mix's start-up scan
(``TaskMix(...).train_size(0)``: held-out rows, the vectorised prompt scan), and the mean time of one
``train_problem`` (one row read and turned into a Task, 1,000 random rows); memory as ``VmRSS``, its anonymous
part (``RssAnon``: the process's own objects) and its file-backed part (``RssFile``: mapped pages, shared between
processes and reclaimable), and the peak (``VmHWM``).

``--json PATH`` writes ``{"rows", "file_mb", "cache_mb", "cold": {...}, "warm": {...}, "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = ("apple", "train", "seven", "number", "integer", "sum", "product", "twelve", "river", "bridge", "total",
         "fraction", "remainder", "price", "dozen", "minutes", "speed", "distance", "ratio", "percent")


def write_parquet(path: Path, rows: int, prompt_chars: int, seed: int = 0) -> None:
    """``rows`` rows in verl's schema, written in row groups of 100k (a few seconds per million rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    schema = None
    writer = None
    for start in range(0, rows, 100_000):
        count = min(100_000, rows - start)
        prompts, truths = [], []
        for i in range(start, start + count):
            words = " ".join(rng.choice(WORDS) for _ in range(prompt_chars // 6))
            prompts.append([{"role": "user", "content": f"Problem {i}: {words}"[:prompt_chars]}])
            truths.append(str(rng.randrange(10_000)))
        table = pa.table({
            "data_source": ["openai/gsm8k"] * count,
            "prompt": prompts,
            "ability": ["math"] * count,
            "reward_model": [{"style": "rule", "ground_truth": t} for t in truths],
            "extra_info": [{"split": "train", "index": i} for i in range(start, start + count)],
        })
        if writer is None:
            schema = table.schema
            writer = pq.ParquetWriter(path, schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def memory() -> dict[str, float]:
    """This process's VmRSS, RssAnon, RssFile and VmHWM in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def child(path: str) -> dict:
    """One process's start-up over the data set (run in a fresh interpreter)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    result: dict = {"start": memory()}
    t0 = time.perf_counter()
    import datasets  # noqa: F401

    from prorl_async.config import TasksConfig, TaskSpec
    from prorl_async.envs.data import check
    from prorl_async.envs.tasks import TaskMix

    result["import_s"] = round(time.perf_counter() - t0, 3)
    result["after_import"] = memory()
    spec = TaskSpec(source={"path": path})
    t0 = time.perf_counter()
    source = check(spec)
    result["open_s"] = round(time.perf_counter() - t0, 3)
    result["after_open"] = memory()
    t0 = time.perf_counter()
    mix = TaskMix(TasksConfig(mix=[spec], validation_size=64))
    size = mix.train_size(0)
    result["mix_startup_s"] = round(time.perf_counter() - t0, 3)
    result["after_mix"] = memory()
    rng = random.Random(1)
    picks = [rng.randrange(size) for _ in range(1000)]
    t0 = time.perf_counter()
    for j in picks:
        mix.train_problem(0, j)
    result["train_problem_us"] = round((time.perf_counter() - t0) / len(picks) * 1e6, 1)
    result["after_problems"] = memory()
    result.update(rows=source.num_rows, train_size=size,
                  cache_files=[f["filename"] for f in source.dataset.cache_files])
    return result


def run_child(path: Path, cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--prompt-chars", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return 0

    from common import describe, machine_info

    info = machine_info()
    print(f"machine: {describe(info)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="prorl-data-bench-") as tmp:
        path, cache = Path(tmp) / "train.parquet", Path(tmp) / "hf-cache"
        t0 = time.perf_counter()
        write_parquet(path, args.rows, args.prompt_chars)
        file_mb = path.stat().st_size / 2**20
        print(f"wrote {args.rows:,} rows ({file_mb:.0f} MiB parquet) in {time.perf_counter() - t0:.1f} s", flush=True)
        results = {"cold": run_child(path, cache), "warm": run_child(path, cache)}
        cache_mb = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
    print(f"{'':6s} {'import s':>9s} {'open s':>8s} {'scan s':>8s} {'row us':>8s} {'RSS MiB':>8s} {'anon':>8s} "
          f"{'file':>8s} {'peak':>8s}")
    for name, r in results.items():
        m = r["after_problems"]
        times = f"{r['import_s']:9.2f} {r['open_s']:8.2f} {r['mix_startup_s']:8.2f} {r['train_problem_us']:8.0f}"
        print(f"{name:6s} {times} {m['VmRSS']:8.0f} {m['RssAnon']:8.0f} {m['RssFile']:8.0f} {m['VmHWM']:8.0f}")
    base = {name: r["after_import"]["VmRSS"] for name, r in results.items()}
    print(f"Arrow cache {cache_mb:.0f} MiB; RSS after the imports, before any data: cold {base['cold']:.0f} MiB, "
          f"warm {base['warm']:.0f} MiB")
    report = {"rows": args.rows, "prompt_chars": args.prompt_chars, "file_mb": round(file_mb, 1),
              "cache_mb": round(cache_mb, 1), **results, "machine": info}
    print(json.dumps({k: v for k, v in report.items() if k not in ("cold", "warm")} | {
        "cold_open_s": results["cold"]["open_s"], "warm_open_s": results["warm"]["open_s"],
        "warm_mix_startup_s": results["warm"]["mix_startup_s"]}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
