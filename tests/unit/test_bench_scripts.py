"""The pure parts of the end-to-end benches (bench/_runs.py, speedup, staleness, learning, peers, all).

No timing is asserted: the benches measure, these tests only check the arithmetic, the assembly of tables
and JSON from synthetic metrics records, and the figures (matplotlib PNGs) drawn from them.
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

import _runs  # noqa: E402
import all as all_benches  # noqa: E402
import chaos  # noqa: E402
import launchers  # noqa: E402
import learning  # noqa: E402
import peers  # noqa: E402
import speedup  # noqa: E402
import staleness  # noqa: E402


def test_ideal_bound_is_sum_over_max() -> None:
    assert _runs.ideal_bound(1.0, 1.0) == 2.0
    assert _runs.ideal_bound(3.0, 1.0) == pytest.approx(4 / 3)
    assert _runs.ideal_bound(0.0, 2.0) == 1.0
    assert math.isnan(_runs.ideal_bound(0.0, 0.0))


def test_ratio_handles_missing_values() -> None:
    assert _runs.ratio(6.0, 3.0) == 2.0
    assert _runs.ratio(None, 3.0) is None
    assert _runs.ratio(1.0, 0.0) is None
    assert _runs.ratio(float("nan"), 1.0) is None


def test_table_aligns_columns_and_shows_missing_as_dash() -> None:
    text = _runs.table(["name", "value"], [["a", 1.23456], ["long name", None]], digits=2)
    lines = text.splitlines()
    assert lines[0].startswith("name") and "value" in lines[0]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].endswith("1.23") and lines[3].endswith("-")
    assert len({len(line) for line in lines}) == 1


def test_write_json_turns_nan_into_null(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    _runs.write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


def _records(waits: list[float], train: float = 1.0, samples: int = 16) -> list[dict]:
    """A synthetic metrics log: one step per wait, each ending ``wait + train`` seconds after the last."""
    records: list[dict] = [{"kind": "event", "time_s": 0.0}]
    t = 10.0  # startup
    for i, wait in enumerate(waits):
        t += wait + train
        records.append({"kind": "step", "time_s": t, "wait_s": wait, "step_time_s": train - 0.1, "sync_s": 0.1,
                        "samples": samples, "tokens": 10 * samples, "reward_mean": 0.1 * i, "is_truncated_frac": 0.0,
                        "ess": 1.0, "staleness_mean": 0.0,
                        "buffer_counters": {"received": 10, "yielded": 8, "stale": 2}})
    return records


def test_summarize_leaves_the_warmup_out() -> None:
    summary = _runs.summarize(_records([50.0, 2.0, 2.0, 2.0]), warmup_steps=1)
    assert summary["steps"] == 4 and summary["timed_steps"] == 2
    assert summary["span_s"] == pytest.approx(6.0)
    assert summary["samples_per_s"] == pytest.approx(32 / 6.0)
    assert summary["t_train_s"] == pytest.approx(1.0)
    assert summary["t_wait_s"] == pytest.approx(2.0)
    assert summary["learner_idle_ratio"] == pytest.approx(4.0 / 6.0)
    assert summary["stale_drop_frac"] == pytest.approx(0.2)
    assert summary["samples_total"] == 64


def test_summarize_without_steps() -> None:
    assert _runs.summarize([{"kind": "event", "time_s": 0.0}]) == {"steps": 0}


def test_generator_idle_from_cumulative_heartbeats() -> None:
    # started at 0; idle 50 of the first 100 s, then 10 of the next 100 s
    gens = [{"kind": "generator", "source": "g0", "time_s": 100.0, "tokens_sent": 1000, "tokens_per_s": 10.0,
             "idle_ratio": 0.5},
            {"kind": "generator", "source": "g0", "time_s": 200.0, "tokens_sent": 3000, "tokens_per_s": 15.0,
             "idle_ratio": 0.3}]
    assert _runs.generator_idle(gens, since=150.0) == pytest.approx(0.1)
    assert _runs.generator_idle([], since=0.0) is None


def test_reward_curve_and_budget() -> None:
    records = _records([1.0, 1.0, 1.0, 1.0])
    curve = _runs.reward_curve(records)
    assert [p["samples"] for p in curve] == [16, 32, 48, 64]
    assert curve[0]["t_s"] == pytest.approx(2.0)  # from the start of training: the first step's wait + train
    assert _runs.training_start(records) == pytest.approx(10.0)
    assert _runs.reward_at_budget(records, budget=48, window=2) == pytest.approx(0.15)


def test_speedup_assembles_ratios_against_sync_and_the_bound() -> None:
    rows = {0: {"samples_per_s": 1.0, "t_wait_s": 2.0, "t_train_s": 1.0},
            1: {"samples_per_s": 1.35}, 2: {"samples_per_s": 1.4}, 4: {"samples_per_s": None}}
    doc = speedup.assemble(rows)
    assert doc["ideal_bound"] == pytest.approx(1.5)
    assert doc["best_bound"] == 2
    assert doc["speedup_over_sync"] == pytest.approx(1.4)
    assert doc["fraction_of_ideal"] == pytest.approx(1.4 / 1.5)
    assert doc["runs"]["0"]["fraction_of_ideal"] is None and doc["runs"]["4"]["speedup_over_sync"] is None


def test_staleness_recommends_the_smallest_bound_near_the_best() -> None:
    rows = {0: {"samples_per_s": 1.0, "reward_at_budget": 0.30}, 1: {"samples_per_s": 1.9, "reward_at_budget": 0.30},
            2: {"samples_per_s": 2.0, "reward_at_budget": 0.31}, 4: {"samples_per_s": 2.05, "reward_at_budget": 0.2}}
    assert staleness.recommend(rows) == 1
    rows[1]["reward_at_budget"] = 0.1  # bound 1 loses reward: the next bound that keeps it
    assert staleness.recommend(rows) == 2
    assert staleness.recommend({}) is None
    no_reward = {0: {"samples_per_s": 1.0, "reward_at_budget": float("nan")}, 1: {"samples_per_s": 2.0}}
    assert staleness.recommend(no_reward) == 1
    # auto wins only by being more than 5% faster than every fixed bound that keeps the reward
    rows["auto"] = {"samples_per_s": 2.05, "reward_at_budget": 0.31}
    assert staleness.recommend(rows) == 2
    rows["auto"]["samples_per_s"] = 2.2
    assert staleness.recommend(rows) == "auto"
    assert staleness.parse_bounds("auto,4,0, 1,4") == [0, 1, 4, "auto"]
    with pytest.raises(SystemExit, match="neither"):
        staleness.parse_bounds("1,fast")


def test_learning_late_reward_and_time_to_reward() -> None:
    curve = [{"t_s": float(t), "samples": 16 * t, "reward": r} for t, r in [(1, 0.0), (5, 0.2), (8, 0.4), (10, 0.6)]]
    assert learning.late_reward(curve, budget_s=10.0) == pytest.approx(0.5)
    assert learning.time_to_reward(curve, target=0.4, window=1) == 8.0
    assert learning.time_to_reward(curve, target=0.9) is None
    records = [{"kind": "event", "time_s": 0.0}, {"kind": "step", "time_s": 4.0, "wait_s": 1.0, "step_time_s": 1.0},
               {"kind": "validation", "time_s": 5.0, "pass_at_1": 0.5}]  # the key validation records have
    assert learning.validation_curve(records) == [{"t_s": 3.0, "pass@1": 0.5}]
    assert learning.startup_s(records) == pytest.approx(2.0)


def test_peers_seconds_per_1k_and_speedup() -> None:
    assert peers.seconds_per_1k([10.0, 20.0, 30.0], samples_per_step=100) == pytest.approx(100.0)
    assert peers.seconds_per_1k([10.0], samples_per_step=100) is None
    assert peers.speedup(300.0, 100.0) == 3.0
    assert peers.speedup(None, 100.0) is None
    sides = peers.side_rows({"step_ends": [5.0, 15.0, 25.0], "rewards": [0.1, 0.2, 0.3], "wall_s": 40.0,
                             "load_s": 5.0},
                            {"step_ends": [20.0, 22.0, 24.0], "rewards": [0.1, 0.3, 0.5], "wall_s": 30.0,
                             "load_s": 0.0, "policy_rewards": [float("nan"), 0.2, 0.1], "scored": [64, 128, 96]},
                            samples_per_step=64)
    assert sides["trl"]["samples"] == 192 and sides["trl"]["first_step_end_s"] == 10.0
    assert sides["prorl-async"]["reward_at_budget"] == pytest.approx(0.3)
    # TRL trains on everything it generates: its policy reward is its batch reward; ours counts every arrival
    assert sides["trl"]["policy_reward_at_budget"] == pytest.approx(0.2) and sides["trl"]["scored_samples"] == 192
    assert sides["prorl-async"]["policy_reward_at_budget"] == pytest.approx(0.15)
    assert sides["prorl-async"]["scored_samples"] == 288
    assert peers.speedup(sides["trl"]["s_per_1k_steady"], sides["prorl-async"]["s_per_1k_steady"]) == 5.0


def test_peers_trl_settings_follow_the_config() -> None:
    from prorl_async.config import load_config

    cfg = load_config(None)
    settings = peers.trl_settings(cfg)
    assert settings["num_generations"] == cfg.sampling.group_size
    samples = cfg.learner.batch_groups * cfg.sampling.group_size
    assert settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] == samples
    assert settings["steps_per_generation"] == settings["gradient_accumulation_steps"]  # one generate per step
    assert peers.trl_settings(cfg, micro_batch=samples)["gradient_accumulation_steps"] == 1
    with pytest.raises(ValueError):
        peers.trl_settings(cfg, micro_batch=samples - 1)
    assert settings["max_completion_length"] == cfg.sampling.max_response_tokens
    assert settings["use_cpu"] and settings["beta"] == 0.0


def test_all_summary_rows_and_headlines() -> None:
    results = {"transport": {"returncode": 0, "seconds": 5.0, "json": {"tokens_per_s": 2.5e7}},
               "rewards": {"returncode": 0, "seconds": 3.0, "json": {"samples_per_s": {"logic": 4000.0}}},
               "native": {"returncode": 1, "seconds": 1.0, "json": None}}
    rows = all_benches.summary_rows(results)
    assert rows[0][:4] == ["transport", "ok", "tokens_per_s", 2.5e7]
    assert rows[1][3] == "logic=4,000.0"
    assert rows[2][1] == "failed (1)" and rows[2][3] is None
    cmd = all_benches.command("native", quick=True, json_path=Path("/tmp/x.json"))
    assert cmd[-2:] == ["--json", "/tmp/x.json"] and "--quick" in cmd


def test_chaos_timeline_rolls_back_the_steps_a_killed_learner_took_after_its_checkpoint() -> None:
    records = [{"kind": "step", "version": v, "prompt_ids": [f"a{v}"]} for v in (1, 2, 3)]
    records += [{"kind": "event", "event": "resumed", "version": 2}]  # killed after step 3, checkpoint at 2
    records += [{"kind": "step", "version": v, "prompt_ids": [f"b{v}"]} for v in (3, 4)]
    steps = chaos.final_timeline(records)
    assert [(s["version"], s["prompt_ids"]) for s in steps] == [(1, ["a1"]), (2, ["a2"]), (3, ["b3"]), (4, ["b4"])]


def _panel(**extra) -> dict:
    return {"title": "reward", "xlabel": "time (s)", "ylabel": "step reward (batch mean)", **extra}


def test_lines_figure_titles_labels_and_legends() -> None:
    fig = _runs.lines_figure([
        _panel(series=[[(0.0, 0.1), (1.0, 0.3)], [(0.0, 0.2), (1.0, float("nan")), (2.0, 0.4)]],
               legend=["sync", "async"]),
        _panel(title="samples/s by bound", xlabel="max_staleness (policy versions)", ylabel="samples/s",
               series=[[(0.0, 1.0), (1.0, 2.0), (2.0, 1.5)]], xticks=[(0.0, "0"), (1.0, "1"), (2.0, "auto")]),
    ], title="a bench")
    first, second = fig.axes
    assert fig.get_suptitle() == "a bench"
    assert (first.get_title(), first.get_xlabel(), first.get_ylabel()) == ("reward", "time (s)",
                                                                           "step reward (batch mean)")
    assert [t.get_text() for t in first.get_legend().get_texts()] == ["sync", "async"]
    assert first.get_ylim()[0] == 0.0  # every value >= 0: y from 0
    assert first.xaxis.get_gridlines()[0].get_visible()
    assert second.get_title() == "samples/s by bound" and second.get_xlabel() == "max_staleness (policy versions)"
    assert second.get_legend() is None  # one series: the title names it
    assert [t.get_text() for t in second.get_xticklabels()] == ["0", "1", "auto"]
    with pytest.raises(ValueError, match="xlabel"):
        _runs.lines_figure([{"title": "t", "ylabel": "y", "series": []}])


def _png_pixels(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pixels = imread(path)
    assert pixels[..., :3].std() > 0.05  # something was drawn
    return pixels


def test_plot_lines_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "plot.png"
    _runs.plot_lines(path, [_panel(series=[[(0.0, 0.1), (1.0, 0.3)]]), _panel(series=[[(0.0, 0.2), (1.0, 0.4)]])])
    height, width = _png_pixels(path).shape[:2]
    assert 800 <= width <= 2500 and 300 <= height <= 1000 and width > height  # two panels side by side


def test_launch_resume_passes_the_flag_and_appends_to_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    class FakePopen:  # records the command and writes a line to its log: no process is started
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            calls.append(list(argv))
            kwargs["stdout"].write(f"attempt {len(calls) + 1}\n".encode())

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(_runs.subprocess, "Popen", FakePopen)
    run_dir = tmp_path / "runs" / "resets"
    log = run_dir.parent / "resets.supervisor.log"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"attempt 1\n")
    run = _runs.launch(None, ["run.max_steps=8"], run_dir, resume=run_dir, timeout_s=5.0)
    assert run.returncode == 0 and run.records == []
    after_run = calls[0][calls[0].index("run") + 1:]
    assert after_run[0] == f"--resume={run_dir}" and after_run[1:3] == ["--set", "run.max_steps=8"]
    assert log.read_bytes() == b"attempt 1\nattempt 2\n"  # the interrupted attempt's log is kept
    _runs.launch("configs/tiny.toml", [], run_dir, timeout_s=5.0)
    assert calls[1][calls[1].index("run") + 1] == "configs/tiny.toml"
    assert not any(a.startswith("--resume") for a in calls[1])
    with pytest.raises(ValueError, match="config=None"):
        _runs.launch("configs/tiny.toml", [], run_dir, resume=run_dir)
    assert len(calls) == 2


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every figure ``_runs.plot_lines`` draws (and still writes) during the test."""
    drawn = []

    def record(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    real = _runs.lines_figure
    monkeypatch.setattr(_runs, "lines_figure", record)
    return drawn


def test_staleness_plot_has_four_labelled_panels(tmp_path: Path, figures: list) -> None:
    rows = {0: {"samples_per_s": 1.0, "stale_drop_frac": 0.0, "reward_at_budget": 0.3},
            1: {"samples_per_s": 1.8, "stale_drop_frac": 0.1, "reward_at_budget": float("nan")},
            "auto": {"samples_per_s": 2.0, "stale_drop_frac": 0.05, "reward_at_budget": 0.28}}
    curves = {b: [{"samples": 16.0 * i, "reward": 0.1 * i} for i in range(1, 4)] for b in rows}
    path = tmp_path / "staleness.png"
    staleness.plot(path, rows, curves)
    height, width = _png_pixels(path).shape[:2]
    assert width > 3 * height
    [fig] = figures
    assert [ax.get_title() for ax in fig.axes] == ["samples/s by bound", "stale-drop fraction by bound",
                                                   "reward at the budget by bound", "step reward vs samples"]
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes) and fig.get_suptitle()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "auto"]
    assert [t.get_text() for t in fig.axes[3].get_legend().get_texts()] == [
        "max_staleness 0", "max_staleness 1", "max_staleness auto"]


def test_learning_plot_has_two_labelled_panels(tmp_path: Path, figures: list) -> None:
    curves = {m: [{"t_s": 10.0 * i, "samples": 16.0 * i, "reward": 0.1 * i} for i in range(1, 4)]
              for m in ("sync", "async")}
    path = tmp_path / "learning.png"
    learning.plot(path, curves, {"sync": 0, "async": 1}, budget_s=90.0)
    _png_pixels(path)
    [fig] = figures
    assert [ax.get_xlabel() for ax in fig.axes] == ["time since training began (s)", "samples trained on (cumulative)"]
    assert all(ax.get_title() and ax.get_ylabel() for ax in fig.axes) and "90 s" in fig.get_suptitle()
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sync (max_staleness 0)",
                                                                       "async (max_staleness 1)"]


def test_launchers_compares_finished_arms_only() -> None:
    arms = [{"config": "tiny", "launcher": "local", "returncode": 0, "samples_per_s": 10.0, "startup_s": 40.0},
            {"config": "tiny", "launcher": "ray", "returncode": 0, "samples_per_s": 9.0, "startup_s": 50.0},
            {"config": "tiny", "launcher": "ray", "returncode": 1, "samples_per_s": 1.0, "startup_s": 99.0}]
    rows, summary = launchers.compare(arms, ["tiny"])
    assert summary["tiny"]["samples_per_s_ratio_ray_over_local"] == pytest.approx(0.9)
    assert (summary["tiny"]["local_startup_s"], summary["tiny"]["ray_startup_s"]) == (40.0, 50.0)
    assert rows == [["tiny", 10.0, 9.0, pytest.approx(0.9), 40.0, 50.0]]
