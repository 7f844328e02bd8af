"""Output files of ``prorl-async eval``: ``eval.json``, ``report.md``, ``pass1_hist.png`` and ``pass_at_k.png``.

The PNGs are matplotlib figures drawn on the Agg canvas (``Figure`` + ``FigureCanvasAgg``, never pyplot, so no
global state and no display): one panel per task, plus ``all`` when there are several tasks, each with a title,
labelled axes and a grid, and a legend wherever more than one series is drawn. ``eval.json`` stays strict JSON
(non-finite floats are written as null).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

COLORS = ("#1f77b4", "#ff7f0e")  # model, other
DPI = 150


def write_all(data: dict[str, Any], per_model: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write every file into ``out``; returns ``{kind: file name}`` (also stored in ``eval.json``)."""
    files: dict[str, Any] = {"json": "eval.json", "report": "report.md", "pass1_histogram": "pass1_hist.png",
                             "pass_at_k": "pass_at_k.png",
                             "samples": {label: m["file"] for label, m in per_model.items()}}
    panels = plot_scopes(data)
    plot_histograms(data, panels, out / files["pass1_histogram"])
    plot_curves(data, panels, out / files["pass_at_k"])
    data = {**data, "files": files}
    (out / files["json"]).write_text(json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")
    (out / files["report"]).write_text(markdown(data))
    return files


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as None (``eval.json`` stays strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def plot_scopes(data: dict[str, Any]) -> list[str]:
    """Panels of the figures: every task, then ``all`` when there is more than one task."""
    tasks = [t["label"] for t in data["tasks"]]
    return tasks + (["all"] if len(tasks) > 1 else [])


def table_scopes(data: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Scopes worth a table row: a domain row only for a domain with several tasks, ``all`` only for several tasks
    (otherwise they repeat a task's row; ``eval.json`` keeps every scope)."""
    tasks = data["tasks"]
    per_domain = {t["domain"]: sum(u["domain"] == t["domain"] for u in tasks) for t in tasks}
    keep = []
    for scope in results:
        if scope.startswith("domain:") and per_domain.get(scope.removeprefix("domain:"), 0) < 2:
            continue
        if scope == "all" and len(tasks) < 2:
            continue
        keep.append(scope)
    return keep


def scope_title(scope: str) -> str:
    if scope.startswith("domain:"):
        return f"{scope.removeprefix('domain:')} (domain)"
    return scope


def _labels(data: dict[str, Any]) -> list[str]:
    return [data["model"]] + ([data["other"]] if data.get("other") else [])


# ------------------------------------------------------------------------------------------- markdown


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _signed(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def markdown(data: dict[str, Any]) -> str:
    s, labels = data["settings"], _labels(data)
    ks = [str(k) for k in s["k"]]
    bound_ks = [k for k in ks if int(k) >= 2]
    title = f"`{data['model']}`" + (f" vs `{data['other']}`" if data.get("other") else "")
    lines = [f"# Evaluation of {title}", ""]
    for label in labels:
        m = data["models"][label]
        gen, sc = m["generation"], m["scoring"]
        bad = sc.get("error", 0) + sc.get("timeout", 0) + sc.get("crash", 0)
        lines.append(f"- `{label}`: {m['path']} (given as `{m['spec']}`); {gen['tokens']} tokens generated in "
                     f"{gen['generate_s']:.1f} s ({gen['tokens_per_s']:.0f} tok/s; "
                     f"{gen['prompt_tokens']} prompt tokens over all samples)"
                     + (f"; {gen['skipped']} prompts too long, skipped" if gen.get("skipped") else "")
                     + (f"; **{bad} samples scored 0 by a scorer error, timeout or crash**" if bad else ""))
    tasks = ", ".join(f"`{t['label']}` ({t['prompts']})" for t in data["tasks"])
    stop = ", ".join(f"`{x}`" for x in s["stop"]) or "none"
    lines += [
        f"- tasks (held-out prompts): {tasks}; validation split of tasks.seed {s['tasks_seed']}, size "
        f"{s['validation_size']}; {s['few_shot']}-shot, prefill `{s['prefill']}`, answer format {s['answer_format']}",
        f"- sampling: {s['samples']} samples per prompt, temperature {s['temperature']:g}, top_p {s['top_p']:g}"
        + (f", top_k {s['top_k']}" if s["top_k"] > 0 else "")
        + f", at most {s['max_response_tokens']} tokens, stop {stop}, seed {s['seed']}",
        f"- a sample is correct when its reward ({_rewards(data)}) is at least {s['correct_threshold']:g}; "
        "pass@k is the unbiased estimate 1 - C(n-c, k)/C(n, k) averaged over prompts; a domain row and `all` pool "
        "their prompts (each prompt counts once)",
        "",
    ]
    for label in labels:
        results = data["results"][label]
        shown = table_scopes(data, results)
        lines += [f"## `{label}`", ""]
        lines += _table(
            ["scope", "prompts", "mean reward", *(f"pass@{k}" for k in ks), "never solved", "always solved"],
            [[scope_title(scope), r["prompts"], _f(r.get("mean_reward")),
              *(_f(r.get("pass_at_k", {}).get(k)) for k in ks), r.get("solved_none", "–"), r.get("solved_all", "–")]
             for scope, r in results.items() if scope in shown])
        if bound_ks:
            lines += ["Dang et al. bound on the expected pass@k from the pass@1 distribution, "
                      "`1 - ((1 - E[p])^2 + Var(p))^(k/2)`: measured pass@k / the bound with the mean and variance "
                      "(over prompts, ddof 0) of the per-prompt pass@1 estimates / the bound with the binomial "
                      "sampling noise of those estimates removed from Var(p) (`1 - (1 - pass@2)^(k/2)`; the plug-in "
                      "bound sits below the measured pass@k when samples per prompt are few):", ""]
            lines += _table(
                ["scope", "E[p]", "Var(p)", *(f"pass@{k} / bound / debiased" for k in bound_ks)],
                [[scope_title(scope), _f(r.get("pass1_mean")), _f(r.get("pass1_var"), 4),
                  *(" / ".join(_f(r.get(key, {}).get(k)) for key in ("pass_at_k", "dang_bound", "dang_bound_debiased"))
                    for k in bound_ks)]
                 for scope, r in results.items() if r.get("prompts") and scope in shown])
    comparison = data.get("comparison")
    if comparison:
        a, b = labels
        lines += [f"## Comparison: `{a}` − `{b}`", "",
                  f"Deltas are `{a}` minus `{b}` on the same prompts. *Newly solved*: prompts `{b}` never solved in "
                  f"{s['samples']} samples that `{a}` solved at least once; *lost*: the reverse (the reasoning "
                  "boundary at k = n).", ""]
        lines += _table(
            ["scope", "prompts", f"pass@1 {a}", f"pass@1 {b}", *(f"Δ pass@{k}" for k in ks), "newly solved", "lost"],
            [[scope_title(scope), c["prompts"], _f(c["pass1_mean"]["model"]), _f(c["pass1_mean"]["other"]),
              *(_signed(c["pass_at_k"].get(k, {}).get("delta")) for k in ks), c["newly_solved"], c["lost"]]
             for scope, c in comparison.items() if scope in table_scopes(data, comparison)])
    lines += ["## pass@1 distribution over prompts", "",
              f"![pass@1 distribution]({data.get('files', {}).get('pass1_histogram', 'pass1_hist.png')})", ""]
    first = data["results"][labels[0]]
    edges = next((r["histogram"]["edges"] for r in first.values() if "histogram" in r), None)
    if edges:
        bins = [f"[{lo:.1f}, {hi:.1f}{']' if i == len(edges) - 2 else ')'}" for i, (lo, hi) in
                enumerate(itertools.pairwise(edges))]
        rows = []
        for scope in table_scopes(data, first):
            for label in labels:
                r = data["results"][label].get(scope, {})
                if "histogram" in r:
                    rows.append([scope_title(scope), f"`{label}`", *r["histogram"]["counts"]])
        lines += ["Prompts per pass@1 bin:", "", *_table(["scope", "model", *bins], rows)]
    lines += ["## pass@k against k", "",
              f"![pass@k]({data.get('files', {}).get('pass_at_k', 'pass_at_k.png')})", "",
              "Solid: measured pass@k; dashed: the Dang et al. bound from the per-prompt pass@1 estimates; dotted: "
              "the same bound with their sampling noise removed (both for k >= 2; at k = 1 the formula lies below "
              "pass@1).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- figures


def _grid(count: int) -> tuple[int, int]:
    cols = min(count, 3)
    return math.ceil(count / cols), cols


def _panels(count: int) -> tuple[Figure, list[Axes]]:
    """A figure of ``count`` panels, at most three a row, on the Agg canvas (no pyplot state)."""
    rows, cols = _grid(count)
    fig = Figure(figsize=(max(4.2 * cols, 5.5), 3.3 * rows + 0.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _panel_title(data: dict[str, Any], scope: str) -> str:
    prompts = data["results"][data["model"]].get(scope, {}).get("prompts")
    name = "all tasks" if scope == "all" else scope_title(scope)
    return f"{name} ({prompts} prompts)" if prompts is not None else name


def _finite_float(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, facecolor="white")


def histogram_figure(data: dict[str, Any], scopes: list[str]) -> Figure:
    """The paper's Figure 7: per scope, prompts per pass@1 bin (one bar per model in each bin) and each model's
    mean pass@1 as a dashed vertical line."""
    labels = _labels(data)
    fig, axes = _panels(len(scopes))
    for ax, scope in zip(axes, scopes, strict=True):
        handles = []
        top = 1
        for i, label in enumerate(labels):
            result = data["results"][label].get(scope, {})
            hist = result.get("histogram")
            if hist is None:
                continue
            edges, counts = hist["edges"], hist["counts"]
            widths = [(hi - lo) / len(labels) for lo, hi in itertools.pairwise(edges)]
            lefts = [lo + i * w for lo, w in zip(edges[:-1], widths, strict=True)]
            handles.append(ax.bar(lefts, counts, width=[w * 0.92 for w in widths], align="edge", color=COLORS[i],
                                  alpha=0.85, label=label, zorder=2))
            top = max(top, *counts)
            mean = result.get("pass1_mean")
            if _finite_float(mean):
                handles.append(ax.axvline(mean, color=COLORS[i], linestyle="--", linewidth=1.2,
                                          label=f"{label}: mean = {mean:.2f}", zorder=3))
        ax.set_title(_panel_title(data, scope), fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, top * 1.35)  # headroom for the legend
        ax.set_xlabel("pass@1 of a prompt (fraction of samples correct)", fontsize=9)
        ax.set_ylabel("prompts (count)", fontsize=9)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3, zorder=0)
        ax.set_axisbelow(True)
        if len(handles) > 1:
            ax.legend(handles=handles, loc="upper right", ncols=len(labels), fontsize=7, frameon=False)
    fig.suptitle(f"pass@1 distribution over prompts ({data['settings']['samples']} samples per prompt)", fontsize=11)
    return fig


def curve_figure(data: dict[str, Any], scopes: list[str]) -> Figure:
    """Per scope: measured pass@k against k (log2 axis) for each model (solid), the Dang et al. bound from the
    per-prompt pass@1 estimates (dashed) and the bound with their sampling noise removed (dotted), both for k >= 2;
    one legend for the figure."""
    labels = _labels(data)
    fig, axes = _panels(len(scopes))
    styles = (("pass_at_k", "o-", "pass@k"), ("dang_bound", "--", "bound"),
              ("dang_bound_debiased", ":", "bound, debiased"))
    handles: dict[tuple[int, int], Any] = {}  # (style, model) -> a line, for the figure's legend
    for ax, scope in zip(axes, scopes, strict=True):
        ks: set[int] = set()
        for i, label in enumerate(labels):
            c = data["results"][label].get(scope, {}).get("curve")
            if not c:
                continue
            ks.update(c["k"])
            for j, (key, style, name) in enumerate(styles):
                # the bounds are drawn for k >= 2 only (at k = 1 the formula lies below pass@1)
                kv = [(k, v) for k, v in zip(c["k"], c.get(key, []), strict=False)
                      if (j == 0 or k >= 2) and _finite_float(v)]
                if kv:
                    [line] = ax.plot(*zip(*kv, strict=True), style, color=COLORS[i], markersize=3.5,
                                     linewidth=1.5 if j == 0 else 1.3, label=f"{label}: {name}")
                    handles.setdefault((j, i), line)
        ax.set_xscale("log", base=2)
        if ks:
            ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_ylim(0, 1.02)
        ax.set_title(_panel_title(data, scope), fontsize=10)
        ax.set_xlabel("k (samples per prompt, log scale)", fontsize=9)
        ax.set_ylabel("pass@k (mean over prompts)", fontsize=9)
        ax.grid(True, alpha=0.3)
    if len(handles) > 1:
        # one column per style, one row per model (legend entries fill column by column)
        ordered = [handles[key] for key in sorted(handles)]
        fig.legend(handles=ordered, loc="outside lower center", ncols=len({j for j, _ in handles}), fontsize=8,
                   frameon=False)
    s = data["settings"]
    fig.suptitle(f"pass@k against k ({s['samples']} samples per prompt, temperature {s['temperature']:g})",
                 fontsize=11)
    return fig


def plot_histograms(data: dict[str, Any], scopes: list[str], path: Path) -> None:
    """Write :func:`histogram_figure` as a PNG."""
    _save(histogram_figure(data, scopes), path)


def plot_curves(data: dict[str, Any], scopes: list[str], path: Path) -> None:
    """Write :func:`curve_figure` as a PNG."""
    _save(curve_figure(data, scopes), path)


def _rewards(data: dict[str, Any]) -> str:
    """The reward of each task, one name when they share it (reports written before per-task rewards: the global)."""
    names = {t["reward"] for t in data["tasks"] if t.get("reward")}
    if not names:
        return data["settings"]["reward_function"]
    if len(names) == 1:
        return names.pop()
    return "; ".join(f"`{t['label']}`: {t['reward']}" for t in data["tasks"])
