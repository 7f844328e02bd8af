"""The figures of ``bench/boundary.py``'s report: five PNGs drawn from :func:`_boundary_stats.analyse`'s output.

``pass-at-k``, ``solved`` and ``regimes`` are line panels (``_runs.plot_lines``); ``pass1-hist`` (grouped bars) and
``training`` (line panels with reset markers) are drawn here on the Agg canvas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import _runs
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure_paths(prefix: str | Path) -> dict[str, str]:
    """The five PNGs of a report, by the figure names ``_boundary_stats.CLAIMS`` refer to."""
    return {name: f"{prefix}-{name}.png" for name in ("pass-at-k", "pass1-hist", "training", "solved", "regimes")}


def _last_per_arm(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``base`` (if evaluated), then each arm's latest evaluated checkpoint."""
    last: dict[str, tuple[int, str]] = {}
    for label, m in models.items():
        if m["arm"] is not None and m["step"] >= last.get(m["arm"], (-1, ""))[0]:
            last[m["arm"]] = (m["step"], label)
    return (["base"] if "base" in models else []) + [label for _, label in last.values()]


def _scope_order(analysis: Mapping[str, Any]) -> list[str]:
    first = next(iter(analysis["pass_at_k"].values()), {})
    return [s for s in first if s != "all"] + (["all"] if "all" in first and len(first) > 2 else [])


def write_figures(analysis: Mapping[str, Any], plan: Mapping[str, Any], prefix: str | Path) -> dict[str, str]:
    """Write the five PNGs (those with data); returns ``{figure: path}`` of the ones written."""
    paths, written = figure_paths(prefix), {}
    scopes_shown = _scope_order(analysis)
    if scopes_shown:
        panels = [_pass_at_k_panel(analysis, s) for s in scopes_shown]
        _runs.plot_lines(Path(paths["pass-at-k"]), panels, f"pass@k against k, base vs trained ({plan['samples']} "
                         "samples per prompt)")
        _runs.save_figure(histogram_figure(analysis, scopes_shown, plan), Path(paths["pass1-hist"]))
        written.update({k: paths[k] for k in ("pass-at-k", "pass1-hist")})
    if analysis["training"]:
        _runs.save_figure(training_figure(analysis), Path(paths["training"]))
        written["training"] = paths["training"]
    if any(analysis["solved"].values()) and scopes_shown:
        _runs.plot_lines(Path(paths["solved"]), [_solved_panel(analysis, s) for s in scopes_shown],
                         f"prompts solved at k = {plan['samples']} against the base (0 of {plan['samples']} samples)")
        written["solved"] = paths["solved"]
    tasks = [s for s in scopes_shown if s != "all"]
    if tasks and len(analysis["models"]) > 1:
        _runs.plot_lines(Path(paths["regimes"]), [_regime_panel(analysis, t, plan) for t in tasks],
                         "pass@1 and pass@k_max against training steps (step 0: the base)")
        written["regimes"] = paths["regimes"]
    return written


def _pass_at_k_panel(analysis: Mapping[str, Any], scope: str) -> dict[str, Any]:
    labels = _last_per_arm(analysis["models"])
    series = [[(math.log2(int(k)), v) for k, v in analysis["pass_at_k"][label].get(scope, {}).items()]
              for label in labels]
    ks = sorted({int(k) for label in labels for k in analysis["pass_at_k"][label].get(scope, {})})
    return {"title": f"{scope}: pass@k", "xlabel": "k (samples per prompt, log2 axis)",
            "ylabel": "pass@k (mean over prompts)", "legend": labels, "series": series,
            "xticks": [(math.log2(k), str(k)) for k in ks]}


def _solved_panel(analysis: Mapping[str, Any], scope: str) -> dict[str, Any]:
    series, legend, unsolved = [], [], None
    for arm, points in analysis["solved"].items():
        for key, name in (("newly_solved", "newly solved"), ("lost", "lost")):
            series.append([(0, 0)] + [(p["step"], p[scope][key]) for p in points if scope in p])
            legend.append(f"{arm}: {name}")
        unsolved = next((p[scope]["base_unsolved"] for p in points if scope in p), unsolved)
    return {"title": f"{scope}: newly solved / lost (base never solved {unsolved})",
            "xlabel": "training step (checkpoint)", "ylabel": "prompts (count)", "legend": legend, "series": series}


def _regime_panel(analysis: Mapping[str, Any], task: str, plan: Mapping[str, Any]) -> dict[str, Any]:
    k_max = max(plan["ks"])
    base = analysis["pass_at_k"].get("base", {}).get(task, {})
    series, legend = [], []
    for arm in dict.fromkeys(m["arm"] for m in analysis["models"].values() if m["arm"] is not None):
        points = sorted((m["step"], label) for label, m in analysis["models"].items() if m["arm"] == arm)
        for k in (1, k_max):
            start = [(0, base[str(k)])] if str(k) in base else []
            series.append(start + [(s, analysis["pass_at_k"][label].get(task, {}).get(str(k), math.nan))
                                   for s, label in points])
            legend.append(f"{arm}: pass@{k}")
    name = analysis["regimes"].get(task, {}).get("regime", "no regime: no end evaluation")
    return {"title": f"{task}: {name}", "xlabel": "training step (checkpoint)", "ylabel": "pass@k (mean over prompts)",
            "legend": legend, "series": series}


def histogram_figure(analysis: Mapping[str, Any], scopes_shown: Sequence[str], plan: Mapping[str, Any]) -> Figure:
    """The paper's Fig. 7: per scope, prompts per pass@1 bin for the base and the main arm's checkpoints (grouped
    bars), each one's mean as a dashed line."""
    models, main = analysis["models"], analysis["main_arm"]
    labels = [lb for lb in models if lb == "base"] + sorted((lb for lb, m in models.items() if m["arm"] == main),
                                                              key=lambda lb: models[lb]["step"])
    fig = Figure(figsize=(4.6 * len(scopes_shown), 3.8), dpi=_runs.DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, scope in zip(fig.subplots(1, len(scopes_shown), squeeze=False)[0], scopes_shown, strict=True):
        width, top = 0.1 / max(len(labels), 1), 1
        for i, label in enumerate(labels):
            profile = analysis["pass1"][label].get(scope, {})
            if not profile.get("prompts"):
                continue
            counts = profile["histogram"]
            lefts = [b / len(counts) + i * width for b in range(len(counts))]
            ax.bar(lefts, counts, width=width * 0.92, align="edge", color=f"C{i}", alpha=0.85, label=label)
            ax.axvline(profile["mean"], color=f"C{i}", linestyle="--", linewidth=1.2)
            top = max(top, *counts)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, top * 1.35)  # headroom for the legend
        ax.set_title(f"{scope}: pass@1 over prompts (dashed: means)", fontsize=10)
        ax.set_xlabel("pass@1 of a prompt (fraction of samples correct)", fontsize=9)
        ax.set_ylabel("prompts (count)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
        if len(labels) > 1:
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"pass@1 distribution, base and {main} checkpoints ({plan['samples']} samples per prompt)",
                 fontsize=11)
    return fig


def training_figure(analysis: Mapping[str, Any]) -> Figure:
    """Entropy, KL, KL share, response length and validation pass@1 against steps, a line per arm; each arm's resets
    as dotted vertical lines in its colour."""
    arms = list(analysis["training"])
    series = {arm: t["series"] for arm, t in analysis["training"].items()}
    panels = [{"title": title, "xlabel": "training step", "ylabel": ylabel, "legend": arms,
               "series": [list(zip(series[a]["steps"], series[a][key], strict=True)) for a in arms]}
              for key, title, ylabel in (
                  ("entropy", "policy entropy", "entropy (nats per response token)"),
                  ("kl", "KL to the reference (k3)", "KL (nats per response token)"),
                  ("kl_share", "KL term's share of the update", "share of the gradient (0-1)"),
                  ("response_tokens", "response length", "tokens per response (batch mean)"))]
    panels.append({"title": "validation pass@1 (held-out, in run)", "xlabel": "training step",
                   "ylabel": "pass@1 (fraction correct)", "legend": arms,
                   "series": [[(r["version"], r["pass_at_1"]) for r in series[a]["validation"]] for a in arms]})
    fig = _runs.lines_figure(panels, "training over steps per arm; dotted vertical lines: resets (arm's colour)")
    for ax in fig.axes:
        for i, arm in enumerate(arms):
            for v in series[arm]["resets"]:
                ax.axvline(v, color=f"C{i % 10}", linestyle=":", linewidth=1.0, alpha=0.8)
    return fig
