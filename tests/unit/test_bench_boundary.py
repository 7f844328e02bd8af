"""The pure parts of ``bench/boundary.py`` (with ``_boundary_stats.py`` and ``_boundary_plots.py``): plan,
statistics, verdicts, figures and the report stage.

Synthetic evaluations and metrics records only: no process is started (the report stage is run on a work directory
written here). Each test pins numbers worked out by hand, so a wrong formula fails it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import _boundary_plots as plots  # noqa: E402
import _boundary_stats as stats  # noqa: E402
import boundary  # noqa: E402

T, F = True, False


def prompts(*rows: str) -> dict[str, tuple[bool, ...]]:
    """``prompts("1100", "0000")``: prompt p0 with samples correct, correct, wrong, wrong; p1 never correct."""
    return {f"p{i}": tuple(ch == "1" for ch in row) for i, row in enumerate(rows)}


# ----------------------------------------------------------------------------------------------- plan


def test_plan_derives_intervals_from_steps_and_keeps_given_ones() -> None:
    plan = boundary.make_plan({"steps": 40, "reset_every": 7})
    assert (plan["reset_every"], plan["checkpoint_every"], plan["eval_every"], plan["val_every"]) == (7, 10, 20, 6)
    assert plan["config"] == "configs/boundary.toml" and plan["samples"] == 64 and max(plan["ks"]) == 64
    quick = boundary.make_plan({"quick": True})
    assert quick["config"] == "configs/tiny.toml" and quick["ks"] == [1, 2, 4] and quick["steps"] == 4


def test_default_plan_follows_its_own_rule_and_the_config() -> None:
    from prorl_async.config import load_config

    plan = boundary.make_plan({})
    assert {k: plan[k] for k in boundary.derived(24)} == boundary.derived(24) == {
        "reset_every": 6, "checkpoint_every": 6, "eval_every": 12, "val_every": 4}
    cfg = load_config(boundary.config_path(plan), boundary.run_overrides(plan, "resets"))
    assert (cfg.run.max_steps, cfg.run.time_budget_s, cfg.reset.interval_steps, cfg.eval.every_steps) == (24, 0, 6, 4)
    assert cfg.tasks.validation_size >= plan["prompts"] and cfg.model.name == "smollm2-135m-instruct"
    assert load_config(boundary.config_path(plan), boundary.run_overrides(plan, "no-kl")).loss.kl_beta == 0


def test_plan_refuses_samples_below_k_and_evals_between_checkpoints() -> None:
    with pytest.raises(SystemExit, match="below the largest --k 64"):
        boundary.make_plan({"samples": 32})
    with pytest.raises(SystemExit, match="multiple of --checkpoint-every"):
        boundary.make_plan({"eval_every": 9})


def test_stored_plan_wins_and_only_eval_every_may_change() -> None:
    stored = boundary.make_plan({"steps": 40})
    assert boundary.settle_plan(stored, {}) == stored
    assert boundary.settle_plan(stored, {"steps": 40})["steps"] == 40  # the same value is no change
    assert boundary.settle_plan(stored, {"eval_every": 10})["eval_every"] == 10
    with pytest.raises(SystemExit, match="steps=40"):
        boundary.settle_plan(stored, {"steps": 80})
    same_file = str(boundary.config_path(stored).resolve())  # given as an absolute path, stored relative
    assert boundary.settle_plan(stored, {"config": same_file})["config"] == "configs/boundary.toml"


def test_arms_differ_only_in_reset_interval_and_kl_weight() -> None:
    plan = boundary.make_plan({"steps": 96, "overrides": ["learner.lr=1e-5"]})
    resets, plain, no_kl = (set(boundary.run_overrides(plan, a)) for a in boundary.ARMS)
    assert resets - plain == {"reset.interval_steps=24"}
    assert plain - resets == {"reset.interval_steps=0"}
    assert no_kl - plain == {"loss.kl_beta=0"}
    assert {"run.max_steps=96", "run.time_budget_s=0", "run.checkpoint_every_steps=24", "eval.every_steps=16",
            "eval.at_start=true", "reset.kl_share_threshold=0", "learner.lr=1e-5"} <= plain
    assert boundary.run_overrides(plan, "resets")[0] == "learner.lr=1e-5"  # the user's first: the bench's knobs win
    with pytest.raises(SystemExit, match="unknown arm"):
        boundary.run_overrides(plan, "sometimes")


def test_eval_steps_are_multiples_and_the_last() -> None:
    assert boundary.eval_steps([24, 48, 53, 72, 96], 48, 96) == [48, 96]  # 53: an interrupted run's checkpoint
    assert boundary.eval_steps([48, 96, 100], 48, 100) == [48, 96, 100]
    assert boundary.eval_steps([2, 4, 6], 4, 4) == [4]


# ----------------------------------------------------------------------------------------------- statistics


def test_outcomes_from_rows_apply_the_threshold_and_skip_skipped_prompts() -> None:
    rows = [{"id": "a", "task": "logic/x", "samples": [{"reward": 1.0}, {"reward": 0.0}, {"reward": 0.9999999999}]},
            {"id": "b", "task": "logic/x", "skipped": "too long"},
            {"id": "c", "task": "logic/y", "samples": [{"reward": 0.5}]}]
    assert stats.outcomes_from_rows(rows, 1.0) == {"logic/x": {"a": (T, F, T)}, "logic/y": {"c": (F,)}}
    assert stats.outcomes_from_rows(rows, 0.5)["logic/y"] == {"c": (T,)}
    rows[0]["samples"] = [{"reward": 1.0, "text": "<answer>7"}, {"reward": 0.0, "text": " <answer>7\n"},
                          {"reward": 0.0, "text": "<answer>8"}]
    assert stats.distinct_from_rows(rows) == {"logic/x": {"a": 2}, "logic/y": {"c": 1}}
    assert stats.diversity({"a": 2, "b": 1, "c": 1, "d": 4}) == {"prompts": 4, "mean_distinct": 2.0,
                                                                 "frac_single": 0.5}
    assert stats.diversity({})["mean_distinct"] is None
    both = stats.scopes({"x": {"a": (T,)}, "y": {"b": (F,)}})
    assert both["all"] == {"a": (T,), "b": (F,)}


def test_pass_curve_is_the_unbiased_estimate_averaged_over_prompts() -> None:
    curve = stats.pass_curve(prompts("1000", "0000"), [1, 2, 4, 8])
    # prompt 0: pass@1 1/4, pass@2 1 - C(3,2)/C(4,2) = 1/2, pass@4 1; prompt 1: 0; k = 8 no prompt reaches
    assert curve == pytest.approx({1: 0.125, 2: 0.25, 4: 0.5})


def test_paired_delta_has_the_paired_standard_error() -> None:
    d = stats.paired_delta(prompts("00", "10", "11"), prompts("10", "11", "11"), 1)
    assert (d["prompts"], d["base"], d["other"], d["delta"]) == pytest.approx((3, 0.5, 5 / 6, 1 / 3))
    assert d["se"] == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))  # std of (1/2, 1/2, 0), ddof 1
    assert stats.paired_delta({}, prompts("1"), 1)["delta"] is None


def test_beyond_counts_only_past_z_standard_errors() -> None:
    assert [stats.beyond(d, 0.1) for d in (0.3, 0.2, 0.1, -0.25)] == [1, 0, 0, -1]
    assert stats.beyond(0.3, math.nan) == 0 and stats.beyond(None, 0.1) == 0
    assert stats.beyond(0.01, 0.0) == 1  # every prompt moved the same way


def test_binomial_se_is_never_zero() -> None:
    assert stats.binomial_se(0.0, 8) == pytest.approx(math.sqrt(0.1 * 0.9 / 8))
    assert stats.binomial_se(0.5, 100) == pytest.approx(0.05)


def test_pass1_profile() -> None:
    p = stats.pass1_profile(prompts("0000", "1111", "1100", "0000"))
    assert (p["prompts"], p["mean"], p["frac_zero"], p["frac_one"]) == (4, 0.375, 0.5, 0.25)
    assert p["histogram"] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]


def test_sign_test_tail() -> None:
    assert stats.binom_upper_tail(10, 8) == pytest.approx(56 / 1024)
    assert stats.binom_upper_tail(5, 5) == pytest.approx(1 / 32)
    assert stats.binom_upper_tail(0, 0) == 1.0


def test_solved_changes_count_newly_solved_and_lost_at_k_n() -> None:
    c = stats.solved_changes(prompts("0000", "0000", "0100", "1111"), prompts("0010", "0000", "0000", "1111"))
    assert (c["base_unsolved"], c["newly_solved"], c["lost"]) == (2, 1, 1)
    assert c["newly_solved_ids"] == ["p0"] and c["lost_ids"] == ["p2"] and c["newly_solved_correct"] == {"p0": 1}
    assert c["p_newly_gt_lost"] == pytest.approx(0.75)


def test_ranks_and_correlations() -> None:
    assert list(stats.ranks([3, 1, 1, 2])) == [3.0, 0.5, 0.5, 2.0]
    assert stats.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert stats.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(0.9819805)
    assert stats.pearson([1, 1, 1], [1, 2, 3]) is None and stats.spearman([1, 2], [2, 1]) is None


def test_permutation_p_is_small_only_in_the_right_direction() -> None:
    x = list(range(20))
    y = [20 - v for v in x]
    low, high = stats.permutation_p(x, y, -1.0)
    assert low == pytest.approx(1 / 2001) and high == pytest.approx(1.0)


def test_prompt_gains_split_the_base_samples_in_halves() -> None:
    g = stats.prompt_gains(prompts("1100", "0000"), prompts("1111", "1000"))
    assert g["h"] == 2
    assert g["x"] == [1.0, 0.0]  # pass@2 of the first halves "11" and "00"
    assert g["gain_pass1"] == pytest.approx([1.0, 0.25])  # end pass@1 less the second halves' "00", "00"
    assert g["gain_pass_h"] == pytest.approx([1.0, 0.5])  # end pass@2: 1 and 1 - C(3,2)/C(4,2)


def test_block_mean_se_and_slope_se() -> None:
    assert stats.block_mean_se([1, 2, 3, 4, 5, 6, 7, 8], 4) == pytest.approx((4.5, 2.0))
    mean, se = stats.block_mean_se([1.0, 3.0], 4)  # fewer than 2 blocks: the values themselves
    assert (mean, se) == pytest.approx((2.0, 1.0))
    assert all(math.isnan(v) for v in stats.block_mean_se([]))
    assert stats.slope_se([0, 1, 2], [0, 1, 2], [0.1] * 3) == pytest.approx((1.0, math.sqrt(0.02) / 2))
    assert all(math.isnan(v) for v in stats.slope_se([5], [0.1], [0.1]))


# ----------------------------------------------------------------------------------------------- training records


def step(version: int, entropy: float, reset: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"kind": "step", "version": version, "entropy": entropy, "kl": 0.01 * version, "kl_share": 0.1,
            "response_tokens_mean": 10.0, "reward_mean": 0.5, "reset": reset, **extra}


def validation(version: int, pass1: float, samples: int = 100) -> dict[str, Any]:
    return {"kind": "validation", "version": version, "pass_at_1": pass1, "samples": samples, "complete": True,
            "by_task": {"logic/x": {"pass_at_1": pass1}}}


def test_training_series_keeps_the_last_record_of_a_version() -> None:
    records = [validation(0, 0.2), step(1, 1.0), step(2, 0.9), {"kind": "event", "event": "checkpoint"},
               step(2, 0.8, reset=1.0), validation(2, 0.4), step(3, "nan")]  # a resumed run logs step 2 again
    s = stats.training_series(records)
    assert s["steps"] == [1, 2, 3] and s["entropy"][:2] == [1.0, 0.8] and math.isnan(s["entropy"][2])
    assert s["resets"] == [2] and s["kl"] == pytest.approx([0.01, 0.02, 0.03])
    assert [r["version"] for r in s["validation"]] == [0, 2]
    assert s["validation"][1]["se"] == pytest.approx(stats.binomial_se(0.4, 100))
    assert s["validation"][1]["by_task"] == {"logic/x": 0.4}


def synthetic_arm(entropy_end: float, val_end: float, steps: int = 12, resets: tuple[int, ...] = ()) -> list[dict]:
    """Entropy falling linearly from 1.0 to ``entropy_end``, validation every 2 steps rising linearly to ``val_end``
    from 0.2 (1000 samples a round: tight errors)."""
    records = [validation(0, 0.2, 1000)]
    for v in range(1, steps + 1):
        records.append(step(v, 1.0 + (entropy_end - 1.0) * v / steps, reset=float(v in resets)))
        if v % 2 == 0:
            records.append(validation(v, 0.2 + (val_end - 0.2) * v / steps, 1000))
    return records


def test_arm_summary_thirds_and_slopes() -> None:
    summary = stats.arm_summary(stats.training_series(synthetic_arm(0.4, 0.8)), 12)
    assert summary["entropy_first_third"] == pytest.approx(1.0 - 0.6 * 2.5 / 12)  # steps 1-4
    assert summary["entropy_last_third"] == pytest.approx(1.0 - 0.6 * 10.5 / 12)  # steps 9-12
    assert summary["entropy_slope_per_step"] == pytest.approx(-0.05)
    assert summary["val_rounds"] == 7 and summary["val_rounds_last_third"] == 3  # rounds 8, 10, 12
    assert summary["val_slope_last_third"] == pytest.approx(0.05)
    assert (summary["val_start"], summary["val_end"]) == pytest.approx((0.2, 0.8))
    timed_out = {**validation(12, 0.1), "complete": False}  # holds only some prompts: left out
    late = stats.arm_summary(stats.training_series([*synthetic_arm(0.4, 0.8)[:-1], timed_out]), 12)
    assert late["val_end"] == pytest.approx(0.2 + 0.6 * 10 / 12) and late["val_rounds_last_third"] == 2


def test_resets_verdict_needs_entropy_and_progress_beyond_noise() -> None:
    def summary(entropy_end: float, val_end: float) -> dict[str, Any]:
        return stats.arm_summary(stats.training_series(synthetic_arm(entropy_end, val_end)), 12)

    held = stats.verdict_resets({"resets": summary(0.8, 0.9), "no-resets": summary(0.2, 0.3)})
    assert held["verdict"] == "held" and held["numbers"]["progress_from"] == "slope"
    assert held["numbers"]["entropy_diff"] == pytest.approx(0.6 * 10.5 / 12)
    worse = stats.verdict_resets({"resets": summary(0.2, 0.3), "no-resets": summary(0.8, 0.9)})
    assert worse["verdict"] == "did not hold"
    tie = stats.verdict_resets({"resets": summary(0.5, 0.6), "no-resets": summary(0.5, 0.6)})
    assert tie["verdict"] == "inconclusive"
    assert stats.verdict_resets({"resets": summary(0.5, 0.6)})["verdict"] == "inconclusive"


# ----------------------------------------------------------------------------------------------- verdicts


def many(pattern: str, count: int, start: int = 0) -> dict[str, tuple[bool, ...]]:
    return {f"q{start + i}": tuple(ch == "1" for ch in pattern) for i in range(count)}


def test_improves_verdict() -> None:
    base = {**many("00000000", 10), **many("11000000", 10, 10)}
    better = {**many("10000000", 10), **many("11110000", 10, 10)}
    v = stats.verdict_improves(base, better, 8)
    assert v["verdict"] == "held"
    assert v["numbers"]["pass@1"]["delta"] == pytest.approx((10 * 0.125 + 10 * 0.25) / 20)
    assert v["numbers"]["pass@8"]["delta"] == pytest.approx(0.5)
    sharper = {**many("00000000", 10), **many("11111111", 10, 10)}  # pass@1 up, pass@8 the same
    assert stats.verdict_improves(base, sharper, 8)["verdict"] == "inconclusive"
    assert stats.verdict_improves(better, base, 8)["verdict"] == "did not hold"


def test_weakest_verdict_uses_the_split_half_correlation() -> None:
    base = {"logic/x": {**many("00000000", 15), **many("11111111", 15, 15)}}
    end = {"logic/x": {**many("11111100", 15), **many("11111111", 15, 15)}}
    v = stats.verdict_weakest(stats.scopes(base), stats.scopes(end), 8)
    assert v["verdict"] == "held" and v["numbers"]["prompts"] == 30 and v["numbers"]["h"] == 4
    assert v["numbers"]["spearman_prompts_gain_pass1"] == pytest.approx(-1.0)
    assert v["numbers"]["per_task"]["logic/x"]["gain_pass1"] == pytest.approx(0.375)
    flat = stats.verdict_weakest(stats.scopes(base), stats.scopes(base), 8)
    assert flat["verdict"] == "inconclusive"  # no gain anywhere: a constant side


def test_shift_verdict() -> None:
    base = {**many("0000", 10), **many("1100", 10, 10)}
    right = {**many("1000", 10), **many("1110", 10, 10)}
    v = stats.verdict_shift(base, right)
    assert v["verdict"] == "held" and v["numbers"]["frac_zero"] == [0.5, 0.0]
    assert stats.verdict_shift(right, base)["verdict"] == "did not hold"
    middle = many("1100", 20)
    spread = {**many("0000", 4), **many("1111", 16, 4)}  # mean up 0.3, but 4 prompts now at 0: not a shift
    v = stats.verdict_shift(middle, spread)
    assert v["verdict"] == "inconclusive" and "spread" in v["why"]
    assert v["numbers"]["mean"]["delta"] == pytest.approx(0.3)


def test_new_solved_verdict_is_a_sign_test() -> None:
    base = many("0000", 6)
    assert stats.verdict_new_solved(base, {**many("1000", 5), **many("0000", 1, 5)})["verdict"] == "held"  # 1/32
    assert stats.verdict_new_solved(base, {**many("1000", 4), **many("0000", 2, 4)})["verdict"] == "inconclusive"
    assert stats.verdict_new_solved(base, base)["verdict"] == "did not hold"
    assert stats.verdict_new_solved(many("1000", 6), many("1000", 6))["verdict"] == "inconclusive"


def d(delta: float, se: float = 0.01) -> dict[str, float]:
    return {"delta": delta, "se": se}


def test_regimes() -> None:
    assert stats.regime(d(0.2), d(-0.1)) == "diminish"
    assert stats.regime(d(0.2), d(0.0)) == "plateau"
    assert stats.regime(d(0.2), d(0.1), d(0.001)) == "plateau"  # rose, then flat between the last two
    assert stats.regime(d(0.2), d(0.1), d(0.05)) == "sustained"
    assert stats.regime(d(0.2), d(0.1)) == "sustained"
    assert stats.regime(d(-0.2), d(-0.1)) == "regressed"
    assert stats.regime(d(0.2), d(0.1), d(-0.05)) == "plateau"  # rose, then fell between the last two
    assert stats.regime(d(-0.2), d(0.1)) == "other"  # broader but worse at one sample: none of the three
    flat = {"regime": "plateau", "pass@1": d(0.0), "pass@k": d(0.0)}
    assert stats.verdict_regimes({"x": flat})["verdict"] == "inconclusive"
    moved = {"regime": "sustained", "pass@1": d(0.1), "pass@k": d(0.1)}
    assert stats.verdict_regimes({"x": flat, "y": moved})["verdict"] == "held"
    assert stats.verdict_regimes({"x": {**moved, "regime": "regressed"}})["verdict"] == "did not hold"


# ----------------------------------------------------------------------------------------------- analysis, figures


def synthetic_eval(patterns: dict[str, list[str]]) -> dict[str, Any]:
    return {"dir": "/x", "seconds": 1.0, "outcomes": {task: {f"{task}/{i}": tuple(ch == "1" for ch in row)
                                                              for i, row in enumerate(rows)}
                                                       for task, rows in patterns.items()},
            "distinct": {task: {f"{task}/{i}": len(set(row)) for i, row in enumerate(rows)}
                         for task, rows in patterns.items()}}


BASE = {"logic/a": ["0000"] * 6 + ["1100"] * 6, "logic/b": ["1000"] * 6 + ["1111"] * 6}
MID = {"logic/a": ["0000"] * 6 + ["1110"] * 6, "logic/b": ["1100"] * 6 + ["1111"] * 6}
END = {"logic/a": ["1100"] * 6 + ["1111"] * 6, "logic/b": ["1110"] * 6 + ["1111"] * 6}
PLAN = boundary.make_plan({"quick": True, "steps": 12, "checkpoint_every": 6, "eval_every": 6})


def test_analyse_end_to_end_and_figures(tmp_path: Path) -> None:
    evals = {"resets": {6: synthetic_eval(MID), 12: synthetic_eval(END)}, "no-resets": {12: synthetic_eval(MID)}}
    training = {"resets": stats.training_series(synthetic_arm(0.8, 0.9, resets=(3, 6, 9, 12))),
                "no-resets": stats.training_series(synthetic_arm(0.2, 0.3))}
    a = stats.analyse(synthetic_eval(BASE), evals, training, PLAN)
    assert list(a["verdicts"]) == list(stats.CLAIMS)
    assert a["models"]["resets step 6"] == {"arm": "resets", "step": 6}
    assert a["pass_at_k"]["base"]["all"]["1"] == pytest.approx((6 * 0 + 6 * 0.5 + 6 * 0.25 + 6 * 1) / 24)
    assert a["verdicts"]["1a"]["verdict"] == "held" and a["verdicts"]["2"]["verdict"] == "held"
    assert a["verdicts"]["3"]["numbers"]["newly_solved"] == 6  # logic/a's six prompts the base never solved
    assert a["verdicts"]["4"]["verdict"] == "held"
    assert a["regimes"]["logic/a"]["regime"] == "sustained"  # pass@4 0.5 -> 0.5 (step 6) -> 1.0
    assert a["regimes"]["logic/b"]["regime"] == "plateau"  # pass@4 1.0 throughout, pass@1 up
    assert [(p["step"], p["logic/a"]["newly_solved"]) for p in a["solved"]["resets"]] == [(6, 0), (12, 6)]
    assert a["regimes"]["logic/a"]["last_segment_pass@k"]["delta"] == pytest.approx(0.5)  # step 6 -> 12
    assert a["training"]["resets"]["series"]["resets"] == [3, 6, 9, 12]
    assert a["diversity"]["base"]["logic/a"] == {"prompts": 12, "mean_distinct": 1.5, "frac_single": 0.5}
    assert a["diversity"]["resets step 12"]["all"]["frac_single"] == pytest.approx(12 / 24)
    assert "resets step 12" in stats.diversity_table(a["diversity"])
    table = stats.verdict_table(a["verdicts"])
    assert "1a" in table and "held" in table and "sustained" in table

    figures = plots.write_figures(a, PLAN, tmp_path / "fig")
    assert set(figures) == {"pass-at-k", "pass1-hist", "training", "solved", "regimes"}
    for path in figures.values():
        height, width, _ = imread(path).shape
        assert height > 300 and width > 600


def test_analyse_without_evaluations_is_inconclusive() -> None:
    a = stats.analyse(None, {}, {}, PLAN)
    assert {v["verdict"] for v in a["verdicts"].values()} == {"inconclusive"}
    a = stats.analyse(synthetic_eval(BASE), {"resets": {6: synthetic_eval(MID)}}, {}, PLAN)
    assert "no evaluation of the resets arm at step 12" in a["verdicts"]["1a"]["why"]


# ----------------------------------------------------------------------------------------------- work directory


def test_run_state(tmp_path: Path) -> None:
    run = tmp_path / "resets"
    assert boundary.run_state(run, 4) == ("new", None)
    (run / "checkpoints" / "step-000002.partial" / "policy").mkdir(parents=True)
    assert boundary.run_state(run, 4) == ("restart", None)
    (run / "checkpoints" / "step-000002" / "policy").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "policy" / "config.json").write_text("{}")
    assert boundary.run_state(run, 4) == ("restart", 2)  # no config.toml: cannot be resumed
    (run / "config.toml").write_text("")
    assert boundary.run_state(run, 4) == ("resumable", 2)
    (run / "checkpoints" / "step-000004" / "policy").mkdir(parents=True)
    (run / "checkpoints" / "step-000004" / "policy" / "config.json").write_text("{}")
    assert boundary.run_state(run, 4) == ("finished", 4)
    assert sorted(boundary.checkpoints(run)) == [2, 4]


def write_eval(out: Path, patterns: dict[str, list[str]]) -> None:
    """What ``prorl-async eval`` leaves that the bench reads: eval.json and the samples file."""
    out.mkdir(parents=True)
    (out / "eval.json").write_text(json.dumps({"model": "m", "seconds": 2.0, "settings": {"correct_threshold": 1.0},
                                               "models": {"m": {"samples_file": "samples-m.jsonl"}}}))
    rows = [{"id": f"{task}/{i}", "task": task, "samples": [{"reward": float(ch == "1")} for ch in row]}
            for task, rs in patterns.items() for i, row in enumerate(rs)]
    (out / "samples-m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_stage_reads_a_work_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import _runs

    work = tmp_path / "work"
    write_eval(work / "evals" / "base", BASE)
    write_eval(work / "evals" / "resets" / "step-000006", MID)
    write_eval(work / "evals" / "resets" / "step-000012", END)
    (work / "runs" / "resets").mkdir(parents=True)
    (work / "runs" / "resets" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in synthetic_arm(0.8, 0.9, resets=(6, 12))))
    (work / "plan.json").write_text(json.dumps(PLAN))
    monkeypatch.setattr(_runs, "machine_header", lambda title: {"cpu": "test"})
    out = tmp_path / "out" / "b"
    code = boundary.main(["--work", str(work), "--stage", "report", "--arms", "resets", "--plot-prefix", str(out)])
    assert code == 0
    doc = json.loads(Path(f"{out}.json").read_text())
    assert doc["verdicts"]["1a"]["verdict"] == "held" and doc["verdicts"]["4"]["verdict"] == "inconclusive"
    assert doc["evals"]["resets step 12"] == {"dir": str(work / "evals" / "resets" / "step-000012"), "seconds": 2.0}
    assert set(doc["figures"]) == {"pass-at-k", "pass1-hist", "training", "solved", "regimes"}
    assert "did not hold" not in capsys.readouterr().out.split("claim", 1)[1]
    with pytest.raises(SystemExit, match="steps=12"):
        boundary.main(["--work", str(work), "--stage", "report", "--steps", "20"])
