"""The TUI: a RunView following a metrics file, the rendered screen, plain lines and the refresh loops.

The fixture ``test_tui_sample.jsonl`` is a recorded ``configs/tiny.toml`` run (3 steps, 1 generator) whose
values were edited to be told apart (the tiny model's losses are all 0) and given a second generator, a
reference reset, the arrived rewards per domain and a validation record; expected figures are read from it, not
typed in.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from rich.console import Console

from prorl_async.monitor.progress import WINDOW_STEPS, trend_arrow
from prorl_async.monitor.tui.app import live_loop, phase_line, plain_line, plain_loop, render, sparkline, wants_live
from prorl_async.monitor.tui.view import RunView

SAMPLE = Path(__file__).with_name("test_tui_sample.jsonl")
CONFIG = {"run": {"max_steps": 3, "time_budget_s": 0.0}, "model": {"name": "tiny-random"},
          "generator": {"num_generators": 2}, "learner": {"batch_groups": 4}, "buffer": {"max_staleness": 1}}


def _records(kind: str | None = None) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return [r for r in records if kind is None or r["kind"] == kind]


def _rate(source: str) -> float:
    """Tokens/s of a generator over its reports (the sample spans less than the TUI's 30 s window)."""
    reports = [r for r in _records("generator") if r["source"] == source]
    return (reports[-1]["tokens_sent"] - reports[0]["tokens_sent"]) / (reports[-1]["time_s"] - reports[0]["time_s"])


def _pooled(steps: list[dict[str, Any]], domain: str | None = None) -> tuple[float, int]:
    """Mean reward and count of every sample that arrived over ``steps`` (what the policy reward pools)."""
    if domain is None:
        pairs = [(r["reward_arrived_mean"], r["samples_arrived"]) for r in steps]
    else:
        pairs = [(r["reward_arrived_by_domain"][domain], r["samples_arrived_by_domain"][domain]) for r in steps]
    n = sum(k for _, k in pairs)
    return sum(m * k for m, k in pairs) / n, n


def _policy(steps: list[dict[str, Any]], domain: str | None = None) -> str:
    """``0.308 →``: the pooled reward of the (at most WINDOW_STEPS) ``steps`` and its arrow against the first one."""
    assert len(steps) <= WINDOW_STEPS
    value, n = _pooled(steps, domain)
    start, n0 = _pooled(steps[:1], domain)
    return f"{value:.3f} {trend_arrow(start, n0, value, n)}"


def _screen(view: RunView, width: int = 120) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render(view, width))
    return console.export_text()


def _view(tmp_path: Path, lines: list[str] | None = None) -> RunView:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f"{line}\n" for line in (lines if lines is not None else SAMPLE.read_text().splitlines())))
    view = RunView(tmp_path, title="tiny-probe", config=CONFIG, clock=None)
    view.poll()
    return view


def _has(screen: str, *parts: str) -> None:
    """``parts`` on one line of ``screen``, in order, separated by blanks only."""
    pattern = r"\s+".join(re.escape(p) for p in parts)
    assert re.search(pattern, screen), f"{parts!r} not on screen:\n{screen}"


@pytest.fixture
def full_view(tmp_path: Path) -> RunView:
    view = _view(tmp_path)
    view.set_process_state("learner", "alive", pid=111)
    view.set_process_state("generator-0", "restarting", pid=222, restarts=2)
    view.set_process_state("generator-1", "alive", pid=333)
    return view


def test_screen_shows_every_field_with_the_recorded_values(full_view: RunView) -> None:
    screen = _screen(full_view)
    step = _records("step")[-1]
    gens = {r["source"]: r for r in _records("generator")}  # the last record of each generator
    # header: config, model, elapsed, step / max_steps, learner version and process, time budget
    _has(screen, "tiny-probe", "model", "tiny-random", "elapsed", "0:01:13", "step", "3/3", "learner", "v3",
         "alive", "pid", "111", "time budget", "none")
    # generators: state, pid, restarts, tokens/s, policy version, groups sent, in flight, reward errors,
    # stale groups aborted, weight update time, idle ratio (not in the records yet), report age
    for name, state, pid, restarts in [("generator-0", "restarting", "222", "2"), ("generator-1", "alive", "333", "0")]:
        g = gens[name]
        errors = g["score_error"] + g["score_timeout"] + g["score_crash"]
        _has(screen, name, state, pid, restarts, f"{_rate(name):.1f}", f"v{g['policy_version']}",
             str(g["groups_sent"]), str(g["groups_in_flight"]), str(errors), str(g["groups_aborted_stale"]),
             f"{g['weight_update_s']:.3f} s", "n/a")
    assert f"{_rate('generator-1'):.1f}" != f"{_rate('generator-0'):.1f}"
    # learner
    _has(screen, "step time", f"{step['step_time_s']:.3f} s")
    _has(screen, "tokens/s", f"{step['tokens_per_s']:.1f}")
    _has(screen, "loss", f"{step['loss']:.4f}")
    _has(screen, "pg / kl loss", f"{step['pg_loss']:.4f} / {step['kl_loss']:.4f}")
    _has(screen, "KL", f"{step['kl']:.2e}", "share", f"{step['kl_share']:.3f}")
    _has(screen, "approx KL", f"{step['approx_kl']:.2e}")
    _has(screen, "entropy", f"{step['entropy']:.4f}")
    _has(screen, "clip lo / hi", f"{step['clip_frac_low']:.4f} / {step['clip_frac_high']:.4f}")
    _has(screen, "IS truncated", f"{step['is_truncated_frac']:.4f}")
    _has(screen, "ESS", f"{step['ess']:.4f}")
    _has(screen, "grad norm", f"{step['grad_norm']:.4f}")
    _has(screen, "ref resets", "1", f"(v{step['version']} {step['reset_reason']})")
    # buffer: fill against (K + 1) x batch, staleness histogram (n/a: not recorded yet), filtered by reason
    _has(screen, "fill", f"{step['buffer_held']}/8", "█████░░░░░")
    _has(screen, "staleness", "n/a")
    _has(screen, "batch stale", "mean", f"{step['group_staleness_mean']:.2f}", "max", str(step["group_staleness_max"]))
    for key, value in step["buffer_counters"].items():
        _has(screen, key if key in ("received", "yielded") else f"drop {key}", str(value))
    _has(screen, "gen aborted", str(sum(g["groups_aborted_stale"] for g in gens.values())))
    # the headline: the policy reward (every arrived sample of the last steps) per domain, its change since the first
    # step's arrivals; held-out pass@1; the batch reward, labelled filtered
    steps = _records("step")
    delta = _pooled(steps)[0] - _pooled(steps[:1])[0]
    _has(screen, "policy reward", _policy(steps), f"{delta:+.3f}", "since start",
         f"(every scored sample, last {WINDOW_STEPS} steps: {_pooled(steps)[1]} samples)")
    _has(screen, "by domain", "logic", _policy(steps, "logic"), "math", _policy(steps, "math"))
    _has(screen, "held-out", "pass@1", f"{_records('validation')[-1]['pass_at_1']:.3f}", "(v3)", "batch reward",
         "(filtered)", f"{step['reward_mean']:.3f}")
    # the rewards panel: the same with their trends; the batch reward's over the steps: 0.25, 0.375, 0.5
    _has(screen, "policy reward", _policy(steps))
    for domain in step["reward_arrived_by_domain"]:
        _has(screen, domain, _policy(steps, domain))
    _has(screen, "batch reward", "(filtered)", f"{step['reward_mean']:.3f}", sparkline(r["reward_mean"] for r in steps))
    # weight sync, idle ratios, validation, events
    _has(screen, "weight sync", f"{step['sync_s']:.3f} s", "3.00 MiB")
    _has(screen, "sync peers", "ok", str(step["sync_delivered"]), "failed", "0")
    _has(screen, "learner idle", f"{step['learner_idle_ratio']:.3f}", "wait", f"{step['wait_s']:.2f} s")
    _has(screen, "gen idle", "n/a")
    validation = _records("validation")[-1]
    _has(screen, "validation", "v3", "pass@1", f"{validation['pass_at_1']:.3f}", "pass@4",
         f"{validation['pass_at_4']:.3f}")
    _has(screen, "checkpoint v3 step-000003")


def test_sparkline_reads_rewards_on_a_fixed_scale() -> None:
    assert sparkline([0.0, 0.25, 0.5, 1.0]) == "▁▃▅█"
    assert sparkline([0.0, 0.0]) == "▁▁"  # no reward yet: flat at the bottom, not stretched
    assert sparkline([-2.0, 2.0]) == "▁█"  # outside [0, 1]: min to max
    assert sparkline([]) == ""


def test_missing_figures_read_na_not_zero(tmp_path: Path) -> None:
    step = {k: v for k, v in _records("step")[0].items() if k not in ("entropy", "ess", "sync_s", "sync_bytes")}
    view = _view(tmp_path, [json.dumps(step)])
    screen = _screen(view)
    _has(screen, "entropy", "n/a")
    _has(screen, "ESS", "n/a")
    _has(screen, "weight sync", "n/a", "n/a")
    _has(screen, "validation", "pass@1", "n/a", "pass@k", "n/a")  # until a validation record arrives
    _has(screen, "generator-0", "starting")  # a row for each configured generator before it reports
    _has(screen, "generator-1", "starting")


def test_generator_rate_is_windowed_and_restarts_from_zero(tmp_path: Path) -> None:
    def report(t: float, tokens: int) -> str:
        return json.dumps({"kind": "generator", "time_s": t, "elapsed_s": t, "source": "generator-0",
                           "tokens_sent": tokens})

    view = _view(tmp_path, [report(0, 0), report(10, 5000), report(20, 5100), report(40, 5300)])
    assert view.snapshot.generators["generator-0"].recent_tokens_per_s == pytest.approx((5300 - 5000) / 30)
    view = _view(tmp_path, [report(0, 0), report(10, 5000), report(20, 100), report(22, 300)])  # restarted at 15
    assert view.snapshot.generators["generator-0"].recent_tokens_per_s == pytest.approx(100)


def test_before_the_first_step_the_header_shows_the_announced_version(tmp_path: Path) -> None:
    view = _view(tmp_path, SAMPLE.read_text().splitlines()[:2])  # learner_ready (version 0), generator_ready
    screen = _screen(view)
    _has(screen, "step", "0/3", "learner", "v0", "ready")
    _has(screen, "fill", "n/a")
    _has(screen, "generator-0", "ready")
    _has(screen, "events:", "learner_ready v0", "|", "generator_ready generator-0")


def test_narrow_screen_keeps_the_main_figures(full_view: RunView) -> None:
    screen = _screen(full_view, width=80)
    assert max(len(line) for line in screen.splitlines()) <= 80
    _has(screen, "generator-1", "alive", f"{_rate('generator-1'):.1f}", "v2", "16", "3")
    _has(screen, "loss", f"{_records('step')[-1]['loss']:.4f}")


def test_follow_reads_only_complete_lines(tmp_path: Path) -> None:
    lines = SAMPLE.read_text().splitlines()
    path = tmp_path / "metrics.jsonl"
    view = RunView(tmp_path, config=CONFIG, clock=None)
    assert view.poll() == 0  # no file yet
    with path.open("w") as f:
        f.write(lines[0] + "\n" + lines[1][:40])  # the learner is in the middle of the second line
        f.flush()
        assert view.poll() == 1
        assert view.poll() == 0  # the torn line is not read twice, nor half
        f.write(lines[1][40:] + "\n")
        f.flush()
        assert view.poll() == 1
        for line in lines[2:]:
            f.write(line + "\n")
        f.flush()
    assert view.poll() == len(lines) - 2
    snap = view.snapshot
    assert snap.records == len(lines) and snap.malformed == 0
    assert snap.step["version"] == 3
    assert list(snap.reward_trend["all"]) == [r["reward_mean"] for r in _records("step")]


def test_malformed_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    good = SAMPLE.read_text().splitlines()
    view = _view(tmp_path, [good[0], "{not json", "[1, 2]", '{"no_kind": 1}', "", "\x00\x01", *good[1:]])
    assert view.snapshot.malformed == 4
    assert view.snapshot.records == len(good)
    assert view.snapshot.step["version"] == 3
    assert "4 malformed lines skipped" in _screen(view)


def test_a_replaced_file_is_read_afresh_and_process_states_stay(tmp_path: Path) -> None:
    view = _view(tmp_path)
    view.set_process_state("generator-0", "exited", pid=9, restarts=1)
    first_step = _records("step")[0]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(first_step) + "\n")  # shorter than what was read
    view.poll()
    assert view.snapshot.records == 1 and view.snapshot.step["version"] == 1
    gen = view.snapshot.generators["generator-0"]
    assert (gen.state, gen.pid, gen.restarts) == ("exited", 9, 1)


def test_resets_are_counted_once_per_version(tmp_path: Path) -> None:
    step = _records("step")[-1]
    reset = {"kind": "reset", "time_s": step["time_s"], "elapsed_s": step["elapsed_s"], "version": 3,
             "reason": "kl_share"}
    later = {"kind": "reset", "time_s": step["time_s"] + 1, "elapsed_s": step["elapsed_s"] + 1, "version": 7,
             "reason": "schedule"}
    view = _view(tmp_path, [json.dumps(r) for r in [*_records(), reset, later]])
    assert view.snapshot.resets == [(3, "kl_share"), (7, "schedule")]


def test_plain_line(full_view: RunView) -> None:
    step = _records("step")[-1]
    line = plain_line(full_view)
    assert "\n" not in line
    rate = _rate("generator-0") + _rate("generator-1")
    steps = _records("step")
    policy = f"policy reward {_policy(steps)} {_pooled(steps)[0] - _pooled(steps[:1])[0]:+.3f} since start"
    domains = f"(logic {_policy(steps, 'logic')}  math {_policy(steps, 'math')})"
    for part in ["[0:01:13] step 3/3", f"{policy} {domains}", f"batch reward (filtered) {step['reward_mean']:.3f}",
                 "held-out pass@1 0.438 (v3)",
                 f"loss {step['loss']:.4f}", f"kl {step['kl']:.2e}", f"entropy {step['entropy']:.3f}",
                 "buffer 4/8", f"generators 1/2 up {rate:.1f} tok/s", "sync 0.12 s 3.00 MiB", "resets 1"]:
        assert part in line, (part, line)


def test_live_loop_redraws_at_least_twice_a_second_and_follows_new_records(tmp_path: Path) -> None:
    lines = SAMPLE.read_text().splitlines()
    steps = [i for i, line in enumerate(lines) if '"kind":"step"' in line]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines[: steps[0] + 1]) + "\n")  # up to step 1
    view = RunView(tmp_path, config=CONFIG, clock=None)
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    polled_at: list[float] = []
    poll = view.poll

    def timed_poll() -> int:
        polled_at.append(trio.current_time())
        return poll()

    view.poll = timed_poll  # type: ignore[method-assign]

    def states(v: RunView) -> None:  # as the supervisor does: generator-1 dies after a second
        v.set_process_state("generator-1", "alive" if trio.current_time() < 1.0 else "restarting", pid=7)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: live_loop(view, console=console, before_refresh=states,
                                                              task_status=task_status))
            await trio.sleep(1.1)
            assert view.snapshot.step["version"] == 1
            assert "generator-1  alive" in out.getvalue()
            with path.open("a") as f:
                f.write("\n".join(lines[steps[0] + 1 :]) + "\n")
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    gaps = [b - a for a, b in itertools.pairwise(polled_at)]
    assert len(polled_at) >= 1 + 2 * 2 and max(gaps) <= 0.5 + 1e-6, polled_at  # >= 2 polls a second for 2.1 s
    assert out.getvalue().count("prorl-async run") >= len(polled_at)  # and a frame drawn after each
    assert view.snapshot.step["version"] == 3
    last_frame = out.getvalue().rsplit("prorl-async run", 1)[1]
    assert "step 3/3" in last_frame and "generator-1  restarting" in last_frame


def test_wants_live() -> None:
    class Stream(io.StringIO):
        def __init__(self, tty: bool) -> None:
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    assert wants_live("auto", Stream(True)) and not wants_live("auto", Stream(False))
    assert wants_live("on", Stream(False)) and not wants_live("off", Stream(True))


def test_plain_loop_prints_when_records_arrive(tmp_path: Path) -> None:
    lines = SAMPLE.read_text().splitlines()
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines[0] + "\n")
    view = RunView(tmp_path, config=CONFIG, clock=None)
    out = io.StringIO()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: plain_loop(view, every_s=5.0, file=out, task_status=task_status))
            await trio.sleep(5.5)  # one line: the first record arrived
            await trio.sleep(5.0)  # nothing new: no line
            with path.open("a") as f:
                f.write("\n".join(lines[1:]) + "\n")
            await trio.sleep(5.0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    phases = [line for line in out.getvalue().splitlines() if "] start-up: " in line]
    printed = [line for line in out.getvalue().splitlines() if line not in phases]
    assert len(printed) == 2, printed
    assert len(phases) == 5 and "learner ready (v0)" in phases[0] and "first step done (v1)" in phases[-1], phases
    assert "step 0/3" in printed[0] and "step 3/3" in printed[1]  # learner_ready announced version 0


def test_fields_the_records_will_carry_are_shown_once_they_do(tmp_path: Path) -> None:
    """Held-group staleness histogram, generator idle ratio, pass@k as a dict: drawn as soon as a record has them."""
    records = _records()
    step = next(r for r in reversed(records) if r["kind"] == "step")
    step["buffer_staleness_hist"] = {"1": 1, "0": 3}
    step["messages_rejected"] = {"token": 2, "value": 1}  # what the learner's decoder refused
    step["buffer_counters"]["untrainable"] = 4
    for r in records:
        if r["kind"] == "generator":
            r["idle_ratio"] = 0.25 if r["source"] == "generator-0" else 0.75
    records = [r for r in records if r["kind"] != "validation"]
    records.append({"kind": "validation", "time_s": step["time_s"], "elapsed_s": step["elapsed_s"], "version": 2,
                    "pass_at_k": {"1": 0.125, "16": 0.5}})
    screen = _screen(_view(tmp_path, [json.dumps(r) for r in records]))
    _has(screen, "staleness", "0:3", "1:1")
    _has(screen, "bad msgs", "3")
    _has(screen, "drop untrainable", "4")
    _has(screen, "generator-0", "finished")
    assert "0.25" in _line_with(screen, "generator-0") and "0.75" in _line_with(screen, "generator-1")
    _has(screen, "gen idle", "mean 0.50 max 0.75")
    _has(screen, "validation", "v2", "pass@1 0.125", "pass@16 0.500")


def test_the_snapshot_stays_small_over_a_long_run(tmp_path: Path) -> None:
    """Rendering cost must not grow with the run: the snapshot keeps bounded trends, not the history."""
    step = _records("step")[0]
    lines = []
    for version in range(1, 2001):
        step.update(version=version, reward_mean=(version % 10) / 10, time_s=step["time_s"] + 1)
        lines.append(json.dumps(step))
        lines.append(json.dumps({"kind": "event", "event": "checkpoint", "version": version, "path": f"c/{version}",
                                 "time_s": step["time_s"], "elapsed_s": 1.0}))
    view = _view(tmp_path, lines)
    snap = view.snapshot
    assert snap.records == 4000 and snap.version == 2000
    assert all(len(trend) <= 32 for trend in snap.reward_trend.values())
    assert len(snap.events) == 3 and snap.last_checkpoint == "2000"
    assert "2000" in _line_with(_screen(view), "step", "learner")


def _line_with(screen: str, *parts: str) -> str:
    return next(line for line in screen.splitlines() if all(p in line for p in parts))


def _arrived_step(version: int, mean: float | None, n: int, batch: float = 0.5) -> str:
    """A step record whose arrivals (all from domain ``logic``) are ``n`` samples of mean reward ``mean``."""
    record = {"kind": "step", "time_s": 1000.0 + 10 * version, "elapsed_s": 10.0 * version, "version": version,
              "reward_mean": batch, "reward_arrived_mean": mean, "samples_arrived": n,
              "reward_arrived_by_domain": {"logic": mean} if n else {},
              "samples_arrived_by_domain": {"logic": n} if n else {}}
    return json.dumps(record)


def test_the_headline_is_the_policy_reward_pooled_over_the_last_steps_with_its_trend(tmp_path: Path) -> None:
    """Every scored sample of the last WINDOW_STEPS step records, weighted by samples; the change since the first
    record's arrivals, with an arrow beyond twice its standard error; the filtered batch reward stays flat at 0.5."""
    rising = [(0.1 + 0.04 * i, 64 + 8 * (i % 3)) for i in range(20)]  # 0.10 -> 0.86, 64 to 80 samples a step
    view = _view(tmp_path, [_arrived_step(i + 1, m, n) for i, (m, n) in enumerate(rising)])
    last = rising[-WINDOW_STEPS:]
    want, samples = sum(m * n for m, n in last) / sum(n for _, n in last), sum(n for _, n in last)
    p = view.snapshot.policy["all"]
    assert p.value == pytest.approx(want) and p.samples == samples
    assert p.start == pytest.approx(0.1) and p.delta == pytest.approx(want - 0.1) and p.arrow == "↑"
    assert view.snapshot.policy["logic"].value == pytest.approx(want)
    assert len(p.trend) == 20 and p.trend[-1] == pytest.approx(want) and p.trend[0] == pytest.approx(0.1)
    screen = _screen(view)
    _has(screen, "policy reward", f"{want:.3f} ↑ {want - 0.1:+.3f} since start",
         f"(every scored sample, last {WINDOW_STEPS} steps: {samples} samples)")
    _has(screen, "by domain", f"logic {want:.3f} ↑")
    _has(screen, "held-out", "pass@1 n/a", "batch reward (filtered) 0.500")
    line = plain_line(view)
    assert f"policy reward {want:.3f} ↑ {want - 0.1:+.3f} since start (logic {want:.3f} ↑)" in line, line
    assert "batch reward (filtered) 0.500" in line

    flat = tmp_path / "flat"
    flat.mkdir()
    p = _view(flat, [_arrived_step(i + 1, 0.5, 64) for i in range(10)]).snapshot.policy["all"]
    assert (p.value, p.delta, p.arrow) == (pytest.approx(0.5), pytest.approx(0.0), "→")
    falling = tmp_path / "falling"
    falling.mkdir()
    p = _view(falling, [_arrived_step(i + 1, 0.8 - 0.05 * i, 64) for i in range(10)]).snapshot.policy["all"]
    assert p.arrow == "↓" and p.delta < 0
    # a step with nothing arrived still counts as a step of the window; the value stays while the window is empty
    gaps = tmp_path / "gaps"
    gaps.mkdir()
    lines = [_arrived_step(1, 0.2, 64), _arrived_step(2, 0.6, 64), *[_arrived_step(v, None, 0) for v in range(3, 8)]]
    p = _view(gaps, lines).snapshot.policy["all"]
    assert p.value == pytest.approx(0.6) and p.samples == 64  # steps 3-7 hold none: the value of steps 2-6 stays
    p = _view(gaps, lines[:4]).snapshot.policy["all"]
    assert p.value == pytest.approx(0.4) and p.samples == 128


def test_trend_arrow_marks_changes_beyond_noise() -> None:
    assert trend_arrow(0.2, 1000, 0.3, 1000) == "↑"  # standard error about 0.02
    assert trend_arrow(0.3, 1000, 0.2, 1000) == "↓"
    assert trend_arrow(0.2, 10, 0.3, 10) == "→"  # about 0.19: within noise
    assert trend_arrow(0.0, 64, 0.0, 64) == "→"
    assert trend_arrow(None, 0, 0.3, 10) == "" and trend_arrow(0.2, 10, None, 0) == ""


def test_records_without_arrived_rewards_read_na_for_the_policy_reward(tmp_path: Path) -> None:
    """Older runs (before ``reward_arrived_mean``) replay: the policy reward is n/a, the batch reward is shown."""
    old = [{k: v for k, v in r.items() if "arrived" not in k} for r in _records()]
    view = _view(tmp_path, [json.dumps(r) for r in old])
    screen = _screen(view)
    _has(screen, "policy reward", "n/a", "(every scored sample, last")
    _has(screen, "batch reward (filtered) 0.500")
    assert "policy reward n/a" in plain_line(view)


def test_held_out_pass_at_1_compares_with_the_first_complete_round(tmp_path: Path) -> None:
    def validation(version: int, p1: float, complete: bool = True) -> str:
        return json.dumps({"kind": "validation", "time_s": 1000.0 + version, "elapsed_s": float(version),
                           "version": version, "complete": complete, "pass_at_1": p1})

    requested = json.dumps({"kind": "event", "event": "validation_requested", "time_s": 1000.0, "elapsed_s": 0.0,
                            "version": 0, "round": 0, "step": 0, "reason": "start"})
    view = _view(tmp_path, [requested])
    assert "held-out pass@1 n/a validating v0…" in plain_line(view)
    view = _view(tmp_path, [requested, validation(0, 0.25), validation(10, 0.3, complete=False),
                            validation(20, 0.625)])
    assert "held-out pass@1 0.625 (v20, +0.375 since v0)" in plain_line(view)
    view = _view(tmp_path, [validation(0, 0.25), validation(10, 0.3, complete=False)])
    assert "held-out pass@1 0.300 (v10, partial, +0.050 since v0)" in plain_line(view)


def test_start_up_phases_from_process_states_and_records(tmp_path: Path) -> None:
    """A line per phase, timed from the supervisor's start; the first step's line says what each phase cost."""
    records = _records()
    ready = next(r for r in records if r.get("event") == "learner_ready")
    joined = next(r for r in records if r.get("event") == "generators_joined")
    first = _records("step")[0]
    started = ready["time_s"] - 9.5  # the supervisor started the learner 9.5 s before it was ready
    now = [started]
    (tmp_path / "metrics.jsonl").write_text("")
    view = RunView(tmp_path, config=CONFIG, clock=lambda: now[0], since_s=started)
    view.poll()
    view.set_process_state("learner", "alive", pid=111)
    now[0] += 5.5
    view.set_process_state("learner", "alive", pid=111)  # each refresh: one line only
    view.poll()
    screen = _screen(view)
    _has(screen, "start-up: learner: loading the model (pid 111)", "·", "0:00:05 in this phase")
    (tmp_path / "metrics.jsonl").write_text(SAMPLE.read_text())
    view.poll()
    phases = list(view.snapshot.phases.lines)
    model, generators, batch = ready["time_s"] - started, joined["time_s"] - ready["time_s"], \
        first["time_s"] - joined["time_s"]
    assert [p.text for p in phases] == [
        "learner: loading the model (pid 111)",
        "learner ready (v0): model loaded, listening; generators start",
        "generator-0 connected; it starts its vLLM engine, then joins the weight group",
        "generator-1 connected; it starts its vLLM engine, then joins the weight group",
        "generators joined the weight group; waiting for the first batch (4 groups)",
        f"first step done (v1): {first['time_s'] - started:.0f} s after start: model {model:.0f} s, "
        f"generators {generators:.0f} s, first batch and step {batch:.0f} s",
    ]
    assert all(p.label == "start-up" for p in phases)
    assert phase_line(view.snapshot, phases[1]) == ("[0:00:09] start-up: learner ready (v0): model loaded, "
                                                     "listening; generators start")
    _has(_screen(view), "start-up: first step done (v1):")

    # records from before the supervisor started (a resumed run's file) make no line
    late = RunView(tmp_path, config=CONFIG, clock=None, since_s=records[-1]["time_s"] + 1)
    late.poll()
    assert not late.snapshot.phases.lines


def test_a_stop_and_a_resumed_start_in_one_file_have_their_own_phases(tmp_path: Path) -> None:
    t = _records()[-1]["time_s"]
    stop = [{"kind": "event", "event": "interrupted", "signal": 2, "version": 3, "time_s": t + 1, "elapsed_s": 80.0},
            {"kind": "event", "event": "checkpoint", "path": "/r/checkpoints/step-000003", "version": 3,
             "time_s": t + 2, "elapsed_s": 81.0},
            {"kind": "event", "event": "resumed", "path": "/r/checkpoints/step-000003", "version": 3,
             "time_s": t + 60, "elapsed_s": 8.0},
            {"kind": "event", "event": "learner_ready", "version": 3, "time_s": t + 61, "elapsed_s": 9.0}]
    view = _view(tmp_path, [*SAMPLE.read_text().splitlines(), *(json.dumps(r) for r in stop)])
    tail = [(p.label, p.text) for p in view.snapshot.phases.lines][-4:]
    assert tail == [
        ("stopping", "learner interrupted (v3), it ends the step in progress, writes a checkpoint, then stops the "
                     "generators"),
        ("stopping", "checkpoint written: /r/checkpoints/step-000003"),
        ("start-up", "resumed from step-000003 (v3)"),
        ("start-up", "learner ready (v3): model loaded, listening; generators start"),
    ]
    assert not view.snapshot.phases.started


def test_on_a_cluster_the_screen_names_each_processs_host(tmp_path: Path) -> None:
    view = _view(tmp_path)
    assert "node-a" not in _screen(view)  # on one machine: no host column
    view.set_process_state("learner", "alive", pid=111, host="node-a")
    view.set_process_state("generator-0", "alive", pid=222, host="node-b")
    view.set_process_state("generator-1", "alive", pid=333, host="node-c")
    screen = _screen(view)
    _has(screen, "alive", "pid", "111", "on", "node-a")
    _has(screen, "generator-0", "alive", "node-b", "222")
    _has(screen, "generator-1", "alive", "node-c", "333")
    view.poll()  # a fresh snapshot keeps what the supervisor said
    _has(_screen(view), "generator-0", "alive", "node-b")


def test_a_learner_of_several_ranks_shows_how_many_are_alive_and_where(tmp_path: Path) -> None:
    view = _view(tmp_path)
    view.set_process_state("learner", "alive", pid=111, host="node-a")
    view.set_process_state("learner-1", "alive", pid=112, host="node-b")
    screen = _screen(view)
    _has(screen, "on", "node-a", "ranks", "2/2", "alive", "+node-b")
    assert "learner-1" not in screen  # a rank is not a generator row
    view.set_process_state("learner-1", "exited", pid=112, host="node-b")
    _has(_screen(view), "ranks", "1/2", "alive")
