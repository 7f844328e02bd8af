"""Compile-check native/ops_cuda.cu on a machine without a GPU: compile only, no link, nothing run.

    python native/compile_check_cuda.py [--arch 9.0] [--keep DIR]

A CPU build of torch ships the CUDA headers but not libc10_cuda/libtorch_cuda, so the extension cannot
link here; nvcc can still compile the kernels against torch's headers with the flags a real build uses
(torch.utils.cpp_extension.load, as prorl_async.algo.native does on GPU machines), given a stub of the one
generated c10/cuda header that CPU builds lack (c10/cuda/impl/cuda_cmake_macros.h). Exit status 0 when the
object file was produced; the compiler's output is printed otherwise. Takes about a minute.
Not part of the default test run: tests/native/test_cuda_compile.py runs it when PRORL_CUDA_COMPILE_CHECK=1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def find_cuda_home() -> Path | None:
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")  # may be a wrapper script outside the toolkit: last resort
    return Path(os.path.realpath(nvcc)).parent.parent if nvcc else None


def compile_check(arch: str = "9.0", keep: Path | None = None) -> tuple[bool, str]:
    """(object file produced, compiler output)."""
    from prorl_async.algo import native as _native

    cuda_home = find_cuda_home()
    if cuda_home is None:
        return False, "nvcc not found (set CUDA_HOME)"
    out = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="prorl-cuda-check-"))
    out.mkdir(parents=True, exist_ok=True)
    for name in _native.CUDA_SOURCES + _native.HEADERS:
        shutil.copy2(_native.NATIVE_DIR / name, out / name)
    # The one c10/cuda header that a CUDA build of torch generates and a CPU build does not ship.
    shim = out / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    objects = [out / (Path(name).stem + ".cuda.o") for name in _native.CUDA_SOURCES]
    for obj in objects:
        obj.unlink(missing_ok=True)  # a --keep directory may hold one from an earlier run
    env = {"CUDA_HOME": str(cuda_home), "TORCH_CUDA_ARCH_LIST": arch}
    log = out / "build.log"
    sources = [out / name for name in _native.CUDA_SOURCES]
    _native.compile_in_child("prorl_cuda_check", sources, out, log, env, extra_include_paths=[str(out / "shim")])
    output = log.read_text(errors="replace")
    ok = all(obj.is_file() and obj.stat().st_size > 0 for obj in objects)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return ok, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200)")
    parser.add_argument("--keep", type=Path, help="build here and keep the files")
    args = parser.parse_args()
    ok, output = compile_check(args.arch, args.keep)
    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
    if ok:
        print("\n".join(warnings))
        print(f"ops_cuda.cu compiles for sm_{args.arch.replace('.', '')} (linking needs a CUDA build of torch)")
        return 0
    print(output)
    print("ops_cuda.cu did NOT compile")
    return 1


if __name__ == "__main__":
    sys.exit(main())
