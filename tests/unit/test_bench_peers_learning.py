"""bench/peers_learning.py's arithmetic: TRL's best held-out pass@1, when each side first reached it, the ratio."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peers_learning  # noqa: E402

TINY = str(BENCH.parent / "configs" / "tiny.toml")


def _points(*pairs: tuple[float, float | None]) -> list[dict[str, object]]:
    return [{"label": f"t{s}", "seconds": s, "pass_at_1": p} for s, p in pairs]


def test_each_side_is_timed_at_its_first_save_reaching_trls_best() -> None:
    trl = _points((0, 0.30), (300, 0.35), (600, 0.42), (900, 0.40))
    ours = _points((0, 0.30), (120, 0.38), (240, 0.45), (360, 0.50))
    result = peers_learning.compare(0.30, trl, ours)
    assert result["trl_best"] == 0.42
    assert result["trl"] == {"seconds": 600, "after_s": 300, "label": "t600"}
    assert result["ours"] == {"seconds": 240, "after_s": 120, "label": "t240"}
    assert result["speedup"] == 600 / 240
    assert result["ours_best"] == 0.50


def test_a_side_that_never_gets_there_has_no_time_and_no_ratio() -> None:
    trl = _points((0, 0.30), (300, 0.60))
    ours = _points((0, 0.30), (120, 0.50), (240, None))
    result = peers_learning.compare(0.30, trl, ours)
    assert result["ours"]["seconds"] is None and result["speedup"] is None


def test_no_scored_trl_save_gives_no_target() -> None:
    assert peers_learning.compare(0.3, _points((0, None)), _points((0, 0.3)))["trl_best"] is None


def test_pass_at_1_reads_the_overall_and_per_task_figures(tmp_path: Path) -> None:
    (tmp_path / "eval.json").write_text(json.dumps({
        "tasks": [{"label": "logic/chain_sum"}, {"label": "logic/letter_counting"}],
        "results": {"m": {"all": {"pass_at_k": {"1": 0.5, "4": 0.75}}, "domain:logic": {"pass_at_k": {"1": 0.5}},
                          "logic/chain_sum": {"pass_at_k": {"1": 0.25}},
                          "logic/letter_counting": {"pass_at_k": {"1": 0.75}}}}}))
    assert peers_learning.pass_at_1(tmp_path / "eval.json") == (0.5, {"logic/chain_sum": 0.25,
                                                                     "logic/letter_counting": 0.75})


def test_our_checkpoints_are_timed_from_the_launch() -> None:
    records = [{"kind": "step", "time_s": 1010.0}, {"kind": "event", "event": "checkpoint", "path": "/r/step-4",
                                                    "version": 4, "time_s": 1100.0},
               {"kind": "event", "event": "interrupted", "time_s": 1200.0}]
    assert peers_learning.our_checkpoints(records, 1000.0) == [{"path": "/r/step-4", "step": 4, "seconds": 100.0}]


def _earlier(tmp_path: Path, **extra: object) -> dict[str, object]:
    """An earlier run's JSON as --trl-from / --ours-from read it; its eval config path is gone (a cleaned /tmp)."""
    return {"config": TINY, "overrides": ["sampling.stop=[]", "run.max_steps=0"],
            "eval_config": str(tmp_path / "gone" / "config.toml"), "run_dir": str(tmp_path / "run"), **extra}


def test_trl_from_rebuilds_the_evaluation_config_when_its_file_is_gone(tmp_path: Path) -> None:
    # 2026-12-04: --trl-from read the evaluation config from the earlier run's directory under /tmp, gone since;
    # every evaluation of this side failed after 30 minutes of training.
    from prorl_async.config import config_to_toml, load_config

    text = peers_learning.eval_config_text(_earlier(tmp_path))
    assert text == config_to_toml(load_config(TINY, ["sampling.stop=[]", "run.max_steps=0"]))
    path = tmp_path / "eval-config.toml"
    path.write_text(text)
    assert load_config(str(path)).sampling.stop == []
    assert peers_learning.eval_config_text(_earlier(tmp_path, eval_config_toml="x = 1\n")) == "x = 1\n"


def test_ours_from_takes_the_earlier_checkpoints_with_their_times(tmp_path: Path) -> None:
    for step in (3, 6):
        (tmp_path / "run" / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    earlier = _earlier(tmp_path, sides={"prorl-async": [
        {"label": "base", "seconds": 0.0, "pass_at_1": 0.25},
        {"label": "step 3", "seconds": 152.4, "step": 3, "pass_at_1": None},
        {"label": "step 6", "seconds": 257.2, "step": 6, "pass_at_1": None, "path": str(tmp_path / "elsewhere")}]})
    (tmp_path / "elsewhere").mkdir()
    assert peers_learning.earlier_checkpoints(earlier) == [
        {"path": str(tmp_path / "run" / "checkpoints" / "step-000003"), "step": 3, "seconds": 152.4},
        {"path": str(tmp_path / "elsewhere"), "step": 6, "seconds": 257.2}]
    (tmp_path / "elsewhere").rmdir()
    with pytest.raises(SystemExit, match=r"step 6.*is gone"):
        peers_learning.earlier_checkpoints(earlier)
