"""The command line: instant start-up (nothing heavy imported), one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prorl_async.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prorl_async.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from prorl_async.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'transformers', 'pydantic', 'numpy', 'zmq') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "run" in out.stdout and "eval" in out.stdout
    assert "HEAVY []" in out.stdout


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("prorl-async")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "run" in out.stdout


def test_bad_config_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner]\nbatch_groupz = 3\n")
    out = _run("run", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "bad.toml" in out.stderr and "learner.batch_groupz" in out.stderr and "allowed:" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_override_exits_2() -> None:
    out = _run("config", "configs/tiny.toml", "--set", "sampling.temperature=hot")
    assert out.returncode == 2 and "sampling.temperature" in out.stderr and "Traceback" not in out.stderr


def test_truncated_training_sampling_exits_2() -> None:
    out = _run("config", "configs/tiny.toml", "--set", "sampling.top_p=0.9")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "tiny.toml" in out.stderr and "sampling.top_p" in out.stderr and "importance weights" in out.stderr


def test_config_prints_resolved(capsys) -> None:
    assert main(["config", str(ROOT / "configs/tiny.toml"), "--set", "optim.lr=0.5"]) == 0
    assert "lr = 0.5" in capsys.readouterr().out


def test_models_lists_builtins(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "tiny-random" in out


def test_unknown_model_is_a_user_error(capsys) -> None:
    assert main(["models", "no-such-model"]) == 2
    assert "not a built-in model" in capsys.readouterr().err
