"""The pure analysis of ``bench/boundary.py``: per-prompt outcomes -> pass@k, paired deltas, the tests, the verdicts.

No processes and no files: :func:`analyse` turns the loaded evaluations (per task, per prompt id, each sample correct
or not) and each arm's :func:`training_series` into the report's JSON, with a verdict per claim (:data:`CLAIMS`; the
claims and their tests are described in ``boundary.py``'s docstring); :func:`verdict_table` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from prorl_async.eval.stats import CORRECT_EPS, histogram, pass_at_k

MAIN_ARM = "resets"
Z = 2.0  # a difference counts beyond Z standard errors
ALPHA = 0.05  # permutation and sign tests
STEP_KEYS = {"entropy": "entropy", "kl": "kl", "kl_share": "kl_share", "response_tokens": "response_tokens_mean",
             "reward": "reward_mean"}
CLAIMS = {
    "1a": ("prolonged RL improves pass@1 and pass@k", "pass-at-k"),
    "1b": ("the gain is largest where the base is weakest", "pass-at-k"),
    "2": ("the pass@1 distribution over prompts shifts right", "pass1-hist"),
    "3": ("prompts the base never solves become solvable", "solved"),
    "4": ("KL + resets keep entropy up and improvement going", "training"),
    "5": ("each task falls into one regime: diminish, plateau, sustained", "regimes"),
}


# ----------------------------------------------------------------------------------------------- statistics


def _per_prompt(rows: Sequence[Mapping[str, Any]], of_samples: Callable[[Sequence[Mapping[str, Any]]], Any],
                ) -> dict[str, dict[str, Any]]:
    """Per task, per prompt id: ``of_samples`` of its samples, from ``samples-LABEL.jsonl`` rows (skipped ones out)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if samples := row.get("samples"):
            out.setdefault(row["task"], {})[row["id"]] = of_samples(samples)
    return out


def outcomes_from_rows(rows: Sequence[Mapping[str, Any]], threshold: float) -> dict[str, dict[str, tuple[bool, ...]]]:
    """Per task, per prompt id: each sample correct or not."""
    return _per_prompt(rows, lambda samples: tuple(s["reward"] >= threshold - CORRECT_EPS for s in samples))


def distinct_from_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per task, per prompt id: how many different completions (text, outer whitespace stripped) its samples hold."""
    return _per_prompt(rows, lambda samples: len({str(s.get("text", "")).strip() for s in samples}))


def diversity(distinct: Mapping[str, int]) -> dict[str, Any]:
    """Mean different completions per prompt and the share of prompts answered one way every time."""
    counts = list(distinct.values())
    if not counts:
        return {"prompts": 0, "mean_distinct": None, "frac_single": None}
    return {"prompts": len(counts), "mean_distinct": float(np.mean(counts)),
            "frac_single": sum(c == 1 for c in counts) / len(counts)}


def scopes(outcomes: Mapping[str, Mapping[str, tuple[bool, ...]]]) -> dict[str, dict[str, tuple[bool, ...]]]:
    """Each task, then ``all`` (every prompt once: ids are unique across tasks)."""
    out = {task: dict(prompts) for task, prompts in outcomes.items()}
    out["all"] = {pid: o for prompts in outcomes.values() for pid, o in prompts.items()}
    return out


def prompt_pass(outcome: Sequence[bool], k: int) -> float:
    """Unbiased pass@k of one prompt (``prorl_async.eval.stats.pass_at_k``)."""
    return pass_at_k(len(outcome), int(sum(outcome)), k)


def pass_curve(prompts: Mapping[str, Sequence[bool]], ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over prompts for each k (prompts with fewer than k samples left out; k none reaches, absent)."""
    out = {}
    for k in ks:
        values = [prompt_pass(o, k) for o in prompts.values() if len(o) >= k]
        if values:
            out[k] = float(np.mean(values))
    return out


def paired_delta(base: Mapping[str, Sequence[bool]], other: Mapping[str, Sequence[bool]], k: int) -> dict[str, Any]:
    """``other - base`` in mean pass@k over their shared prompts, with the paired standard error over prompts."""
    shared = [pid for pid in base if pid in other and len(base[pid]) >= k and len(other[pid]) >= k]
    a = np.array([prompt_pass(base[p], k) for p in shared])
    b = np.array([prompt_pass(other[p], k) for p in shared])
    if not shared:
        return {"k": k, "prompts": 0, "base": None, "other": None, "delta": None, "se": None}
    d = b - a
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return {"k": k, "prompts": len(shared), "base": float(a.mean()), "other": float(b.mean()),
            "delta": float(d.mean()), "se": se}


def beyond(delta: float | None, se: float | None, z: float = Z) -> int:
    """+1 / -1 when ``delta`` is more than ``z`` standard errors above / below 0; 0 inside, or when unknown."""
    if delta is None or se is None or math.isnan(delta) or math.isnan(se):
        return 0
    return 1 if delta > z * se else -1 if delta < -z * se else 0


def binomial_se(p: float, samples: int) -> float:
    """Standard error of a pass rate from ``samples`` draws, with p shrunk to (successes + 1) / (samples + 2), so it
    is never 0 at p = 0 or 1."""
    shrunk = (p * samples + 1) / (samples + 2)
    return math.sqrt(shrunk * (1 - shrunk) / max(samples, 1))


def pass1_profile(prompts: Mapping[str, Sequence[bool]], bins: int = 10) -> dict[str, Any]:
    """The pass@1 distribution over prompts: mean, fraction at 0 and at 1, histogram (``eval.stats.histogram``)."""
    counts = [(len(o), int(sum(o))) for o in prompts.values() if len(o)]
    if not counts:
        return {"prompts": 0}
    return {"prompts": len(counts), "mean": float(np.mean([c / n for n, c in counts])),
            "frac_zero": sum(c == 0 for _, c in counts) / len(counts),
            "frac_one": sum(c == n for n, c in counts) / len(counts), "histogram": histogram(counts, bins)}


def binom_upper_tail(n: int, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(max(k, 0), n + 1)) / 2**n if n else 1.0


def solved_changes(base: Mapping[str, Sequence[bool]], other: Mapping[str, Sequence[bool]]) -> dict[str, Any]:
    """Prompts solved at k = n: newly (base 0 of n, other > 0) and lost (the reverse), with the one-sided sign test of
    newly > lost (p = P(X >= newly), X ~ Bin(newly + lost, 1/2))."""
    shared = [pid for pid in base if pid in other and len(base[pid]) and len(other[pid])]
    newly = sorted(p for p in shared if not any(base[p]) and any(other[p]))
    lost = sorted(p for p in shared if any(base[p]) and not any(other[p]))
    return {"prompts": len(shared), "base_unsolved": sum(not any(base[p]) for p in shared),
            "other_unsolved": sum(not any(other[p]) for p in shared), "newly_solved": len(newly), "lost": len(lost),
            "p_newly_gt_lost": binom_upper_tail(len(newly) + len(lost), len(newly)),
            "p_lost_gt_newly": binom_upper_tail(len(newly) + len(lost), len(lost)),
            "newly_solved_ids": newly, "lost_ids": lost,
            "newly_solved_correct": {p: int(sum(other[p])) for p in newly}}


def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank."""
    _, inverse, counts = np.unique(np.asarray(values, dtype=float), return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2.0)[inverse]


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; None with fewer than 3 points or a constant side."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the ranks (ties at their mean rank)."""
    return pearson(ranks(x), ranks(y)) if len(x) >= 3 else None


def permutation_p(x: Sequence[float], y: Sequence[float], rho: float, permutations: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """One-sided p-values of Spearman's ``rho`` (lower, upper) against ``permutations`` shuffles of ``y``."""
    rx, ry = ranks(x), ranks(y)
    zx = (rx - rx.mean()) / rx.std()
    zy = (ry - ry.mean()) / ry.std()
    shuffled = np.random.default_rng(seed).permuted(np.tile(zy, (permutations, 1)), axis=1)
    null = shuffled @ zx / len(zx)
    eps = 1e-12  # ties of the statistic with rho count as at least as extreme
    return (float((np.sum(null <= rho + eps) + 1) / (permutations + 1)),
            float((np.sum(null >= rho - eps) + 1) / (permutations + 1)))


def prompt_gains(base: Mapping[str, Sequence[bool]], end: Mapping[str, Sequence[bool]]) -> dict[str, Any]:
    """Per shared prompt with at least 2 base samples: the base's pass@h on its first half of samples (h = half),
    and the gains in pass@1 and pass@h of ``end`` over the base's second half (split so that the same noise is not
    on both sides of the correlation)."""
    shared = [p for p in base if p in end and len(base[p]) >= 2 and len(end[p]) >= len(base[p]) // 2]
    if not shared:
        return {"h": None, "x": [], "gain_pass1": [], "gain_pass_h": []}
    h = min(len(base[p]) for p in shared) // 2
    x, g1, gh = [], [], []
    for p in shared:
        first, second = base[p][:h], base[p][h:2 * h]
        x.append(prompt_pass(first, h))
        g1.append(prompt_pass(end[p], 1) - prompt_pass(second, 1))
        gh.append(prompt_pass(end[p], h) - prompt_pass(second, h))
    return {"h": h, "x": x, "gain_pass1": g1, "gain_pass_h": gh}


def block_mean_se(values: Sequence[float], block: int = 4) -> tuple[float, float]:
    """Mean of ``values`` and its standard error from the means of consecutive blocks of ``block`` (neighbouring
    steps are correlated); with fewer than 2 blocks, from the values themselves. (nan, nan) when empty."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    blocks = [v[i:i + block].mean() for i in range(0, len(v) - block + 1, block)]
    spread = np.array(blocks if len(blocks) >= 2 else v)
    se = float(spread.std(ddof=1) / math.sqrt(len(spread))) if len(spread) > 1 else math.nan
    return float(v.mean()), se


def slope_se(xs: Sequence[float], ys: Sequence[float], ses: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of ys on xs and its standard error propagated from the points' own errors ``ses``
    (measurement noise, not the residuals: with 3-5 points the residuals say little). (nan, nan) below 2 points."""
    x, y, s = (np.asarray(v, dtype=float) for v in (xs, ys, ses))
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan
    dx = x - x.mean()
    sxx = float(dx @ dx)
    return float(dx @ (y - y.mean()) / sxx), float(math.sqrt(float((dx**2) @ (s**2))) / sxx)


# ----------------------------------------------------------------------------------------------- training records


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def training_series(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per step (``version``) the step record's entropy, KL, KL share, response length and reward; the steps with a
    reset; the validation rounds. A resumed run logs again the steps after its checkpoint: the last record of a
    version wins."""
    steps: dict[int, Mapping[str, Any]] = {}
    rounds: dict[int, Mapping[str, Any]] = {}
    for r in records:
        if r.get("kind") == "step" and r.get("version") is not None:
            steps[int(r["version"])] = r
        elif r.get("kind") == "validation" and r.get("version") is not None and r.get("pass_at_1") is not None:
            rounds[int(r["version"])] = r
    versions = sorted(steps)
    out: dict[str, Any] = {"steps": versions}
    out.update({name: [_num(steps[v].get(key)) for v in versions] for name, key in STEP_KEYS.items()})
    out["resets"] = [v for v in versions if _num(steps[v].get("reset")) > 0]
    out["validation"] = [{
        "version": v, "pass_at_1": _num(r["pass_at_1"]), "samples": int(r.get("samples") or 0),
        "se": binomial_se(_num(r["pass_at_1"]), int(r.get("samples") or 0)), "complete": bool(r.get("complete", True)),
        "by_task": {t: _num(m.get("pass_at_1")) for t, m in (r.get("by_task") or {}).items()}}
        for v, r in sorted(rounds.items())]
    return out


def arm_summary(series: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """One arm's claim-4 figures: mean entropy and KL share in the first and last thirds of ``steps``, the entropy
    slope, and validation pass@1 at start and end and its slope over the last third."""
    versions = series["steps"]
    late = [i for i, v in enumerate(versions) if v > 2 * steps / 3]
    early = [i for i, v in enumerate(versions) if v <= steps / 3]
    out: dict[str, Any] = {"steps_logged": len(versions), "resets": list(series["resets"])}
    for name in ("entropy", "kl_share", "kl"):
        out[f"{name}_first_third"], _ = block_mean_se([series[name][i] for i in early])
        out[f"{name}_last_third"], out[f"{name}_last_third_se"] = block_mean_se([series[name][i] for i in late])
    ent = [(v, e) for v, e in zip(versions, series["entropy"], strict=True) if math.isfinite(e)]
    out["entropy_slope_per_step"] = float(np.polyfit(*zip(*ent, strict=True), 1)[0]) if len(ent) >= 2 else None
    rounds = [r for r in series["validation"] if r["complete"]]  # a timed-out round holds only some prompts
    tail = [r for r in rounds if r["version"] >= 2 * steps / 3]
    slope, se = slope_se([r["version"] for r in tail], [r["pass_at_1"] for r in tail], [r["se"] for r in tail])
    out.update(val_rounds=len(rounds), val_rounds_last_third=len(tail), val_slope_last_third=slope,
               val_slope_last_third_se=se)
    for key, r in (("val_start", rounds[0] if rounds else None), ("val_end", rounds[-1] if rounds else None)):
        out[key] = r["pass_at_1"] if r else None
        out[f"{key}_se"] = r["se"] if r else None
        out[f"{key}_version"] = r["version"] if r else None
    return out


# ----------------------------------------------------------------------------------------------- verdicts


def _verdict(claim: str, verdict: str, why: str, numbers: dict[str, Any]) -> dict[str, Any]:
    text, figure = CLAIMS[claim]
    return {"claim": text, "figure": figure, "verdict": verdict, "why": why, "numbers": numbers}


def verdict_improves(base: Mapping[str, Sequence[bool]], end: Mapping[str, Sequence[bool]],
                     k_max: int) -> dict[str, Any]:
    """Claim 1a over the pooled prompts: held when pass@1 and pass@k_max both rise beyond noise."""
    d1, dk = paired_delta(base, end, 1), paired_delta(base, end, k_max)
    s1, sk = beyond(d1["delta"], d1["se"]), beyond(dk["delta"], dk["se"])
    numbers = {"pass@1": d1, f"pass@{k_max}": dk}
    if s1 > 0 and sk > 0:
        return _verdict("1a", "held", f"pass@1 and pass@{k_max} both up beyond {Z:g} SE", numbers)
    if s1 < 0 or sk < 0:
        down = " and ".join(n for n, s in (("pass@1", s1), (f"pass@{k_max}", sk)) if s < 0)
        return _verdict("1a", "did not hold", f"{down} down beyond {Z:g} SE", numbers)
    return _verdict("1a", "inconclusive", f"pass@1 {_word(s1)}, pass@{k_max} {_word(sk)} ({Z:g} SE)", numbers)


def _word(sign: int) -> str:
    return {1: "up", -1: "down", 0: "within noise"}[sign]


def verdict_weakest(base: Mapping[str, Mapping[str, Sequence[bool]]], end: Mapping[str, Mapping[str, Sequence[bool]]],
                    k_max: int) -> dict[str, Any]:
    """Claim 1b: Spearman over prompts of the base's (first-half) pass@h and the pass@1 gain, one-sided permutation
    p; per task the base pass@k_max and the gains, and their correlations across tasks (numbers only)."""
    tasks = [t for t in base if t != "all" and t in end]
    per_task = {t: {"base_pass_at_kmax": pass_curve(base[t], [k_max]).get(k_max),
                    "gain_pass1": paired_delta(base[t], end[t], 1)["delta"],
                    "gain_pass_at_kmax": paired_delta(base[t], end[t], k_max)["delta"]} for t in tasks}
    usable = [t for t in tasks if all(v is not None for v in per_task[t].values())]
    xs = [per_task[t]["base_pass_at_kmax"] for t in usable]
    across = {"tasks": len(usable), "spearman_gain_pass1": spearman(xs, [per_task[t]["gain_pass1"] for t in usable]),
              "spearman_gain_pass_at_kmax": spearman(xs, [per_task[t]["gain_pass_at_kmax"] for t in usable]),
              "pearson_gain_pass1": pearson(xs, [per_task[t]["gain_pass1"] for t in usable])}
    g = prompt_gains(base.get("all", {}), end.get("all", {}))
    rho = spearman(g["x"], g["gain_pass1"])
    rho_h = spearman(g["x"], g["gain_pass_h"])
    numbers: dict[str, Any] = {"per_task": per_task, "across_tasks": across, "prompts": len(g["x"]), "h": g["h"],
                               "spearman_prompts_gain_pass1": rho, "spearman_prompts_gain_pass_h": rho_h}
    if rho is None:
        return _verdict("1b", "inconclusive", "no correlation over prompts (too few, or one side constant)", numbers)
    p_low, p_high = permutation_p(g["x"], g["gain_pass1"], rho)
    numbers.update(p_negative=p_low, p_positive=p_high)
    if rho < 0 and p_low < ALPHA:
        return _verdict("1b", "held", f"rho {rho:+.2f} over {len(g['x'])} prompts, p {p_low:.3f}", numbers)
    if rho > 0 and p_high < ALPHA:
        return _verdict("1b", "did not hold", f"rho {rho:+.2f} > 0 over {len(g['x'])} prompts, p {p_high:.3f}",
                        numbers)
    return _verdict("1b", "inconclusive", f"rho {rho:+.2f} over {len(g['x'])} prompts, p {min(p_low, p_high):.3f} "
                    f">= {ALPHA}", numbers)


def verdict_shift(base: Mapping[str, Sequence[bool]], end: Mapping[str, Sequence[bool]],
                  path: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Claim 2: mean per-prompt pass@1 up beyond noise, with no more prompts at 0 and no fewer at 1."""
    d = paired_delta(base, end, 1)
    a, b = pass1_profile(base), pass1_profile(end)
    numbers = {"mean": d, "frac_zero": [a.get("frac_zero"), b.get("frac_zero")],
               "frac_one": [a.get("frac_one"), b.get("frac_one")], "along_training": list(path)}
    sign = beyond(d["delta"], d["se"])
    if sign < 0:
        return _verdict("2", "did not hold", f"mean pass@1 down {d['delta']:+.3f} (SE {d['se']:.3f})", numbers)
    if sign == 0:
        return _verdict("2", "inconclusive", "mean pass@1 change within noise", numbers)
    if b["frac_zero"] <= a["frac_zero"] and b["frac_one"] >= a["frac_one"]:
        return _verdict("2", "held", f"mean pass@1 {d['delta']:+.3f} (SE {d['se']:.3f}), at 0 {a['frac_zero']:.2f} "
                        f"-> {b['frac_zero']:.2f}, at 1 {a['frac_one']:.2f} -> {b['frac_one']:.2f}", numbers)
    return _verdict("2", "inconclusive", "mean up, but more prompts at 0 or fewer at 1: a spread, not a shift", numbers)


def verdict_new_solved(base: Mapping[str, Sequence[bool]], end: Mapping[str, Sequence[bool]]) -> dict[str, Any]:
    """Claim 3: newly solved against lost at k = n, one-sided sign test."""
    c = solved_changes(base, end)
    head = f"{c['newly_solved']} newly solved, {c['lost']} lost of {c['base_unsolved']} never solved by the base"
    if c["newly_solved"] > c["lost"] and c["p_newly_gt_lost"] < ALPHA:
        return _verdict("3", "held", f"{head}; p {c['p_newly_gt_lost']:.3f}", c)
    if c["base_unsolved"] >= 5 and c["newly_solved"] == 0:
        return _verdict("3", "did not hold", f"{head}: none became solvable", c)
    if c["lost"] > c["newly_solved"] and c["p_lost_gt_newly"] < ALPHA:
        return _verdict("3", "did not hold", f"{head}: more lost than gained, p {c['p_lost_gt_newly']:.3f}", c)
    why = "the base solves every prompt" if not c["base_unsolved"] else f"p {c['p_newly_gt_lost']:.3f} >= {ALPHA}"
    return _verdict("3", "inconclusive", f"{head}; {why}", c)


def verdict_resets(arms: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Claim 4: ``resets`` against ``no-resets`` in the last third: entropy higher and validation progress steeper."""
    numbers: dict[str, Any] = {"arms": dict(arms)}
    if MAIN_ARM not in arms or "no-resets" not in arms:
        return _verdict("4", "inconclusive", "needs both the resets and no-resets arms", numbers)
    r, n = arms[MAIN_ARM], arms["no-resets"]
    ent = (r["entropy_last_third"] - n["entropy_last_third"],
           math.hypot(r["entropy_last_third_se"], n["entropy_last_third_se"]))
    slope = (r["val_slope_last_third"] - n["val_slope_last_third"],
             math.hypot(r["val_slope_last_third_se"], n["val_slope_last_third_se"]))
    end = ((r["val_end"] - n["val_end"], math.hypot(r["val_end_se"], n["val_end_se"]))
           if r["val_end"] is not None and n["val_end"] is not None else (math.nan, math.nan))
    s_ent = beyond(*ent)
    use_slope = not (math.isnan(slope[0]) or math.isnan(slope[1]))
    s_prog = beyond(*slope) if use_slope else beyond(*end)
    numbers.update(entropy_diff=ent[0], entropy_diff_se=ent[1], val_slope_diff=slope[0], val_slope_diff_se=slope[1],
                   val_end_diff=end[0], val_end_diff_se=end[1], progress_from="slope" if use_slope else "end")
    why = (f"resets - no-resets, last third: entropy {_word(s_ent)} ({ent[0]:+.3f} +- {ent[1]:.3f}), progress "
           f"{_word(s_prog)} ({'validation slope' if use_slope else 'last validation pass@1'}); KL share "
           f"{r['kl_share_last_third']:.2f} vs {n['kl_share_last_third']:.2f}")
    if s_ent > 0 and s_prog > 0:
        return _verdict("4", "held", why, numbers)
    if s_ent < 0 or s_prog < 0:
        return _verdict("4", "did not hold", why, numbers)
    return _verdict("4", "inconclusive", why, numbers)


def regime(d1: Mapping[str, Any], dk: Mapping[str, Any], last_k: Mapping[str, Any] | None = None) -> str:
    """A task's regime from base -> end deltas of pass@1 (``d1``) and pass@k_max (``dk``) and the pass@k_max delta
    between the last two evaluated checkpoints (``last_k``, None with one): see the module docstring."""
    s1, sk = beyond(d1["delta"], d1["se"]), beyond(dk["delta"], dk["se"])
    if sk < 0:
        return "diminish" if s1 > 0 else "regressed"
    if sk == 0:
        return "plateau" if s1 >= 0 else "regressed"
    if s1 < 0:
        return "other"  # pass@k_max up while pass@1 fell: none of the paper's three
    if last_k is not None and beyond(last_k["delta"], last_k["se"]) <= 0:
        return "plateau"  # rose, then flat (or falling) between the last two evaluated checkpoints
    return "sustained"


def verdict_regimes(per_task: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Claim 5: every task in one of the three regimes, and at least one moved beyond noise."""
    numbers = {"tasks": dict(per_task)}
    if not per_task:
        return _verdict("5", "inconclusive", "no task evaluated at the end", numbers)
    names = {t: v["regime"] for t, v in per_task.items()}
    listing = ", ".join(f"{t}: {r}" for t, r in names.items())
    if any(r not in ("diminish", "plateau", "sustained") for r in names.values()):
        return _verdict("5", "did not hold", f"outside the three regimes: {listing}", numbers)
    moved = any(beyond(v["pass@1"]["delta"], v["pass@1"]["se"]) or beyond(v["pass@k"]["delta"], v["pass@k"]["se"])
                for v in per_task.values())
    if not moved:
        return _verdict("5", "inconclusive", f"no task moved beyond noise ({listing})", numbers)
    return _verdict("5", "held", listing, numbers)


# ----------------------------------------------------------------------------------------------- analysis


def analyse(base: Mapping[str, Any] | None, evals: Mapping[str, Mapping[int, Mapping[str, Any]]],
            training: Mapping[str, Mapping[str, Any]], plan: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the report holds, from the loaded evaluations (``base``, ``evals[arm][step]``: each with
    ``outcomes``) and each arm's :func:`training_series`."""
    ks, steps = sorted(plan["ks"]), plan["steps"]
    k_max = ks[-1]
    labelled = ([("base", 0, None, base)] if base is not None else []) + [
        (f"{arm} step {step}", step, arm, ev) for arm, by_step in evals.items() for step, ev in sorted(by_step.items())]
    models = {label: (step, arm, scopes(ev["outcomes"])) for label, step, arm, ev in labelled}
    out: dict[str, Any] = {
        "models": {label: {"arm": arm, "step": step} for label, (step, arm, _) in models.items()},
        "pass_at_k": {label: {s: {str(k): v for k, v in pass_curve(p, ks).items()} for s, p in sc.items()}
                      for label, (_, _, sc) in models.items()},
        "pass1": {label: {s: pass1_profile(p) for s, p in sc.items()} for label, (_, _, sc) in models.items()},
        "diversity": {label: {s: diversity(d) for s, d in scopes(ev["distinct"]).items()}
                      for label, _, _, ev in labelled if "distinct" in ev},
        "training": {arm: {"series": s, "summary": arm_summary(s, steps)} for arm, s in training.items()},
        "solved": {}, "regimes": {},
        "main_arm": MAIN_ARM if MAIN_ARM in evals else next(iter(evals), MAIN_ARM)}  # another when resets is not run
    arms_summary = {arm: t["summary"] for arm, t in out["training"].items()}
    verdicts: dict[str, Any] = {"4": verdict_resets(arms_summary)}
    if base is None:
        out["verdicts"] = {**{c: _verdict(c, "inconclusive", "no evaluation of the base model", {})
                              for c in CLAIMS if c != "4"}, **verdicts}
        return out
    b = models["base"][2]
    for arm, by_step in evals.items():
        out["solved"][arm] = [{"step": step, **{s: _solved_counts(b[s], scopes(ev["outcomes"]).get(s, {}))
                                                for s in b}} for step, ev in sorted(by_step.items())]
    main_arm = out["main_arm"]
    main = evals.get(main_arm, {})
    if steps not in main:
        out["verdicts"] = {**{c: _verdict(c, "inconclusive", f"no evaluation of the {main_arm} arm at step {steps}",
                                          {}) for c in CLAIMS if c != "4"}, **verdicts}
        return out
    end = scopes(main[steps]["outcomes"])
    path = [{"step": 0, **_profile_short(pass1_profile(b["all"]))}] + [
        {"step": s, **_profile_short(pass1_profile(scopes(ev["outcomes"])["all"]))} for s, ev in sorted(main.items())]
    before_end = [s for s in sorted(main) if s < steps]
    for task in (t for t in b if t != "all" and t in end):
        last_k = (paired_delta(scopes(main[before_end[-1]]["outcomes"]).get(task, {}), end[task], k_max)
                  if before_end else None)
        d1, dk = paired_delta(b[task], end[task], 1), paired_delta(b[task], end[task], k_max)
        out["regimes"][task] = {"regime": regime(d1, dk, last_k), "pass@1": d1, "pass@k": dk, "k": k_max,
                                "last_segment_pass@k": last_k}
    verdicts.update({"1a": verdict_improves(b["all"], end["all"], k_max), "1b": verdict_weakest(b, end, k_max),
                     "2": verdict_shift(b["all"], end["all"], path), "3": verdict_new_solved(b["all"], end["all"]),
                     "5": verdict_regimes(out["regimes"])})
    out["verdicts"] = {c: verdicts[c] for c in CLAIMS}
    return out


def _solved_counts(base: Mapping[str, Sequence[bool]], other: Mapping[str, Sequence[bool]]) -> dict[str, Any]:
    c = solved_changes(base, other)
    return {k: c[k] for k in ("prompts", "base_unsolved", "newly_solved", "lost", "p_newly_gt_lost")}


def _profile_short(p: Mapping[str, Any]) -> dict[str, Any]:
    return {k: p.get(k) for k in ("mean", "frac_zero", "frac_one")}


def verdict_table(verdicts: Mapping[str, Mapping[str, Any]], figures: Mapping[str, str] | None = None) -> str:
    """The printed table: claim, verdict, figure, and the line of numbers it rests on."""
    lines = [f"{'claim':6s} {'verdict':13s} figure / why", "-" * 100]
    for cid, v in verdicts.items():
        figure = (figures or {}).get(v["figure"], v["figure"])
        lines += [f"{cid:6s} {v['verdict']:13s} {v['claim']} [{figure}]", f"{'':20s} {v['why']}"]
    return "\n".join(lines)


def diversity_table(div: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Per model and task: mean different completions per prompt, and the share of prompts answered one way."""
    scope_names = list(next(iter(div.values())))
    lines = ["different completions per prompt (mean; share of prompts always answered the same way)",
             f"{'model':22s} " + " ".join(f"{s:>24s}" for s in scope_names)]
    for label, by_scope in div.items():
        cells = []
        for s in scope_names:
            v = by_scope.get(s) or {}
            cells.append(f"{v['mean_distinct']:.1f} ({v['frac_single']:.2f})" if v.get("prompts") else "-")
        lines.append(f"{label:22s} " + " ".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)
