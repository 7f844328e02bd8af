"""Output files of ``prorl-async eval``: ``eval.json``, ``report.md``, ``pass1_hist.png`` and ``pass_at_k.png``.

The PNGs are drawn with matplotlib (Agg, no pyplot state) when it can be imported; without it a small
built-in rasteriser writes the same panels as plain bars and lines without text, so a report never lacks
its figures (``eval.json`` records which one drew them).
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

COLORS = ("#1f77b4", "#ff7f0e")  # model, other


def write_all(data: dict[str, Any], per_model: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write every file into ``out``; returns ``{kind: file name}`` (also stored in ``eval.json``)."""
    files: dict[str, Any] = {"json": "eval.json", "report": "report.md", "pass1_histogram": "pass1_hist.png",
                             "pass_at_k": "pass_at_k.png",
                             "samples": {label: m["file"] for label, m in per_model.items()}}
    panels = plot_scopes(data)
    files["plotter"] = plot_histograms(data, panels, out / files["pass1_histogram"])
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
        f"- a sample is correct when its reward ({s['reward_function']}) is at least {s['correct_threshold']:g}; "
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


def _hist_of(data: dict[str, Any], label: str, scope: str) -> dict[str, Any] | None:
    return data["results"][label].get(scope, {}).get("histogram")


def plot_histograms(data: dict[str, Any], scopes: list[str], path: Path) -> str:
    """Figure 7 style: per scope, prompts per pass@1 bin, both models overlaid; returns the plotter used."""
    labels = _labels(data)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        series = [[[(_hist_of(data, label, sc) or {}).get("counts", []) for label in labels]] for sc in scopes]
        _fallback_png(path, scopes, series, kind="bars")
        return "builtin"
    rows, cols = _grid(len(scopes))
    fig = Figure(figsize=(max(4.6 * cols, 6.0), 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, scope in zip(axes, scopes, strict=False):
        for i, label in enumerate(labels):
            hist = _hist_of(data, label, scope)
            if hist is None:
                continue
            edges, counts = hist["edges"], hist["counts"]
            mean = data["results"][label][scope]["pass1_mean"]
            ax.bar(edges[:-1], counts, width=[hi - lo for lo, hi in itertools.pairwise(edges)],
                   align="edge", color=COLORS[i], alpha=0.55 if len(labels) > 1 else 0.85, edgecolor=COLORS[i],
                   label=f"{label} (mean {mean:.2f})")
        ax.set_title(scope_title(scope), fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("pass@1 of a prompt")
        ax.set_ylabel("prompts")
        ax.legend(fontsize=7)
    for ax in axes[len(scopes):]:
        ax.set_visible(False)
    fig.suptitle(f"pass@1 distribution over prompts ({data['settings']['samples']} samples per prompt)", fontsize=11)
    fig.savefig(path, dpi=110)
    return "matplotlib"


def plot_curves(data: dict[str, Any], scopes: list[str], path: Path) -> str:
    """Per scope: measured pass@k against k (log scale) for each model, and the Dang bound (dashed)."""
    labels = _labels(data)

    def curve(label: str, scope: str) -> dict[str, Any] | None:
        return data["results"][label].get(scope, {}).get("curve")

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        series = []
        for scope in scopes:
            lines = []
            for label in labels:
                c = curve(label, scope)
                if c:
                    lines += [c["pass_at_k"], [b if k >= 2 else math.nan for k, b in
                                               zip(c["k"], c["dang_bound_debiased"], strict=True)]]
            series.append([lines])
        _fallback_png(path, scopes, series, kind="lines")
        return "builtin"
    rows, cols = _grid(len(scopes))
    fig = Figure(figsize=(max(4.6 * cols, 6.0), 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, scope in zip(axes, scopes, strict=False):
        for i, label in enumerate(labels):
            c = curve(label, scope)
            if not c:
                continue
            ax.plot(c["k"], c["pass_at_k"], "o-", color=COLORS[i], markersize=3, label=f"{label} pass@k")
            for key, style, name in (("dang_bound", "--", "bound"), ("dang_bound_debiased", ":", "bound, debiased")):
                kb = [(k, b) for k, b in zip(c["k"], c.get(key, []), strict=False) if k >= 2 and not math.isnan(b)]
                if kb:
                    ax.plot(*zip(*kb, strict=True), style, color=COLORS[i], alpha=0.8, label=f"{label} {name}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_title(scope_title(scope), fontsize=10)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.legend(fontsize=7)
    for ax in axes[len(scopes):]:
        ax.set_visible(False)
    fig.suptitle("pass@k (solid) and the Dang et al. bound (dashed; dotted: debiased)", fontsize=11)
    fig.savefig(path, dpi=110)
    return "matplotlib"


# -------------------------------------------------------------------- fallback: a tiny PNG rasteriser

_RGB = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in COLORS]


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def blend(self, x: int, y: int, rgb: tuple[int, ...], alpha: float) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            for j in range(3):
                self.px[i + j] = round(self.px[i + j] * (1 - alpha) + rgb[j] * alpha)

    def rect(self, x0: float, y0: float, x1: float, y1: float, rgb: tuple[int, ...], alpha: float = 1.0) -> None:
        for y in range(round(min(y0, y1)), round(max(y0, y1))):
            for x in range(round(min(x0, x1)), round(max(x0, x1))):
                self.blend(x, y, rgb, alpha)

    def line(self, x0: float, y0: float, x1: float, y1: float, rgb: tuple[int, ...], dashed: bool = False) -> None:
        steps = max(int(max(abs(x1 - x0), abs(y1 - y0))), 1)
        for s in range(steps + 1):
            if dashed and (s // 4) % 2:
                continue
            t = s / steps
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in (0, 1):
                self.blend(x + dx, y, rgb, 1.0)

    def save(self, path: Path) -> None:
        stride = self.w * 3
        raw = b"".join(b"\x00" + bytes(self.px[y * stride : (y + 1) * stride]) for y in range(self.h))

        def chunk(tag: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                         + chunk(b"IEND", b""))


def _fallback_png(path: Path, scopes: list[str], series: list[list[list[list[float]]]], kind: str) -> None:
    """Panels without text: ``bars`` (counts per bin, one series per model, overlaid) or ``lines`` (values in
    [0, 1] over equally spaced points; series alternate solid measured and dashed bound per model)."""
    pw, ph, pad = 300, 220, 30
    rows, cols = _grid(len(scopes))
    canvas = _Canvas(cols * pw, rows * ph)
    grey = (90, 90, 90)
    for n, panel in enumerate(series):
        ox, oy = (n % cols) * pw + pad, (n // cols) * ph + pad // 2
        w, h = pw - 2 * pad + pad // 2, ph - 2 * pad
        canvas.line(ox, oy + h, ox + w, oy + h, grey)
        canvas.line(ox, oy, ox, oy + h, grey)
        values = panel[0]
        if kind == "bars":
            top = max([max(v) for v in values if v] or [1]) or 1
            for i, counts in enumerate(values):
                for b, count in enumerate(counts):
                    x0 = ox + w * b / len(counts)
                    canvas.rect(x0 + 1, oy + h - h * count / top, x0 + w / len(counts) - 1, oy + h,
                                _RGB[i % 2], 0.55 if len(values) > 1 else 0.85)
        else:
            for i, ys in enumerate(values):
                pts = [(ox + w * j / max(len(ys) - 1, 1), oy + h - h * y) for j, y in enumerate(ys)
                       if not math.isnan(y)]
                for (x0, y0), (x1, y1) in itertools.pairwise(pts):
                    canvas.line(x0, y0, x1, y1, _RGB[(i // 2) % 2], dashed=bool(i % 2))
    canvas.save(path)
