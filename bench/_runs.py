"""Shared parts of the end-to-end benches: launch a real ``prorl-async run``, pin its processes, read its metrics.

Used by ``speedup.py``, ``staleness.py``, ``learning.py`` and ``peers.py``; not a script of its own.

- :func:`launch` runs ``prorl-async run CONFIG --set ...`` (the console script's entry point) in a session of its
  own (so that it and everything it starts can be stopped by its process group, never by name) with
  ``run.run_dir`` under /tmp.
- Pinning (``pin={"learner": {1}, "generator": {0}}``): the supervisor starts its children with plain
  ``subprocess``, each leading a process group of its own, so a thread here re-applies ``sched_setaffinity`` to
  every thread of every process in the learner's and the generators' groups while the run lasts (threads and
  processes started later inherit it; the loop catches the ones started before). vLLM binds its OpenMP threads
  itself: ``VLLM_CPU_OMP_THREADS_BIND`` is set to the generator's cores so it binds them there, and the learner
  gets ``learner.num_threads`` = its core count (it would otherwise size its pool from the unpinned mask).
- :func:`summarize` reduces ``RUN_DIR/metrics.jsonl`` to steady-state figures: the first ``warmup_steps`` steps
  (engine start, first weights) are left out of every rate.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_ENTRY = "import sys; from prorl_async.cli import main; sys.exit(main())"  # what the `prorl-async` script runs

# ----------------------------------------------------------------------------------------------- pure math


def ideal_bound(t_gen: float, t_train: float) -> float:
    """Best speedup of overlapping generation and training over running them one after the other.

    Sync spends ``t_gen + t_train`` per step; perfect overlap spends ``max(t_gen, t_train)``.
    """
    slowest = max(t_gen, t_train)
    return (t_gen + t_train) / slowest if slowest > 0 else float("nan")


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, None as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(header: list[str], rows: list[list[Any]], digits: int = 3) -> str:
    """A plain aligned text table (right-aligned columns after the first)."""
    cells = [header] + [[fmt(c, digits) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                   strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path | None, doc: dict[str, Any]) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_finite(doc), indent=2) + "\n")
        print(f"wrote {out}")


def _finite(value: Any) -> Any:
    """NaN/inf as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------- metrics


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line
            continue
    return records


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def summarize(records: list[dict[str, Any]], warmup_steps: int = 1) -> dict[str, Any]:
    """Steady-state figures of one run from its metrics records.

    Rates span from the end of step ``warmup_steps`` to the end of the last step; per-phase times are means over
    the same steps: ``t_train`` = ``step_time_s + sync_s`` (learner busy), ``t_wait`` = ``wait_s`` (learner idle,
    waiting for a full batch). In a synchronous run the learner's wait is the generation of one batch (plus
    loading its weights), so there ``t_wait`` is the generation phase.
    """
    steps = [r for r in records if r.get("kind") == "step"]
    gens = [r for r in records if r.get("kind") == "generator"]
    out: dict[str, Any] = {"steps": len(steps)}
    if not steps:
        return out
    w = min(warmup_steps, len(steps) - 1)
    timed = steps[w + 1:] if len(steps) > w + 1 else steps[-1:]
    span = steps[-1]["time_s"] - steps[w]["time_s"] if len(steps) > w + 1 else float("nan")
    samples = sum(r.get("samples", 0) for r in timed)
    tokens = sum(r.get("tokens", 0) for r in timed)
    wait = sum(r.get("wait_s", 0.0) for r in timed)
    last = steps[-1]
    counters = last.get("buffer_counters", {}) or {}
    received = counters.get("received", 0)
    last_gen = gens[-1] if gens else {}
    out.update(
        timed_steps=len(timed), span_s=span,
        samples_per_s=samples / span if span > 0 else float("nan"),
        tokens_per_s=tokens / span if span > 0 else float("nan"),
        step_period_s=span / len(timed) if span > 0 else float("nan"),
        t_train_s=_mean([r.get("step_time_s", 0.0) + r.get("sync_s", 0.0) for r in timed]),
        t_wait_s=_mean([r.get("wait_s", 0.0) for r in timed]),
        learner_idle_ratio=wait / span if span > 0 else float("nan"),
        generator_idle_ratio=generator_idle(gens, steps[w]["time_s"]),
        generator_tokens_per_s=last_gen.get("tokens_per_s"),
        stale_drop_frac=counters.get("stale", 0) / received if received else 0.0,
        groups_aborted_stale=last_gen.get("groups_aborted_stale"),
        is_truncated_frac=_mean([r.get("is_truncated_frac", float("nan")) for r in timed]),
        ess=_mean([r.get("ess", float("nan")) for r in timed]),
        staleness_mean=_mean([r.get("staleness_mean", float("nan")) for r in timed]),
        reward_mean_last=_mean([r.get("reward_mean", float("nan")) for r in steps[-3:]]),
        samples_total=sum(r.get("samples", 0) for r in steps),
        wall_s=last["time_s"] - records[0]["time_s"],
        buffer_counters=counters,
    )
    return out


def generator_idle(gens: list[dict[str, Any]], since: float) -> float | None:
    """Idle share of the generators after ``since`` (learner clock), from their cumulative heartbeat figures.

    A generator reports ``idle_ratio`` and ``tokens_per_s`` since its own start; ``tokens_sent / tokens_per_s`` is
    that elapsed time, so two records give the idle seconds and the elapsed seconds in between. Summed over the
    generators; None without two usable records of one generator.
    """
    idle = elapsed = 0.0
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in gens:
        if r.get("tokens_per_s") and r.get("tokens_sent") and r.get("idle_ratio") is not None:
            by_source.setdefault(str(r.get("source")), []).append(r)
    for records in by_source.values():
        window = [r for r in records if r["time_s"] >= since] or records[-1:]
        first = max((r for r in records if r["time_s"] < since), key=lambda r: r["time_s"], default=window[0])
        last = window[-1]
        e0, e1 = (r["tokens_sent"] / r["tokens_per_s"] for r in (first, last))
        if e1 > e0:
            idle += last["idle_ratio"] * e1 - first["idle_ratio"] * e0
            elapsed += e1 - e0
    return idle / elapsed if elapsed > 0 else None


def training_start(records: list[dict[str, Any]]) -> float | None:
    """When the learner's training loop began (learner clock): the first step's end less its wait, train and sync.

    Process and engine start come before it and vary with the machine's load, so curves over wall-clock start here.
    """
    first = next((r for r in records if r.get("kind") == "step"), None)
    if first is None:
        return None
    return first["time_s"] - first.get("wait_s", 0.0) - first.get("step_time_s", 0.0) - first.get("sync_s", 0.0)


def reward_curve(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per step: seconds since training began (:func:`training_start`), cumulative samples, ``reward_mean``."""
    t0 = training_start(records)
    if t0 is None:
        return []
    seen, curve = 0, []
    for r in records:
        if r.get("kind") == "step":
            seen += int(r.get("samples", 0))
            curve.append({"t_s": r["time_s"] - t0, "samples": seen, "reward": r.get("reward_mean", float("nan"))})
    return curve


def reward_at_budget(records: list[dict[str, Any]], budget: int, window: int = 3) -> float:
    """Mean reward of the last ``window`` steps trained before ``budget`` samples were used (nan if none)."""
    curve = [p for p in reward_curve(records) if p["samples"] <= budget]
    return _mean([p["reward"] for p in curve[-window:]])


# ----------------------------------------------------------------------------------------------- running


@dataclass
class Run:
    """One finished (or stopped) ``prorl-async run``."""

    run_dir: Path
    returncode: int
    seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)


def pin_overrides(pin: dict[str, set[int]] | None) -> list[str]:
    """Config overrides a pinned run needs: the learner's torch threads = its cores."""
    return [f"learner.num_threads={len(pin['learner'])}"] if pin else []


def launch(config: str | None, overrides: list[str], run_dir: Path, *, pin: dict[str, set[int]] | None = None,
           timeout_s: float = 3600.0, quiet: bool = True) -> Run:
    """Run ``prorl-async run`` to completion (or ``timeout_s``, then SIGINT and wait) and return its records."""
    run_dir = Path(run_dir)
    argv = [sys.executable, "-c", _ENTRY, "run"] + ([config] if config else [])
    for item in [*overrides, *pin_overrides(pin), f"run.run_dir={json.dumps(str(run_dir))}", "run.tui=\"off\""]:
        argv += ["--set", item]
    env = dict(os.environ)
    if pin:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(pin["generator"]))
    log = (run_dir.parent / f"{run_dir.name}.supervisor.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    stop = threading.Event()
    pinner = threading.Thread(target=_pin_loop, args=(run_dir, pin, stop), daemon=True) if pin else None
    if pinner:
        pinner.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"  {run_dir.name}: past {timeout_s:.0f} s, stopping it (SIGINT)", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this function started, by its id
            code = proc.wait()
    except BaseException:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        raise
    finally:
        stop.set()
        if pinner:
            pinner.join(timeout=5)
    seconds = time.monotonic() - started
    if code != 0 and not quiet:
        print(log.read_text(errors="replace")[-3000:])
    return Run(run_dir, code, seconds, read_records(run_dir))


def _pin_loop(run_dir: Path, pin: dict[str, set[int]] | None, stop: threading.Event) -> None:
    """Until ``stop``: every thread of every process in each child's process group onto its cores."""
    assert pin is not None
    while not stop.wait(0.5):
        try:
            pids = json.loads((run_dir / "pids.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        groups = {int(pid): pin["learner" if name == "learner" else "generator"] for name, pid in pids.items()}
        for pid, pgid in _processes():
            cores = groups.get(pgid)
            if cores is not None:
                _pin_threads(pid, cores)


def _processes() -> list[tuple[int, int]]:
    """(pid, process group id) of every process visible in /proc."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        out.append((int(entry.name), int(fields[2])))
    return out


def _pin_threads(pid: int, cores: set[int]) -> None:
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            if os.sched_getaffinity(tid) != cores:
                os.sched_setaffinity(tid, cores)
        except OSError:  # the thread ended meanwhile
            pass


def default_pin() -> dict[str, set[int]] | None:
    """Generator on the first core this process may use, learner on the second; None with fewer than two."""
    cores = sorted(os.sched_getaffinity(0))
    return {"generator": {cores[0]}, "learner": {cores[1]}} if len(cores) >= 2 else None


# ----------------------------------------------------------------------------------------------- plotting


# A 3x5 pixel font (the canvas has no text): rows top to bottom, 3 bits each; letters are drawn upper case.
_GLYPHS = {"0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
           "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
           ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "+": (0, 2, 7, 2, 0), "/": (1, 1, 2, 4, 4), ":": (0, 2, 0, 2, 0),
           "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4), "%": (5, 1, 2, 4, 5), "_": (0, 0, 0, 0, 7), ",": (0, 0, 0, 2, 4),
           "=": (0, 7, 0, 7, 0), "<": (1, 2, 4, 2, 1), ">": (4, 2, 1, 2, 4), "@": (2, 5, 7, 4, 3),
           "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7),
           "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5), "I": (7, 2, 2, 2, 7), "J": (1, 1, 1, 5, 2),
           "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7), "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5), "O": (2, 5, 5, 5, 2),
           "P": (6, 5, 6, 4, 4), "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5), "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2),
           "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5), "Y": (5, 5, 2, 2, 2),
           "Z": (7, 1, 2, 4, 7)}


def _text(canvas: Any, x: float, y: float, text: str, scale: int = 2, rgb: tuple[int, ...] = (60, 60, 60)) -> None:
    """``text`` at (x, y) (top-left), ``scale`` pixels per glyph pixel; characters without a glyph are blanks."""
    for n, ch in enumerate(text.upper()):
        for row, bits in enumerate(_GLYPHS.get(ch, (0, 0, 0, 0, 0))):
            for col in range(3):
                if bits >> (2 - col) & 1:
                    x0, y0 = x + (4 * n + col) * scale, y + row * scale
                    canvas.rect(x0, y0, x0 + scale, y0 + scale, rgb)


def _text_width(text: str, scale: int = 2) -> int:
    return 4 * len(text) * scale


def _short(value: float) -> str:
    return f"{value:.3g}".replace("e+0", "e").replace("e-0", "e-")


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_lines(path: Path, panels: list[dict[str, Any]], width: int = 420, height: int = 300) -> None:
    """A PNG of line panels side by side, drawn with the project's dependency-free canvas (no matplotlib here).

    Each panel: ``{"series": [[(x, y), ...], ...]}`` and optionally ``"title"`` (drawn above the panel),
    ``"xticks"`` (``[(x, label), ...]``: category labels under the x axis instead of its extremes) and
    ``"legend"`` (a name per series, in the series' colours, top right). Series take the palette's colours in
    order; axes are scaled to the data (y from 0 when all values are >= 0) and labelled with their extremes.
    """
    from prorl_async.eval.report import _Canvas  # the tiny PNG rasteriser; reused, not copied

    canvas = _Canvas(width * len(panels), height)
    pad, top, grey = 28, 34, (90, 90, 90)
    for n, panel in enumerate(panels):
        ox, oy, w, h = n * width + pad, top, width - 2 * pad, height - top - pad
        if panel.get("title"):
            _text(canvas, n * width + (width - _text_width(panel["title"])) / 2, 8, panel["title"], rgb=(20, 20, 20))
        points = [p for s in panel["series"] for p in s if not math.isnan(p[1])]
        if not points:
            continue
        x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
        y_lo = 0.0 if y_lo >= 0 else y_lo
        x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)
        canvas.line(ox, oy + h, ox + w, oy + h, grey)
        canvas.line(ox, oy, ox, oy + h, grey)
        _text(canvas, ox + 4, oy, _short(y_hi))
        _text(canvas, ox + 4, oy + h - 12, _short(y_lo))
        if panel.get("xticks"):
            for x, label in panel["xticks"]:
                px = ox + w * (x - x_lo) / (x_hi - x_lo)
                _text(canvas, min(max(px - _text_width(label) / 2, ox), ox + w - _text_width(label)), oy + h + 4, label)
        else:
            _text(canvas, ox + w - _text_width(_short(x_hi)), oy + h + 4, _short(x_hi))
            _text(canvas, ox, oy + h + 4, _short(x_lo))
        for i, series in enumerate(panel["series"]):
            pts = [(ox + w * (x - x_lo) / (x_hi - x_lo), oy + h - h * (y - y_lo) / (y_hi - y_lo))
                   for x, y in series if not math.isnan(y)]
            rgb = PALETTE[i % len(PALETTE)]
            for (x0, y0), (x1, y1) in itertools.pairwise(pts):
                canvas.line(x0, y0, x1, y1, rgb)
            for x, y in pts:
                canvas.rect(x - 2, y - 2, x + 2, y + 2, rgb)
        for i, name in enumerate(panel.get("legend") or []):
            _text(canvas, ox + w - _text_width(name), oy + 14 + 14 * i, name, rgb=PALETTE[i % len(PALETTE)])
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"wrote {path}")


def machine_header(title: str) -> dict[str, Any]:
    """Print and return the machine (``bench/common.py``) and the date: every bench states where it ran."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import describe, machine_info

    info = machine_info()
    info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    print(f"{title}\nmachine: {describe(info)}; {info['date']}", flush=True)
    return info
