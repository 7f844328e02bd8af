"""``prorl-async data``: the example's data and reward checked as a user would before training, a reference that
scores below 1 (exit 1), and start-up errors of ``prorl-async run`` as one line before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from prorl_async import cli
from prorl_async.config import load_config
from prorl_async.envs.preview import absolute_paths

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own_data" / "config.toml"


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository root, as its README says


def test_the_example_is_ready_to_train(at_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["data", str(EXAMPLE), "--set", "model.name=tiny-random", "--show", "1", "--rows", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "examples/own_data/train.jsonl: 260 rows; prompt column 'question', answer column 'answer'" in out
    assert "math/word_problems" in out and "260" in out and "40" in out  # train and validation rows
    assert "---- prompt 1 of 1" in out and out.count("<answer>") >= 3  # two demonstrations and the prefill
    assert "math/word_problems: 8 scored, mean 1.000, 0 below 1" in out


def test_references_that_do_not_score_1_fail_the_check(at_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    # the wrong answer column: the reference written is the row's id, the reward compares with its `answer`
    code = cli.main(["data", str(EXAMPLE), "--set", "model.name=tiny-random", "--show", "0", "--rows", "4",
                     "--set", 'tasks.mix=[{name="w", reward="examples/own_data/reward.py:reward", '
                              'source={path="examples/own_data/train.jsonl", prompt="question", answer="id"}}]'])
    out = capsys.readouterr().out
    assert code == 1 and "below 1" in out and "check the answer column" in out


def test_run_refuses_a_missing_column_in_one_line_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "1 + 1?", "answer": "2"}\n' * 3)
    config = tmp_path / "bad.toml"
    config.write_text(f'[run]\nrun_dir = "{tmp_path / "run"}"\n[[tasks.mix]]\nname = "rows"\ndomain = "math"\n'
                      f'[tasks.mix.source]\npath = "{data}"\nprompt = "prompt_text"\n')
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prompt_text" in err and "question" in err and str(data) in err
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_run_refuses_a_reward_function_that_does_not_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'[run]\nrun_dir = "{tmp_path / "run"}"\n[[tasks.mix]]\nname = "chain_sum"\n'
                      f'reward = "{tmp_path / "missing.py"}:reward"\n')
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.py" in err
    assert not (tmp_path / "run").exists()


def test_source_and_reward_files_become_absolute_module_specs_stay(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, ['generator.reward_function="pkg.mod:fn"'])
    resolved = absolute_paths(cfg, tmp_path)
    spec = resolved.tasks.mix[0]
    assert spec.source.path == str(tmp_path / "examples/own_data/train.jsonl")
    assert spec.source.validation_path == str(tmp_path / "examples/own_data/validation.jsonl")
    assert spec.reward == f"{tmp_path / 'examples/own_data/reward.py'}:reward"
    assert resolved.generator.reward_function == "pkg.mod:fn"
    assert absolute_paths(resolved, Path("/elsewhere")) == resolved  # absolute already: unchanged
