"""``cluster.launcher = "ray"`` on a real four-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

Custom resources pin the learner's two ranks to two learner nodes (the head and one more: FSDP2 over gloo across
nodes) and the generator to either of two generator nodes. One run: the tiny model trains with CURVE on (keys made
for the run, handed over through Ray) and a client without the run's keys is refused; the generator's node is
killed mid-run, Ray restarts its actor on the other node and the new generator contributes groups; Ctrl-C on the
driver stops every process with a checkpoint; ``--resume`` continues the run on the cluster, on both learner nodes.
Every process is on loopback: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray's own addresses on 127.0.0.1 (Ray
otherwise turns a loopback address into the machine's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prorl_async.config import TransportConfig
from prorl_async.monitor.metrics import read_metrics
from prorl_async.supervisor.lifecycle import process_table
from prorl_async.transport.sockets import Subscriber, Transport, run_keys

ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="needs Ray: pip install 'prorl-async[ray]'")

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("prorl-async")
pytestmark = pytest.mark.integration
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                      "health_check_initial_delay_ms": 1000}


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch):
    for key, value in LOOPBACK_ONLY.items():
        monkeypatch.setenv(key, value)
    made = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"learner_node": 1}, "node_ip_address": "127.0.0.1",
        "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS})
    learner_node = made.add_node(num_cpus=1, resources={"learner_node": 1}, node_ip_address="127.0.0.1")
    nodes = [made.add_node(num_cpus=1, resources={"generator_node": 1}, node_ip_address="127.0.0.1")
             for _ in range(2)]
    try:
        yield made, learner_node, nodes
    finally:
        made.shutdown()


def _config(tmp_path: Path, address: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text((ROOT / "configs" / "tiny.toml").read_text() + f"""
[cluster]
launcher = "ray"
address = "{address}"
curve = "on"
learner_nodes = 2
learner_resources = {{learner_node = 1}}
generator_resources = {{generator_node = 1}}
""")
    return path


def _events(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [e for e in read_metrics(path, kind="event") if e.get("event") == name] if path.exists() else []


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path, kind="step") if path.exists() else []


def _logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((run_dir / "logs").glob("*.log")))


def _until(what: str, check, driver: subprocess.Popen, run_dir: Path, timeout_s: float = 240.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (got := check()):
            return got
        if driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) before {what}:\n{_logs(run_dir)}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout_s:g} s:\n{_logs(run_dir)}")


def _group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(group == pgid and state not in ("Z", "X") for state, _, group in process_table().values()):
            return True
        time.sleep(0.5)
    return False


def test_ray_cluster_trains_on_two_learner_nodes_survives_a_generator_node_and_resumes(cluster, tmp_path) -> None:
    made, learner_node, generator_nodes = cluster
    run_dir = tmp_path / "run"
    config = _config(tmp_path, made.address)
    argv = [str(EXE), "run", str(config), "--set", f"run.run_dir={run_dir}", "--set", "run.tui=off",
            "--set", "run.max_steps=100000", "--set", "run.checkpoint_every_steps=0"]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    started: list[int] = []
    try:
        _until("the first steps", lambda: len(_steps(run_dir)) >= 3, driver, run_dir)
        hosts = json.loads((run_dir / "hosts.json").read_text())
        assert {hosts["learner"]["node"], hosts["learner-1"]["node"]} == {made.head_node.node_id,
                                                                          learner_node.node_id}  # one rank a node
        first = hosts["generator-0"]["node"]
        assert first in {n.node_id for n in generator_nodes}

        # CURVE: a client without the run's keys (none, or another run's) never hears the learner.
        endpoints = json.loads((run_dir / "endpoints.json").read_text())
        for keys in (None, run_keys()[1]):
            with Transport(TransportConfig(linger_ms=0), keys=keys) as transport:
                assert Subscriber(transport, endpoints["control"]).recv(timeout_s=3.0) is None

        # The generator's node dies: its processes stop, Ray restarts the actor on the other node.
        pids = json.loads((run_dir / "pids.json").read_text())
        started += [pids["learner"], pids["learner-1"], pids["generator-0"]]
        victim = next(n for n in generator_nodes if n.node_id == first)
        made.remove_node(victim, allow_graceful=False)
        assert _group_gone(pids["generator-0"], 60.0), "the lost node's generator outlived its actor"
        ready = _until("the replacement's Ready", lambda: _events(run_dir, "generator_ready")[1:], driver, run_dir)
        moved = json.loads((run_dir / "hosts.json").read_text())["generator-0"]
        assert moved["node"] != first and moved["node"] in {n.node_id for n in generator_nodes}
        started.append(json.loads((run_dir / "pids.json").read_text())["generator-0"])
        # ... and contributes: steps trained on groups it generated after its Ready.
        after = ready[-1]["time_s"]
        _until("steps after the replacement joined",
               lambda: len([s for s in _steps(run_dir) if s["time_s"] > after + 1]) >= 3, driver, run_dir)

        driver.send_signal(signal.SIGINT)  # Ctrl-C: checkpoint, then every process stops
        assert driver.wait(120) == 130, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
    for pid in started:
        assert _group_gone(pid, 30.0), f"process group {pid} outlived the run"
    out = (tmp_path / "driver.log").read_text()
    assert "generator-0 was lost with its actor" in out, out[-3000:]
    last = _steps(run_dir)[-1]["version"]
    assert f"checkpoint: {run_dir / 'checkpoints' / f'step-{last:06d}'}" in out, out[-2000:]

    # --resume continues on the cluster (one generator node is left).
    resumed = subprocess.run([str(EXE), "run", "--resume", str(run_dir), "--set", f"run.max_steps={last + 2}",
                              "--set", "run.tui=off"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:] + _logs(run_dir)
    assert [s["version"] for s in _steps(run_dir)][-2:] == [last + 1, last + 2]
    assert (run_dir / "logs" / "learner-1.log").read_text().count("stopped by rank 0") == 2  # both runs, both ranks
