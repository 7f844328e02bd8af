"""The build checks that the library reports an op's errors, and falls back to the system compiler when not.

A toolchain that links libstdc++ statically into shared libraries (the GPU machine's ``$CXX`` does) puts a
second C++ runtime in the process: an op's ``TORCH_CHECK`` then crashed the process there and cut the message
at the first number here. The build child loads the library and calls an op with bad arguments; when that
fails it builds again with the system's ``c++``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
from prorl_async.algo import native as _native
print(sorted(_native.load()))
try:
    torch.ops.prorl.group_advantage(torch.zeros(3), 2, 1e-6, True)
except RuntimeError as err:
    print("raised:", str(err).splitlines()[0])
"""


def _static_libstdcxx() -> bool:
    gxx = shutil.which("g++")
    if gxx is None:
        return False
    out = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(out) and os.path.isfile(out)


@pytest.mark.skipif(not _static_libstdcxx(), reason="needs g++ with a static libstdc++ (libstdc++.a)")
def test_a_compiler_that_links_libstdcxx_statically_is_replaced(tmp_path: Path) -> None:
    wrapper = tmp_path / "static-g++"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" -shared "*) exec {shutil.which("g++")} "$@" -static-libstdc++ ;; esac\n'
        f'exec {shutil.which("g++")} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {**os.environ, "CXX": str(wrapper), "PRORL_CACHE_DIR": str(tmp_path / "cache"), "PRORL_NATIVE": "1"}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "raised: prorl::group_advantage: rewards of shape [3] do not split into groups of 2" in run.stdout, (
        run.stdout + run.stderr[-3000:])
    assert f"a library built with {wrapper} cannot report an op's error" in run.stderr
    assert "building again with" in run.stderr
