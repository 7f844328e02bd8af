"""The loss's KL term on the fused native op against the PyTorch reference path: values, gradients, stats.

test_loss.py runs all its checks on both paths; here the two paths meet in one test, on the edge cases
(a fully masked row, -inf padding, a single token, micro-batches sharing a denominator), and a test
checks that the switch really routes the KL through the op.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from prorl_async.algo import native as _native
from prorl_async.algo.kl import kl_reduce_reference
from prorl_async.algo.loss import merge_stats, prorl_loss
from prorl_async.config import LossConfig


def use_ops(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Set the dispatch mode as ``learner.ops`` would (as in test_loss.py; tests/unit is not a package)."""
    if mode == "native":
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None and not _native.build_dir().joinpath(f"{_native.LIBRARY_NAME}.so").is_file():
            pytest.skip(f"no C++ compiler ({cxx}) and no cached build of the native ops")
        _native.load()
    monkeypatch.setattr(_native, "_configured", mode)
    monkeypatch.setattr(_native, "_decisions", {})


def _inputs(seed: int, b: int, t: int):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(b, t, generator=g) * 0.4
    behav = old + torch.randn(b, t, generator=g) * 0.6
    ref = logp.detach() + torch.randn(b, t, generator=g) * 0.5
    adv = torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    return logp, old, behav, ref, adv, mask


@pytest.mark.parametrize("mode", ["reference", "native"])
def test_kl_goes_through_the_op_only_in_native_mode(monkeypatch, mode):
    use_ops(monkeypatch, mode)
    _native.load()  # kl_reduce_op exists once the library is loaded, whichever mode is set
    calls: list[int] = []
    op = _native.kl_reduce_op

    def counting(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(_native, "kl_reduce_op", counting)
    logp, old, behav, ref, adv, mask = _inputs(seed=3, b=3, t=5)
    prorl_loss(logp, old, behav, ref, adv, mask, LossConfig(kl_beta=0.1))
    prorl_loss(logp, old, behav, None, adv, mask, LossConfig(kl_beta=0.1))  # no reference model: no KL
    assert len(calls) == (1 if mode == "native" else 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("is_correction", ["none", "truncated", "decoupled"])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 300)])
def test_native_and_reference_paths_agree(monkeypatch, is_correction, aggregation, shape, device):
    cfg = LossConfig(is_correction=is_correction, aggregation=aggregation, kl_beta=0.3)
    inputs = _inputs(seed=sum(shape), b=shape[0], t=shape[1])
    logp = inputs[0].detach().to(device).requires_grad_()
    old, behav, ref, adv, mask = (t.to(device) for t in inputs[1:])
    if shape[0] > 1:
        mask[1] = False  # a fully masked row
    logp.data[~mask] = float("-inf")  # padding garbage must reach neither path
    denominator = float(max(mask.sum(), 1))
    results = {}
    for mode in ("reference", "native"):
        use_ops(monkeypatch, mode)
        losses, stats = [], []
        for rows in (slice(0, 1), slice(1, None)):  # two micro-batches sharing the denominator
            loss, part = prorl_loss(
                logp[rows], old[rows], behav[rows], ref[rows], adv[rows], mask[rows], cfg, denominator=denominator
            )
            losses.append(loss)
            stats.append(part)
        total = sum(losses)
        (grad,) = torch.autograd.grad(total, logp)
        results[mode] = (total.item(), grad, merge_stats(stats))
    (ref_loss, ref_grad, ref_stats), (nat_loss, nat_grad, nat_stats) = results["reference"], results["native"]
    assert nat_loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(nat_grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(nat_grad).all() and nat_grad[~mask].abs().sum() == 0
    assert nat_stats.keys() == ref_stats.keys()
    for key, value in ref_stats.items():
        if not math.isnan(value):
            assert nat_stats[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("mode", ["reference", "native"])
def test_kl_term_equals_the_k3_definition(monkeypatch, mode):
    # The KL part alone (zero advantages): beta * token mean of k3, against float64 sums, gaps of both signs
    # and up to 3 nats (the native op's series and exp branches both).
    use_ops(monkeypatch, mode)
    logp, old, behav, _, _, mask = _inputs(seed=11, b=4, t=9)
    ref = logp.detach() + torch.linspace(-3, 3, 36).view(4, 9)
    loss, stats = prorl_loss(logp, old, behav, ref, torch.zeros(4), mask, LossConfig(kl_beta=0.5))
    want = kl_reduce_reference(logp.detach().double(), ref.double(), mask)
    kl_mean = (want.kl_sum / want.tokens).item()
    assert loss.item() == pytest.approx(0.5 * kl_mean, rel=1e-6)
    assert stats["kl"] == pytest.approx(kl_mean, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    d = (ref - logp.detach()).double()
    want_grad = torch.where(mask, 0.5 * -torch.expm1(d) / want.tokens, 0.0)  # d k3 / d logp = -expm1(d)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-8)
