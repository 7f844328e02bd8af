"""The sandbox against hostile programs: each is contained, reported, and leaves nothing behind.

The OS layer (namespaces, uid, rlimits) is tested with the Python guards off, so that it is the kernel
that stops the program, and the guards separately. Every test checks afterwards that no process of a
sandbox uid is alive and that the test process has no new children.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from prorl_async.envs.sandbox import SANDBOX_UIDS, SandboxLimits, run_python

FAST = SandboxLimits(timeout_s=1.5, cpu_s=1)
OS_ONLY = SandboxLimits(timeout_s=1.5, cpu_s=1, python_guards=False)
IS_ROOT = os.geteuid() == 0
ISOLATION = run_python("pass", FAST).isolation
HAS_NAMESPACES = ISOLATION == "namespaces"


def _live_sandbox_processes() -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{name}").st_uid
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if uid in SANDBOX_UIDS and state != "Z":
            found.append(int(name))
    return found


def _children() -> set[int]:
    path = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    return {int(pid) for pid in path.read_text().split()} if path.exists() else set()


@pytest.fixture(autouse=True)
def nothing_outlives_the_test():
    before = _children()
    yield
    deadline = time.monotonic() + 2.0
    while (_live_sandbox_processes() or _children() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_sandbox_processes() == []
    assert _children() - before == set()


def test_plain_program_runs_isolated_in_an_empty_directory():
    result = run_python("import os\nprint(os.getcwd(), os.listdir('.'), sorted(os.environ))", FAST)
    assert result.ok, result
    _, listing, env = result.stdout.split(" ", 2)
    assert listing == "[]"
    assert "HOME" in env and "PROR" not in env
    if IS_ROOT:
        assert ISOLATION in ("namespaces", "uid")
        assert result.stdout and int(run_python("import os; print(os.getuid())", FAST).stdout) in SANDBOX_UIDS


def test_exit_codes_and_exceptions_are_reported():
    assert run_python("import sys; sys.exit(3)", FAST).exit_code == 3
    failed = run_python("raise ValueError('boom')", FAST)
    assert failed.status == "error" and "ValueError: boom" in failed.stderr


@pytest.mark.parametrize("code", ["while True: pass", "import time\ntime.sleep(60)"])
def test_infinite_loop_and_sleep_end_at_the_limits(code):
    start = time.monotonic()
    result = run_python(code, OS_ONLY)
    assert result.status in ("cpu_limit", "timeout"), result
    assert time.monotonic() - start < FAST.timeout_s + 3


@pytest.mark.parametrize(
    "namespaces",
    [True, pytest.param(False, marks=pytest.mark.skipif(not IS_ROOT, reason="the uid fallback needs root"))],
    ids=["namespaces", "fallback"],
)
def test_fork_bomb_is_capped_and_cleaned_up(namespaces):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    limits = SandboxLimits(timeout_s=1.5, cpu_s=1, python_guards=False, namespaces=namespaces)
    start = time.monotonic()
    result = run_python(bomb, limits)
    assert result.status in ("cpu_limit", "timeout", "killed"), result
    assert time.monotonic() - start < 8
    # The process cap held: a program that counts its forks stops at max_processes.
    counter = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
               "    n += 1\nprint(n)\n")
    counted = run_python(counter, limits)
    if IS_ROOT:
        assert counted.ok and int(counted.stdout) == limits.max_processes - 1, counted
    subprocess_still_works = run_python("print(1)", FAST)
    assert subprocess_still_works.ok


def test_fork_is_refused_by_the_python_guards():
    result = run_python("import os\nos.fork()", FAST)
    assert result.status == "error" and "os.fork is not allowed" in result.stderr


def test_memory_bomb_fails_with_memory_error():
    bombs = ("x = bytearray(8 * 1024 ** 3)", "x = 'a' * (4 * 1024 ** 3)",
             "x = []\nwhile True:\n    x.append(bytearray(64 * 1024 ** 2))")
    for code in bombs:
        result = run_python(code, SandboxLimits(timeout_s=5, memory_mb=256, python_guards=False))
        assert result.status == "error" and "MemoryError" in result.stderr, result


def test_writing_outside_the_directory_leaves_nothing_on_the_host(tmp_path):
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    private = [Path.cwd() / "escaped-file", Path.home() / "escaped-file", Path("/etc/escaped-file")]
    world_writable = [open_dir / "escaped", Path("/tmp") / f"prorl-escape-{os.getpid()}"]
    code = (f"for path in {[str(t) for t in private + world_writable]!r}:\n    try:\n"
            "        open(path, 'w').write('x')\n    except OSError as err:\n        print('refused', path, err)\n")
    run_python(code, OS_ONLY)
    try:
        if IS_ROOT:  # root-owned directories are closed to the sandbox uid in every mode
            assert not any(t.exists() for t in private)
        if HAS_NAMESPACES:  # world-writable ones are private tmpfs mounts in the sandbox
            assert not any(t.exists() for t in world_writable)
    finally:
        for target in world_writable:
            target.unlink(missing_ok=True)


def test_big_file_hits_the_file_size_limit():
    result = run_python("open('big', 'wb').write(b'x' * (64 * 1024 * 1024))", OS_ONLY)
    assert result.status == "file_size", result


def test_printing_gigabytes_is_cut_off():
    start = time.monotonic()
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", OS_ONLY)
    assert result.status == "output_limit", result
    assert len(result.stdout) <= 16 * 1024
    assert time.monotonic() - start < 5


@pytest.fixture
def listening_server():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                accepted.append(conn.recv(100) or b"connected")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def test_network_is_unreachable(listening_server):
    port, accepted = listening_server
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'escaped')\nprint('connected')")
    os_layer = run_python(code, OS_ONLY)
    guarded = run_python(code, FAST)
    assert "connected" not in os_layer.stdout and "connected" not in guarded.stdout
    assert guarded.status == "error" and "socket" in guarded.stderr and "not allowed" in guarded.stderr
    time.sleep(0.3)
    assert accepted == []
    if HAS_NAMESPACES:
        interfaces = run_python("print(open('/proc/net/dev').read())", FAST).stdout
        assert [line.split(":")[0].strip() for line in interfaces.splitlines()[2:] if line.strip()] == ["lo"]


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("PRORL_TEST_SECRET", "s3cr3t-token-value")
    code = ("import os\nprint(dict(os.environ))\nfor pid in ('self', '1', str(os.getppid())):\n    try:\n"
            "        print(open(f'/proc/{pid}/environ').read())\n    except OSError as err:\n        print(err)\n")
    result = run_python(code, OS_ONLY)
    assert "s3cr3t-token-value" not in result.stdout + result.stderr


def test_ctypes_and_subprocess_are_refused_by_the_guards():
    for code in ("import ctypes\nctypes.CDLL(None).getpid()", "import subprocess\nsubprocess.run(['true'])",
                 "import os\nos.system('true')"):
        result = run_python(code, FAST)
        assert result.status == "error" and "not allowed" in result.stderr, (code, result)


def test_failed_namespace_setup_falls_back_once(monkeypatch):
    from prorl_async.envs import sandbox

    real_run = sandbox._run
    calls = []

    def mount_fails(code, limits):
        calls.append(limits.namespaces)
        if limits.namespaces:
            return sandbox.SandboxResult("sandbox_error", isolation="namespaces", detail="namespace setup failed: x")
        return real_run(code, limits)

    monkeypatch.setattr(sandbox, "_run", mount_fails)
    monkeypatch.setattr(sandbox, "_namespace_setup_failed", False)
    with pytest.warns(UserWarning, match="without namespaces"):
        assert run_python("print(1)", FAST).ok
    assert run_python("print(2)", FAST).stdout == "2\n"
    assert calls == [True, False, False]
