"""Reference resets: the pure policy, then the learner acting on it (reference copied, moments cleared)."""

from __future__ import annotations

import pytest
import torch
from test_learner import random_batch, tiny_config

from prorl_async.algo.loss import prorl_loss
from prorl_async.config import LossConfig, ResetConfig
from prorl_async.learner.reset import ResetPolicy
from prorl_async.learner.trainer import Learner


def _run(policy: ResetPolicy, shares: list[float]) -> list[tuple[int, str]]:
    """Feed one KL share per step and take every reset the policy asks for; the (step, reason) list."""
    resets = []
    for step, share in enumerate(shares, start=1):
        reason = policy.after_step(step, share)
        if reason:
            policy.mark_reset(step)
            resets.append((step, reason))
    return resets


def test_schedule_counts_from_the_last_reset():
    assert _run(ResetPolicy(ResetConfig(interval_steps=3)), [0.0] * 10) == [(3, "schedule"), (6, "schedule"),
                                                                             (9, "schedule")]
    assert _run(ResetPolicy(ResetConfig()), [0.9] * 10) == []  # every trigger off by default


def test_kl_share_needs_a_full_window_above_the_threshold():
    policy = ResetPolicy(ResetConfig(kl_share_threshold=0.5, kl_window_steps=3))
    shares = [0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    # window means: step 3 (0.63 > 0.5) resets; afterwards the window restarts empty: steps 4-6 fill it again.
    assert _run(policy, shares) == [(3, "kl_share"), (6, "kl_share"), (9, "kl_share")]
    quiet = ResetPolicy(ResetConfig(kl_share_threshold=0.5, kl_window_steps=3))
    assert _run(quiet, [0.9, 0.1, 0.1, 0.9, 0.1, 0.1]) == []


def test_validation_plateau_after_patience():
    policy = ResetPolicy(ResetConfig(val_patience_steps=4))
    policy.observe_validation(step=2, reward=0.30)
    assert policy.after_step(3, 0.0) is None
    policy.observe_validation(step=4, reward=0.35)  # improvement: the patience clock restarts at 4
    policy.observe_validation(step=6, reward=0.33)
    assert policy.after_step(7, 0.0) is None  # 6 - 4 < 4
    policy.observe_validation(step=8, reward=0.34)  # 8 - 4 >= 4 without beating 0.35
    assert policy.after_step(9, 0.0) == "validation_plateau"
    policy.mark_reset(9)
    policy.observe_validation(step=10, reward=0.30)  # the reset restarts the clock too
    assert policy.after_step(11, 0.0) is None


def test_state_round_trip():
    policy = ResetPolicy(ResetConfig(kl_share_threshold=0.5, kl_window_steps=3, val_patience_steps=2))
    _run(policy, [0.9, 0.9])
    policy.observe_validation(1, 0.2)
    copy = ResetPolicy(policy.cfg)
    copy.load_state_dict(policy.state_dict())
    assert copy.state_dict() == policy.state_dict()
    assert copy.after_step(3, 0.9) == policy.after_step(3, 0.9) == "kl_share"


def _step_stats(drift: float, beta: float, seed: int) -> dict[str, float]:
    """Loss stats of an on-policy step: zero-mean advantages, equal lengths, the reference ``drift`` nats away."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 8, generator=g) * 3
    ref = logp + drift * torch.randn(4, 8, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    _, stats = prorl_loss(logp, logp, logp, ref, adv, torch.ones(4, 8, dtype=torch.bool), LossConfig(kl_beta=beta))
    return stats


def test_kl_share_fires_when_the_penalty_dominates_the_update():
    # A strong penalty and a policy 2 nats from its reference: the KL gradient outweighs the policy gradient.
    shares = [_step_stats(drift=2.0, beta=1.0, seed=s)["kl_share"] for s in range(3)]
    assert min(shares) > 0.5
    policy = ResetPolicy(ResetConfig(kl_share_threshold=0.5, kl_window_steps=3))
    assert _run(policy, shares) == [(3, "kl_share")]  # only once the window is full


def test_kl_share_stays_quiet_for_a_weak_penalty_near_the_reference():
    # The default beta (1e-4) and small drift: the pg loss of zero-mean advantages is ~0, so the former
    # loss-value share was ~1 and fired every window; the gradient share is ~1e-5.
    stats = [_step_stats(drift=0.05, beta=1e-4, seed=s) for s in range(10)]
    loss_shares = [abs(s["kl_loss"]) / (abs(s["pg_loss"]) + abs(s["kl_loss"])) for s in stats]
    assert sum(loss_shares) / len(loss_shares) > 0.5  # what the former definition would have fed the policy
    assert max(s["kl_share"] for s in stats) < 1e-3
    policy = ResetPolicy(ResetConfig(kl_share_threshold=0.5, kl_window_steps=3))
    assert _run(policy, [s["kl_share"] for s in stats]) == []


def _moments(learner: Learner) -> int:
    return len(learner.optimizer.state)


def _reference_equals_policy(learner: Learner) -> bool:
    return all(torch.equal(r, p) for r, p in zip(learner.reference.parameters(), learner.policy.parameters(),
                                                   strict=True))


@pytest.fixture(scope="module")
def batch():
    return random_batch(seed=11)


def test_scheduled_reset_in_the_learner(tiny_model_dir, batch):
    learner = Learner(tiny_config(reset={"interval_steps": 2}))
    m1 = learner.train_step(batch)
    assert m1.reset == 0 and _moments(learner) > 0 and not _reference_equals_policy(learner)
    m2 = learner.train_step(batch)
    assert (m2.reset, m2.reset_reason) == (1.0, "schedule")
    assert _moments(learner) == 0 and _reference_equals_policy(learner)
    m3 = learner.train_step(batch)
    assert m3.reset == 0 and m3.kl == 0.0  # the step right after a reset starts at the reference
    assert learner.reset_policy.resets == 1


def test_kl_share_reset_in_the_learner(tiny_model_dir, batch):
    learner = Learner(tiny_config(loss={"kl_beta": 1.0}, reset={"kl_share_threshold": 1e-6, "kl_window_steps": 2}))
    metrics = [learner.train_step(batch) for _ in range(4)]
    # Step 1 has KL 0 (reference = policy), step 2 fills the window: reset; then the same again.
    assert [m.kl == 0.0 for m in metrics] == [True, False, True, False]
    assert [m.reset_reason for m in metrics] == ["", "kl_share", "", "kl_share"]
    assert _moments(learner) == 0 and _reference_equals_policy(learner)


def test_validation_reset_in_the_learner(tiny_model_dir, batch):
    learner = Learner(tiny_config(reset={"val_patience_steps": 2}))
    learner.observe_validation(0.5)
    learner.train_step(batch)
    learner.train_step(batch)
    learner.observe_validation(0.4)  # no better than 0.5 for two steps
    m = learner.train_step(batch)
    assert m.reset_reason == "validation_plateau" and _moments(learner) == 0


def test_manual_reset_is_reported_with_the_next_step(tiny_model_dir, batch):
    learner = Learner(tiny_config())
    learner.train_step(batch)
    learner.reset_reference("manual")
    assert _moments(learner) == 0 and _reference_equals_policy(learner)
    assert learner.train_step(batch).reset_reason == "manual"
    assert learner.train_step(batch).reset_reason == ""
