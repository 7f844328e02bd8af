"""Run untrusted Python (model-written code) in a separate, contained process.

``run_python(code, limits) -> SandboxResult`` never raises for anything the program does. The program runs
in a fresh interpreter started as ``python -I -S -B`` (no environment variables, no site-packages, no user
site) by ``sandbox_launcher.py``, with:

- **limits**: CPU seconds, address space, file size, open files and process count (``setrlimit``), a
  wall-clock timeout, and a cap on the bytes it may print (printing more kills it);
- **a uid of its own** when we are root: a random uid from a range no account uses, no groups,
  ``PR_SET_NO_NEW_PRIVS``, no capabilities. ``RLIMIT_NPROC`` counts processes per user and does not bind
  root, which is why the drop matters: under a fresh uid a fork bomb stops at ``max_processes``;
- **namespaces** when the kernel allows them (root on Linux): new PID, network, mount, IPC and UTS
  namespaces. The network namespace has only a downed loopback: nothing can be reached. The mount
  namespace gets fresh size-limited tmpfs on every world-writable directory (/tmp, /var/tmp, /dev/shm,
  /run/lock) and its own /proc, so the program works in an empty temporary directory, cannot leave files
  on the host, and sees only its own processes. The namespace's init is a root process we control: when
  it exits, or is killed on timeout, the kernel kills everything left in the namespace, so nothing the
  program starts outlives the run;
- **Python guards** (defence in depth, on by default): an audit hook, installed before the program runs
  and impossible to remove from Python, refuses sockets, ctypes, fork, exec and subprocesses.

Without namespaces (not root, or a container that forbids ``unshare``) it falls back to rlimits, the uid
drop when root (leftovers are then killed as that uid with ``kill(-1)``) or a process group otherwise, a
temporary directory and the Python guards; ``SandboxResult.isolation`` says which level ran.

Usage::

    result = run_python("print(sum(range(10)))", SandboxLimits(timeout_s=2))
    assert result.ok and result.stdout == "45\\n"
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from prorl_async.envs.sandbox_launcher import ENV, UID_BASE, UID_SPAN, decode_result, encode_request

LAUNCHER = Path(__file__).resolve().with_name("sandbox_launcher.py")
STATUSES = ("ok", "error", "timeout", "cpu_limit", "file_size", "output_limit", "killed", "sandbox_error")
SANDBOX_UIDS = range(UID_BASE, UID_BASE + UID_SPAN)
"""Uids the sandbox runs programs as (when started as root); no process of these survives a run."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. Defaults suit one HumanEval-sized test program."""

    timeout_s: float = 5.0
    """Wall-clock limit; the whole process tree is killed when it passes."""
    cpu_s: int = 5
    """CPU seconds per process (RLIMIT_CPU: SIGXCPU, SIGKILL a second later)."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS); allocations beyond it fail with MemoryError."""
    file_size_mb: int = 1
    """Largest file the program may write (RLIMIT_FSIZE: SIGXFSZ beyond it)."""
    max_processes: int = 16
    """Processes and threads of the sandbox uid (RLIMIT_NPROC)."""
    max_output_bytes: int = 1024 * 1024
    """Bytes of stdout + stderr; printing more kills the program."""
    tmpfs_mb: int = 16
    """Size of each private tmpfs (namespaces only)."""
    python_guards: bool = True
    """Audit hook refusing sockets, ctypes, fork, exec and subprocesses (off only to test the OS layer)."""
    namespaces: bool = True
    """Use pid/net/mount namespaces where the kernel allows; False forces the fallback (to test it)."""


@dataclass(frozen=True)
class SandboxResult:
    """How one run ended; ``status`` is one of :data:`STATUSES`."""

    status: str
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    """The last 16 KiB of standard output."""
    stderr: str = ""
    """The last 16 KiB of standard error."""
    wall_s: float = 0.0
    isolation: str = ""
    """``namespaces`` (pid/net/mount namespaces + own uid), ``uid`` (own uid only) or ``rlimits``."""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_namespace_setup_failed = False  # set once namespaces were allowed but mounting in them failed


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as ``__main__`` in the sandbox and report how it ended (never raises)."""
    global _namespace_setup_failed
    limits = limits or SandboxLimits()
    if _namespace_setup_failed:
        limits = replace(limits, namespaces=False)
    result = _run(code, limits)
    if result.status == "sandbox_error" and result.detail.startswith("namespace setup failed"):
        warnings.warn(f"sandbox: {result.detail}; running without namespaces from now on", stacklevel=2)
        _namespace_setup_failed = True
        result = _run(code, replace(limits, namespaces=False))
    return result


def _run(code: str, limits: SandboxLimits) -> SandboxResult:
    request = encode_request(code, asdict(limits))
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-B", str(LAUNCHER)],
            input=request,
            capture_output=True,
            env=dict(ENV),
            timeout=limits.timeout_s + 10.0,  # the launcher enforces timeout_s itself; this is a backstop
            close_fds=True,
        )
    except subprocess.TimeoutExpired:  # run() killed the launcher; its init dies with it (PDEATHSIG)
        return SandboxResult("sandbox_error", wall_s=time.monotonic() - start, detail="launcher hung")
    except OSError as err:
        return SandboxResult("sandbox_error", wall_s=time.monotonic() - start, detail=f"cannot start: {err}")
    try:
        fields = decode_result(proc.stdout.decode())
    except (ValueError, UnicodeDecodeError):
        tail = proc.stderr.decode(errors="replace")[-500:]
        return SandboxResult("sandbox_error", wall_s=time.monotonic() - start, detail=f"launcher failed: {tail}")
    if fields["signal"] is not None and not fields["detail"]:
        fields["detail"] = signal.Signals(fields["signal"]).name
    return SandboxResult(**fields)
