"""The Ray launcher's parts: the run-directory check, how a lost actor is reported, the child's environment, and a
placement the cluster cannot make (a real one-node Ray instance). The whole launcher on a three-node cluster is
``tests/integration/test_ray_cluster.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from prorl_async.config import load_config
from prorl_async.errors import UserError
from prorl_async.supervisor import ray_launcher
from prorl_async.supervisor.ray_launcher import NODE_LOST, TOKEN_FILE, RayLauncher, RemoteProcess, _check_run_dir
from prorl_async.transport.sockets import CURVE_KEYS_ENV, CurveKeys

ray = pytest.importorskip("ray", reason="needs Ray: pip install 'prorl-async[ray]'")


def test_a_node_that_does_not_see_the_run_directory_is_told_what_to_fix(tmp_path: Path) -> None:
    (tmp_path / TOKEN_FILE).write_text("abc\n")
    assert _check_run_dir(tmp_path, "abc", "node-a") is None
    missing = _check_run_dir(tmp_path / "elsewhere", "abc", "node-b")
    assert missing is not None and "node node-b does not see the run directory" in missing
    assert "storage every node mounts at the same path" in missing
    other = _check_run_dir(tmp_path, "xyz", "node-c")
    assert other is not None and "another run's" in other


class _LostActor:
    """An actor handle whose calls fail as Ray's do when the actor's node died."""

    class _Method:
        def remote(self, *args: object) -> object:
            return object()  # a reference; getting it fails (below)

    wait = _Method()


def test_a_lost_actor_is_reported_as_such_not_as_an_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    def lost(ref: object, timeout_s: float) -> object:
        raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(ray_launcher, "_get", lost)
    process = RemoteProcess(_LostActor(), {"pid": 7, "host": "node-a", "incarnation": "x"}, call_timeout_s=1.0)
    assert trio.run(process.wait) == NODE_LOST
    assert process.poll() == NODE_LOST and process.lost


def test_a_child_gets_the_runs_variables_and_its_own_keys_only(tmp_path: Path) -> None:
    cfg = load_config(None, ["cluster.launcher=\"ray\"", "cluster.curve=\"on\""])
    launcher = RayLauncher(cfg, tmp_path)
    launcher.learner_keys = CurveKeys(b"L" * 40, b"S" * 40, authorized=(b"G" * 40,))
    launcher.generator_keys = CurveKeys(b"G" * 40, b"T" * 40, server_public=b"L" * 40)
    learner = launcher.child("learner", ["-m", "prorl_async.learner"], tmp_path / "l.log", learner=True)
    generator = launcher.child("generator-0", ["-m", "prorl_async.generator"], tmp_path / "g.log")
    base = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PRORL_SUPERVISOR_PID": "1"}
    learner.env, generator.env = dict(base), dict(base)
    env = launcher._env(learner)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "PRORL_SUPERVISOR_PID" not in env  # the actor names itself
    assert "PATH" not in env  # a node keeps its own
    assert CurveKeys.from_env(env[CURVE_KEYS_ENV]) == launcher.learner_keys
    assert CurveKeys.from_env(launcher._env(generator)[CURVE_KEYS_ENV]) == launcher.generator_keys


def test_a_process_the_cluster_cannot_place_is_one_clear_error(tmp_path: Path) -> None:
    """A real Ray instance (one node, started here) asked for a resource no node has: an error within the timeout
    that names what was asked for, not a hang."""
    script = f"""
import sys
from pathlib import Path
from prorl_async.config import load_config
from prorl_async.errors import UserError
from prorl_async.supervisor.ray_launcher import RayLauncher
cfg = load_config(None, ["cluster.launcher=\\"ray\\"", "cluster.address=\\"local\\"", "cluster.placement_timeout_s=3",
                         "cluster.learner_resources={{big_node=1}}"])
launcher = RayLauncher(cfg, Path({str(tmp_path)!r}))
launcher.connect()
child = launcher.child("learner", ["-c", "pass"], Path({str(tmp_path / "l.log")!r}), learner=True)
child.env = {{}}
try:
    child._start_blocking()
except UserError as err:
    print("ERROR:", err)
finally:
    launcher.close([child])
"""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "ERROR: the cluster could not place learner within 3 s" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "big_node" in out.stdout and "free now" in out.stdout
    assert not (tmp_path / TOKEN_FILE).exists()  # close() takes the run's token away


def test_unblocking_signals_reaches_the_child() -> None:
    """The child of a thread that blocks SIGINT (as an actor's do) still gets the Ctrl-C the supervisor forwards."""
    code = """
import signal, subprocess, sys, threading
from prorl_async.supervisor.ray_launcher import _unblock_signals
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
child = "import signal; print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))"
plain = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout.strip()
fixed = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                       preexec_fn=_unblock_signals).stdout.strip()
print(plain, fixed)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_the_launcher_needs_ray_named_as_an_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'prorl-async\[ray\]'"):
        RayLauncher(load_config(), tmp_path).connect()
