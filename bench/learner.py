"""Learner throughput: train tokens/s and peak memory of ``Learner.train_step`` per model and precision,
and the speed-up of prefix sharing (``learner.share_prompt``) on the default run's batch shape.

    python bench/learner.py                                  # tiny-random and SmolLM2-135M, fp32 and bf16
    python bench/learner.py --models tiny-random --steps 5 --json runs/bench-learner.json
    python bench/learner.py --sharing --json runs/bench-learner-sharing.json   # shared vs unshared

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

``--sharing`` instead times one step of ``configs/default.toml``'s learner (its batch: ``batch_groups`` x
``group_size`` samples, here 8 x 8, every sample of a group with the same ``--prompt-tokens`` prompt and
``sampling.max_response_tokens`` response tokens) three ways per model: ``shared`` (the default),
``shared-per-group`` (the budget set to one group's row, so a micro-batch is one group: the other way to
batch groups whose prompts differ in length) and ``unshared`` (``share_prompt = false``, one row per
sample). Token counts are the same for all three (each sample's prompt + response; ``forward tokens``
is what the forward actually ran); the table gives step seconds, tokens/s and the ratio to unshared,
and the CPU seconds the process used per step (all its threads): on a machine shared with other jobs
the wall time mostly says how much CPU the step was given, the CPU time how much work it did.
The warm-up is a one-group step (optimizer state, allocator), not a full step: a full unshared step of
SmolLM2-135M takes minutes on 2 cores. ``--json`` then writes ``sharing`` keyed by model and path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, grouped_batch, machine_info

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRECISIONS = {
    "fp32": {"model": {"dtype": "float32"}, "learner": {"autocast": "off"}},
    "bf16-autocast": {"model": {"dtype": "float32"}, "learner": {"autocast": "bfloat16"}},
    "bf16": {"model": {"dtype": "bfloat16"}, "learner": {"autocast": "off", "master_dtype": "bfloat16"}},
}
# (groups, group size, mean prompt tokens, mean response tokens) per model: a step of a few seconds.
BATCHES = {"tiny-random": (8, 8, 48, 160), "smollm2-135m-instruct": (1, 8, 48, 128)}
DEFAULT_BATCH = (4, 8, 48, 128)


def _machine() -> dict:
    from prorl_async.learner.trainer import available_cores

    return {**machine_info(), "usable_cores": available_cores()}


def _batch(model: str, vocab: int, seed: int = 0):
    groups, group_size, prompt_mean, response_mean = BATCHES.get(model, DEFAULT_BATCH)
    return grouped_batch(groups, group_size, prompt_mean, (response_mean // 2, response_mean * 3 // 2), vocab, seed)


SHARING_PATHS = ("shared", "shared-per-group", "unshared")


def scale_main(args: argparse.Namespace, machine: dict) -> int:
    """``--scale``: the GPU-scale matrix (``bench/_learner_scale.py``), one process per case; table and --json."""
    import _learner_scale as scale

    cases = [c for c in scale.CASES if _wanted(c.arch, args.archs) and _wanted(str(c.seq), args.seqs)
             and _wanted(c.layout, args.layouts) and _wanted(c.setup, args.setups)]
    fits = [int(r) for r in args.paper_fit.split(",") if r] if args.paper_fit else []
    common = ["--steps", str(args.steps), "--models-dir", args.models_dir, *(["--shrink"] if args.shrink else []),
              *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []),
              *[a for s in args.set for a in ("--set", s)]]
    print(scale.HEADER)
    results = []
    jobs = [["--one-scale", c.arch, c.layout, c.setup, str(c.seq), str(c.groups), str(c.group_size)] for c in cases]
    jobs += [["--one-paper-fit", str(r)] for r in fits]
    for job in jobs:
        r = _child([*job, *common])
        if isinstance(r, str):
            print(f"{' '.join(job[1:]):60s} FAILED: {r}", flush=True)
            continue
        results.append(r)
        print(scale.format_row(r), flush=True)
        print(scale.format_phases(r), flush=True)
        if args.json:  # after every case: a run cut short keeps what it measured
            machine["load_avg_1m_end"] = os.getloadavg()[0]
            scale.dump(args.json, {"machine": machine, "overrides": args.set, "shrunk": args.shrink,
                                   "results": results})
    return 0 if len(results) == len(jobs) else 1


def _wanted(value: str, chosen: str | None) -> bool:
    return chosen is None or value in chosen.split(",")


def _one_scale(args: argparse.Namespace) -> dict:
    """Child process of --scale: write the architecture's random model once, then measure one case."""
    import _learner_scale as scale

    shrink = scale.SHRINK_FACTOR if args.shrink else 1  # rows and budgets this many times shorter
    if args.one_scale:
        arch, layout, setup, seq, groups, group_size = args.one_scale
        case = scale.Case(arch, layout, setup, int(seq) // shrink, int(groups), int(group_size))
    else:
        arch = "r1-distill-qwen-1.5b"
    model_dir = Path(args.models_dir) / (arch + ("-shrunk" if args.shrink else ""))
    scale.write_random_model(arch, model_dir, args.shrink)
    if args.one_scale:
        return scale.run_case(model_dir, case, args.steps, args.set, args.peak_tflops, args.shrink)
    return scale.run_paper_fit(model_dir, int(args.one_paper_fit) // shrink, args.steps, args.set, args.peak_tflops,
                               args.shrink)


def run_sharing(model: str, path: str, steps: int, threads: int, prompt_tokens: int) -> dict:
    """Time ``steps`` train steps of the default config's learner on ``model`` along ``path``, in this process."""
    import torch

    from prorl_async.config import load_config
    from prorl_async.learner.trainer import Learner

    base = load_config()  # configs/default.toml
    group_size, groups, resp = base.sampling.group_size, base.learner.batch_groups, base.sampling.max_response_tokens
    overrides = [f"model.name={model}", "learner.device=cpu", f"learner.num_threads={threads}"]
    if path == "unshared":
        overrides.append("learner.share_prompt=false")
    if path == "shared-per-group":
        overrides.append(f"learner.micro_batch_tokens={prompt_tokens + group_size * resp}")
    cfg = load_config(overrides=overrides)
    started = time.perf_counter()
    learner = Learner(cfg)
    load_s = time.perf_counter() - started
    vocab = learner.policy.lm.config.vocab_size
    batch = grouped_batch(groups, group_size, prompt_tokens, (resp, resp), vocab)
    learner.train_step(grouped_batch(1, group_size, prompt_tokens, (resp, resp), vocab, seed=1))  # warm-up
    cpu_start = time.process_time()
    metrics = [learner.train_step(batch) for _ in range(steps)]
    cpu_s = time.process_time() - cpu_start
    elapsed = sum(m.step_time_s for m in metrics)
    return {
        "model": model,
        "path": path,
        "cpu_s_per_step": cpu_s / steps,
        "threads": torch.get_num_threads(),
        "micro_batch_tokens": cfg.learner.micro_batch_tokens,
        "samples_per_step": batch.num_samples,
        "prompt_tokens": prompt_tokens,
        "response_tokens": resp,
        "steps": steps,
        "tokens_per_step": metrics[0].total_tokens,
        "response_tokens_per_step": metrics[0].tokens,
        "forward_tokens_per_step": metrics[0].forward_tokens,
        "step_time_s": elapsed / steps,
        "train_tokens_per_s": sum(m.total_tokens for m in metrics) / elapsed,
        "response_tokens_per_s": sum(m.tokens for m in metrics) / elapsed,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_s": load_s,
        "loss": metrics[-1].loss,
    }


def _child(args: list[str]) -> dict | str:
    """Run this script with ``args`` in a fresh process; its result (last stdout line) or the error's last line."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sharing_main(args: argparse.Namespace, machine: dict) -> int:
    """Shared vs unshared on the default batch shape, one process per (model, path); table and --json."""
    print(f"{'model':24s} {'path':17s} {'tok/step':>8s} {'fwd tok':>7s} {'step s':>7s} {'train tok/s':>11s} "
          f"{'resp tok/s':>10s} {'speed-up':>8s} {'cpu s':>7s} {'cpu ratio':>9s} {'peak MB':>8s}")
    out: dict[str, dict] = {}
    for model in args.models.split(","):
        rows: dict[str, dict] = {}
        for path in [p for p in reversed(SHARING_PATHS) if p in args.paths.split(",")]:  # unshared first
            r = _child(["--one-sharing", model, path, "--steps", str(args.steps), "--threads", str(args.threads),
                        "--prompt-tokens", str(args.prompt_tokens)])
            if isinstance(r, str):
                print(f"{model:24s} {path:17s} FAILED: {r}")
                continue
            base = rows.get("unshared")
            r["speedup_vs_unshared"] = base["step_time_s"] / r["step_time_s"] if base else None
            r["cpu_ratio_vs_unshared"] = base["cpu_s_per_step"] / r["cpu_s_per_step"] if base else None
            rows[path] = r
            speedup = f"{r['speedup_vs_unshared']:7.2f}x" if base else f"{'-':>8s}"
            cpu_ratio = f"{r['cpu_ratio_vs_unshared']:8.2f}x" if base else f"{'-':>9s}"
            print(f"{model:24s} {path:17s} {r['tokens_per_step']:8.0f} {r['forward_tokens_per_step']:7.0f} "
                  f"{r['step_time_s']:7.2f} {r['train_tokens_per_s']:11.1f} {r['response_tokens_per_s']:10.1f} "
                  f"{speedup} {r['cpu_s_per_step']:7.1f} {cpu_ratio} {r['peak_memory_mb']:8.0f}", flush=True)
        out[model] = rows
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    print(f"# load average at the end {machine['load_avg_1m_end']:.1f}")
    if args.json:
        ratios = {m: rows["shared"]["speedup_vs_unshared"] for m, rows in out.items()
                  if "shared" in rows and "unshared" in rows}
        doc = {"sharing": out, "shared_speedup": ratios, "machine": machine}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(len(rows) == len(args.paths.split(",")) for rows in out.values()) else 1


def run_one(model: str, precision: str, steps: int, device: str, threads: int) -> dict:
    """Time ``steps`` train steps of one (model, precision) in this process."""
    import torch

    from prorl_async.config import Config
    from prorl_async.learner.trainer import Learner

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
        "samples_per_step": batch.num_samples,
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
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps after one warm-up step (default 2, with --sharing 1)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every available core)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--sharing", action="store_true",
                        help="shared vs unshared prompts on configs/default.toml's batch shape (CPU, fp32)")
    parser.add_argument("--prompt-tokens", type=int, default=165, help="--sharing: prompt length of every group")
    parser.add_argument("--paths", default=",".join(SHARING_PATHS), help="--sharing: which of " + ", ".join(
        SHARING_PATHS))
    scale = parser.add_argument_group("--scale: real architectures at long sequences, MFU (bench/_learner_scale.py)")
    scale.add_argument("--scale", action="store_true", help="time the GPU-scale matrix instead")
    scale.add_argument("--archs", help="only these architectures (qwen3-0.6b, r1-distill-qwen-1.5b; none: no case, "
                       "only --paper-fit)")
    scale.add_argument("--seqs", help="only these row lengths (16384, 65536)")
    scale.add_argument("--layouts", help="only these layouts (sequence, packed)")
    scale.add_argument("--setups", help="only these loss setups (bare, prorl)")
    scale.add_argument("--paper-fit", default="8192,16384", metavar="TOKENS",
                       help="configs/prorl-1.5b.toml's learner at these response lengths ('' for none)")
    scale.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a config override for every case (repeatable), e.g. learner.gradient_checkpointing=false")
    scale.add_argument("--shrink", action="store_true",
                       help="tiny versions of the architectures, rows 16x shorter: checks every path on a CPU")
    scale.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, when it is not an H100/H200")
    scale.add_argument("--models-dir", default="/tmp/prorl-scale-models", help="where the random models are kept")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--one-scale", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--one-paper-fit", help=argparse.SUPPRESS)
    parser.add_argument("--one-sharing", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 1 if args.sharing or args.one_sharing or args.scale or args.one_scale or args.one_paper_fit else 2
    if args.one:  # child process: one measurement, as JSON on the last stdout line
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.device, args.threads)))
        return 0
    if args.one_sharing:
        model, path = args.one_sharing
        print(json.dumps(run_sharing(model, path, args.steps, args.threads, args.prompt_tokens)))
        return 0
    if args.one_scale or args.one_paper_fit:
        print(json.dumps(_one_scale(args)))
        return 0

    machine = _machine()
    print(f"# {describe(machine)}, torch {machine.get('torch')}")
    if args.sharing:
        return sharing_main(args, machine)
    if args.scale:
        return scale_main(args, machine)
    header = f"{'model':24s} {'precision':14s} {'tok/step':>8s} {'step s':>7s} {'train tok/s':>11s} " \
             f"{'resp tok/s':>10s} {'peak MB':>8s}"
    print(header)
    results = []
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            r = _child(["--one", model, precision, "--steps", str(args.steps), "--device", args.device,
                        "--threads", str(args.threads)])
            if isinstance(r, str):
                print(f"{model:24s} {precision:14s} FAILED: {r}")
                continue
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
