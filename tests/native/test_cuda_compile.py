"""Compile-check of native/ops_cuda.cu on a machine without a GPU (about a minute, so only on request).

PRORL_CUDA_COMPILE_CHECK=1 pytest tests/native/test_cuda_compile.py
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from prorl_async.algo import native as _native


@pytest.mark.skipif(os.environ.get("PRORL_CUDA_COMPILE_CHECK") != "1", reason="set PRORL_CUDA_COMPILE_CHECK=1")
def test_ops_cuda_compiles() -> None:
    spec = importlib.util.spec_from_file_location("compile_check_cuda", _native.NATIVE_DIR / "compile_check_cuda.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ok, output = module.compile_check()
    assert ok, output
