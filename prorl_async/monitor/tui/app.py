"""The live TUI of ``prorl-async run``: a rich screen (or plain log lines) drawn from a :class:`RunView`.

    RUN_DIR/metrics.jsonl ──poll──> RunView.snapshot ──render──> rich Live (a terminal) / plain_line (a log)

Invariants:
- :func:`render` and :func:`plain_line` are pure: they read the snapshot and format it, nothing more — no
  I/O, no history scans — so refreshing twice a second costs the supervisor a few milliseconds and the
  training processes nothing;
- every figure has a place on screen; one the records do not carry (yet) reads ``n/a``, never ``0``;
- the headline is the policy reward: every scored sample that arrived, pooled over the last
  :data:`~prorl_async.monitor.progress.WINDOW_STEPS` steps, with its change since the start and an arrow when that
  change exceeds twice its standard error (:mod:`prorl_async.monitor.progress`), per domain; beside it the held-out
  pass@1 (the last round, and its change since the first) and the batch reward, labelled ``(filtered)``: the
  variance filter keeps it near 0.5 whatever the policy does;
- start-up (and stop) phases: the live screen's status line shows the current one; plain mode prints each as a
  line of its own (``[0:00:09] start-up: ...``) within a second;
- the screen is drawn in the normal buffer (``screen=False``, ``transient=False``): what the run printed
  stays in the scrollback after it ends.

``python -m prorl_async.monitor.tui --replay METRICS.jsonl`` shows a recorded run in the TUI
(:mod:`prorl_async.monitor.tui.replay`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import trio
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from prorl_async.learner.buffer import DROP_REASONS
from prorl_async.monitor.progress import WINDOW_STEPS, Phase, PolicyReward, pass_at_1
from prorl_async.monitor.tui.view import ProcessStatus, RunView, Snapshot

NA = "n/a"
_SPARK = "▁▂▃▄▅▆▇█"
_STATE_STYLE = {"alive": "green", "running": "green", "ready": "cyan", "restarting": "yellow",
                "exited": "red", "finished": "dim", "starting": "dim"}
_PASS_AT = re.compile(r"^pass(?:_at_|@)(\d+)$")
_PHASE_POLL_S = 1.0  # plain mode: a new phase line is printed within this long


# ------------------------------------------------------------------------------------------ formatting


def _num(values: dict[str, Any], key: str) -> float | None:
    value = values.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return NA if value is None else f"{value:{spec}}{unit}"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return NA
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _mib(n_bytes: float | None) -> str:
    return NA if n_bytes is None else f"{n_bytes / 2**20:.2f} MiB"


def sparkline(values: Iterable[float]) -> str:
    """One block character per value; rewards in [0, 1] on that fixed scale, anything else min-to-max."""
    vals = list(values)
    if not vals:
        return ""
    lo, hi = (0.0, 1.0) if min(vals) >= 0.0 and max(vals) <= 1.0 else (min(vals), max(vals))
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(len(_SPARK) - 1, int((v - lo) / span * len(_SPARK)))] for v in vals)


def _pass_at(validation: dict[str, Any]) -> list[tuple[int, float]]:
    found = []
    for key, value in validation.items():
        m = _PASS_AT.match(key)
        if m and isinstance(value, int | float):
            found.append((int(m.group(1)), float(value)))
    for k, value in (validation.get("pass_at_k") or {}).items():  # also {"pass_at_k": {"16": 0.3}}
        if str(k).isdigit() and isinstance(value, int | float):
            found.append((int(k), float(value)))
    return sorted(set(found))


def _validation_text(snap: Snapshot) -> str:
    found = _pass_at(snap.validation)
    if not found:
        return f"pass@1 {NA}  pass@k {NA}"
    version = snap.validation.get("version")
    where = f"v{version} " if version is not None else ""
    return where + "  ".join(f"pass@{k} {v:.3f}" for k, v in found)


def _steps_text(snap: Snapshot) -> str:
    done = NA if snap.version is None else str(snap.version)  # a step is one batch: the policy version counts steps
    return f"{done}/{snap.max_steps}" if snap.max_steps else f"{done} (no step limit)"


def _gen_sum(snap: Snapshot, key: str) -> float | None:
    values = [_num(g.values, key) for g in snap.generators.values()]
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _gen_rate(snap: Snapshot) -> float | None:
    rates = [r for g in snap.generators.values() if (r := g.recent_tokens_per_s) is not None]
    return sum(rates) if rates else None


def _policy_text(p: PolicyReward | None, since: bool = True) -> str:
    """``0.452 ↑ +0.121 since start``: the smoothed arrived reward, its arrow, its change; n/a before any arrival."""
    if p is None or p.value is None:
        return NA
    delta = p.delta
    change = f" {delta:+.3f} since start" if since and delta is not None else ""
    return f"{p.value:.3f} {p.arrow}{change}"


def _domains_text(snap: Snapshot) -> str:
    """``logic 0.375 ↑  math 0.625 →``: each domain's policy reward."""
    return "  ".join(f"{d} {_policy_text(p, since=False)}" for d, p in sorted(snap.policy.items()) if d != "all")


def _held_out_text(snap: Snapshot) -> str:
    """``pass@1 0.438 (v3, +0.125 since v0)``, then ``validating v4…`` while a round runs; n/a before the first."""
    last = pass_at_1(snap.validation)
    if last is None:
        text = f"pass@1 {NA}"
    else:
        where = [f"v{snap.validation.get('version', '?')}"]
        if snap.validation.get("complete") is False:
            where.append("partial")
        first = pass_at_1(snap.first_validation)
        if first is not None and snap.first_validation is not snap.validation:
            where.append(f"{last - first:+.3f} since v{snap.first_validation.get('version', '?')}")
        text = f"pass@1 {last:.3f} ({', '.join(where)})"
    if snap.validating:
        text += f" validating v{snap.validating.get('version', '?')}…"
    return text


def phase_line(snap: Snapshot, phase: Phase) -> str:
    """``[0:00:09] start-up: learner ready (v0): ...``: one phase, timed from the start of the run."""
    origin = snap.phases.origin_s
    return f"[{_clock(None if origin is None else max(0.0, phase.time_s - origin))}] {phase.label}: {phase.text}"


def _status_text(snap: Snapshot) -> Text | None:
    """The current start-up (or stop) phase, with the groups sent while the first batch is gathered."""
    phases = snap.phases
    phase = phases.current
    if phase is None:
        return None
    text = f"{phase.label}: {phase.text}"
    busy = not phases.started or phases.stopping
    if busy and not phases.started and "joined" in phases.marks:
        text += f" · {_fmt(_gen_sum(snap, 'groups_sent'), '.0f')} groups sent"
    if busy and snap.now_s is not None:
        text += f" · {_clock(max(0.0, snap.now_s - phase.time_s))} in this phase"
    return Text(text, style="yellow" if busy else "dim", no_wrap=True, overflow="ellipsis")


# ------------------------------------------------------------------------------------------ rich screen


def render(view: RunView, width: int = 120) -> RenderableType:
    """The whole screen for ``view``'s snapshot at a terminal ``width`` (panels stack below 100 columns)."""
    snap = view.snapshot
    wide = width >= 100
    # a panel's value column: the screen split in three (or whole), less borders, padding and the key column
    value_width = (width // 3 if wide else width) - 18
    panels = [_learner_panel(snap), _buffer_panel(snap), _reward_panel(snap, value_width)]
    if wide:
        row = Table.grid(expand=True, padding=(0, 1))
        for _ in panels:
            row.add_column(ratio=1)
        row.add_row(*panels)
        body: RenderableType = row
    else:
        body = Group(*panels)
    return Group(_header(snap), _generator_table(snap, wide), body, _footer(snap))


def _ranks_text(snap: Snapshot) -> Text:
    """`` ranks 2/2 alive +node-b`` (the hosts of ranks > 0 besides rank 0's) for several ranks; nothing for one."""
    if not snap.learner_ranks:
        return Text("")
    ranks = [snap.learner, *snap.learner_ranks.values()]
    alive = sum(r.state == "alive" for r in ranks)
    hosts = sorted({r.host for r in ranks if r.host} - {snap.learner.host})  # rank 0's is shown already
    style = "" if alive == len(ranks) else _STATE_STYLE.get("restarting", "")
    return Text.assemble(" ranks ", (f"{alive}/{len(ranks)} alive", style), f" +{','.join(hosts)}" if hosts else "")


def _header(snap: Snapshot) -> Panel:
    learner = snap.learner
    line = Text.assemble(
        (snap.title, "bold"), "  model ", (snap.model or NA, "bold"),
        "  elapsed ", _clock(snap.elapsed_s),
        "  step ", (_steps_text(snap), "bold"),
        "  learner ", NA if snap.version is None else f"v{snap.version}",
        " ", (learner.state, _STATE_STYLE.get(learner.state, "")),
        f" pid {learner.pid}" if learner.pid else "",
        f" on {learner.host}" if learner.host else "",
        _ranks_text(snap),
        "  time budget ", _clock(snap.time_budget_s) if snap.time_budget_s else "none",
    )
    policy = snap.policy.get("all")
    domains = _domains_text(snap)
    counted = f": {policy.samples} samples" if policy is not None and policy.value is not None else ""
    rows: list[RenderableType] = [line, Text.assemble(
        ("policy reward ", "bold"), (_policy_text(policy), "bold"),
        (f"  (every scored sample, last {WINDOW_STEPS} steps{counted})", "dim"))]
    if domains:
        rows.append(Text.assemble(("by domain ", "bold"), domains))
    rows.append(Text.assemble(("held-out ", "bold"), _held_out_text(snap),
                              "   batch reward (filtered) ", _fmt(_num(snap.step, "reward_mean"), ".3f")))
    if (status := _status_text(snap)) is not None:
        rows.append(status)
    return Panel(Group(*rows), title="prorl-async run", title_align="left", padding=(0, 1))


# (header, shown on a narrow screen too); the order of _generator_row's cells
_GEN_COLUMNS = [("generator", True), ("state", True), ("host", True), ("pid", False), ("restarts", False),
                ("tok/s", True), ("version", True), ("sent", True), ("in flight", False), ("rwd err", True),
                ("aborted", False), ("update", False), ("idle", True), ("age", False)]


def _generator_table(snap: Snapshot, wide: bool) -> Table:
    """One row per generator: groups sent, reward errors (score error + timeout + crash), stale groups aborted."""
    on_cluster = any(gen.host for gen in snap.generators.values())  # the host column only when there are hosts
    keep = [(wide or narrow) and (name != "host" or on_cluster) for name, narrow in _GEN_COLUMNS]
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold underline", title="generators",
                  title_justify="left", title_style="bold")
    for (name, _), shown in zip(_GEN_COLUMNS, keep, strict=True):
        if shown:
            table.add_column(name, justify="left" if name in ("generator", "state") else "right", no_wrap=True)
    for gen in snap.generators.values():
        table.add_row(*[cell for cell, shown in zip(_generator_row(gen, snap), keep, strict=True) if shown])
    if not snap.generators:
        table.add_row("(none yet)", *[""] * (sum(keep) - 1))
    return table


def _generator_row(gen: ProcessStatus, snap: Snapshot) -> list[str | Text]:
    v = gen.values
    errors = [_num(v, f"score_{k}") for k in ("error", "timeout", "crash")]
    reported = _num(v, "time_s")
    age = None if reported is None or snap.now_s is None else max(0.0, snap.now_s - reported)
    version = _num(v, "policy_version")
    return [
        gen.name, Text(gen.state, style=_STATE_STYLE.get(gen.state, "")), gen.host or NA,
        str(gen.pid) if gen.pid else NA, str(gen.restarts),
        _fmt(gen.recent_tokens_per_s, ".1f"), NA if version is None else f"v{version:.0f}",
        _fmt(_num(v, "groups_sent"), ".0f"), _fmt(_num(v, "groups_in_flight"), ".0f"),
        NA if None in errors else f"{sum(e for e in errors if e is not None):.0f}",
        _fmt(_num(v, "groups_aborted_stale"), ".0f"), _fmt(_num(v, "weight_update_s"), ".3f", " s"),
        _fmt(_num(v, "idle_ratio"), ".2f"), _fmt(age, ".1f", " s"),
    ]


def _kv_panel(title: str, rows: list[tuple[str, str]]) -> Panel:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True, min_width=max(len(k) for k, _ in rows))
    grid.add_column(no_wrap=True, overflow="ellipsis")
    for key, value in rows:
        grid.add_row(key, value)
    return Panel(grid, title=title, title_align="left", padding=(0, 1))


def _learner_panel(snap: Snapshot) -> Panel:
    s = snap.step
    resets = snap.resets
    last_reset = f" (v{resets[-1][0]} {resets[-1][1] or '?'})" if resets else ""
    return _kv_panel("learner", [
        ("step time", _fmt(_num(s, "step_time_s"), ".3f", " s")),
        ("tokens/s", _fmt(_num(s, "tokens_per_s"), ".1f")),
        ("loss", _fmt(_num(s, "loss"), ".4f")),
        ("pg / kl loss", f"{_fmt(_num(s, 'pg_loss'), '.4f')} / {_fmt(_num(s, 'kl_loss'), '.4f')}"),
        ("KL", f"{_fmt(_num(s, 'kl'), '.2e')}  share {_fmt(_num(s, 'kl_share'), '.3f')}"),
        ("approx KL", _fmt(_num(s, "approx_kl"), ".2e")),
        ("entropy", _fmt(_num(s, "entropy"), ".4f")),
        ("clip lo / hi", f"{_fmt(_num(s, 'clip_frac_low'), '.4f')} / {_fmt(_num(s, 'clip_frac_high'), '.4f')}"),
        ("IS truncated", _fmt(_num(s, "is_truncated_frac"), ".4f")),
        ("ESS", _fmt(_num(s, "ess"), ".4f")),
        ("grad norm", _fmt(_num(s, "grad_norm"), ".4f")),
        ("lr", _fmt(_num(s, "lr"), ".2e")),
        ("ref resets", f"{len(resets)}{last_reset}"),
    ])


def _buffer_panel(snap: Snapshot) -> Panel:
    s = snap.step
    held, cap = _num(s, "buffer_held"), snap.buffer_capacity
    fill = _fmt(held, ".0f") + (f"/{cap}" if cap and held is not None else "")
    if held is not None and cap:
        filled = round(10 * min(held / cap, 1.0))
        fill += " " + "█" * filled + "░" * (10 - filled)
    counters = s.get("buffer_counters") if isinstance(s.get("buffer_counters"), dict) else {}
    rows = [
        ("fill", fill),
        ("bound", _fmt(_num(s, "max_staleness") if "max_staleness" in s else snap.configured_bound, ".0f")
         + (" (auto)" if snap.auto_staleness else "")),
        ("staleness", _histogram(s.get("buffer_staleness_hist"))),
        ("batch stale", f"mean {_fmt(_num(s, 'group_staleness_mean'), '.2f')} "
                        f"max {_fmt(_num(s, 'group_staleness_max'), '.0f')}"),
        ("received", _fmt(_num(counters, "received"), ".0f")),
        ("yielded", _fmt(_num(counters, "yielded"), ".0f")),
    ]
    reasons = [k for k in counters if k not in ("received", "yielded")] or list(DROP_REASONS)  # what the buffer counts
    rows += [(f"drop {r}", _fmt(_num(counters, r), ".0f")) for r in reasons]
    rejected = s.get("messages_rejected")
    if isinstance(rejected, dict):  # messages the learner could not decode (malformed, out of vocabulary, ...)
        rows.append(("bad msgs", str(sum(v for v in rejected.values() if isinstance(v, int | float)))))
    rows += [("gen aborted", _fmt(_gen_sum(snap, "groups_aborted_stale"), ".0f")),
             ("too long", _fmt(_gen_sum(snap, "prompts_too_long"), ".0f"))]
    return _kv_panel("buffer", rows)


def _histogram(hist: Any) -> str:
    """``{"0": 3, "1": 1}`` (staleness -> held groups) as ``0:3 1:1``; n/a until the records carry it."""
    if not isinstance(hist, dict) or not hist:
        return NA
    items = sorted((int(k), int(v)) for k, v in hist.items() if str(k).isdigit() and isinstance(v, int | float))
    return " ".join(f"{k}:{v}" for k, v in items) or NA


def _reward_panel(snap: Snapshot, value_width: int) -> Panel:
    s = snap.step

    def with_trend(text: str, values: Iterable[float]) -> str:  # as many sparkline points as the column holds
        return f"{text} {sparkline(list(values)[-max(4, value_width - len(text) - 1):])}"

    policy = snap.policy.get("all")
    rows = [("policy reward", with_trend(_policy_text(policy, since=False), policy.trend if policy else ()))]
    for domain, p in sorted(snap.policy.items()):
        if domain != "all":
            rows.append((f" {domain}", with_trend(_policy_text(p, since=False), p.trend)))
    rows.append(("batch reward", with_trend(f"(filtered) {_fmt(_num(s, 'reward_mean'), '.3f')}",
                                            snap.reward_trend.get("all", ()))))
    failed = s.get("sync_failed")
    n_failed = len(failed) if isinstance(failed, dict | list) else _num(s, "sync_failed")
    gen_update = [u for g in snap.generators.values() if (u := _num(g.values, "weight_update_s")) is not None]
    gen_idle = [i for g in snap.generators.values() if (i := _num(g.values, "idle_ratio")) is not None]
    rows += [
        ("weight sync", f"{_fmt(_num(s, 'sync_s'), '.3f', ' s')} {_mib(_num(s, 'sync_bytes'))}"),
        ("sync peers", f"ok {_fmt(_num(s, 'sync_delivered'), '.0f')} failed {_fmt(n_failed, '.0f')}"),
        ("gen update", _fmt(max(gen_update, default=None), ".3f", " s max")),
        ("learner idle", f"{_fmt(_num(s, 'learner_idle_ratio'), '.3f')} wait {_fmt(_num(s, 'wait_s'), '.2f', ' s')}"),
        ("gen idle", f"mean {sum(gen_idle) / len(gen_idle):.2f} max {max(gen_idle):.2f}" if gen_idle else NA),
    ]
    return _kv_panel("rewards · sync · idle", rows)


def _event_text(event: dict[str, Any]) -> str:
    """``checkpoint v3 step-000003``, ``generator_ready generator-1``, ``buffer_starved <detail>``."""
    detail = event.get("detail") or event.get("source") or (Path(str(event["path"])).name if "path" in event else "")
    version = event.get("version")
    return f"{event.get('event', '?')}{f' v{version}' if version is not None else ''}{f' {detail}' if detail else ''}"


def _footer(snap: Snapshot) -> Group:
    validation = Text.assemble(("validation ", "bold"), _validation_text(snap))
    parts = [_event_text(event) for event in snap.events]
    events = Text("events: " + ("  |  ".join(parts) if parts else "none"), style="dim", no_wrap=True,
                  overflow="ellipsis")
    if snap.malformed:
        events.append(f"   ({snap.malformed} malformed lines skipped)", style="yellow")
    return Group(validation, events)


# ------------------------------------------------------------------------------------------ plain lines


def plain_line(view: RunView) -> str:
    """One log line for a non-terminal stdout: the figures a person scans first."""
    snap = view.snapshot
    s = snap.step
    domains = _domains_text(snap)
    gens = snap.generators.values()
    up = sum(g.state in ("alive", "running") for g in gens)
    held, cap = _num(s, "buffer_held"), snap.buffer_capacity
    return (
        f"[{_clock(snap.elapsed_s)}] step {_steps_text(snap)}"
        f" | policy reward {_policy_text(snap.policy.get('all'))}{f' ({domains})' if domains else ''}"
        f" | held-out {_held_out_text(snap)}"
        f" | batch reward (filtered) {_fmt(_num(s, 'reward_mean'), '.3f')}"
        f" | loss {_fmt(_num(s, 'loss'), '.4f')} kl {_fmt(_num(s, 'kl'), '.2e')}"
        f" entropy {_fmt(_num(s, 'entropy'), '.3f')} grad {_fmt(_num(s, 'grad_norm'), '.3f')}"
        f" | {_fmt(_num(s, 'step_time_s'), '.2f', ' s/step')} {_fmt(_num(s, 'tokens_per_s'), '.0f', ' tok/s')}"
        f" idle {_fmt(_num(s, 'learner_idle_ratio'), '.2f')}"
        f" | buffer {_fmt(held, '.0f')}{f'/{cap}' if cap and held is not None else ''}"
        f" | generators {up}/{len(snap.generators)} up {_fmt(_gen_rate(snap), '.1f', ' tok/s')}"
        f" | sync {_fmt(_num(s, 'sync_s'), '.2f', ' s')} {_mib(_num(s, 'sync_bytes'))}"
        f" | resets {len(snap.resets)}"
    )


# ------------------------------------------------------------------------------------------ loops


def wants_live(mode: str, stream: TextIO | None = None) -> bool:
    """``run.tui``: ``on`` / ``off``, or ``auto`` — the live screen only when ``stream`` (stdout) is a terminal."""
    if mode in ("on", "off"):
        return mode == "on"
    return (stream or sys.stdout).isatty()


def _update(view: RunView, before_refresh: Callable[[RunView], None] | None) -> int:
    if before_refresh is not None:
        before_refresh(view)  # e.g. the supervisor's process states
    return view.poll()


async def live_loop(view: RunView, *, refresh_per_s: float = 2.0, console: Console | None = None,
                    before_refresh: Callable[[RunView], None] | None = None,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Poll ``view`` and redraw the screen ``refresh_per_s`` times a second until cancelled (last frame kept).

    ``before_refresh(view)`` runs before each poll: the place to call :meth:`RunView.set_process_state`.
    """
    from rich.live import Live

    console = console or Console()
    period = 1.0 / refresh_per_s
    _update(view, before_refresh)
    with Live(render(view, console.width), console=console, auto_refresh=False, transient=False,
              screen=False, vertical_overflow="crop") as live:
        task_status.started()
        try:
            while True:
                await trio.sleep(period)
                _update(view, before_refresh)
                live.update(render(view, console.width), refresh=True)
        finally:  # cancelled at the end of the run: draw what the last records said
            _update(view, before_refresh)
            live.update(render(view, console.width), refresh=True)


async def plain_loop(view: RunView, *, every_s: float = 10.0, file: TextIO | None = None,
                     before_refresh: Callable[[RunView], None] | None = None,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Every ``every_s``, one :func:`plain_line` if records arrived since the last one; each new phase line
    (:func:`phase_line`) as soon as a poll finds it (polls at least once a second); the rest when cancelled."""
    out = file or sys.stdout
    printed = 0  # the seq of the last phase printed
    fresh = 0  # records applied since the last plain line

    def new_phases() -> None:
        nonlocal printed
        for phase in list(view.snapshot.phases.lines):
            if phase.seq > printed:
                print(phase_line(view.snapshot, phase), file=out, flush=True)
                printed = phase.seq

    task_status.started()
    try:
        next_line = trio.current_time() + every_s
        while True:
            await trio.sleep_until(min(next_line, trio.current_time() + _PHASE_POLL_S))
            fresh += _update(view, before_refresh)
            new_phases()
            if trio.current_time() >= next_line:
                next_line += every_s
                if fresh:
                    print(plain_line(view), file=out, flush=True)
                    fresh = 0
    finally:
        fresh += _update(view, before_refresh)
        new_phases()
        if fresh:
            print(plain_line(view), file=out, flush=True)


# ------------------------------------------------------------------------------------------ replay
