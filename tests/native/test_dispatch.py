"""Which path the dispatchers take (learner.ops, PRORL_NATIVE), the one-warning fallback, and the build cache."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from prorl_async.algo import native as _native
from prorl_async.errors import UserError


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Module state as in a new process (nothing loaded, nothing failed, config auto)."""
    monkeypatch.setattr(_native, "_configured", "auto")
    monkeypatch.setattr(_native, "_devices", None)
    monkeypatch.setattr(_native, "_failure", None)
    monkeypatch.setattr(_native, "_decisions", {})
    monkeypatch.delenv("PRORL_NATIVE", raising=False)


def _unavailable(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make loading fail as on a machine without a compiler; returns a list that counts the attempts."""
    attempts: list[int] = []

    def fail() -> frozenset[str]:
        attempts.append(1)
        raise _native.NativeOpsUnavailable("no C++ compiler: 'c++' is not on PATH (install g++ or set CXX)")

    monkeypatch.setattr(_native, "_load_library", fail)
    return attempts


def test_mode_precedence(fresh_state, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _native.mode() == "auto"
    monkeypatch.setenv("PRORL_NATIVE", "0")
    assert _native.mode() == "reference"
    monkeypatch.setenv("PRORL_NATIVE", "1")
    assert _native.mode() == "native"
    _native.configure("reference")  # the config, when not auto, wins over the environment
    assert _native.mode() == "reference"
    _native.configure("auto")
    assert _native.mode() == "native"
    monkeypatch.setenv("PRORL_NATIVE", "yes")
    with pytest.raises(UserError, match="PRORL_NATIVE"):
        _native.mode()
    with pytest.raises(ValueError):
        _native.configure("fast")  # type: ignore[arg-type]


def test_reference_mode_never_loads(fresh_state, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = _unavailable(monkeypatch)
    _native.configure("reference")
    assert not _native.enabled_for(torch.device("cpu"))
    assert attempts == []


def test_auto_falls_back_with_one_warning(fresh_state, monkeypatch: pytest.MonkeyPatch) -> None:
    from prorl_async.algo.advantage import group_advantage, group_advantage_reference
    from prorl_async.algo.kl import kl_reduce

    attempts = _unavailable(monkeypatch)
    rewards = torch.rand(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(group_advantage(rewards, 4), group_advantage_reference(rewards, 4))
        kl_reduce(-torch.rand(2, 3), -torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool))
        group_advantage(rewards, 2)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no C++ compiler" in messages[0] and "PRORL_NATIVE=0" in messages[0]
    assert attempts == [1]  # tried once, not on every call


def test_forced_native_raises_when_unavailable(fresh_state, monkeypatch: pytest.MonkeyPatch) -> None:
    _unavailable(monkeypatch)
    monkeypatch.setenv("PRORL_NATIVE", "1")
    with pytest.raises(_native.NativeOpsUnavailable, match="no C\\+\\+ compiler"):
        _native.enabled_for(torch.device("cpu"))


def test_build_dir_is_keyed_by_torch_python_and_sources() -> None:
    path = _native.build_dir(with_cuda=False)
    assert f"torch{torch.__version__}" in path.name and f"py{sys.version_info[0]}{sys.version_info[1]}" in path.name
    assert path.name != _native.build_dir(with_cuda=True).name


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


_TWO_CALLS = """
import torch
from prorl_async.algo.kl import kl_reduce
from prorl_async.algo.advantage import group_advantage
kl_reduce(-torch.rand(2, 3), -torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool))
group_advantage(torch.rand(8), 4)
from prorl_async.algo import native as _native
print("loaded" if _native._devices else "reference")
"""


def test_no_compiler_end_to_end(tmp_path) -> None:
    # A new process, an empty cache and no compiler: reference results and exactly one warning on stderr.
    proc = _run(_TWO_CALLS, CXX=str(tmp_path / "no-such-c++"), PRORL_CACHE_DIR=str(tmp_path), PRORL_NATIVE="auto")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference"
    assert proc.stderr.count("native ops unavailable") == 1 and "no C++ compiler" in proc.stderr


def test_cached_build_loads_without_a_compiler(native_ops, tmp_path) -> None:
    proc = _run(_TWO_CALLS, CXX=str(tmp_path / "no-such-c++"), PRORL_NATIVE="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded"
