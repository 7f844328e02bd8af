"""Builds and loads the native ops (``native/`` -> ``torch.ops.prorl.*``) and decides when the dispatchers use them.

Which path the dispatchers in ``advantage.py`` and ``kl.py`` take, first match wins:

1. ``configure("native" | "reference")``, from the config field ``learner.ops``;
2. the environment variable ``PRORL_NATIVE=1 | 0 | auto``;
3. ``auto``: native when the extension loads, else the PyTorch reference with one warning per process.

The decision per device is made once (at the first dispatch for that device) and remembered until the next
``configure``: a dispatcher's check then costs one dict lookup, which matters for ops that take ~10 us.
Changing ``PRORL_NATIVE`` after the first dispatch therefore has no effect; call ``configure`` instead.

``native`` means the extension must load (an error says why not); it then serves float32/bfloat16
tensors on the devices it was built for, and anything else still takes the reference.

Build invariants:

- JIT with ``torch.utils.cpp_extension.load``, in a child process, into
  ``$PRORL_CACHE_DIR/native/<torch>-<python>-<cpu|cuda>-<hash of sources and flags>/`` (default
  ``~/.cache/prorl-async``), built in a temporary directory and renamed into place under a lock
  (``models._cached``): concurrent processes never load a half-written library, a checkout at any path
  reuses the build, and loading a cached build takes milliseconds and needs no compiler.
- Nothing is fetched and pip is not involved, so its build isolation can never install a torch.
- CUDA sources are compiled only when this torch has CUDA and nvcc is found (``CUDA_HOME``); otherwise
  CUDA tensors take the reference.

Usage::

    _native.configure(cfg.learner.ops)  # once per process; "auto" leaves the choice to PRORL_NATIVE
    if _native.enabled_for(logp.device):
        kl_per_seq, tokens_per_seq, kl_sum, tokens = torch.ops.prorl.kl_reduce(logp, ref_logp, mask)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prorl_async.errors import UserError

if TYPE_CHECKING:
    import torch

Mode = Literal["auto", "native", "reference"]

NATIVE_DIR = Path(__file__).resolve().parents[2] / "native"
LIBRARY_NAME = "prorl_native"
CPP_SOURCES = ("ops.cpp", "cpu_kernels.cpp", "autograd.cpp")
CUDA_SOURCES = ("ops_cuda.cu",)
HEADERS = ("ops.h", "prorl_math.h")
# -fno-math-errno/-fno-trapping-math/-ffp-contract=fast let gcc vectorize the selects and fuse the polynomials;
# the code never reads errno or FP exception flags. -fopenmp: at::parallel_for is OpenMP in torch's CPU builds
# (the library then needs libgomp.so.1, which torch has already loaded).
CXX_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast")
LD_FLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3",)

_log = logging.getLogger(__name__)
_configured: Mode = "auto"
_devices: frozenset[str] | None = None  # device types the loaded library serves; None until loaded
_failure: str | None = None  # why the library could not be loaded (auto mode remembers and does not retry)
_decisions: dict[torch.device, bool] = {}  # enabled_for's answers; cleared by configure()
_ENV_MODES: dict[str, Mode] = {"1": "native", "0": "reference", "auto": "auto", "": "auto"}

# The loaded ops (OpOverloads, the cheapest way to call them from Python); None until the library is loaded.
group_advantage_op: torch._ops.OpOverload | None = None
kl_reduce_op: torch._ops.OpOverload | None = None


class NativeOpsUnavailable(UserError):
    """The native ops were requested (``learner.ops = "native"`` or ``PRORL_NATIVE=1``) but cannot be loaded."""


def configure(ops: Mode) -> None:
    """Set the config's choice (``learner.ops``); ``auto`` defers to ``PRORL_NATIVE``."""
    global _configured
    if ops not in ("auto", "native", "reference"):
        raise ValueError(f"ops must be auto, native or reference, got {ops!r}")
    _configured = ops
    _decisions.clear()


def mode() -> Mode:
    """The path asked for: the configured one unless ``auto``, then ``PRORL_NATIVE``."""
    if _configured != "auto":
        return _configured
    env = os.environ.get("PRORL_NATIVE", "auto").strip().lower()
    if env not in _ENV_MODES:
        raise UserError(f"PRORL_NATIVE={env!r}: use 1 (native ops), 0 (PyTorch reference) or auto")
    return _ENV_MODES[env]


def enabled_for(device: torch.device) -> bool:
    """Whether the dispatchers should call the native ops for tensors on ``device``.

    Loads (and the first time on a machine builds) the extension unless the mode is ``reference``.
    Raises :class:`NativeOpsUnavailable` in ``native`` mode when it cannot be loaded.
    """
    decision = _decisions.get(device)
    if decision is None:
        decision = _decisions[device] = _decide(device)
    return decision


def _decide(device: torch.device) -> bool:
    wanted = mode()
    if wanted == "reference":
        return False
    if _devices is None and _failure is None:
        _try_load()
    if _failure is not None:
        if wanted == "native":
            raise NativeOpsUnavailable(f"native ops requested but unavailable: {_failure}")
        return False
    assert _devices is not None
    return device.type in _devices


def load() -> frozenset[str]:
    """Load the extension (building it if needed) and return the device types it serves; raises if it cannot."""
    if _devices is None and _failure is None:
        _try_load()
    if _failure is not None:
        raise NativeOpsUnavailable(_failure)
    assert _devices is not None
    return _devices


def _try_load() -> None:
    global _devices, _failure
    try:
        _devices = _load_library()
    except Exception as err:  # any failure to build or load means: no native ops in this process
        _failure = str(err) if isinstance(err, NativeOpsUnavailable) else f"{type(err).__name__}: {err}"
        if mode() == "auto":
            warnings.warn(
                f"prorl-async: native ops unavailable ({_failure}); using the slower PyTorch reference ops. "
                'Set learner.ops = "reference" or PRORL_NATIVE=0 to choose it explicitly.',
                RuntimeWarning,
                stacklevel=4,
            )


def _with_cuda() -> bool:
    import torch
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def build_dir(with_cuda: bool | None = None) -> Path:
    """The cache directory of the build for these sources, flags, torch and Python."""
    import torch

    from prorl_async.models import cache_dir

    cuda = _with_cuda() if with_cuda is None else with_cuda
    digest = hashlib.sha256()
    for name in sorted(CPP_SOURCES + HEADERS + (CUDA_SOURCES if cuda else ())):
        digest.update(name.encode() + b"\0" + (NATIVE_DIR / name).read_bytes() + b"\0")
    # The GPU architectures the kernels are compiled for (cpp_extension: TORCH_CUDA_ARCH_LIST, else the
    # visible GPUs): a build for one GPU generation must not be loaded on another.
    arch = (os.environ.get("TORCH_CUDA_ARCH_LIST") or _visible_archs()) if cuda else None
    digest.update(json.dumps([CXX_FLAGS, LD_FLAGS, NVCC_FLAGS if cuda else None, arch]).encode())
    device = f"cuda{torch.version.cuda}" if cuda else "cpu"
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{device}-{digest.hexdigest()[:16]}"
    return cache_dir().parent / "native" / tag


def _visible_archs() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    return ";".join(
        sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    )


def _load_library() -> frozenset[str]:
    import torch

    from prorl_async.models import _cached  # the same lock + temporary directory + rename as the model cache

    with_cuda = _with_cuda()
    if torch.cuda.is_available() and not with_cuda:
        warnings.warn(
            "prorl-async: building the native ops without CUDA (nvcc not found: set CUDA_HOME); "
            "CUDA tensors take the PyTorch reference ops.",
            RuntimeWarning,
            stacklevel=5,
        )
    target = build_dir(with_cuda)
    _cached(target, lambda tmp: _build(tmp, with_cuda, log_path=target.with_name(target.name + ".log")))
    torch.ops.load_library(str(target / f"{LIBRARY_NAME}.so"))
    _register_python_parts()
    global group_advantage_op, kl_reduce_op
    group_advantage_op = torch.ops.prorl.group_advantage.default
    kl_reduce_op = torch.ops.prorl.kl_reduce.default
    return frozenset({"cpu", "cuda"} if with_cuda else {"cpu"})


def _check_toolchain() -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise NativeOpsUnavailable(f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)")
    if not cpp_extension.is_ninja_available() and shutil.which("ninja", path=_build_path()) is None:
        raise NativeOpsUnavailable("ninja is not installed (pip install ninja)")


def _build_path() -> str:
    # The venv's bin (where pip puts ninja) is not on PATH when python is run by its full path.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


_BUILD_SCRIPT = """
import json, os, sys
from torch.utils import cpp_extension
# A CPU build of torch leaves CUDA_HOME unset; native/compile_check_cuda.py sets it to compile-check the .cu.
cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME")
cpp_extension.load(**json.loads(sys.argv[1]))
if len(sys.argv) > 2:  # the library is loaded here: its errors must reach Python as exceptions
    import torch
    print("%s" % sys.argv[2], flush=True)
    try:
        torch.ops.prorl.group_advantage(torch.zeros(3), 2, 1e-6, True)
    except RuntimeError as err:
        assert "do not split into groups" in str(err), err
    else:
        sys.exit("prorl::group_advantage accepted 3 rewards in groups of 2")
"""
# Printed by the build child once the library is built and loaded, before the error check. A toolchain that
# links libstdc++ statically into the library (the GPU machine's $CXX) leaves two C++ runtimes in one process:
# an op's TORCH_CHECK then segfaulted there (torch 2.11) and cut the message at the first number here.
_BUILT_MARK = "prorl-native: built and loaded"


def compile_in_child(
    name: str,
    sources: list[Path],
    out: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    check_errors: bool = False,
    **load_args: object,
) -> int:
    """Run ``torch.utils.cpp_extension.load`` with this module's flags in a child process (which keeps the
    library it loads out of this one), building into ``out``; its output goes to ``log_path``; the exit status.
    ``check_errors``: then call an op of the loaded library with bad arguments, which must raise."""
    args = {
        "name": name,
        "sources": [str(path) for path in sources],
        "build_directory": str(out),
        "extra_cflags": list(CXX_FLAGS),
        "extra_cuda_cflags": list(NVCC_FLAGS),
        "extra_ldflags": list(LD_FLAGS),
        "is_python_module": False,
        "verbose": True,
        **load_args,
    }
    with open(log_path, "w") as log:
        return subprocess.run(
            [sys.executable, "-c", _BUILD_SCRIPT, json.dumps(args), *([_BUILT_MARK] if check_errors else [])],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": _build_path(), **(env or {})},
        ).returncode


def _build(out: Path, with_cuda: bool, log_path: Path) -> None:
    """Compile and link the library into ``out`` from a copy of the sources (so any checkout can reuse it)."""
    _check_toolchain()
    _log.info("building the native ops into %s (once per source and torch version, ~30 s)", out)
    src = out / "src"
    src.mkdir()
    sources = CPP_SOURCES + (CUDA_SOURCES if with_cuda else ())
    for name in sources + HEADERS:
        shutil.copy2(NATIVE_DIR / name, src / name)
    status = compile_in_child(LIBRARY_NAME, [src / name for name in sources], out, log_path, check_errors=True)
    if status != 0 and _built_but_misreports(log_path):
        # The configured compiler's library crashes when an op raises; the system's c++ may link the C++
        # runtime as torch does. Try it once, from a clean build directory.
        cxx = os.environ.get("CXX", "c++")
        fallback = shutil.which("c++") or shutil.which("g++")
        broken = (f"a library built with {cxx} cannot report an op's error (the process crashed or the message came "
                   f"out cut: exit status {status})")
        if fallback is None or Path(fallback).resolve() == Path(shutil.which(cxx) or cxx).resolve():
            raise NativeOpsUnavailable(f"{broken}; set CXX to a compiler that links libstdc++ dynamically "
                                       f"(log: {log_path})")
        _log.warning("prorl-async: %s; building again with %s", broken, fallback)
        for child in out.iterdir():
            if child.is_dir() and child.name != "src":
                shutil.rmtree(child)
            elif child.is_file():
                child.unlink()
        status = compile_in_child(LIBRARY_NAME, [src / name for name in sources], out, log_path,
                                  env={"CXX": fallback}, check_errors=True)
        if status != 0 and _built_but_misreports(log_path):
            raise NativeOpsUnavailable(f"{broken}, and with {fallback} too (log: {log_path})")
    if status != 0 or not (out / f"{LIBRARY_NAME}.so").is_file():
        lines = log_path.read_text(errors="replace").splitlines()
        shown = [line for line in lines if "error" in line.lower() and "Traceback" not in line][:8] or lines[-15:]
        raise NativeOpsUnavailable(f"the build failed (log: {log_path}):\n" + "\n".join(shown))


def _built_but_misreports(log_path: Path) -> bool:
    """Whether the build child's log says it built and loaded the library (so the error check failed)."""
    return _BUILT_MARK in log_path.read_text(errors="replace")


def _register_python_parts() -> None:
    """Fake (shape-only) kernels for torch.compile and opcheck; the autograd formula is in native/autograd.cpp."""
    import torch

    @torch.library.register_fake("prorl::group_advantage")
    def _(rewards: torch.Tensor, group_size: int, eps: float, normalize_std: bool) -> torch.Tensor:
        return rewards.new_empty(rewards.shape, dtype=torch.float32)

    @torch.library.register_fake("prorl::kl_reduce")
    def _(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = logp.shape[0]
        per_seq = (logp.new_empty(rows, dtype=torch.float32), logp.new_empty(rows, dtype=torch.int64))
        return (*per_seq, logp.new_empty((), dtype=torch.float32), logp.new_empty((), dtype=torch.int64))

    @torch.library.register_fake("prorl::kl_reduce_backward")
    def _(
        grad_kl_per_seq: torch.Tensor | None,
        grad_kl_sum: torch.Tensor | None,
        logp: torch.Tensor,
        ref_logp: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        return torch.empty_like(logp, memory_format=torch.contiguous_format)
