"""bench/peers_learning.py's arithmetic: TRL's best held-out pass@1, when each side first reached it, the ratio."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peers_learning  # noqa: E402


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
