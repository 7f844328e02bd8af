"""What every bench script reports about where it ran (CPU model, cores, load, GPU, versions), and shared timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """The machine a measurement was taken on (load included: these machines are shared and noisy)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or platform.machine())
    info: dict[str, Any] = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "load_avg_1m": os.getloadavg()[0],
                            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def describe(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return f"{info['cpu']}, {info['cores']} cores (load {info['load_avg_1m']:.1f}){gpu}"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, after one warm-up call that is not counted."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def checkpoint_weights(folder: Path, dtype: Any) -> dict[str, Any]:
    """Every tensor of a model folder's safetensors files (checkpoint names), converted to ``dtype``."""
    from safetensors.torch import load_file

    return {k: v.to(dtype) for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def grouped_batch(groups: int, group_size: int, prompt_tokens: int, response_range: tuple[int, int], vocab: int,
                  seed: int = 0):
    """Random token ids, one prompt per group as in real batches; response lengths uniform in ``response_range``."""
    import torch

    from prorl_async.learner.batch import build_batch
    from prorl_async.transport.messages import Sample, TrajectoryGroup

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(groups):
        prompt = torch.randint(4, vocab, (prompt_tokens,), generator=g).numpy()
        samples = []
        for j in range(group_size):
            n_resp = int(torch.randint(response_range[0], response_range[1] + 1, (1,), generator=g))
            resp = torch.randint(4, vocab, (n_resp,), generator=g).numpy()
            behav = (-torch.rand(n_resp, generator=g) * 3).numpy()
            samples.append(Sample(resp, behav, [0] * n_resp, "stop", float(j % 2)))
        out.append(TrajectoryGroup(prompt_id=f"bench-{k}", task="bench", domain="bench", prompt_token_ids=prompt,
                                   samples=samples, generator_id=0, seq=k))
    return build_batch(out)
