"""The sandbox launcher: run as ``python -I -S -B sandbox_launcher.py`` by :func:`sandbox.run_python`.

Reads a request on stdin (:func:`encode_request`) and writes the result fields on stdout
(:func:`encode_result`). Standard library only, and only cheap modules, because it starts once per
sample: no ``json`` or ``signal`` (their ``re``/``enum`` imports cost ~30 ms), the C ``_signal`` instead.
The containment design is described in ``sandbox.py``; the process layout is::

    launcher (root: unshare, wall clock, output cap, report)
      └── init (PID 1 of the new namespaces, root: mounts, waits; PDEATHSIG=SIGKILL)
            └── program (own uid, rlimits, no new privileges, audit hook; runs the code)
"""

from __future__ import annotations

import _signal as signal  # the C module behind ``signal``, without its enum wrappers
import binascii
import ctypes
import os
import resource
import select
import sys
import time

_MiB = 1024 * 1024
UID_BASE = 1_800_000_000  # sandbox uids are UID_BASE + [0, UID_SPAN): no account uses this range
UID_SPAN = 100_000_000
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
_KEEP = 16 * 1024  # bytes of each stream kept for the report

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
# Imported before dropping privileges when the interpreter's files cannot be exposed to the sandbox uid.
_PRELOAD = (
    "traceback", "math", "cmath", "itertools", "collections", "functools", "re", "string", "heapq", "bisect",
    "typing", "fractions", "decimal", "statistics", "random", "hashlib", "copy", "operator", "json",
    "datetime", "array", "struct", "unicodedata", "textwrap",
)
_BLOCKED_EVENTS = ("os.system", "os.fork", "os.forkpty", "os.startfile", "pty.spawn")
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what} failed: {os.strerror(ctypes.get_errno())}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


# ------------------------------------------------------------------------------------------ namespaces


def unshare_namespaces() -> bool:
    """New pid/net/mount/ipc/uts namespaces for this process's children; False where not allowed."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    if _libc.unshare(_CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS) != 0:
        return False
    try:
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # later mounts never propagate to the host
    except OSError:
        return False
    return True


def mount_private_dirs(tmpfs_mb: int) -> None:
    """In init: fresh tmpfs on world-writable dirs, the interpreter kept reachable, a /proc of our own."""
    prefixes = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in _interpreter_dirs()}
    for path in WRITABLE_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={tmpfs_mb}m,mode=1777,nr_inodes=4096")
    for prefix, fd in prefixes.items():
        _expose(prefix, fd)
        os.close(fd)
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def _interpreter_dirs() -> set[str]:
    return {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}


def _expose(prefix: str, fd: int) -> None:
    """Make the interpreter's files at ``prefix`` readable by the sandbox uid.

    They may sit under a directory others cannot enter (``/root/.pyenv``) or under a directory we just
    covered (``/tmp``). A closed ancestor is covered with an empty tmpfs (hiding its other contents, which
    we want anyway); the prefix, held open since before the mounts, is bind-mounted back in place.
    """
    blocked = _first_closed_ancestor(prefix)
    try:
        visible = blocked is None and os.path.samestat(os.stat(prefix), os.fstat(fd))
    except OSError:
        visible = False
    if visible:
        return
    if blocked is not None:
        _mount("tmpfs", blocked, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
    os.makedirs(prefix, 0o755, exist_ok=True)
    _mount(f"/proc/self/fd/{fd}", prefix, None, _MS_BIND | _MS_REC)


def _first_closed_ancestor(path: str) -> str | None:
    """The first directory on ``path`` that others may not enter (None: all open, or the rest is missing)."""
    parts = path.strip("/").split("/")
    for i in range(len(parts) + 1):
        candidate = "/" + "/".join(parts[:i])
        try:
            if not os.stat(candidate).st_mode & 0o001:
                return candidate
        except FileNotFoundError:
            return None
    return None


# --------------------------------------------------------------------------------------------- program


def _guard_hook(event: str, args: tuple) -> None:
    if event in _BLOCKED_EVENTS or event.startswith(_BLOCKED_PREFIXES):
        raise PermissionError(f"sandbox: {event} is not allowed")


def _count_user_processes(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:  # noqa: SIM105 - contextlib is one more import per sample
                count += os.stat(f"/proc/{name}").st_uid == uid
            except OSError:
                pass
    return count


def become_program(code: str, limits: dict, uid: int | None, workdir: str, out_w: int, err_w: int) -> None:
    """In the program process: descriptors, limits, identity, guards, then run ``code``. Never returns."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1 << 16)
        cpu = int(limits["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * _MiB,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_mb"] * _MiB,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        nproc = int(limits["max_processes"])
        if uid is None:  # not root: the limit counts every process of our user, so add what already runs
            nproc += _count_user_processes(os.getuid())
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        os.chdir(workdir)
        os.umask(0o077)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setresuid, which clears it
        os.environ.clear()
        os.environ.update(ENV, HOME=workdir)
        sys.argv = ["solution.py"]
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGXCPU):
            signal.signal(sig, signal.SIG_DFL)
        if limits["python_guards"]:
            sys.addaudithook(_guard_hook)
    except BaseException as err:  # the sandbox could not be set up: never run the code unconfined
        os.write(2, f"sandbox setup failed: {err!r}\n".encode())
        os._exit(125)
    status = 0
    try:
        exec(compile(code, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status & 0xFF)


# ------------------------------------------------------------------------------------------------ init


def init_main(request: dict, uid: int | None, namespaces: bool, pipes: tuple[int, int, int]) -> None:
    """The sandbox's init: mounts, starts the program, reports how it ended, exits. Never returns."""
    out_w, err_w, status_w = pipes
    try:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if namespaces:
            try:
                mount_private_dirs(int(request["limits"]["tmpfs_mb"]))
            except OSError as err:  # the caller retries without namespaces
                os.write(status_w, f"setup {err}".encode()[:500])
                os._exit(0)
            workdir = "/tmp/work"
            os.mkdir(workdir, 0o700)
            if uid is not None:
                os.chown(workdir, uid, uid)
        else:
            workdir = request["workdir"]
            os.setpgid(0, 0)  # the launcher kills this group afterwards
            if uid is not None and _first_closed_ancestor(os.path.realpath(sys.base_prefix)):
                for name in _PRELOAD:
                    __import__(name)
        pid = os.fork()
        if pid == 0:
            os.close(status_w)
            become_program(request["code"], request["limits"], uid, workdir, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        while True:  # as PID 1 we also reap orphans; stop when the program itself has ended
            reaped, status = os.waitpid(-1, 0)
            if reaped == pid:
                break
        report = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        os.write(status_w, report.encode())
    except BaseException as err:
        os.write(status_w, f"error {err!r}".encode()[:500])
    os._exit(0)


# -------------------------------------------------------------------------------------------- protocol

_LIMIT_TYPES = {"timeout_s": float, "cpu_s": int, "memory_mb": int, "file_size_mb": int, "max_processes": int,
                "max_output_bytes": int, "tmpfs_mb": int, "python_guards": bool, "namespaces": bool}
_RESULT_FIELDS = ("status", "exit_code", "signal", "wall_s", "isolation", "stdout", "stderr", "detail")


def encode_request(code: str, limits: dict) -> bytes:
    """One line of ``key=value`` limits, then the code."""
    line = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in limits.items())
    return line.encode() + b"\n" + code.encode("utf-8", "surrogatepass")


def decode_request(data: bytes) -> dict:
    line, _, code = data.partition(b"\n")
    limits = {}
    for item in line.decode().split():
        key, _, value = item.partition("=")
        kind = _LIMIT_TYPES[key]
        limits[key] = bool(int(value)) if kind is bool else kind(value)
    return {"code": code.decode("utf-8", "surrogatepass"), "limits": limits}


def encode_result(outcome: dict) -> str:
    """One line per field of :data:`_RESULT_FIELDS`, each base64 of its text (empty for None)."""
    values = (b"" if outcome.get(f) is None else str(outcome[f]).encode() for f in _RESULT_FIELDS)
    return "".join(binascii.b2a_base64(v, newline=False).decode() + "\n" for v in values)


def decode_result(text: str) -> dict:
    lines = text.splitlines()[-len(_RESULT_FIELDS):]
    if len(lines) != len(_RESULT_FIELDS):
        raise ValueError(f"expected {len(_RESULT_FIELDS)} result lines, got {len(lines)}")
    fields = {f: binascii.a2b_base64(v).decode() for f, v in zip(_RESULT_FIELDS, lines, strict=True)}
    out: dict = {"status": fields["status"], "isolation": fields["isolation"], "stdout": fields["stdout"],
                 "stderr": fields["stderr"], "detail": fields["detail"], "wall_s": float(fields["wall_s"] or 0)}
    for key in ("exit_code", "signal"):
        out[key] = int(fields[key]) if fields[key] else None
    return out


# -------------------------------------------------------------------------------------------- launcher


def main() -> None:
    request = decode_request(sys.stdin.buffer.read())
    limits = request["limits"]
    start = time.monotonic()
    namespaces = limits["namespaces"] and unshare_namespaces()
    uid = UID_BASE + int.from_bytes(os.urandom(4), "little") % UID_SPAN if os.geteuid() == 0 else None
    isolation = "namespaces" if namespaces else ("uid" if uid is not None else "rlimits")
    if not namespaces:
        import tempfile

        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come back to us, to be killed and reaped
        request["workdir"] = tempfile.mkdtemp(prefix="prorl-sandbox-")
        if uid is not None:
            os.chown(request["workdir"], uid, uid)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()
    init_pid = os.fork()
    if init_pid == 0:
        for fd in (out_r, err_r, status_r):
            os.close(fd)
        init_main(request, uid, namespaces, (out_w, err_w, status_w))
    for fd in (out_w, err_w, status_w):
        os.close(fd)
    outcome = watch(init_pid, (out_r, err_r, status_r), limits, start)
    if not namespaces:
        kill_leftovers(init_pid, uid, request["workdir"])
    outcome.update(wall_s=round(time.monotonic() - start, 4), isolation=isolation)
    sys.stdout.write(encode_result(outcome))
    sys.stdout.flush()


def watch(init_pid: int, fds: tuple[int, int, int], limits: dict, start: float) -> dict:
    """Collect output and status until init reports, the clock runs out or the program prints too much.

    Only init holds the status pipe, so its end of file means init has exited: in a pid namespace the
    kernel has then killed every process left in it, and the output pipes can be drained without blocking.
    """
    out_r, err_r, status_r = fds
    kept = {out_r: bytearray(), err_r: bytearray()}
    status_text = bytearray()
    total = 0
    verdict = None
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = start + float(limits["timeout_s"])
    status_open = True
    while status_open:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            verdict = "timeout"
            break
        for fd, _ in poller.poll(max(1, int(remaining * 1000))):
            chunk = os.read(fd, 65536)
            if fd == status_r:
                status_text += chunk
                status_open = bool(chunk)
            elif not chunk:
                poller.unregister(fd)
            else:
                total += _keep(kept[fd], chunk)
        if total > limits["max_output_bytes"]:
            verdict = "output_limit"
            break
    if verdict is not None:
        os.kill(init_pid, signal.SIGKILL)  # init is PID 1 of the namespace: everything in it dies too
    os.waitpid(init_pid, 0)
    for fd in (out_r, err_r):  # what the program wrote before it ended
        os.set_blocking(fd, False)
        try:
            while total <= limits["max_output_bytes"] and (chunk := os.read(fd, 65536)):
                total += _keep(kept[fd], chunk)
        except BlockingIOError:
            pass
    outcome: dict = {"stdout": kept[out_r].decode(errors="replace"), "stderr": kept[err_r].decode(errors="replace")}
    return outcome | classify(verdict, status_text.decode(errors="replace"), limits)


def _keep(buffer: bytearray, chunk: bytes) -> int:
    buffer += chunk
    del buffer[:-_KEEP]
    return len(chunk)


def classify(verdict: str | None, status_text: str, limits: dict) -> dict:
    if verdict == "timeout":
        return {"status": "timeout", "detail": f"wall clock over {limits['timeout_s']} s"}
    if verdict == "output_limit":
        return {"status": "output_limit", "detail": f"printed more than {limits['max_output_bytes']} bytes"}
    kind, _, value = status_text.partition(" ")
    if kind == "exit":
        code = int(value)
        if code == 125:
            return {"status": "sandbox_error", "exit_code": code, "detail": "sandbox setup failed"}
        return {"status": "ok" if code == 0 else "error", "exit_code": code}
    if kind == "signal":
        sig = int(value)
        status = {signal.SIGXCPU: "cpu_limit", signal.SIGXFSZ: "file_size"}.get(sig, "killed")
        return {"status": status, "signal": sig}
    if kind == "setup":
        return {"status": "sandbox_error", "detail": f"namespace setup failed: {value}"}
    return {"status": "sandbox_error", "detail": status_text or "no status from the sandbox init"}


def kill_leftovers(group: int, uid: int | None, workdir: str) -> None:
    """Without a pid namespace: kill whatever the program left running, then remove its directory."""
    import shutil

    try:  # noqa: SIM105 - contextlib is one more import per sample
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
    if uid is not None:  # kill(-1) as the sandbox uid reaches every process of that uid, and only those
        pid = os.fork()
        if pid == 0:
            try:
                os.setresuid(uid, uid, uid)
                for _ in range(100):
                    os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
            os._exit(0)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # reap the killed descendants (we are their subreaper)
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.01)
        except ChildProcessError:
            break
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
