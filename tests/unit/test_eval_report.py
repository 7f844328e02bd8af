"""``prorl-async eval`` without vLLM: task selection on the held-out split, model resolution, the CLI's flags,
and the output files (JSON, markdown, matplotlib PNGs) from synthetic scored prompts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from matplotlib.image import imread

from prorl_async import cli
from prorl_async.config import load_config
from prorl_async.envs.tasks import TaskMix
from prorl_async.errors import UserError
from prorl_async.eval import report as evaluation_report
from prorl_async.eval.run import (
    EvalModel,
    assemble,
    eval_tasks,
    find_run_config,
    resolve_eval_model,
    select_specs,
)
from prorl_async.eval.stats import HIST_BINS, PromptResult

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "configs" / "default.toml"


def test_select_specs() -> None:
    cfg = load_config(DEFAULT)
    assert [label for label, _ in select_specs(cfg)] == ["logic/chain_sum", "logic/letter_counting"]
    cfg = load_config(DEFAULT, ['eval.tasks=["letter_counting"]'])
    [(label, spec)] = select_specs(cfg)
    assert label == "logic/letter_counting" and spec.params == {"min_words": 1, "max_words": 3}  # the mix's params
    cfg = load_config(DEFAULT, ['eval.tasks=["logic"]'])
    assert len(select_specs(cfg)) == 2
    cfg = load_config(DEFAULT, ['eval.tasks=["logic/chain_sum", "logic/family_relationships"]'])
    [(_, first), (label, outside)] = select_specs(cfg)
    assert first.params["max_terms"] == 2 and label == "logic/family_relationships" and outside.params == {}
    with pytest.raises(UserError, match=r"not in tasks\.mix"):
        select_specs(load_config(DEFAULT, ['eval.tasks=["nope"]']))
    with pytest.raises(UserError, match="nope/x"):
        select_specs(load_config(DEFAULT, ['eval.tasks=["nope/x"]']))
    cfg = load_config(DEFAULT, ['tasks.mix=[{name="chain_sum"}, {name="chain_sum", params={min_terms=3}}]'])
    assert [label for label, _ in select_specs(cfg)] == ["logic/chain_sum#0", "logic/chain_sum#1"]


def test_eval_tasks_are_the_runs_held_out_split() -> None:
    cfg = load_config(DEFAULT, ['eval.tasks=["letter_counting"]', "eval.prompts=5"])
    tasks = eval_tasks(cfg, select_specs(cfg))
    assert len(tasks) == 5 and all(label == "logic/letter_counting" for label, _ in tasks)
    # the same problems a training run with the full mix holds out (the split does not depend on the position)
    held_out = TaskMix(cfg.tasks).validation_tasks(1)[:5]
    assert [t.question for _, t in tasks] == [t.question for t in held_out]
    assert all(t.metadata["split"] == "validation" for _, t in tasks)
    with pytest.raises(UserError, match="validation_size"):
        eval_tasks(load_config(DEFAULT, ["eval.prompts=65"]), select_specs(cfg))
    with pytest.raises(UserError, match="no held-out split"):
        eval_tasks(load_config(DEFAULT, ["tasks.validation_size=0"]), select_specs(cfg))


def _hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_resolve_models_and_run_config(tmp_path: Path) -> None:
    run = tmp_path / "myrun"
    _hf_dir(run / "checkpoints" / "step-000002" / "policy")
    _hf_dir(run / "checkpoints" / "step-000010" / "policy")
    (run / "checkpoints" / "step-000011").mkdir()  # incomplete: no policy
    (run / "config.toml").write_text("")
    for spec in (run, run / "checkpoints" / "step-000010", run / "checkpoints" / "step-000010" / "policy"):
        m = resolve_eval_model(str(spec))
        assert m.path == (run / "checkpoints" / "step-000010" / "policy").resolve()
        assert m.label == "myrun-step-000010" and m.run_dir == run.resolve()
        assert find_run_config(str(spec)) == (run / "config.toml").resolve()
    plain = _hf_dir(tmp_path / "hf")
    assert resolve_eval_model(str(plain)).label == "hf" and find_run_config(str(plain)) is None
    assert find_run_config("tiny-random") is None
    with pytest.raises(UserError, match="not a built-in model"):
        resolve_eval_model(str(tmp_path / "missing"))


def test_cli_flags_become_eval_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run_eval(cfg, model, *, compare=None, out_dir=None, log=print):
        seen.update(cfg=cfg, model=model, compare=compare, out_dir=out_dir)
        return {}

    monkeypatch.setattr("prorl_async.eval.run.run_eval", fake_run_eval)
    assert cli.main(["eval", "tiny-random", "--tasks", "chain_sum,letter_counting", "--k", "1,16,32",
                     "--prompts", "3", "--compare", "other", "--out", "/tmp/x"]) == 0
    cfg = seen["cfg"]
    assert cfg.eval.k == [1, 16, 32] and cfg.eval.samples == 32  # raised to the largest k
    assert cfg.eval.tasks == ["chain_sum", "letter_counting"] and cfg.eval.prompts == 3
    assert (seen["model"], seen["compare"], seen["out_dir"]) == ("tiny-random", "other", "/tmp/x")
    assert cli.main(["eval", "tiny-random", "--k", "1,2", "--samples", "4"]) == 0
    assert seen["cfg"].eval.samples == 4
    assert cli.main(["eval", "tiny-random", "--k", "1,8", "--samples", "4"]) == 2  # one-line config error
    assert cli.main(["eval", "tiny-random", "--k", "1,x"]) == 2


# ------------------------------------------------------------------------------------------- output files


def _scored(seed: int, tasks: list) -> list[PromptResult]:
    out = []
    for i, (label, task) in enumerate(tasks):
        c = (i * 7 + seed) % 5
        out.append(PromptResult(task.id, label, task.domain, tuple([1.0] * c + [0.0] * (4 - c))))
    return out


def _data(tmp_path: Path, compare: bool) -> tuple[dict, dict]:
    cfg = load_config(DEFAULT, ["eval.prompts=6", "eval.samples=4", "eval.k=[1, 2, 4]"])
    specs = select_specs(cfg)
    tasks = eval_tasks(cfg, specs)
    models = [EvalModel("a", "a", tmp_path)] + ([EvalModel("b", "b", tmp_path)] if compare else [])
    meta = {"tokens": 10, "generate_s": 1.0, "tokens_per_s": 10.0, "prompt_tokens": 100, "engine_start_s": 1.0,
            "skipped": 0}
    per_model = {m.label: {"prompts": _scored(n, tasks), "meta": meta, "scoring": {"ok": 48, "error": 0},
                           "file": f"samples-{m.label}.jsonl"} for n, m in enumerate(models)}
    return assemble(cfg, models, specs, tasks, per_model, time.time()), per_model


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a real PNG: its signature, then its pixels as matplotlib decodes them."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    return pixels.shape[1], pixels.shape[0]


@pytest.mark.parametrize("compare", [False, True])
def test_write_all(tmp_path: Path, compare: bool) -> None:
    data, per_model = _data(tmp_path, compare)
    files = evaluation_report.write_all(data, per_model, tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["files"] == files
    assert set(files) == {"json", "report", "pass1_histogram", "pass_at_k", "samples"}
    assert set(saved["results"]["a"]) == {"logic/chain_sum", "logic/letter_counting", "domain:logic", "all"}
    assert set(saved["results"]["a"]["all"]["pass_at_k"]) == {"1", "2", "4"}
    for png in ("pass1_hist.png", "pass_at_k.png"):
        width, height = _png_size(tmp_path / png)
        assert 1200 <= width <= 3000 and 400 <= height <= 1500 and width > height  # three panels in a row
    report = (tmp_path / "report.md").read_text()
    assert "| logic/chain_sum | 6 |" in report and "pass@4 / bound / debiased" in report and "pass1_hist.png" in report
    if compare:
        assert saved["other"] == "b" and "## Comparison: `a` − `b`" in report
        delta = saved["comparison"]["all"]["pass_at_k"]["1"]
        assert delta["delta"] == pytest.approx(delta["model"] - delta["other"])
    else:
        assert saved["comparison"] is None and "Comparison" not in report


def _legend_texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


@pytest.mark.parametrize("compare", [False, True])
def test_histogram_figure_is_labelled(tmp_path: Path, compare: bool) -> None:
    data, _ = _data(tmp_path, compare)
    scopes = evaluation_report.plot_scopes(data)
    assert scopes == ["logic/chain_sum", "logic/letter_counting", "all"]
    fig = evaluation_report.histogram_figure(data, scopes)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["logic/chain_sum (6 prompts)", "logic/letter_counting (6 prompts)",
                                               "all tasks (12 prompts)"]
    assert "pass@1 distribution" in fig.get_suptitle() and "4 samples per prompt" in fig.get_suptitle()
    models = ["a", "b"] if compare else ["a"]
    for ax in axes:
        assert "pass@1" in ax.get_xlabel() and "prompts" in ax.get_ylabel()
        assert ax.get_xlim() == (0.0, 1.0)
        assert ax.xaxis.get_gridlines()[0].get_visible()
        texts = _legend_texts(ax.get_legend())
        assert [t for t in texts if ":" not in t] == models  # bars, then each model's mean pass@1
        assert all(any(t.startswith(f"{m}: mean = ") for t in texts) for m in models)
        bars = sum(len(c) for c in ax.containers)
        assert bars == HIST_BINS * len(models)
    # the mean in the legend is the one in the results
    mean = data["results"]["a"]["all"]["pass1_mean"]
    assert f"a: mean = {mean:.2f}" in _legend_texts(axes[2].get_legend())


@pytest.mark.parametrize("compare", [False, True])
def test_curve_figure_is_labelled(tmp_path: Path, compare: bool) -> None:
    data, _ = _data(tmp_path, compare)
    fig = evaluation_report.curve_figure(data, ["all"])
    [ax] = fig.axes
    assert ax.get_title() == "all tasks (12 prompts)" and "pass@k against k" in fig.get_suptitle()
    assert ax.get_xlabel().startswith("k (") and ax.get_ylabel().startswith("pass@k (")
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    models = ["a", "b"] if compare else ["a"]
    [legend] = fig.legends  # one legend for the whole figure
    assert sorted(_legend_texts(legend)) == sorted(f"{m}: {name}" for m in models
                                                   for name in ("pass@k", "bound", "bound, debiased"))
    measured = {line.get_label(): line for line in ax.get_lines()}
    curve = data["results"]["a"]["all"]["curve"]
    assert list(measured["a: pass@k"].get_xdata()) == curve["k"]
    assert list(measured["a: pass@k"].get_ydata()) == pytest.approx(curve["pass_at_k"])
    assert list(measured["a: bound"].get_xdata()) == [k for k in curve["k"] if k >= 2]  # no bound at k = 1
