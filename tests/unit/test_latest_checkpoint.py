"""One pick of a run's newest checkpoint, shared by resume, ``prorl-async eval RUN_DIR`` and the supervisor's failure
message: only whole ``step-<digits>`` directories, newest by number; torn ``.partial`` writes and junk never count."""

from __future__ import annotations

from pathlib import Path

import pytest

from prorl_async.config import Config
from prorl_async.eval.run import resolve_eval_model
from prorl_async.supervisor.supervisor import Supervisor
from prorl_async.utils.run_dir import latest_checkpoint


def _checkpoint(path: Path) -> Path:
    """A checkpoint directory whose policy loads (``policy/config.json``)."""
    (path / "policy").mkdir(parents=True)
    (path / "policy" / "config.json").write_text("{}")
    return path


def _run_with_torn_and_junk(tmp_path: Path) -> Path:
    """step-000002 whole; step-000004.partial torn (its policy already written); junk that sorts after both."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    _checkpoint(ckpts / "step-000002")
    _checkpoint(ckpts / "step-000004.partial")
    _checkpoint(ckpts / "step-000008.old")
    _checkpoint(ckpts / "step-latest")
    (ckpts / "step-000009").write_text("a stray file, not a directory")
    (ckpts / "step-").mkdir()
    (ckpts / "notes.txt").write_text("junk")
    (run / "config.toml").write_text("")
    return run


def test_latest_checkpoint_skips_torn_and_junk_and_orders_by_number(tmp_path: Path) -> None:
    run = _run_with_torn_and_junk(tmp_path)
    assert latest_checkpoint(run) == run / "checkpoints" / "step-000002"
    _checkpoint(run / "checkpoints" / "step-10")
    _checkpoint(run / "checkpoints" / "step-9")  # "step-9" > "step-10" as strings
    assert latest_checkpoint(run) == run / "checkpoints" / "step-10"
    (run / "checkpoints" / "step-11").mkdir()  # no policy
    assert latest_checkpoint(run) == run / "checkpoints" / "step-11"
    assert latest_checkpoint(run, holding="policy/config.json") == run / "checkpoints" / "step-10"
    assert latest_checkpoint(tmp_path / "no-such-run") is None


def test_eval_of_a_run_dir_picks_the_newest_whole_checkpoint(tmp_path: Path) -> None:
    run = _run_with_torn_and_junk(tmp_path)
    model = resolve_eval_model(str(run))
    assert model.path == (run / "checkpoints" / "step-000002" / "policy").resolve()
    assert model.label == "run-step-000002"


def test_supervisor_failure_names_the_newest_whole_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    run = _run_with_torn_and_junk(tmp_path)
    assert Supervisor(Config(), run)._learner_failed() == 1
    err = capsys.readouterr().err
    assert f"last checkpoint: {run / 'checkpoints' / 'step-000002'};" in err
