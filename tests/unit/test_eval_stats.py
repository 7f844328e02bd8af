"""pass@k, the Dang et al. bound, the pass@1 histogram and the validation metrics (pure functions)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from math import comb

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prorl_async.eval.stats import (
    PromptResult,
    compare,
    count_correct,
    curve_ks,
    dang_bound,
    dang_bound_debiased,
    histogram,
    pass_at_k,
    summarize,
    summarize_all,
    validation_metrics,
)


def _brute_force(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (c correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_of_subsets(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(_brute_force(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_1_is_the_fraction_correct() -> None:
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16, abs=1e-15)


@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_stable_for_large_n(args: tuple[int, int, int]) -> None:
    n, c, k = args
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    got = pass_at_k(n, c, k)
    assert 0.0 <= got <= 1.0
    assert math.isclose(got, float(exact), rel_tol=1e-12, abs_tol=1e-15)


def test_pass_at_k_tiny_values_keep_their_digits() -> None:
    # one correct in 10,000 samples: pass@1 is 1e-4 exactly; a naive 1 - product would lose digits
    assert pass_at_k(10_000, 1, 1) == pytest.approx(1e-4, rel=1e-12)
    assert pass_at_k(1024, 1, 128) == pytest.approx(128 / 1024, rel=1e-12)


def test_pass_at_k_rejects_bad_arguments() -> None:
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 5), (4, 2, 0), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 2, 1)  # type: ignore[arg-type]


def test_dang_bound_by_hand() -> None:
    p = [0.0, 0.5, 1.0]
    # E[p] = 0.5, Var(p) = (0.25 + 0 + 0.25) / 3 = 1/6; (1 - 0.5)^2 + 1/6 = 5/12
    assert dang_bound(p, 2) == pytest.approx(1 - 5 / 12)
    assert dang_bound(p, 4) == pytest.approx(1 - (5 / 12) ** 2)  # 119/144
    assert dang_bound(p, 16) == pytest.approx(1 - (5 / 12) ** 8)
    # a single prompt with p = 0.2: Var 0, bound = 1 - 0.8^k = the exact pass@k of that prompt
    assert dang_bound([0.2], 3) == pytest.approx(1 - 0.8**3)
    # Jensen: for k >= 2 the bound is above the expected pass@k of the true probabilities
    for k in (2, 3, 4, 8, 16):
        assert dang_bound(p, k) >= sum(1 - (1 - x) ** k for x in p) / len(p) - 1e-12


def test_debiased_bound_removes_the_sampling_noise() -> None:
    counts = [(4, 1), (4, 4), (4, 0), (8, 3)]
    pass2 = sum(pass_at_k(n, c, 2) for n, c in counts) / len(counts)
    assert dang_bound_debiased(counts, 2) == pytest.approx(pass2)  # equals the measured pass@2
    assert dang_bound_debiased(counts, 6) == pytest.approx(1 - (1 - pass2) ** 3)
    # = the formula with Var(p) minus the binomial noise mean(p (1 - p)) / (n - 1)
    p = [c / n for n, c in counts]
    mean = sum(p) / len(p)
    var = sum((x - mean) ** 2 for x in p) / len(p) - sum(c / n * (1 - c / n) / (n - 1) for n, c in counts) / len(p)
    assert dang_bound_debiased(counts, 4) == pytest.approx(1 - ((1 - mean) ** 2 + var) ** 2)
    # the plug-in bound is the lower one: the noise inflates Var(p)
    assert dang_bound(p, 4) < dang_bound_debiased(counts, 4)
    assert math.isnan(dang_bound_debiased([(1, 1)], 2))


def test_count_correct_uses_the_threshold() -> None:
    assert count_correct([1.0, 0.9999999999, 0.5, 0.0]) == (4, 2)
    assert count_correct([1.0, 0.6, 0.5, 0.0], threshold=0.5) == (4, 3)


def test_histogram_bins_and_edges() -> None:
    # n = 4: p in {0, .25, .5, .75, 1}; 1.0 lands in the last bin, 0.5 in [0.5, 0.6)
    counts = [(4, 0), (4, 1), (4, 2), (4, 3), (4, 4), (10, 3), (10, 7)]
    assert histogram(counts) == [1, 0, 1, 1, 0, 1, 0, 2, 0, 1]  # 0.3 exactly is in [0.3, 0.4)
    assert histogram([(3, 1)], bins=3) == [0, 1, 0]


def test_curve_ks() -> None:
    assert curve_ks(16) == [1, 2, 4, 8, 16]
    assert curve_ks(12, [3, 20]) == [1, 2, 3, 4, 8, 12]


def _prompts() -> list[PromptResult]:
    return [
        PromptResult("a0", "logic/a", "logic", (1.0, 0.0, 0.0, 0.0)),
        PromptResult("a1", "logic/a", "logic", (1.0, 1.0, 1.0, 1.0)),
        PromptResult("b0", "math/b", "math", (0.0, 0.0, 0.0, 0.0)),
        PromptResult("b1", "math/b", "math", (0.5, 1.0, 0.0, 0.0)),  # partial credit does not count as correct
        PromptResult("b2", "math/b", "math", ()),  # skipped (prompt too long)
    ]


def test_summarize_a_scope() -> None:
    s = summarize(_prompts()[:2], ks=[1, 2, 4])
    assert s["prompts"] == 2 and s["prompts_skipped"] == 0
    assert s["pass_at_k"]["1"] == pytest.approx((0.25 + 1.0) / 2)
    assert s["pass_at_k"]["2"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["pass_at_k"]["4"] == pytest.approx(1.0)
    assert s["pass1_mean"] == pytest.approx(0.625) and s["pass1_var"] == pytest.approx(0.375**2)
    assert s["dang_bound"]["2"] == pytest.approx(1 - ((1 - 0.625) ** 2 + 0.375**2))
    assert s["solved_none"] == 0 and s["solved_all"] == 1
    assert s["histogram"]["counts"] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert s["curve"]["k"] == [1, 2, 4]


def test_summarize_all_pools_prompts_by_task_domain_and_all() -> None:
    out = summarize_all(_prompts(), ks=[1, 4])
    assert list(out) == ["logic/a", "math/b", "domain:logic", "domain:math", "all"]
    assert out["math/b"]["prompts"] == 2 and out["math/b"]["prompts_skipped"] == 1
    assert out["math/b"]["pass_at_k"]["1"] == pytest.approx(0.125)
    assert out["math/b"]["mean_reward"] == pytest.approx(1.5 / 8)
    assert out["all"]["prompts"] == 4
    assert out["all"]["pass_at_k"]["1"] == pytest.approx((0.25 + 1 + 0 + 0.25) / 4)


def test_k_above_some_prompts_samples_leaves_them_out() -> None:
    prompts = [PromptResult("x", "t", "d", (1.0, 0.0)), PromptResult("y", "t", "d", (0.0, 0.0, 0.0, 1.0))]
    s = summarize(prompts, ks=[1, 4])
    assert s["pass_at_k"]["4"] == 1.0 and s["prompts_used"] == {"4": 1}


def test_compare_deltas_and_boundary() -> None:
    base = _prompts()
    trained = [
        PromptResult("a0", "logic/a", "logic", (1.0, 1.0, 0.0, 0.0)),
        PromptResult("a1", "logic/a", "logic", (0.0, 0.0, 0.0, 0.0)),  # lost
        PromptResult("b0", "math/b", "math", (1.0, 0.0, 0.0, 0.0)),  # newly solved
        PromptResult("b1", "math/b", "math", (1.0, 1.0, 1.0, 1.0)),
        PromptResult("b2", "math/b", "math", ()),
    ]
    out = compare(trained, base, ks=[1, 4])
    assert out["all"]["prompts"] == 4
    assert out["all"]["newly_solved"] == 1 and out["all"]["lost"] == 1
    assert out["logic/a"]["pass1_mean"]["delta"] == pytest.approx((0.5 + 0.0) / 2 - (0.25 + 1.0) / 2)
    assert out["math/b"]["pass_at_k"]["4"]["delta"] == pytest.approx(1.0 - 0.5)


def test_validation_metrics() -> None:
    scored = {"p0": [1.0, 0.0, 0.0, 1.0], "p1": [0.0] * 4, "p2": [1.0, 1.0]}
    m = validation_metrics(scored, ks=(1, 4))
    assert m["prompts"] == 3 and m["samples"] == 10
    assert m["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["pass@4"] == pytest.approx((1.0 + 0.0) / 2)  # p2 has only 2 samples: left out of pass@4
    assert m["mean_reward"] == pytest.approx(4 / 10)
    assert m["solved_none"] == pytest.approx(1 / 3) and m["solved_all"] == pytest.approx(1 / 3)
    assert "dang_bound@4" in m and "dang_bound_debiased@4" in m and "dang_bound@1" not in m
    assert all(isinstance(v, float) for v in m.values())
    grouped = validation_metrics(scored, ks=(1,), groups={"p0": "a", "p1": "a", "p2": "b"})
    assert grouped["a/pass@1"] == pytest.approx(0.25) and grouped["b/pass@1"] == 1.0
    assert validation_metrics({}, ks=(1, 4)) == {"prompts": 0.0}
    assert validation_metrics({"q": [True, False]}, ks=(1, 2))["pass@2"] == 1.0  # correctness flags work too
    assert "pass@8" not in validation_metrics(scored, ks=(8,))
