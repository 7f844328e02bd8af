"""Learner throughput: train tokens/s and peak memory of ``Learner.train_step`` per model and precision.

    python bench/learner.py                                  # tiny-random and SmolLM2-135M, fp32 and bf16
    python bench/learner.py --models tiny-random --steps 5 --json runs/bench-learner.json

Each (model, precision) runs in its own process so that its peak memory is its own: the model and its
reference are loaded, one warm-up step is taken, then ``--steps`` timed steps on a fixed batch of random
token ids (prompt and response lengths vary around the given means, as real groups do). Precisions:

- ``fp32``: float32 weights, no autocast (the CPU default);
- ``bf16-autocast``: float32 master weights, forward/backward under bf16 autocast (the CUDA default);
- ``bf16``: bfloat16 weights and AdamW state (least memory; updates below bf16 resolution are lost).

Train tokens/s counts prompt + response tokens through forward and backward (the reference's no-grad
forward included); response tokens/s, the ones in the loss, are reported too. Peak memory is the process's
peak RSS on CPU (model load included) and ``torch.cuda.max_memory_allocated`` on CUDA. The machine's
load average is printed, because other processes on a shared machine change the numbers.
``--json PATH`` writes everything with top-level ``train_tokens_per_s`` keyed by model name, at the
default precision of the device (fp32 on CPU, bf16-autocast on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

PRECISIONS = {
    "fp32": {"model": {"dtype": "float32"}, "learner": {"autocast": "off"}},
    "bf16-autocast": {"model": {"dtype": "float32"}, "learner": {"autocast": "bfloat16"}},
    "bf16": {"model": {"dtype": "bfloat16"}, "learner": {"autocast": "off"}},
}
# (groups, group size, mean prompt tokens, mean response tokens) per model: a step of a few seconds.
BATCHES = {"tiny-random": (8, 8, 48, 160), "smollm2-135m-instruct": (1, 8, 48, 128)}
DEFAULT_BATCH = (4, 8, 48, 128)


def _machine() -> dict:
    from prorl_async.learner import available_cores

    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": available_cores(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0]}


def _batch(model: str, vocab: int, seed: int = 0):
    import torch

    from prorl_async.learner import TrainBatch, TrainSample

    groups, group_size, prompt_mean, response_mean = BATCHES.get(model, DEFAULT_BATCH)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(groups * group_size):
        n_prompt = prompt_mean  # one prompt per group in real batches; the length matters, not the ids
        n_resp = int(torch.randint(response_mean // 2, response_mean * 3 // 2 + 1, (1,), generator=g))
        resp = torch.randint(4, vocab, (n_resp,), generator=g).tolist()
        behav = (-torch.rand(n_resp, generator=g) * 3).tolist()
        samples.append(TrainSample(torch.randint(4, vocab, (n_prompt,), generator=g).tolist(), resp, behav,
                                   float(i % 2)))
    return TrainBatch(samples, group_size)


def run_one(model: str, precision: str, steps: int, device: str, threads: int) -> dict:
    """Time ``steps`` train steps of one (model, precision) in this process."""
    import torch

    from prorl_async.config import Config
    from prorl_async.learner import Learner

    groups, group_size, _, _ = BATCHES.get(model, DEFAULT_BATCH)
    data = {
        "model": {"name": model, **PRECISIONS[precision]["model"]},
        "sampling": {"group_size": group_size},
        "learner": {"batch_groups": groups, "device": device, "num_threads": threads,
                    **PRECISIONS[precision]["learner"]},
        "optim": {"lr": 1e-6},
        "loss": {"kl_beta": 1e-4},
    }
    cfg = Config.model_validate(data)
    started = time.perf_counter()
    learner = Learner(cfg)
    load_s = time.perf_counter() - started
    batch = _batch(model, learner.policy.lm.config.vocab_size)
    rss_loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if learner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    learner.train_step(batch)  # warm-up: allocator, optimizer state, kernels
    metrics = [learner.train_step(batch) for _ in range(steps)]
    elapsed = sum(m.step_time_s for m in metrics)
    total = sum(m.total_tokens for m in metrics)
    response = sum(m.tokens for m in metrics)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if learner.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "model": model,
        "precision": precision,
        "device": str(learner.device),
        "threads": torch.get_num_threads(),
        "params_m": sum(p.numel() for p in learner.policy.parameters()) / 1e6,
        "samples_per_step": len(batch.samples),
        "tokens_per_step": total / steps,
        "steps": steps,
        "step_time_s": elapsed / steps,
        "train_tokens_per_s": total / elapsed,
        "response_tokens_per_s": response / elapsed,
        "peak_memory_mb": peak_mb,
        "memory_after_load_mb": rss_loaded_mb if learner.device.type == "cpu" else None,
        "load_s": load_s,
        "final_loss": metrics[-1].loss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-random,smollm2-135m-instruct")
    parser.add_argument("--precisions", default="fp32,bf16-autocast,bf16")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every available core)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # child process: one measurement, as JSON on the last stdout line
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.device, args.threads)))
        return 0

    machine = _machine()
    print(f"# {machine['cpu']}, {machine['cores']} cores, gpu: {machine['gpu']}, torch {machine['torch']}, "
          f"load average {machine['load_avg_1m']:.1f}")
    header = f"{'model':24s} {'precision':14s} {'tok/step':>8s} {'step s':>7s} {'train tok/s':>11s} " \
             f"{'resp tok/s':>10s} {'peak MB':>8s}"
    print(header)
    results = []
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            cmd = [sys.executable, __file__, "--one", model, precision, "--steps", str(args.steps),
                   "--device", args.device, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{model:24s} {precision:14s} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{model:24s} {precision:14s} {r['tokens_per_step']:8.0f} {r['step_time_s']:7.2f} "
                  f"{r['train_tokens_per_s']:11.1f} {r['response_tokens_per_s']:10.1f} {r['peak_memory_mb']:8.0f}")
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    default = "bf16-autocast" if machine["gpu"] and args.device != "cpu" else "fp32"
    summary = {r["model"]: r["train_tokens_per_s"] for r in results if r["precision"] == default}
    if args.json:
        out = {"train_tokens_per_s": summary, "default_precision": default, "machine": machine, "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
