"""Evaluation statistics: unbiased pass@k, the pass@1 distribution, the Dang et al. bound, comparisons.

Pure functions over counts (standard library only, cheap to import from the learner). The ``eval``
command builds on them: :mod:`prorl_async.eval.run` (tasks, generation, scoring, output files),
:mod:`prorl_async.eval.generate` (the vLLM process), :mod:`prorl_async.eval.report` (JSON,
markdown, PNG).

Definitions (n samples of a prompt, c of them correct; a sample is correct when its reward is at least
``threshold``, 1.0 by default, so partial credit never counts as solved):

- ``pass@k = 1 - C(n - c, k) / C(n, k)`` per prompt (Chen et al., 2021), averaged over prompts: the
  unbiased estimate of the chance that at least one of k samples is correct. Computed as a product in
  log space (:func:`pass_at_k`), exact to rounding for any n, never through huge binomials.
- ``p = c / n`` is a prompt's pass@1; its distribution over a task's prompts is the paper's Figure 7.
- Dang et al.'s bound on the expected pass@k over prompts,
  ``1 - ((1 - E[p])^2 + Var(p))^(k/2)`` (= ``1 - E[(1 - p)^2]^(k/2)``), from Jensen's inequality: it holds
  for k >= 2 (for k = 1 it is a lower bound on pass@1). ``dang_bound`` plugs in the mean and the population
  variance (ddof = 0) of the per-prompt estimates ``p = c / n``. Those estimates carry binomial noise
  (``Var(c/n) = Var(rho) + E[rho (1 - rho)] / n``), which lowers the plug-in bound: with few samples the
  measured pass@k sits above it (always at k = 2). ``dang_bound_debiased`` removes that noise: it estimates
  ``(1 - E[rho])^2 + Var(rho) = E[(1 - rho)^2]`` without bias as the mean of ``C(n-c, 2) / C(n, 2)``, i.e.
  ``1 - pass@2``, so it equals the measured pass@2 at k = 2 and bounds the expected pass@k above it.

Scopes (a task, a domain, everything) pool their prompts: each prompt counts once, so measured pass@k and
the bound describe the same distribution of prompts.

For periodic validation during training, :func:`validation_metrics` turns ``{prompt_id: [reward, ...]}``
into a flat dict of plain floats (``pass@1``, ``pass@k``, ...)::

    metrics = validation_metrics({"p0": [1.0, 0.0, 0.0, 1.0], "p1": [0.0] * 4}, ks=(1, 4))
    metrics["pass@1"], metrics["pass@4"]   # 0.25, 0.5
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

CORRECT_EPS = 1e-9
"""Rewards within this of the threshold count as correct (1.0 stored as 0.9999999999 is still correct)."""
HIST_BINS = 10


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct among ``n`` samples: ``1 - C(n-c, k) / C(n, k)``.

    ``C(n-c, k) / C(n, k) = prod_{i=0}^{k-1} (n-c-i)/(n-i) = prod_{j=n-c+1}^{n} (1 - k/j)``: the shorter
    product is summed in log space and ``-expm1`` gives the complement, so small values keep their digits.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k takes integers (got n={n!r}, c={c!r}, k={k!r})")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n (got n={n}, c={c})")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples (got n={n})")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    if c < k:  # prod_{j=n-c+1}^{n} (1 - k/j): c factors
        log_fail = sum(math.log1p(-k / j) for j in range(n - c + 1, n + 1))
    else:  # prod_{i=0}^{k-1} (1 - c/(n-i)): k factors
        log_fail = sum(math.log1p(-c / (n - i)) for i in range(k))
    return -math.expm1(log_fail)


def dang_bound(pass1: Sequence[float], k: float) -> float:
    """Dang et al.'s bound ``1 - ((1 - E[p])^2 + Var(p))^(k/2)`` over per-prompt pass@1 values (population Var)."""
    if not pass1:
        raise ValueError("dang_bound needs at least one prompt")
    mean = sum(pass1) / len(pass1)
    var = sum((p - mean) ** 2 for p in pass1) / len(pass1)
    base = min(max((1.0 - mean) ** 2 + var, 0.0), 1.0)
    return 1.0 - base ** (k / 2.0)


def dang_bound_debiased(counts: Sequence[tuple[int, int]], k: float) -> float:
    """The bound with ``E[(1 - rho)^2]`` estimated without bias from ``(n, c)`` pairs: ``1 - (1 - pass@2)^(k/2)``.

    Prompts with fewer than two samples are left out; NaN when none has two.
    """
    used = [(n, c) for n, c in counts if n >= 2]
    if not used:
        return math.nan
    base = sum((n - c) * (n - c - 1) / (n * (n - 1)) for n, c in used) / len(used)
    return 1.0 - min(max(base, 0.0), 1.0) ** (k / 2.0)


def count_correct(rewards: Iterable[float], threshold: float = 1.0) -> tuple[int, int]:
    """``(n, c)``: samples and correct samples (reward >= threshold, up to :data:`CORRECT_EPS`)."""
    values = [float(r) for r in rewards]
    return len(values), sum(r >= threshold - CORRECT_EPS for r in values)


def histogram(counts: Iterable[tuple[int, int]], bins: int = HIST_BINS) -> list[int]:
    """Prompts per pass@1 bin ``[i/bins, (i+1)/bins)`` (the last bin includes 1), from ``(n, c)`` pairs.

    Integer arithmetic: ``c / n`` exactly on a bin edge falls in the upper bin.
    """
    out = [0] * bins
    for n, c in counts:
        out[min(c * bins // n, bins - 1)] += 1
    return out


def curve_ks(n: int, requested: Iterable[int] = ()) -> list[int]:
    """k values for a pass@k curve up to ``n``: powers of two, ``n`` itself and the requested ones."""
    ks = {1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n} | {k for k in requested if 1 <= k <= n}
    return sorted(ks)


# ------------------------------------------------------------------------------------------ summaries


@dataclass(frozen=True)
class PromptResult:
    """One prompt's scored samples."""

    id: str
    task: str  # "domain/name" (disambiguated when a mix holds the same task twice)
    domain: str
    rewards: tuple[float, ...]
    threshold: float = 1.0

    @property
    def n(self) -> int:
        return len(self.rewards)

    @cached_property
    def c(self) -> int:
        return count_correct(self.rewards, self.threshold)[1]

    @property
    def pass1(self) -> float:
        return self.c / self.n


def summarize(prompts: Sequence[PromptResult], ks: Sequence[int], bins: int = HIST_BINS) -> dict[str, Any]:
    """Statistics of one scope: pass@k per k, the pass@1 distribution, the Dang bound, the k curve.

    Prompts without samples (skipped: too long) are counted but left out of every statistic; a k larger
    than a prompt's n leaves that prompt out of pass@k (``prompts_used`` says how many remained).
    """
    used = [p for p in prompts if p.n > 0]
    counts = [(p.n, p.c) for p in used]
    out: dict[str, Any] = {"prompts": len(used), "prompts_skipped": len(prompts) - len(used)}
    if not used:
        return out
    ns = [n for n, _ in counts]
    pass1 = [c / n for n, c in counts]
    mean = sum(pass1) / len(pass1)
    var = sum((p - mean) ** 2 for p in pass1) / len(pass1)
    rewards = [r for p in used for r in p.rewards]
    out.update({
        "samples_per_prompt": min(ns) if min(ns) == max(ns) else [min(ns), max(ns)],
        "mean_reward": sum(rewards) / len(rewards),
        "pass1_mean": mean,
        "pass1_var": var,
        "pass1_std": math.sqrt(var),
        "solved_none": sum(c == 0 for _, c in counts),
        "solved_all": sum(c == n for n, c in counts),
        "pass_at_k": {},
        "dang_bound": {},
        "dang_bound_debiased": {},
        "histogram": {"edges": [i / bins for i in range(bins + 1)], "counts": histogram(counts, bins)},
    })
    for k in sorted(set(ks)):
        value, used_k = _mean_pass(counts, k)
        if used_k:
            out["pass_at_k"][str(k)] = value
            out["dang_bound"][str(k)] = dang_bound(pass1, k)
            out["dang_bound_debiased"][str(k)] = dang_bound_debiased(counts, k)
            if used_k != len(counts):
                out.setdefault("prompts_used", {})[str(k)] = used_k
    curve = curve_ks(min(ns), ks)
    out["curve"] = {"k": curve, "pass_at_k": [_mean_pass(counts, k)[0] for k in curve],
                    "dang_bound": [dang_bound(pass1, k) for k in curve],
                    "dang_bound_debiased": [dang_bound_debiased(counts, k) for k in curve]}
    return out


def _mean_pass(counts: Sequence[tuple[int, int]], k: int) -> tuple[float, int]:
    values = [pass_at_k(n, c, k) for n, c in counts if n >= k]
    return (sum(values) / len(values) if values else math.nan), len(values)


def scopes(prompts: Sequence[PromptResult]) -> dict[str, list[PromptResult]]:
    """Prompts by scope, in report order: each task, each domain, then ``all``."""
    out: dict[str, list[PromptResult]] = {}
    for p in prompts:
        out.setdefault(p.task, []).append(p)
    for p in prompts:
        out.setdefault(f"domain:{p.domain}", []).append(p)
    out["all"] = list(prompts)
    return out


def summarize_all(prompts: Sequence[PromptResult], ks: Sequence[int], bins: int = HIST_BINS) -> dict[str, Any]:
    """:func:`summarize` for every scope of :func:`scopes`."""
    return {name: summarize(group, ks, bins) for name, group in scopes(prompts).items()}


def compare(model: Sequence[PromptResult], other: Sequence[PromptResult], ks: Sequence[int]) -> dict[str, Any]:
    """Per scope, ``model - other``: pass@1 and pass@k deltas, and the prompts each one solves alone.

    ``newly_solved``: prompts ``other`` never solved (c = 0) that ``model`` solved at least once;
    ``lost``: the reverse. Prompts are matched by id; only prompts both evaluated count.
    """
    theirs = {p.id: p for p in other if p.n > 0}
    out: dict[str, Any] = {}
    for name, group in scopes([p for p in model if p.n > 0 and p.id in theirs]).items():
        mine = summarize(group, ks)
        base = summarize([theirs[p.id] for p in group], ks)
        if not mine.get("prompts"):
            continue
        out[name] = {
            "prompts": mine["prompts"],
            "pass1_mean": {"model": mine["pass1_mean"], "other": base["pass1_mean"],
                           "delta": mine["pass1_mean"] - base["pass1_mean"]},
            "pass_at_k": {k: {"model": v, "other": base["pass_at_k"][k], "delta": v - base["pass_at_k"][k]}
                          for k, v in mine["pass_at_k"].items() if k in base["pass_at_k"]},
            "newly_solved": sum(p.c > 0 and theirs[p.id].c == 0 for p in group),
            "lost": sum(p.c == 0 and theirs[p.id].c > 0 for p in group),
        }
    return out


# ------------------------------------------------------------------------------ periodic validation


def validation_metrics(scored: Mapping[str, Sequence[float]], ks: Sequence[int] = (1,), *, threshold: float = 1.0,
                       groups: Mapping[str, str] | None = None) -> dict[str, float]:
    """Validation metrics from already-scored samples: ``{prompt_id: [reward per sample]}`` -> plain floats.

    Keys: ``prompts``, ``samples``, ``mean_reward``, ``pass1_var``, ``solved_none``/``solved_all`` (fractions
    of prompts), ``pass@K`` for each K in ``ks``, ``dang_bound@K`` and ``dang_bound_debiased@K`` for each K >= 2
    (module docstring). A prompt with fewer
    than K samples is left out of ``pass@K``; a K no prompt reaches is left out; prompts with no samples
    are ignored. With ``groups`` (``prompt_id -> name``, e.g. a task), every key is repeated per group as
    ``NAME/KEY``. Empty input gives ``{"prompts": 0.0}``.
    """
    out = _validation(scored, ks, threshold)
    if groups:
        by_group: dict[str, dict[str, Sequence[float]]] = {}
        for pid, rewards in scored.items():
            if pid in groups:
                by_group.setdefault(groups[pid], {})[pid] = rewards
        for name in sorted(by_group):
            out.update({f"{name}/{key}": v for key, v in _validation(by_group[name], ks, threshold).items()})
    return out


def _validation(scored: Mapping[str, Sequence[float]], ks: Sequence[int], threshold: float) -> dict[str, float]:
    counts = [count_correct(rewards, threshold) for rewards in scored.values() if len(rewards)]
    if not counts:
        return {"prompts": 0.0}
    rewards = [float(r) for values in scored.values() for r in values]
    pass1 = [c / n for n, c in counts]
    mean = sum(pass1) / len(pass1)
    out = {
        "prompts": float(len(counts)),
        "samples": float(len(rewards)),
        "mean_reward": sum(rewards) / len(rewards),
        "pass1_var": sum((p - mean) ** 2 for p in pass1) / len(pass1),
        "solved_none": sum(c == 0 for _, c in counts) / len(counts),
        "solved_all": sum(c == n for n, c in counts) / len(counts),
    }
    for k in sorted(set(ks)):
        value, used = _mean_pass(counts, k)
        if used:
            out[f"pass@{k}"] = value
            if k >= 2:
                out[f"dang_bound@{k}"] = dang_bound(pass1, k)
                debiased = dang_bound_debiased(counts, k)
                if not math.isnan(debiased):
                    out[f"dang_bound_debiased@{k}"] = debiased
    return out
