"""bench/informative.py's arithmetic on synthetic metrics records (no run, no timing asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import informative  # noqa: E402


def _step(t: float, received: int, all_correct: int, all_wrong: int, stale: int = 0, reward: float = 0.5,
          samples: int = 8) -> dict:
    counters = {"received": received, "yielded": 0, "stale": stale, "all_correct": all_correct,
                "all_wrong": all_wrong, "no_variance": 0, "untrainable": 0}
    return {"kind": "step", "time_s": t, "wait_s": 0.0, "step_time_s": 1.0, "buffer_counters": counters,
            "reward_arrived_mean": reward, "samples_arrived": samples}


def _validation(t: float, step: int, p1: float, p8: float) -> dict:
    return {"kind": "validation", "time_s": t, "step": step, "pass_at_1": p1,
            "by_task": {"logic/chain_sum": {"pass_at_1": p1, "pass_at_8": p8, "prompts": 4}}}


def test_reach_fraction_over_the_run_and_its_last_quarter() -> None:
    # training starts at t = 0 (first step ends at 1 s after a 1 s step): 4 steps to t = 100
    records = [_step(1, 10, 2, 2), _step(50, 20, 4, 4), _step(74, 30, 6, 6), _step(100, 50, 15, 20, stale=5)]
    figures = informative.reach_figures(records)
    assert figures["reach_fraction"] == pytest.approx(10 / 50)
    # last quarter: from the last step before t = 75 (30 received, 18 admitted) to the end (50, 10)
    assert figures["reach_fraction_last_quarter"] == pytest.approx((10 - 18) / 20)
    assert informative.reach_fraction({"received": 5}, {"received": 5}) is None


def test_validation_gain_and_pass_at_the_largest_k() -> None:
    records = [_step(1, 8, 0, 0), _validation(2, 0, 0.25, 0.5), _validation(60, 10, 0.4, 0.75),
               _validation(90, 20, 0.6, 0.7)]
    v = informative.validation_figures(records)
    assert v["validations"] == 3 and v["pass_at_1_gain"] == pytest.approx(0.35)
    assert v["by_task_first"] == {"logic/chain_sum": {"k": 8, "pass_at_k": 0.5, "pass_at_1": 0.25}}
    assert v["by_task_last"]["logic/chain_sum"]["pass_at_k"] == 0.7
    assert informative.validation_figures([_step(1, 8, 0, 0)]) == {"validations": 0}


def test_policy_reward_quarters_weight_by_samples() -> None:
    records = [_step(i + 1, 8 * (i + 1), 0, 0, reward=r, samples=n)
               for i, (r, n) in enumerate([(0.0, 8), (1.0, 8), (0.5, 8), (0.5, 8), (0.9, 16), (0.6, 8), (0.6, 8),
                                           (0.3, 24)])]
    out = informative.policy_reward(records)
    assert out["policy_reward_first_quarter"] == pytest.approx(0.5)
    assert out["policy_reward_last_quarter"] == pytest.approx((0.6 * 8 + 0.3 * 24) / 32)


def test_the_summary_holds_the_last_steps_task_shares() -> None:
    shares = {"logic/chain_sum": {"share": 0.3, "informative": 0.2, "groups": 32}}
    records = [_step(1, 8, 0, 0), {**_step(2, 16, 1, 1), "task_shares": shares}]
    assert informative.summarize(records)["task_shares"] == shares
    assert "tasks.balance.enabled=false" in informative.ARMS["old"]
