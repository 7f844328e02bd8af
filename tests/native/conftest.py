"""Fixtures for the native-op tests: the extension, loaded (built once per machine into the cache)."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def native_ops() -> frozenset[str]:
    """Load the extension (the first run on a machine builds it, ~20-50 s); the device types it serves.

    Skips only where there is no C++ compiler at all; a build that fails is a test failure.
    """
    from prorl_async.algo import native as _native

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and not _native.build_dir().joinpath(f"{_native.LIBRARY_NAME}.so").is_file():
        pytest.skip(f"no C++ compiler ({cxx}) and no cached build of the native ops")
    return _native.load()


@pytest.fixture
def ops_mode(monkeypatch: pytest.MonkeyPatch):
    """Set the dispatch mode for one test (as learner.ops would), restored afterwards."""
    from prorl_async.algo import native as _native

    def set_mode(mode: str) -> None:
        monkeypatch.setattr(_native, "_configured", mode)
        monkeypatch.setattr(_native, "_decisions", {})

    return set_mode
