"""Shared parts of the end-to-end benches: launch a real ``prorl-async run``, pin its processes, read its metrics.

Used by the end-to-end benches (``speedup.py``, ``staleness.py``, ``learning.py``, ``peers.py``, ``peers_learning.py``,
``informative.py``, ``launchers.py``, ``boundary.py``); not a script of its own.

- :func:`launch` runs ``prorl-async run CONFIG --set ...`` (or ``--resume=RUN_DIR``: continue a run; the console
  script's entry point) in a session of its own (so that it and everything it starts can be stopped by its process
  group, never by name) with ``run.run_dir`` under /tmp.
- Pinning (``pin={"learner": {1}, "generator": {0}}``): the supervisor starts its children with plain
  ``subprocess``, each leading a process group of its own, so a thread here re-applies ``sched_setaffinity`` to
  every thread of every process in the learner's and the generators' groups while the run lasts (threads and
  processes started later inherit it; the loop catches the ones started before). vLLM binds its OpenMP threads
  itself: ``VLLM_CPU_OMP_THREADS_BIND`` is set to the generator's cores so it binds them there, and the learner
  gets ``learner.num_threads`` = its core count (it would otherwise size its pool from the unpinned mask).
- :func:`summarize` reduces ``RUN_DIR/metrics.jsonl`` to steady-state figures: the first ``warmup_steps`` steps
  (engine start, first weights) are left out of every rate.
- :func:`plot_lines` writes a PNG of line panels side by side, drawn with matplotlib on the Agg canvas (no pyplot
  state): every panel has a title and labelled axes, and a legend when it has more than one series.
"""

from __future__ import annotations

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

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parent.parent
_ENTRY = "import sys; from prorl_async.cli import main; sys.exit(main())"  # what the `prorl-async` script runs
DPI = 150  # figures

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


def handoff_s(step: dict[str, Any]) -> float:
    """The learner's own time in a step's weight handoff: the synchronous broadcast (``sync_s``), or the wait for
    the overlapped one (``sync_wait_s``)."""
    return float(step.get("sync_wait_s", step.get("sync_s", 0.0)) or 0.0)


def summarize(records: list[dict[str, Any]], warmup_steps: int = 1) -> dict[str, Any]:
    """Steady-state figures of one run from its metrics records.

    Rates span from the end of step ``warmup_steps`` to the end of the last step; per-phase times are means over
    the same steps: ``t_train`` = ``step_time_s`` + the learner's time in the weight handoff (learner busy:
    ``sync_s`` when the broadcast is synchronous, bound 0; ``sync_wait_s`` when it overlaps the next step),
    ``t_wait`` = ``wait_s`` (learner idle, waiting for a full batch). In a synchronous run the learner's wait is
    the generation of one batch (plus loading its weights), so there ``t_wait`` is the generation phase.
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
        t_train_s=_mean([r.get("step_time_s", 0.0) + handoff_s(r) for r in timed]),
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
    return first["time_s"] - first.get("wait_s", 0.0) - first.get("step_time_s", 0.0) - handoff_s(first)


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
           timeout_s: float = 3600.0, quiet: bool = True, resume: Path | None = None) -> Run:
    """Run ``prorl-async run`` to completion (or ``timeout_s``, then SIGINT and wait) and return its records.

    With ``resume`` (a run directory; then no ``config``): ``prorl-async run --resume=DIR``, which continues that run
    from its newest checkpoint with its own config.toml and ``overrides`` on top. The supervisor's log
    (``RUN_DIR.supervisor.log`` beside the run directory) is appended to, so a resumed run keeps the earlier log.
    """
    if config and resume is not None:
        raise ValueError("launch: a resumed run uses its own config.toml: give config=None with resume")
    run_dir = Path(run_dir)
    argv = [sys.executable, "-c", _ENTRY, "run"] + ([config] if config else [])
    if resume is not None:
        argv.append(f"--resume={resume}")
    for item in [*overrides, *pin_overrides(pin), f"run.run_dir={json.dumps(str(run_dir))}", "run.tui=\"off\""]:
        argv += ["--set", item]
    env = dict(os.environ)
    if pin:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(pin["generator"]))
    log = (run_dir.parent / f"{run_dir.name}.supervisor.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("ab") as out:
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


def lines_figure(panels: list[dict[str, Any]], title: str | None = None) -> Figure:
    """A matplotlib figure (Agg canvas, no pyplot state) of line panels side by side.

    Each panel: ``{"title": str, "xlabel": str, "ylabel": str, "series": [[(x, y), ...], ...]}`` (axis labels with
    their units) and optionally ``"legend"`` (a name per series; shown when there is more than one series) and
    ``"xticks"`` (``[(x, label), ...]``: category labels on the x axis). Series take matplotlib's default colour
    cycle in order, with markers; NaN values leave gaps; the y axis starts at 0 when every value is >= 0.
    """
    fig = Figure(figsize=(4.4 * len(panels), 3.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        missing = [key for key in ("title", "xlabel", "ylabel") if not panel.get(key)]
        if missing:
            raise ValueError(f"plot panel {panel.get('title')!r} lacks {', '.join(missing)}")
        names = panel.get("legend") or []
        ys: list[float] = []
        for i, series in enumerate(panel["series"]):
            xs = [float(x) for x, _ in series]
            values = [float(y) for _, y in series]
            ys += [y for y in values if math.isfinite(y)]
            ax.plot(xs, values, "o-", color=f"C{i % 10}", markersize=3.5, linewidth=1.5,
                    label=names[i] if i < len(names) else f"series {i + 1}")
        if panel.get("xticks"):
            ax.set_xticks([float(x) for x, _ in panel["xticks"]], [str(label) for _, label in panel["xticks"]])
        if ys and min(ys) >= 0:
            ax.set_ylim(bottom=0)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel["xlabel"], fontsize=9)
        ax.set_ylabel(panel["ylabel"], fontsize=9)
        ax.grid(True, alpha=0.3)
        if len(panel["series"]) > 1:
            ax.legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_lines(path: Path, panels: list[dict[str, Any]], title: str | None = None) -> None:
    """Write :func:`lines_figure` as a PNG at ``path`` (its folder is made)."""
    save_figure(lines_figure(panels, title), path)


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path`` (its folder is made), on white."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    print(f"wrote {path}")


def machine_header(title: str) -> dict[str, Any]:
    """Print and return the machine (``bench/common.py``) and the date: every bench states where it ran."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import describe, machine_info

    info = machine_info()
    info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    print(f"{title}\nmachine: {describe(info)}; {info['date']}", flush=True)
    return info
