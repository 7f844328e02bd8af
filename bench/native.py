"""Native ops vs the PyTorch reference: CPU time (fused op, eager reference, torch.compile of the reference)
and, on a GPU, achieved memory bandwidth against the device's copy bandwidth measured in the same run.

    python bench/native.py [--quick] [--json PATH] [--dtype float32|bfloat16] [--threads N] [--no-compile]

Ops: ``group_advantage`` (one reward per row, groups of `samples`), ``kl_reduce`` forward, and ``kl_reduce`` forward +
backward (``kl_sum.backward()``), each through its public dispatcher (``prorl_async.algo.kl.kl_reduce`` in native
mode, Python overhead included) against ``*_reference`` eagerly and under ``torch.compile(dynamic=True)``.
Shapes: rows = prompts x samples, T = padded tokens per row, responses right-padded to a uniform random
length (about half the tokens masked), log-prob gaps ~ N(0, 0.3). Up to the paper's 256 prompts x 16
samples x 16k tokens (67M tokens, ~0.6 GB of inputs; the eager reference peaks near 3 GB).

Times are the best of interleaved runs (robust to bursts of other load on a shared machine; the load
average is recorded in the JSON). ``cpu_speedup_vs_eager`` is the lowest eager/native ratio over all ops and
shapes, every cost included; ``gpu_bandwidth_fraction`` the lowest achieved/copy bandwidth of the CUDA forward
and backward kernels at the shapes of >= 16M tokens (paper-4k, paper-16k).

The fwd+bwd rows also time ``backward call``: ``(x * 1).backward()`` on a scalar leaf, the fixed cost of
calling ``Tensor.backward()`` at all (torch.autograd.backward's Python wrapper and the engine's start),
interleaved with the two paths. Both paths pay it once per call here, while in the learner one backward
call serves the whole loss and model. ``speedup_excl_backward_call`` is (eager - call) / (native - call),
each op's own forward + backward; ``cpu_speedup_vs_eager_excl_backward_call`` its lowest over the shapes
(forward rows and group_advantage count as they are).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prorl_async.algo import native as _native
from prorl_async.algo.advantage import group_advantage, group_advantage_reference
from prorl_async.algo.kl import kl_reduce, kl_reduce_reference

# (name, prompts, samples, T)
SHAPES = [
    ("tiny", 2, 4, 64),
    ("small", 16, 8, 512),
    ("medium", 64, 16, 2048),
    ("paper-1k", 256, 16, 1024),
    ("paper-4k", 256, 16, 4096),
    ("paper-16k", 256, 16, 16384),
]
QUICK = 3  # --quick: the first three shapes


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_batch(rows: int, T: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, T, generator=gen) * 4
    ref = (logp + torch.randn(rows, T, generator=gen) * 0.3).clamp(max=0)
    mask = torch.arange(T) < torch.randint(1, T + 1, (rows,), generator=gen)[:, None]
    return logp.to(device, dtype), ref.to(device, dtype), mask.to(device)


def best_times_ms(
    impls: dict[str, Callable[[], object]], budget_s: float = 2.0, min_rounds: int = 5
) -> dict[str, float]:
    """Best wall time of each implementation in ms, measured in interleaved rounds (one call of each per
    round, after a warm-up call), so that a burst of load from other processes hits them all alike."""
    for fn in impls.values():
        fn()
    best = dict.fromkeys(impls, float("inf"))
    spent, rounds = 0.0, 0
    while rounds < min_rounds or (spent < budget_s and rounds < 500):
        for name, fn in impls.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            best[name], spent = min(best[name], elapsed), spent + elapsed
        rounds += 1
    return {name: seconds * 1e3 for name, seconds in best.items()}


def forward_backward(kl_fn: Callable, logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    leaf = logp.clone().requires_grad_()

    def run() -> None:
        leaf.grad = None
        kl_fn(leaf, ref, mask).kl_sum.backward()

    return run


def backward_call() -> Callable[[], None]:
    """The fixed cost of one ``Tensor.backward()`` call: a one-node graph on a scalar leaf."""
    leaf = torch.zeros((), requires_grad=True)

    def run() -> None:
        leaf.grad = None
        (leaf * 1.0).backward()

    return run


def forward(kl_fn: Callable, logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return kl_fn(logp, ref, mask)

    return run


def advantage(adv_fn: Callable, rewards: torch.Tensor, group_size: int) -> Callable[[], object]:
    return lambda: adv_fn(rewards, group_size)


def cpu_rows(shapes: list[tuple[str, int, int, int]], dtype: torch.dtype, compile_: bool) -> list[dict]:
    kl_impls = {"native": kl_reduce, "eager": kl_reduce_reference}
    adv_impls = {"native": group_advantage, "eager": group_advantage_reference}
    if compile_:
        kl_impls["compiled"] = torch.compile(kl_reduce_reference, dynamic=True)
        adv_impls["compiled"] = torch.compile(group_advantage_reference, dynamic=True)
    rows_out: list[dict] = []
    seen_rows: set[int] = set()
    for name, prompts, samples, T in shapes:
        rows = prompts * samples
        cases: list[tuple[str, dict[str, Callable[[], object]]]] = []
        if rows not in seen_rows:  # the advantage depends on the number of rewards only
            seen_rows.add(rows)
            rewards = (torch.rand(rows) < 0.5).float()
            cases.append(("group_advantage", {k: advantage(f, rewards, samples) for k, f in adv_impls.items()}))
        logp, ref, mask = make_batch(rows, T, dtype)
        cases.append(("kl_reduce fwd", {k: forward(f, logp, ref, mask) for k, f in kl_impls.items()}))
        fwd_bwd = {k: forward_backward(f, logp, ref, mask) for k, f in kl_impls.items()}
        cases.append(("kl_reduce fwd+bwd", {**fwd_bwd, "backward_call": backward_call()}))
        for op, impls in cases:
            times = best_times_ms(impls)
            row = {
                "op": op,
                "shape": name,
                "rows": rows,
                "T": T if op != "group_advantage" else None,
                **{f"{impl}_ms": round(ms, 4) for impl, ms in times.items()},
                "speedup_vs_eager": round(times["eager"] / times["native"], 2),
            }
            if "compiled" in times:
                row["speedup_vs_compiled"] = round(times["compiled"] / times["native"], 2)
            if "backward_call" in times:
                call = times["backward_call"]
                row["speedup_excl_backward_call"] = round((times["eager"] - call) / (times["native"] - call), 2)
            rows_out.append(row)
            print(_format_cpu(row), flush=True)
    return rows_out


def _format_cpu(row: dict) -> str:
    compiled = f"{row['compiled_ms']:10.3f}" if "compiled_ms" in row else f"{'-':>10}"
    vs_compiled = f"{row['speedup_vs_compiled']:8.2f}x" if "speedup_vs_compiled" in row else f"{'-':>9}"
    T = row["T"] if row["T"] is not None else "-"
    excl = ""
    if "backward_call_ms" in row:
        call, without = row["backward_call_ms"], row["speedup_excl_backward_call"]
        excl = f"   (backward() call {call:.3f} ms; without it {without:.2f}x)"
    return (
        f"{row['op']:<18} {row['shape']:<10} {row['rows']:>5} x {T!s:<6} {row['native_ms']:10.3f} "
        f"{row['eager_ms']:10.3f} {compiled} {row['speedup_vs_eager']:8.2f}x {vs_compiled}{excl}"
    )


def cuda_time_s(fn: Callable[[], object], runs: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(runs):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def gpu_rows(shapes: list[tuple[str, int, int, int]], dtype: torch.dtype) -> tuple[float, list[dict]]:
    """Copy bandwidth of the device, then each CUDA kernel's bytes moved / time as a fraction of it."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / cuda_time_s(functools.partial(dst.copy_, src)) / 1e9
    del src, dst
    print(f"\nGPU {torch.cuda.get_device_name()}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    out = []
    for name, prompts, samples, T in shapes:
        rows = prompts * samples
        logp, ref, mask = make_batch(rows, T, dtype, device="cuda")
        grad = torch.randn(rows, device="cuda")
        read = rows * T * (2 * logp.element_size() + 1)  # logp, ref_logp, mask
        cases = {
            "kl_reduce fwd": (functools.partial(torch.ops.prorl.kl_reduce, logp, ref, mask), read),
            "kl_reduce bwd": (
                functools.partial(torch.ops.prorl.kl_reduce_backward, grad, None, logp, ref, mask),
                read + rows * T * logp.element_size(),  # + grad_logp written
            ),
        }
        eager_s = cuda_time_s(functools.partial(kl_reduce_reference, logp, ref, mask), runs=5)
        for op, (fn, moved) in cases.items():
            seconds = cuda_time_s(fn)
            gbs = moved / seconds / 1e9
            row = {
                "op": op,
                "shape": name,
                "rows": rows,
                "T": T,
                "ms": round(seconds * 1e3, 4),
                "gb_per_s": round(gbs, 1),
                "fraction_of_copy": round(gbs / copy_gbs, 3),
                "eager_fwd_ms": round(eager_s * 1e3, 4),
            }
            out.append(row)
            print(
                f"{op:<15} {name:<10} {rows:>5} x {T:<6} {row['ms']:9.3f} ms {gbs:8.0f} GB/s "
                f"{row['fraction_of_copy']:6.1%} of copy   (eager reference fwd {row['eager_fwd_ms']:.3f} ms)"
            )
    return copy_gbs, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the small shapes (seconds, plus compile time)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES[:QUICK] if args.quick else SHAPES

    load_start = round(os.getloadavg()[0], 2)
    _native.configure("native")
    devices = _native.load()
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {args.dtype}; load average {load_start}; best of interleaved runs, ms"
    )
    print(
        f"{'op':<18} {'shape':<10} {'rows x T':<14} {'native':>10} {'eager':>10} {'compiled':>10} "
        f"{'vs eager':>9} {'vs compiled':>9}"
    )
    cpu = cpu_rows(shapes, dtype, compile_=not args.no_compile)
    result: dict = {
        "cpu_speedup_vs_eager": min(row["speedup_vs_eager"] for row in cpu),
        "cpu_speedup_vs_eager_excl_backward_call": min(
            row.get("speedup_excl_backward_call", row["speedup_vs_eager"]) for row in cpu
        ),
        "dtype": args.dtype,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "cpu_rows": cpu,
    }
    print(f"\ncpu_speedup_vs_eager (lowest over ops and shapes): {result['cpu_speedup_vs_eager']:.2f}x")
    print(
        "cpu_speedup_vs_eager_excl_backward_call (the same, fwd+bwd rows without the shared backward() call): "
        f"{result['cpu_speedup_vs_eager_excl_backward_call']:.2f}x"
    )
    if torch.cuda.is_available() and "cuda" in devices:
        # Bandwidth at the paper's long shapes (>= 16M tokens), where the launches' fixed cost is small.
        large = [s for s in shapes if s[1] * s[2] * s[3] >= 16_000_000] or shapes[-1:]
        copy_gbs, gpu = gpu_rows(large, dtype)
        result.update(
            copy_gb_per_s=round(copy_gbs, 1),
            gpu_rows=gpu,
            gpu_device=torch.cuda.get_device_name(),
            gpu_bandwidth_fraction=min(row["fraction_of_copy"] for row in gpu),
        )
        print(f"gpu_bandwidth_fraction (lowest at the large shapes): {result['gpu_bandwidth_fraction']:.1%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
