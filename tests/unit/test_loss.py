"""The ProRL loss against hand-computed values, and its gradients against a naive per-token version.

Every test runs twice, with the KL term's sums from the PyTorch reference and from the fused native op
(``learner.ops``); test_loss_native.py compares the two paths with each other directly.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from prorl_async.algo import native as _native
from prorl_async.algo.loss import merge_stats, prorl_loss, token_logprobs
from prorl_async.config import LossConfig

LN = math.log


def use_ops(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Set the dispatch mode as ``learner.ops`` would; native loads the extension (a build failure fails).

    Skips only where there is no C++ compiler and no cached build.
    """
    if mode == "native":
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None and not _native.build_dir().joinpath(f"{_native.LIBRARY_NAME}.so").is_file():
            pytest.skip(f"no C++ compiler ({cxx}) and no cached build of the native ops")
        _native.load()
    monkeypatch.setattr(_native, "_configured", mode)
    monkeypatch.setattr(_native, "_decisions", {})


@pytest.fixture(autouse=True, params=["reference", "native"])
def ops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The KL path of every test in this module: the PyTorch reference, then the native op."""
    use_ops(monkeypatch, request.param)
    return request.param


def _one_token(ratio: float, adv: float, *, is_weight: float = 1.0, **cfg_kw) -> tuple[torch.Tensor, dict, float]:
    """Loss, stats and d loss / d logp for a single token with the given ratio, advantage and IS weight."""
    logp = torch.tensor([[LN(ratio)]], requires_grad=True)
    old = torch.zeros(1, 1)
    behav = torch.full((1, 1), -LN(is_weight))  # old - behav = ln(is_weight)
    loss, stats = prorl_loss(
        logp, old, behav, None, torch.tensor([adv]), torch.ones(1, 1, dtype=torch.bool), LossConfig(**cfg_kw)
    )
    loss.backward()
    return loss, stats, logp.grad.item()


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "grad", "low", "high"),
    [
        (1.2, 1.0, -1.2, -1.2, 0, 0),  # inside the range: -r A, d/dlogp = -r A
        (1.3, 1.0, -1.3, -1.3, 0, 0),  # above 1 + 0.2 but inside clip-higher's 1 + 0.4
        (2.0, 1.0, -1.4, 0.0, 0, 1),  # clipped high: constant, no gradient
        (2.0, -1.0, 2.0, 2.0, 0, 0),  # A < 0: the high clip never binds (min picks r A)
        (0.5, -1.0, 0.8, 0.0, 1, 0),  # clipped low: -(1 - 0.2) A, no gradient
        (0.7, -1.0, 0.8, 0.0, 1, 0),  # 0.7 < 0.8: still clipped low
        (0.5, 1.0, -0.5, -0.5, 0, 0),  # A > 0: the low clip never binds
        (1.7, 0.0, 0.0, 0.0, 0, 0),  # zero advantage: no loss, no gradient
    ],
)
def test_decoupled_clip(ratio, adv, loss, grad, low, high):
    value, stats, g = _one_token(ratio, adv)
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert g == pytest.approx(grad, abs=1e-6)
    assert (stats["clip_frac_low"], stats["clip_frac_high"]) == (low, high)


@pytest.mark.parametrize(
    ("mode", "weight", "expected_w", "corrected"),
    [
        ("truncated", 3.0, 2.0, 1.0),  # min(3, C = 2)
        ("truncated", 1.5, 1.5, 0.0),
        ("none", 3.0, 1.0, 0.0),
        ("decoupled", 1.5, 1.5, 0.0),  # untruncated below C ...
        ("decoupled", 3.0, 0.0, 1.0),  # ... and dropped above it
    ],
)
def test_importance_weight(mode, weight, expected_w, corrected):
    value, stats, g = _one_token(1.1, 1.0, is_weight=weight, is_correction=mode)
    assert value.item() == pytest.approx(-1.1 * expected_w, rel=1e-6)
    assert g == pytest.approx(-1.1 * expected_w, rel=1e-6)
    assert stats["is_truncated_frac"] == corrected


def test_importance_weight_has_no_gradient():
    old = torch.zeros(1, 2, requires_grad=True)
    behav = torch.full((1, 2), -0.3, requires_grad=True)
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = prorl_loss(logp, old, behav, None, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), LossConfig())
    loss.backward()
    assert old.grad is None and behav.grad is None


def test_kl_term_k3():
    d = LN(2.0)  # ref - logp
    logp = torch.zeros(1, 1, requires_grad=True)
    ref = torch.full((1, 1), d)
    cfg = LossConfig(kl_beta=0.5)
    loss, stats = prorl_loss(logp, logp.detach(), logp.detach(), ref, torch.zeros(1), torch.ones(1, 1, dtype=bool), cfg)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * (2.0 - d - 1.0), rel=1e-6)
    assert stats["kl"] == pytest.approx(2.0 - d - 1.0, rel=1e-6)
    assert stats["kl_share"] == 1.0  # zero advantage: the KL term is the whole loss
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = -exp(ref - logp) + 1 = -1
    assert logp.grad.item() == pytest.approx(0.5 * -1.0, rel=1e-6)


def test_mask_excludes_padding_even_when_it_holds_inf():
    logp = torch.tensor([[0.1, float("inf")], [-0.2, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    zeros = torch.zeros(2, 2)
    loss, stats = prorl_loss(logp, zeros, zeros, zeros, torch.tensor([1.0, -1.0]), mask, LossConfig(kl_beta=0.1))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
    assert logp.grad[:, 1].abs().sum() == 0
    assert stats["tokens"] == 2


def test_aggregation_token_vs_sequence():
    # Sample 0 has one token, sample 1 three; per-token pg = -r A with r = 1 and A = (1, 2).
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, 2.0])
    token, _ = prorl_loss(logp, logp, logp, None, adv, mask, LossConfig(aggregation="token"))
    seq, _ = prorl_loss(logp, logp, logp, None, adv, mask, LossConfig(aggregation="sequence"))
    assert token.item() == pytest.approx(-(1 + 2 * 3) / 4)
    assert seq.item() == pytest.approx(-(1 + 2) / 2)


def test_stats_ess_and_approx_kl():
    logp = torch.tensor([[LN(1.5), 0.0]])
    old = torch.zeros(1, 2)
    behav = torch.tensor([[-LN(2.0), 0.0]])  # raw IS weights (2, 1)
    _, stats = prorl_loss(logp, old, behav, None, torch.ones(1), torch.ones(1, 2, dtype=bool), LossConfig())
    assert stats["ess"] == pytest.approx((1.5**2) / 2.5)  # mean(w)^2 / mean(w^2)
    assert stats["approx_kl"] == pytest.approx(((1.5 - 1 - LN(1.5)) + 0) / 2, rel=1e-6)


def _random_inputs(seed: int, b: int = 3, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g) * 3).requires_grad_()
    old = logp.detach() + torch.randn(b, t, generator=g) * 0.4
    behav = old + torch.randn(b, t, generator=g) * 0.6
    ref = logp.detach() + torch.randn(b, t, generator=g) * 0.3
    adv = torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    return logp, old, behav, ref, adv, mask


def _naive_loss(logp, old, behav, ref, adv, mask, cfg: LossConfig):
    """The loss written token by token with Python floats where no gradient flows."""
    per_seq, total, count = [], 0.0, 0
    for i in range(logp.shape[0]):
        seq_total, n = 0.0, 0
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            raw = math.exp(old[i, t].item() - behav[i, t].item())
            w = {"none": 1.0, "truncated": min(raw, cfg.is_cap), "decoupled": raw if raw <= cfg.is_cap else 0.0}
            r = torch.exp(logp[i, t] - old[i, t].item())
            a = adv[i].item()
            pg = -w[cfg.is_correction] * torch.minimum(r * a, torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
            d = ref[i, t].item() - logp[i, t]
            term = pg + cfg.kl_beta * (torch.exp(d) - d - 1)
            seq_total, n = seq_total + term, n + 1
        total, count = total + seq_total, count + n
        per_seq.append(seq_total / n)
    return total / count if cfg.aggregation == "token" else sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("mode", ["none", "truncated", "decoupled"])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_gradients_match_naive_autograd(mode, aggregation):
    cfg = LossConfig(is_correction=mode, aggregation=aggregation, kl_beta=0.05)
    logp, old, behav, ref, adv, mask = _random_inputs(seed=hash((mode, aggregation)) % 1000)
    loss, _ = prorl_loss(logp, old, behav, ref, adv, mask, cfg)
    (grad,) = torch.autograd.grad(loss, logp)
    naive = _naive_loss(logp, old, behav, ref, adv, mask, cfg)
    (naive_grad,) = torch.autograd.grad(naive, logp)
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, naive_grad, rtol=1e-5, atol=1e-7)


def test_micro_batches_add_up_to_the_batch():
    cfg = LossConfig(kl_beta=0.05)
    logp, old, behav, ref, adv, mask = _random_inputs(seed=7, b=4)
    whole, whole_stats = prorl_loss(logp, old, behav, ref, adv, mask, cfg)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    denominator = float(mask.sum())
    parts, grads = [], []
    for rows in (slice(0, 1), slice(1, 4)):
        loss, stats = prorl_loss(
            logp[rows], old[rows], behav[rows], ref[rows], adv[rows], mask[rows], cfg, denominator=denominator
        )
        grads.append(torch.autograd.grad(loss, logp)[0])
        parts.append(stats)
    torch.testing.assert_close(grads[0] + grads[1], whole_grad)
    merged = merge_stats(parts)
    for key, value in whole_stats.items():
        if not math.isnan(value):
            assert merged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("temperature", [1.0, 1.2])
def test_chunked_logprobs_match_full_log_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    logp, entropy = token_logprobs(hidden, weight, targets, chunk_tokens=8, temperature=temperature, with_entropy=True)
    full = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    expected = full.gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1).detach())
    upstream = torch.randn(37, generator=g)
    got = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    want = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ kl_share


def _loss_share(stats: dict) -> float:
    """The former kl_share, on loss values: |kl_loss| / (|pg_loss| + |kl_loss|)."""
    return abs(stats["kl_loss"]) / (abs(stats["pg_loss"]) + abs(stats["kl_loss"]))


def _zero_mean_batch(drift: float, b: int = 4, t: int = 8, seed: int = 0):
    """On-policy (old = behav = logp), equal-length responses, advantages +-1 (zero mean), ref = logp + drift."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g) * 3).requires_grad_()
    adv = torch.tensor([1.0, -1.0] * (b // 2))
    ref = logp.detach() + drift * torch.randn(b, t, generator=g).abs()
    return logp, logp.detach(), logp.detach(), ref, adv, torch.ones(b, t, dtype=torch.bool)


def test_kl_share_is_small_when_the_kl_term_barely_moves_the_update():
    # Zero-mean advantages over equal lengths make the token-mean pg loss exactly 0, whatever the update:
    # the loss-value share called a beta = 1e-4 penalty with logp ~ ref the whole objective.
    logp, old, behav, ref, adv, mask = _zero_mean_batch(drift=0.01)
    _, stats = prorl_loss(logp, old, behav, ref, adv, mask, LossConfig(kl_beta=1e-4))
    assert stats["pg_loss"] == 0.0 and _loss_share(stats) == 1.0
    assert stats["kl_share"] < 0.05
    # Each token's pg gradient is -A r = -+1; its KL gradient beta (1 - exp(ref - logp)) is ~1e-6.
    assert stats["kl_share"] == pytest.approx(stats["grad_kl_abs_sum"] / (stats["grad_pg_abs_sum"]
                                                                          + stats["grad_kl_abs_sum"]))
    assert stats["grad_pg_abs_sum"] == pytest.approx(1.0)


def test_kl_share_is_large_when_a_strong_penalty_pulls_a_drifted_policy():
    logp, old, behav, ref, adv, mask = _zero_mean_batch(drift=2.0)
    _, stats = prorl_loss(logp, old, behav, ref, adv, mask, LossConfig(kl_beta=1.0))
    assert stats["kl_share"] > 0.5


@pytest.mark.parametrize("mode", ["none", "truncated", "decoupled"])
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_kl_share_sums_are_the_l1_norms_of_each_terms_logprob_gradient(mode, aggregation, on_policy):
    # Against autograd: d pg_loss / d logp from the loss without its KL term, d kl_loss / d logp the difference.
    # on_policy: old = logp, every ratio exactly 1 (a tie of the clip's min, which autograd splits 50/50).
    cfg = LossConfig(is_correction=mode, aggregation=aggregation, kl_beta=0.3)
    logp, old, behav, ref, adv, mask = _random_inputs(seed=5, b=4, t=6)
    if on_policy:
        old = logp.detach()
    full, stats = prorl_loss(logp, old, behav, ref, adv, mask, cfg)
    pg_only, _ = prorl_loss(logp, old, behav, None, adv, mask, cfg)
    (g_full,) = torch.autograd.grad(full, logp)
    (g_pg,) = torch.autograd.grad(pg_only, logp)
    assert on_policy or stats["clip_frac_low"] + stats["clip_frac_high"] > 0  # some tokens have no pg gradient
    assert stats["grad_pg_abs_sum"] == pytest.approx(g_pg.abs().sum().item(), rel=1e-5)
    assert stats["grad_kl_abs_sum"] == pytest.approx((g_full - g_pg).abs().sum().item(), rel=1e-4)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_merged_micro_batch_stats_give_the_batch_kl_share(aggregation):
    cfg = LossConfig(kl_beta=0.2, aggregation=aggregation)
    logp, old, behav, ref, adv, mask = _random_inputs(seed=9, b=5, t=7)
    mask[2] = False  # a fully masked row
    _, whole = prorl_loss(logp, old, behav, ref, adv, mask, cfg)
    denominator = float(mask.sum()) if aggregation == "token" else float((mask.sum(1) > 0).sum())
    parts = [
        prorl_loss(*(x[rows] for x in (logp, old, behav, ref, adv, mask)), cfg, denominator=denominator)[1]
        for rows in (slice(0, 2), slice(2, 3), slice(3, 5))
    ]
    merged = merge_stats(parts)
    for key in ("grad_pg_abs_sum", "grad_kl_abs_sum", "kl_share"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-5), key
    assert 0.0 < whole["kl_share"] < 1.0


# ------------------------------------------------------------------------------------------ extreme log-probs


@pytest.mark.parametrize("mode", ["none", "truncated", "decoupled"])
def test_infinite_importance_ratios_leave_loss_stats_and_gradients_finite(mode):
    # The generator clamps a -inf behaviour log-prob to -1e30: old - behav = 1e30 would make exp() inf and the
    # IS stats inf/NaN. The other extreme: behaviour 0, proximal very negative (exp underflows to 0).
    logp = torch.tensor([[-0.5, -1e30, -1.0, -2.0]], requires_grad=True)
    old = logp.detach()
    behav = torch.tensor([[-1e30, 0.0, -1.1, -2.0]])
    ref = logp.detach() + torch.tensor([[0.1, 0.0, -0.2, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = prorl_loss(logp, old, behav, ref, torch.tensor([1.0]), mask, LossConfig(is_correction=mode))
    (grad,) = torch.autograd.grad(loss, logp)
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()
    bad = {k: v for k, v in stats.items() if k != "entropy" and not math.isfinite(v)}  # entropy: nan, not given
    assert not bad
    assert 0.0 < stats["ess"] <= 1.0 and stats["is_truncated_frac"] == (0.0 if mode == "none" else 0.25)
    assert math.isfinite(merge_stats([stats, stats])["is_weight_sq_mean"])
