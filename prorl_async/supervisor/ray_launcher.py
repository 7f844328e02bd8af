"""The Ray launcher (``cluster.launcher = "ray"``): the supervisor's processes, placed on the nodes of a Ray cluster.

    prorl-async run (trio) ── RemoteChild "learner"     ── ProcessHost actor, node A ── python -m prorl_async.learner
                           └─ RemoteChild "generator-i" ── ProcessHost actor, node B ── python -m prorl_async.generator

Each process the local launcher starts as a child (the learner, each generator) runs here as the child of a
:class:`ProcessHost` actor on the node Ray places it on, with the same arguments, the same log file
(``RUN_DIR/logs/<name>.log``) and the same supervision (:class:`~prorl_async.supervisor.supervisor.Supervisor`):
the ZeroMQ data plane and the weight groups do not change. What Ray adds:

- Placement: one placement group per process, and one for the learner's ranks. The learner's has one bundle per
  learner node (its ranks' ``learner_cpus``, ``learner_gpus_per_node`` GPUs, ``learner_resources``; STRICT_SPREAD),
  and one actor per rank in its node's bundle (one GPU each); a generator engine's has one bundle of
  ``generator.tensor_parallel_size`` GPUs (with ``generator_gpus``), so an engine is never split across nodes.
  A process the cluster cannot place within ``placement_timeout_s`` is a one-line error naming what it asked for.
- Restarts: a generator's actor has Ray's restart policy (``generator_max_restarts``). When its node dies, Ray
  starts the actor again on a node that can hold it and the actor starts the generator again; the learner hands
  out again the requests the lost process held, when the new one says Ready (nothing is lost). A generator
  process that exits on its own is restarted in place by the supervisor, with back-off, as on one machine. The
  learner's actor is never restarted: a lost learner ends the run with its last checkpoint named, and
  ``prorl-async run --resume RUN_DIR`` continues it on the cluster.
- Addresses and keys: when the cluster spans machines (more than one node address, or ``cluster.interface``
  set), the learner listens on its node's address instead of loopback, and CURVE is on (``cluster.curve``): keys
  are made for the run here (:func:`~prorl_async.transport.sockets.run_keys`) and handed to each process through
  its actor, into its environment: never into a file or a log.
- Shared storage: every process reads the run's config and writes its log and checkpoints under RUN_DIR, so
  RUN_DIR must be one directory every node sees. Each actor checks a token this driver writes there and refuses
  to start the process when it does not find it (a clear error, before any model loads).
- Timeouts: every call to an actor waits at most ``call_timeout_s``; an actor that does not answer counts as lost.

Ray is imported only here (``pip install prorl-async[ray]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from prorl_async.errors import UserError
from prorl_async.supervisor.lifecycle import ENV as SUPERVISOR_ENV
from prorl_async.transport.sockets import CURVE_KEYS_ENV, CurveKeys, run_keys
from prorl_async.utils.fs import read_tail, write_atomic

if TYPE_CHECKING:
    from prorl_async.config import Config

TOKEN_FILE = "cluster-token"
NODE_LOST = -1000
"""The exit code a :class:`RemoteProcess` reports when its actor (or its node) was lost, not the process."""
_WAIT_SLICE_S = 2.0  # one remote wait() call returns after at most this long


# ------------------------------------------------------------------------------------------ the actor


class ProcessHost:
    """Runs one of the run's processes on the node Ray placed this actor on (made a Ray actor by the launcher).

    The constructor checks the run directory (shared storage) and starts the process; Ray runs it again when it
    restarts the actor after a node failure, so a restarted actor comes back with a fresh process. ``argv`` is a
    ``python`` command line without the interpreter: this node's interpreter runs it. ``env`` holds only what the
    run adds to this node's own environment.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], run_dir: str, token: str,
                 bind_interface: str | None = None) -> None:
        self.name, self.argv, self.env = name, list(argv), dict(env)
        self.run_dir = Path(run_dir)
        self.incarnation = secrets.token_hex(4)  # new each time Ray (re)constructs this actor
        self.host = socket.gethostname()
        self.address, self.node = _node()
        self.process: subprocess.Popen | None = None
        self.error = _check_run_dir(self.run_dir, token, self.host)
        if bind_interface is not None:  # the learner: listen where the other nodes reach it
            bind = bind_interface or self.address
            self.argv += ["--set", f"transport.host={bind}", "--set", f"weight_sync.host={bind}"]
        if self.error is None:
            self._start()

    def _start(self) -> None:
        log_path = self.run_dir / "logs" / f"{self.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, SUPERVISOR_ENV: str(os.getpid())}  # the child stops when this actor dies
        if "OMP_NUM_THREADS" not in self.env:  # Ray's (1 per reserved CPU), not the run's: the processes size their
            env.pop("OMP_NUM_THREADS", None)   # threads as on one machine (learner.num_threads, vLLM's binding)
        with log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, *self.argv], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                            preexec_fn=_unblock_signals)

    def info(self) -> dict[str, Any]:
        """Where and what: host name, node address, pid, exit code (None while running), incarnation, error."""
        code = self.process.poll() if self.process is not None else None
        return {"host": self.host, "address": self.address, "node": self.node,
                "pid": self.process.pid if self.process else None,
                "returncode": code, "incarnation": self.incarnation, "error": self.error}

    async def wait(self, timeout_s: float) -> int | None:
        """The process's exit code once it exits; None if it still runs after ``timeout_s``."""
        import asyncio

        deadline = time.monotonic() + timeout_s
        while self.process is not None and self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.process.poll() if self.process is not None else 1

    def send_signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def restart(self) -> dict[str, Any]:
        """Start the process again on this node (after it exited); what :meth:`info` says then."""
        self.reap(2.0)
        self._start()
        return self.info()

    def reap(self, grace_s: float = 5.0) -> None:
        """Stop what the process left in its process group (vLLM's engine core, scoring workers): SIGTERM, then
        SIGKILL after ``grace_s``. The group is the process's own session, so nothing else is touched."""
        if self.process is None:
            return
        pgid = self.process.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                self.process.poll()
                try:
                    os.killpg(pgid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.1)


def _unblock_signals() -> None:
    """In the child, before exec: an actor's threads block SIGINT, and a blocked signal stays blocked across exec,
    so the learner would never see the Ctrl-C the supervisor forwards (its checkpoint-and-stop)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _node() -> tuple[str, str]:
    """This node's address and Ray node id."""
    import ray

    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()


def _check_run_dir(run_dir: Path, token: str, host: str) -> str | None:
    """None when ``run_dir`` is the driver's run directory (its token is there); else what to fix, in one line."""
    try:
        found = (run_dir / TOKEN_FILE).read_text().strip()
    except OSError:
        found = None
    if found == token:
        return None
    seen = f"no {TOKEN_FILE} there" if found is None else f"its {TOKEN_FILE} is another run's"
    return (f"node {host} does not see the run directory {run_dir} ({seen}): put run.run_dir on storage every "
            "node mounts at the same path (NFS, Lustre, a shared volume)")


# ------------------------------------------------------------------------------------------ the driver


class RemoteProcess:
    """The driver's handle on a :class:`ProcessHost`'s process, shaped like ``trio.Process`` for the supervisor."""

    def __init__(self, actor: Any, info: dict[str, Any], call_timeout_s: float) -> None:
        self.actor, self.call_timeout_s = actor, call_timeout_s
        self.pid: int = info["pid"]
        self.host: str = info["host"]
        self.incarnation: str = info["incarnation"]
        self.returncode: int | None = None
        self.lost: str = ""
        """Why the actor is gone (its node died, it stopped answering); empty while it answers."""

    def poll(self) -> int | None:
        return self.returncode

    async def wait(self) -> int:
        import ray.exceptions

        while self.returncode is None:
            ref = self.actor.wait.remote(_WAIT_SLICE_S)
            try:
                code = await trio.to_thread.run_sync(_get, ref, self.call_timeout_s + _WAIT_SLICE_S,
                                                     abandon_on_cancel=True)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                self.lost = _first_line(err)
                self.returncode = NODE_LOST
            else:
                if code is not None:
                    self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.actor.send_signal.remote(int(sig))  # no reply awaited: wait() sees the effect

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _get(ref: Any, timeout_s: float) -> Any:
    import ray

    return ray.get(ref, timeout=timeout_s)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


@dataclass
class RemoteChild:
    """One supervised process on the cluster: the same surface as the local ``Child`` (start, reap, tail)."""

    name: str
    argv: list[str]
    log_path: Path
    launcher: RayLauncher
    learner: bool = False
    rank: int = 0
    """The learner rank (ranks > 0 share rank 0's placement group)."""
    process: RemoteProcess | None = None
    restarts: int = 0
    actor: Any = None
    pg: Any = None
    host: str = ""
    env: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)

    async def start(self, env: dict[str, str], pids_file: Path) -> None:
        self.env = {**env, **self.extra_env}
        info = await trio.to_thread.run_sync(self._start_blocking, abandon_on_cancel=True)
        self.process = RemoteProcess(self.actor, info, self.launcher.cfg.call_timeout_s)
        self.host = info["host"]
        pids = json.loads(pids_file.read_text()) if pids_file.exists() else {}
        pids[self.name] = self.process.pid
        write_atomic(pids_file, json.dumps(pids, indent=2) + "\n")
        hosts_file = pids_file.with_name("hosts.json")
        hosts = json.loads(hosts_file.read_text()) if hosts_file.exists() else {}
        hosts[self.name] = {"host": self.host, "address": info["address"], "node": info["node"]}  # for people
        write_atomic(hosts_file, json.dumps(hosts, indent=2) + "\n")

    def _start_blocking(self) -> dict[str, Any]:
        import ray.exceptions

        cfg = self.launcher.cfg
        if self.actor is None:
            self.actor, self.pg = self.launcher.place(self)
            return self._info(cfg.placement_timeout_s)
        # Again after the process exited, or after its actor was lost: Ray may have restarted the actor (with a
        # fresh process) on another node; wait for it. A process that exited on a live actor starts in place.
        deadline = time.monotonic() + cfg.placement_timeout_s
        while True:
            try:
                info = ray.get(self.actor.info.remote(), timeout=cfg.call_timeout_s)
            except ray.exceptions.ActorDiedError as err:  # Ray's restarts used up: a new actor, a new placement
                print(f"prorl-async: {self.name}'s actor is gone ({_first_line(err)}); placing a new one",
                      flush=True)
                self.launcher.release(self)
                self.actor, self.pg = self.launcher.place(self)
                return self._info(cfg.placement_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise UserError(f"{self.name}: its actor did not come back within "
                                    f"cluster.placement_timeout_s = {cfg.placement_timeout_s:g} s") from None
                time.sleep(1.0)
                continue
            if info["error"]:  # restarted on a node that cannot run it (it does not see RUN_DIR): a setup error
                raise UserError(info["error"])
            previous = self.process.incarnation if self.process is not None else None
            if info["incarnation"] != previous and info["returncode"] is None:
                return info  # Ray restarted the actor: its process is new
            return ray.get(self.actor.restart.remote(), timeout=cfg.call_timeout_s)

    def _info(self, timeout_s: float) -> dict[str, Any]:
        import ray

        info = ray.get(self.actor.info.remote(), timeout=timeout_s)
        if info["error"]:
            raise UserError(info["error"])
        return info

    async def reap_group(self, grace_s: float = 5.0) -> None:
        if self.actor is None or (self.process is not None and self.process.lost):
            return  # a lost actor took its processes with it (they stop when their parent is gone)
        ref = self.actor.reap.remote(grace_s)
        try:
            await trio.to_thread.run_sync(_get, ref, self.launcher.cfg.call_timeout_s + 2 * grace_s,
                                          abandon_on_cancel=True)
        except Exception as err:
            print(f"prorl-async: could not reap {self.name} on {self.host}: {_first_line(err)}", flush=True)

    def describe_exit(self, code: int) -> str:
        if code == NODE_LOST and self.process is not None:
            return f"was lost with its actor on {self.host or 'its node'} ({self.process.lost})"
        return f"exited with {code} on {self.host}"

    def tail(self, lines: int = 15) -> str:
        return read_tail(self.log_path, lines)


class RayLauncher:
    """Joins (or starts) the Ray cluster, places the processes, and lets go of everything at the end."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.full, self.cfg = cfg, cfg.cluster
        self.run_dir = run_dir.resolve()
        self.token = secrets.token_hex(16)
        self.started_cluster = False
        self.spans_machines = False
        self.learner_keys: CurveKeys | None = None
        self.generator_keys: CurveKeys | None = None
        self._host_cls: Any = None
        self._learner_pg: Any = None  # the learner's placement group: every rank's actor is in it

    # ---------------------------------------------------------------------------------- start / stop

    def connect(self) -> None:
        """Join or start the cluster; decide the learner's interface and CURVE; write the run-dir token."""
        try:
            import ray
        except ImportError:
            raise UserError("cluster.launcher = \"ray\" needs Ray: pip install 'prorl-async[ray]'") from None
        common = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                  "namespace": f"prorl-async-{self.token[:8]}"}
        address = self.cfg.address
        if address == "auto":
            try:
                ray.init(address="auto", **common)
            except ConnectionError:
                address = "local"
        if address == "local":
            ray.init(num_cpus=max(os.cpu_count() or 1, self._cpus_needed()), _node_ip_address="127.0.0.1", **common)
            self.started_cluster = True
        elif address != "auto":
            try:
                ray.init(address=address, **common)
            except ConnectionError as err:
                raise UserError(f"cluster.address = {address!r}: no Ray cluster there ({_first_line(err)})") from None
        addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        self.spans_machines = bool(self.cfg.interface) or len(addresses) > 1
        curve = self.cfg.curve == "on" or (self.cfg.curve == "auto" and self.spans_machines)
        if self.spans_machines and not curve:
            raise UserError(f"the cluster spans machines ({', '.join(sorted(addresses))}) and cluster.curve = "
                            "\"off\": the data plane would leave this machine unauthenticated; use \"auto\" or \"on\"")
        if curve:
            self.learner_keys, self.generator_keys = run_keys()
        write_atomic(self.run_dir / TOKEN_FILE, self.token + "\n")
        os.chmod(self.run_dir / TOKEN_FILE, 0o600)
        self._host_cls = ray.remote(ProcessHost)
        where = ("a cluster started here" if self.started_cluster
                 else f"the cluster at {ray.get_runtime_context().gcs_address}")
        print(f"ray: {len(addresses)} node address(es) on {where}; learner listens on "
              f"{'its node address' if self.spans_machines else 'loopback'}; CURVE {'on' if curve else 'off'}",
              flush=True)

    def close(self, children: list[RemoteChild]) -> None:
        """Kill every actor this run made, remove their placement groups, and leave (or stop) the cluster."""
        import ray

        for child in children:
            self.release(child)
        (self.run_dir / TOKEN_FILE).unlink(missing_ok=True)
        ray.shutdown()

    def _cpus_needed(self) -> int:
        total = self.cfg.learner_cpus * self.cfg.learner_ranks
        total += self.cfg.generator_cpus * self.full.generator.num_generators
        return int(total + 0.999)

    # ---------------------------------------------------------------------------------- placement

    def child(self, name: str, argv: list[str], log_path: Path, *, learner: bool = False, rank: int = 0) -> RemoteChild:
        return RemoteChild(name, argv, log_path, self, learner=learner, rank=rank)

    def place(self, child: RemoteChild) -> tuple[Any, Any]:
        """A placement group for ``child`` and its actor in it (blocking; waits ``placement_timeout_s``)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        index, owned = 0, True
        if child.learner:  # one bundle per learner node, holding its ranks; an actor per rank
            per_node = cfg.ranks_per_node
            actor = {"CPU": cfg.learner_cpus, **{k: v / per_node for k, v in cfg.learner_resources.items()}}
            if cfg.learner_gpus_per_node:
                actor["GPU"] = 1
            bundle = {k: v * per_node for k, v in actor.items()}
            bundles, strategy = [bundle] * cfg.learner_nodes, "STRICT_SPREAD" if cfg.learner_nodes > 1 else "PACK"
            index, owned = child.rank // per_node, child.rank == 0
        else:
            bundle = {"CPU": cfg.generator_cpus, **cfg.generator_resources}
            if cfg.generator_gpus:
                bundle["GPU"] = self.full.generator.tensor_parallel_size
            bundles, strategy, actor = [bundle], "STRICT_PACK", bundle  # one bundle: an engine's GPUs on one node
        if owned:
            pg = placement_group(bundles, strategy=strategy, name=f"{child.name}-{self.token[:8]}")
            try:
                ray.get(pg.ready(), timeout=cfg.placement_timeout_s)
            except ray.exceptions.GetTimeoutError:
                ray.util.remove_placement_group(pg)
                raise UserError(
                    f"the cluster could not place {child.name} within {cfg.placement_timeout_s:g} s: it asks for "
                    f"{len(bundles)} x {bundle} ({strategy}); free now: {_free(ray.available_resources())}"
                ) from None
            if child.learner:
                self._learner_pg = pg
        elif self._learner_pg is None:
            raise RuntimeError(f"{child.name} is placed with learner rank 0, which was not placed")
        else:
            pg = self._learner_pg
        env = self._env(child)
        options = {"num_cpus": actor["CPU"], "num_gpus": actor.get("GPU", 0),
                   "resources": {k: v for k, v in actor.items() if k not in ("CPU", "GPU")},
                   "max_restarts": 0 if child.learner else cfg.generator_max_restarts,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                           placement_group_bundle_index=index),
                   "name": f"{child.name}-{self.token[:8]}-{secrets.token_hex(2)}"}
        listens = child.learner and child.rank == 0  # the service, the weight group and the ranks' store
        bind = (cfg.interface if self.spans_machines else None) if listens else None
        if listens and self.spans_machines and bind is None:
            bind = ""  # the actor's node address
        handle = self._host_cls.options(**options).remote(child.name, child.argv, env, str(self.run_dir), self.token,
                                                          bind)
        return handle, pg if owned else None

    def release(self, child: RemoteChild) -> None:
        import ray

        if child.actor is not None:
            ray.kill(child.actor, no_restart=True)
            child.actor = None
        if child.pg is not None:
            with contextlib.suppress(Exception):  # already gone with its node
                ray.util.remove_placement_group(child.pg)
            child.pg = None

    def _env(self, child: RemoteChild) -> dict[str, str]:
        """What the run adds to the node's environment: the supervisor's child variables (not the driver's whole
        environment: a node has its own PATH, CUDA devices and home) and this process's CURVE keys."""
        env = {k: v for k, v in child.env.items() if k not in os.environ or os.environ[k] != v or k.startswith(
            ("PRORL_", "VLLM_", "TOKENIZERS_", "PYTHONUNBUFFERED", "OMP_", "WANDB_", "HF_"))}
        env.pop(SUPERVISOR_ENV, None)  # the actor names itself
        keys = self.learner_keys if child.learner else self.generator_keys
        if keys is not None:
            env[CURVE_KEYS_ENV] = keys.to_env()
        return env


def _free(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store"))}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "nothing"
