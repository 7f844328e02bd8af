"""FSDP2 on two gloo ranks (real processes): a split batch gives the same update as one rank on the whole.

The test runs this file as a script once per rank (``python test_learner_fsdp.py RANK WORLD PORT OUT``):
each rank trains on :func:`skewed_batch`, checkpoints after step 1, takes step 2, then resumes from the
checkpoint and takes step 2 again; rank 0 writes the metrics, the gradients of step 1 and the weights.
The test process does the same on one rank and compares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from test_learner import group_of, tiny_config

from prorl_async.config import Config
from prorl_async.learner.batch import GroupBatch, build_batch
from prorl_async.learner.trainer import Learner


def fsdp_config() -> Config:
    return tiny_config(learner={"micro_batch_tokens": 32, "num_threads": 1})


def skewed_batch(seed: int) -> GroupBatch:
    """Three groups of four; one long sample, so the ranks get different numbers of micro-batches (1 and 2: the
    rank with the long one runs a weight-0 filler).

    Prefix-shared rows; group 0 is split in two by the 32-token budget (its 50-token response alone).
    """
    g = torch.Generator().manual_seed(seed)
    groups = []
    for k in range(3):
        prompt = torch.randint(4, 1024, (4,), generator=g)
        lens = [50 if 4 * k + j == 0 else int(torch.randint(2, 5, (1,), generator=g)) for j in range(4)]
        responses = [torch.randint(4, 1024, (n,), generator=g) for n in lens]
        behaviours = [-6.9 + 0.3 * torch.randn(n, generator=g) for n in lens]
        groups.append(group_of(prompt, responses, behaviours, [float((4 * k + j) % 3 == 0) for j in range(4)], seq=k))
    return build_batch(groups)


def grads(learner: Learner) -> dict[str, torch.Tensor]:
    """The last step's gradients by HF name, gathered in full."""
    full = {}
    for name, p in learner.policy.lm.named_parameters():
        g = p.grad
        full[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return full


def _rank_main(rank: int, world: int, port: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    try:
        cfg = fsdp_config()
        learner = Learner(cfg)
        m1 = learner.train_step(skewed_batch(1))
        g1 = grads(learner)
        learner.save_checkpoint(out / "ckpt")
        m2 = learner.train_step(skewed_batch(2))
        resumed = Learner.load_checkpoint(out / "ckpt", cfg)
        m2_resumed = resumed.train_step(skewed_batch(2))
        tensors = {f"grad/{k}": v for k, v in g1.items()}
        tensors |= {f"weight/{k}": v.clone() for k, v in learner.weights()}
        tensors |= {f"resumed/{k}": v.clone() for k, v in resumed.weights()}
        if rank == 0:
            (out / "metrics.json").write_text(json.dumps([m.as_dict() for m in (m1, m2, m2_resumed)]))
            save_file(tensors, out / "tensors.safetensors")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(out: Path) -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, str(rank), "2", str(port), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:  # only the processes this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]


def test_two_ranks_match_one_rank(tiny_model_dir, tmp_path):
    _run_two_ranks(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    tensors = load_file(tmp_path / "tensors.safetensors")

    single = Learner(fsdp_config())
    m1 = single.train_step(skewed_batch(1))
    g1 = grads(single)
    m2 = single.train_step(skewed_batch(2))

    for key in ("loss", "pg_loss", "kl", "tokens", "entropy", "ess", "clip_frac_low", "clip_frac_high"):
        assert metrics[0][key] == pytest.approx(getattr(m1, key), rel=1e-5, abs=1e-7), key
        assert metrics[1][key] == pytest.approx(getattr(m2, key), rel=1e-5, abs=1e-7), key
        assert metrics[2][key] == pytest.approx(getattr(m2, key), rel=1e-5, abs=1e-7), key  # resumed under FSDP
    assert metrics[0]["grad_norm"] == pytest.approx(m1.grad_norm, rel=1e-5)
    for name, g in g1.items():
        torch.testing.assert_close(tensors[f"grad/{name}"], g, rtol=1e-4, atol=1e-7)
    for name, w in single.weights():
        # Adam's first steps move each weight by ~lr whatever the gradient's size: compare at a fraction of lr.
        torch.testing.assert_close(tensors[f"weight/{name}"], w, rtol=0, atol=2e-5)
        torch.testing.assert_close(tensors[f"resumed/{name}"], w, rtol=0, atol=2e-5)
    ckpt = load_file(tmp_path / "ckpt" / "policy" / "model.safetensors")
    assert set(ckpt) == {name for name, _ in single.policy.lm.named_parameters()}  # as transformers saves it


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
