"""``prorl-async run``: the supervisor. Starts the learner and N generator processes, watches them, stops them.

    supervisor (trio) ── learner process   python -m prorl_async.learner RUN_DIR [--rank 0 --world W ...]
                     ├─ learner-r (r >= 1) python -m prorl_async.learner RUN_DIR --rank r --world W ...
                     └─ generator i        python -m prorl_async.generator --config RUN_DIR/config.toml ...

Where they run is the launcher's (``cluster.launcher``): children of this process (``local``, :class:`Child`), or
children of Ray actors on a cluster's nodes (``ray``, :mod:`prorl_async.supervisor.ray_launcher`), supervised the
same way.

Invariants:
- The learner binds every endpoint and writes ``RUN_DIR/endpoints.json``; generators start only after it
  exists and connect to what it names. Each process logs to ``RUN_DIR/logs/<name>.log``.
- The run ends when the learner ends (``max_steps``, time budget): it publishes ``Stop`` and the generators
  exit on it. A generator that dies is restarted with exponential backoff, as it was started: generators keep
  no state, the learner hands the requests the dead process held out again when the new one says Ready; it
  rejoins the weight group and the learner catches it up to the current weights. A learner
  that dies ends the run with its exit code, the last lines of its log and the last checkpoint named.
- A learner of several ranks (``cluster.learner_ranks``, :mod:`prorl_async.learner.ranks`): rank 0 is ``learner``
  (the service; what the rest of this says of the learner), ranks r >= 1 are ``learner-r``, started with it and
  stopped by it (``STOP``). A rank >= 1 that dies ends the run: rank 0 is killed (it cannot checkpoint without the
  rank's shard) and the last complete checkpoint is named.
- Ctrl-C / SIGTERM: SIGINT to the learner (it checkpoints and publishes ``Stop``), then every child is
  waited for and, past a grace period, killed — by the pids this supervisor started, never by name. Children
  watch this process (``lifecycle``): if the supervisor is killed outright they stop themselves. A stop says what
  it does as it goes (the learner interrupted, its checkpoint, each child still running), during start-up too.
- Start-up phases (learner loading the model, listening, each generator's engine starting, the weight group
  joined, the first batch, the first step and what each phase cost) are the view's
  (:class:`~prorl_async.monitor.progress.Phases`, fed from the processes' states and the records written since this
  supervisor started): plain lines, or the live screen's status line.
- The run ends with :func:`~prorl_async.supervisor.summary.closing_lines`, printed once every process stopped: steps,
  policy reward, validation, batch reward, the metrics file and the newest checkpoint (or that there is none) —
  after a normal end and after Ctrl-C alike; a learner that failed gets its exit code and log tail instead.
- ``--resume RUN_DIR``: the same directory, config and metrics file; the learner starts from the newest
  complete checkpoint (weights, optimizer, buffered groups, the prompt order with the requests that were in
  flight re-queued, counters), so nothing is lost and nothing is trained on twice.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from prorl_async.config import Config, load_config, write_resolved
from prorl_async.errors import UserError
from prorl_async.monitor.metrics import read_metrics
from prorl_async.monitor.tui.view import RunView
from prorl_async.supervisor.lifecycle import process_table, supervisor_env
from prorl_async.supervisor.summary import closing_lines
from prorl_async.utils.fs import read_tail, write_atomic
from prorl_async.utils.run_dir import latest_checkpoint

if TYPE_CHECKING:
    from prorl_async.supervisor.ray_launcher import RayLauncher

_GRACE_S = 30.0  # how long children get to exit after Stop / SIGINT before they are killed
_MAX_BACKOFF_S = 60.0


def make_run_dir(cfg: Config) -> Path:
    """Expand ``{timestamp}`` in ``run.run_dir`` and create it (a fresh directory per run). A directory used before
    loses its endpoints.json: the generators wait for the file the new learner writes, not the old one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.run.run_dir.replace("{timestamp}", stamp))
    path.mkdir(parents=True, exist_ok=True)
    (path / "endpoints.json").unlink(missing_ok=True)
    return path


@dataclass
class Child:
    """One supervised process: how to start it and what happened to it."""

    name: str
    argv: list[str]
    """The command line after ``python``."""
    log_path: Path
    process: trio.Process | None = None
    restarts: int = 0
    host: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    """Added to the environment it starts with (a learner rank's ``LOCAL_RANK``)."""

    async def start(self, env: dict[str, str], pids_file: Path) -> None:
        env = {**env, **self.extra_env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which stops the children
            # in order (learner first: checkpoint, then Stop to the generators).
            self.process = await trio.lowlevel.open_process([sys.executable, *self.argv], stdout=log,
                                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                            env=env, start_new_session=True)
        pids = json.loads(pids_file.read_text()) if pids_file.exists() else {}
        pids[self.name] = self.process.pid
        write_atomic(pids_file, json.dumps(pids, indent=2) + "\n")  # RUN_DIR/pids.json: who is who, for people

    async def reap_group(self, grace_s: float = 5.0) -> None:
        """After the process ended: stop what it left in its process group (vLLM's engine core, scoring workers).

        Each child leads a session and process group of its own, and the processes it forks stay in that
        group, so this reaches exactly the processes this supervisor's child started — and only those.
        """
        if self.process is None:
            return
        pgid = self.process.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _group_alive(pgid):
                return
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                return
            for _ in range(int(grace_s * 10)):
                await trio.sleep(0.1)
                if not _group_alive(pgid):
                    return
        print(f"prorl-async: processes left by {self.name} (group {pgid}) survived SIGKILL", flush=True)

    def describe_exit(self, code: int) -> str:
        return f"exited with {code}"

    def tail(self, lines: int = 15) -> str:
        return read_tail(self.log_path, lines)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. Zombies do not count: re-parented ones may never be reaped
    (a container's pid 1 need not reap), and ``killpg(pgid, 0)`` would keep finding them."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return any(group == pgid and state not in ("Z", "X") for state, _, group in process_table().values())


def child_env(cfg: Config, run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.generator.kv_cache_gib)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return supervisor_env(env)


def resume_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The saved config of the run in ``run_dir``, with ``overrides`` (e.g. a higher ``run.max_steps``)."""
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise UserError(f"--resume {run_dir}: no config.toml there (not a run directory)")
    return load_config(path, overrides)


def run(cfg: Config, resume: str | None = None) -> int:
    """Train with ``cfg`` until the learner finishes; returns the process exit status.

    With ``resume`` (a run directory), continue that run from its newest complete checkpoint.
    """
    from prorl_async.envs.preview import absolute_paths, check_sources
    from prorl_async.models import resolve_model
    from prorl_async.monitor.wandb_sink import check_tracking

    check_tracking(cfg.tracking)  # a missing tracker package is a one-line error here, not a dead learner later
    if resume is None:
        cfg = absolute_paths(cfg)  # config.toml names the same data and reward files from any directory
    check_sources(cfg)  # a missing file or column, a reward that does not import: one line, before any model loads
    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise UserError(f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")
        (run_dir / "endpoints.json").unlink(missing_ok=True)  # the learner writes fresh ones
        print(f"resuming {run_dir} from {checkpoint}", flush=True)
    else:
        run_dir = make_run_dir(cfg)
        print(f"run directory: {run_dir}", flush=True)
    write_resolved(cfg, run_dir)
    resolve_model(cfg.model.name)  # build/convert once here, not in every child at the same time
    launcher = None
    if cfg.cluster.launcher == "ray":
        from prorl_async.supervisor.ray_launcher import RayLauncher

        launcher = RayLauncher(cfg, run_dir)
        launcher.connect()
    return trio.run(Supervisor(cfg, run_dir, checkpoint, launcher).main)


class Supervisor:
    def __init__(self, cfg: Config, run_dir: Path, resume_from: Path | None = None,
                 launcher: RayLauncher | None = None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.launcher = launcher  # None: every process is a child of this one
        self.env = child_env(cfg, run_dir)
        self.pids_file = run_dir / "pids.json"
        where = run_dir.resolve() if launcher is not None else run_dir  # an actor's working directory is not ours
        argv = ["-m", "prorl_async.learner", str(where)]
        if resume_from is not None:
            argv += ["--resume", str(resume_from.resolve() if launcher is not None else resume_from)]
        self.learner = self._child("learner", argv, learner=True)
        self.learner_ranks: list[Child] = []  # ranks 1.. of a learner of several (prorl_async.learner.ranks)
        world = cfg.cluster.learner_ranks
        if world > 1:
            nonce = secrets.token_hex(8)
            base = list(argv)  # rank 0's argv is extended in place below
            for rank in range(world):
                name = f"learner-{rank}"
                child = self.learner if rank == 0 else self._child(name, list(base), learner=True, rank=rank)
                child.argv += ["--rank", str(rank), "--world", str(world), "--rendezvous", nonce]
                # On one machine a rank's device is its LOCAL_RANK; a Ray actor sees only the GPU it was given.
                local = rank % cfg.cluster.ranks_per_node if launcher is None else 0
                child.extra_env["LOCAL_RANK"] = str(local)
                if rank:
                    self.learner_ranks.append(child)
        self._failed_rank: Child | None = None  # a rank > 0 that died, which ended the run
        self.generators: list[Child] = []
        self.stopping = False  # generators that exit from now on are not restarted
        self._interrupted = False
        self._ended = False  # the learner ended (finished or interrupted): the closing lines are due
        self.started_s = time.time()  # records older than this (a resumed run's) make no start-up phase line

    async def main(self) -> int:
        code = 130  # unless _run returns: a second Ctrl-C cancels it
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals_loop, nursery.cancel_scope)
                code = await self._run(nursery)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()
                if self.launcher is not None:  # the actors and placement groups go with the run
                    await trio.to_thread.run_sync(self.launcher.close,
                                                  [*self.learner_ranks, self.learner, *self.generators])
        if self._ended or self._interrupted:  # every process stopped: the newest checkpoint is the last one
            self._summary()
        return code

    async def _run(self, nursery: trio.Nursery) -> int:
        nursery.start_soon(self._report_loop)  # the screen is up while the learner starts
        await self.learner.start(self.env, self.pids_file)
        for child in self.learner_ranks:  # they wait for rank 0's rendezvous file
            await child.start(self.env, self.pids_file)
            nursery.start_soon(self._watch_rank_loop, child)
        endpoints = await self._wait_for_endpoints()
        if endpoints is None:  # the learner ended before it listened
            if self._interrupted:
                return 130
            return self._learner_failed()
        for i in range(self.cfg.generator.num_generators):
            child = self._child(f"generator-{i}", self._generator_argv(i, endpoints))
            self.generators.append(child)
            await child.start(self.env, self.pids_file)
            nursery.start_soon(self._watch_generator_loop, child, endpoints)
        assert self.learner.process is not None
        code = await self.learner.process.wait()
        self.stopping = True
        if code != 0 and not self._interrupted:
            return self._learner_failed()
        self._ended = True
        return 130 if self._interrupted else 0

    async def _watch_rank_loop(self, child: Child) -> None:
        """A learner rank > 0 that dies ends the run: the others cannot step without its shard."""
        assert child.process is not None
        code = await child.process.wait()
        if self.stopping or code == 0:
            return
        self._failed_rank = child
        print(f"prorl-async: {child.name} {child.describe_exit(code)}: the learner cannot go on without this rank; "
              f"stopping the run (log: {child.log_path})\n{child.tail(5)}", flush=True)
        learner = self.learner.process
        if learner is not None and learner.returncode is None:
            learner.kill()  # it cannot checkpoint without the rank: the last complete checkpoint stands

    def _child(self, name: str, argv: list[str], learner: bool = False, rank: int = 0) -> Child:
        log_path = self.run_dir / "logs" / f"{name}.log"
        if self.launcher is not None:
            return self.launcher.child(name, argv, log_path, learner=learner, rank=rank)  # type: ignore[return-value]
        return Child(name, argv, log_path)

    async def _signals_loop(self, cancel_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self._interrupted:
                    cancel_scope.cancel()  # second Ctrl-C: stop waiting, shut down now
                    return
                self._interrupted = True
                self.stopping = True
                print("prorl-async: stopping: the learner ends the step in progress (if any), writes a checkpoint and "
                      "stops the generators (Ctrl-C again to abort)", flush=True)
                if self.learner.process is not None and self.learner.process.returncode is None:
                    self.learner.process.send_signal(signal.SIGINT)

    async def _wait_for_endpoints(self) -> dict | None:
        """What the learner bound (``RUN_DIR/endpoints.json``), or None when it ended before it listened."""
        path = self.run_dir / "endpoints.json"
        process = self.learner.process
        assert process is not None
        async with trio.open_nursery() as nursery:

            async def learner_ended() -> None:
                await process.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(learner_ended)
            while not path.exists():
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        return json.loads(path.read_text()) if path.exists() else None

    def _generator_argv(self, i: int, endpoints: dict) -> list[str]:
        ws = endpoints["weight_sync"]
        run_dir = self.run_dir.resolve() if self.launcher is not None else self.run_dir
        return ["-m", "prorl_async.generator", "--config", str(run_dir / "config.toml"),
                "--generator-id", str(i), "--groups", endpoints["groups"], "--control", endpoints["control"],
                "--weight-sync", f"{ws['host']}:{ws['port']}", "--run-dir", str(run_dir)]

    async def _watch_generator_loop(self, child: Child, endpoints: dict) -> None:
        backoff = 1.0
        while True:
            assert child.process is not None
            started = time.monotonic()
            code = await child.process.wait()
            await child.reap_group()
            if self.stopping or code == 0:
                return
            if time.monotonic() - started > 5 * _MAX_BACKOFF_S:
                backoff = 1.0
            print(f"prorl-async: {child.name} {child.describe_exit(code)}; restarting in {backoff:.0f} s "
                  f"(log: {child.log_path})\n{child.tail(5)}", flush=True)
            await trio.sleep(backoff)
            backoff = min(2 * backoff, _MAX_BACKOFF_S)
            if self.stopping:
                return
            child.restarts += 1  # the same argv: a generator keeps no state, the learner hands its prompts out again
            await child.start(self.env, self.pids_file)

    async def _report_loop(self) -> None:
        """The live TUI on a terminal, plain lines otherwise (``run.tui``); both follow RUN_DIR/metrics.jsonl."""
        from prorl_async.monitor.tui.app import live_loop, plain_loop, wants_live

        view = RunView(self.run_dir, title=self.run_dir.name, since_s=self.started_s)
        if wants_live(self.cfg.run.tui):
            await live_loop(view, before_refresh=self._process_states)
        else:
            await plain_loop(view, every_s=self.cfg.run.log_every_s, before_refresh=self._process_states)

    def _process_states(self, view: RunView) -> None:
        for child in [self.learner, *self.learner_ranks, *self.generators]:
            if child.process is not None:
                code = child.process.returncode
                state = "alive" if code is None else "exited" if self.stopping or code == 0 else "restarting"
                view.set_process_state(child.name, state, pid=child.process.pid, restarts=child.restarts,
                                       host=child.host)

    def _learner_failed(self) -> int:
        code = self.learner.process.returncode if self.learner.process else None
        last = latest_checkpoint(self.run_dir) or "none"
        how = "stopped" if code is None else self.learner.describe_exit(code)
        if (rank := self._failed_rank) is not None and rank.process is not None:
            how = f"was stopped: {rank.name} {rank.describe_exit(rank.process.returncode or 0)} (log: {rank.log_path})"
        print(f"prorl-async: the learner {how}; last checkpoint: {last}; "
              f"log: {self.learner.log_path}\n{self.learner.tail()}", file=sys.stderr, flush=True)
        return 1

    def _summary(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        records = read_metrics(path) if path.exists() else []
        for line in closing_lines(records, metrics_path=path, run_dir=self.run_dir,
                                  checkpoint=latest_checkpoint(self.run_dir), interrupted=self._interrupted):
            print(line, flush=True)

    async def _shutdown(self) -> None:
        """Learner first (it checkpoints, then publishes Stop); generators get Stop, then SIGTERM, then SIGKILL."""
        self.stopping = True
        deadline = trio.current_time() + _GRACE_S
        for child in [self.learner, *self.learner_ranks, *self.generators]:
            if child.process is None:
                continue
            if self._interrupted and child.process.returncode is None:
                print(f"prorl-async: waiting for {child.name} (pid {child.process.pid}) to stop", flush=True)
            with trio.move_on_at(min(deadline, trio.current_time() + _GRACE_S / 3)):
                await child.process.wait()
            if child.process.returncode is None:  # e.g. busy in a weight-sync wait when Stop arrived
                child.process.terminate()
                with trio.move_on_at(deadline):
                    await child.process.wait()
            if child.process.returncode is None:
                print(f"prorl-async: {child.name} (pid {child.process.pid}) did not exit; killing it", flush=True)
                child.process.kill()
                await child.process.wait()
            await child.reap_group(grace_s=2.0)
