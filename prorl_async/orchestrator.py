"""``prorl-async run``: the supervisor. Starts the learner and N generator processes, watches them, stops them.

    supervisor (trio) ── learner process   python -m prorl_async.learner_service RUN_DIR
                     └─ generator i        python -m prorl_async.generator --config RUN_DIR/config.toml ...

Invariants:
- The learner binds every endpoint and writes ``RUN_DIR/endpoints.json``; generators start only after it
  exists and connect to what it names. Each process logs to ``RUN_DIR/logs/<name>.log``.
- The run ends when the learner ends (``max_steps``, time budget): it publishes ``Stop`` and the generators
  exit on it. A generator that dies is restarted with exponential backoff, from its last reported
  ``sampler_state`` (its unfinished prompts re-queued); a learner that dies ends the run with its exit code,
  the last lines of its log and the last checkpoint named.
- Ctrl-C / SIGTERM: SIGINT to the learner (it checkpoints and publishes ``Stop``), then every child is
  waited for and, past a grace period, killed — by the pids this supervisor started, never by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from prorl_async.config import Config, write_resolved
from prorl_async.errors import UserError
from prorl_async.metrics import read_metrics

_GRACE_S = 30.0  # how long children get to exit after Stop / SIGINT before they are killed
_MAX_BACKOFF_S = 60.0


def make_run_dir(cfg: Config) -> Path:
    """Expand ``{timestamp}`` in ``run.run_dir`` and create it (a fresh directory per run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.run.run_dir.replace("{timestamp}", stamp))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Child:
    """One supervised process: how to start it and what happened to it."""

    name: str
    argv: list[str]
    log_path: Path
    process: trio.Process | None = None
    restarts: int = 0

    async def start(self, env: dict[str, str], pids_file: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which stops the children
            # in order (learner first: checkpoint, then Stop to the generators).
            self.process = await trio.lowlevel.open_process(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                                            stdin=subprocess.DEVNULL, env=env,
                                                            start_new_session=True)
        pids = json.loads(pids_file.read_text()) if pids_file.exists() else {}
        pids[self.name] = self.process.pid
        pids_file.write_text(json.dumps(pids, indent=2) + "\n")  # RUN_DIR/pids.json: who is who, for people

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def child_env(cfg: Config, run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.generator.kv_cache_gib)
    env.setdefault("VLLM_CACHE_ROOT", str(run_dir / "vllm-cache"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(cfg: Config, resume: str | None = None) -> int:
    """Train with ``cfg`` until the learner finishes; returns the process exit status."""
    from prorl_async.models import resolve_model

    if resume is not None:
        raise UserError("--resume is not available yet (the checkpoint format lands with the resume work)")
    run_dir = make_run_dir(cfg)
    write_resolved(cfg, run_dir)
    print(f"run directory: {run_dir}", flush=True)
    resolve_model(cfg.model.name)  # build/convert once here, not in every child at the same time
    return trio.run(Supervisor(cfg, run_dir).main)


class Supervisor:
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.env = child_env(cfg, run_dir)
        self.pids_file = run_dir / "pids.json"
        py = sys.executable
        self.learner = Child("learner", [py, "-m", "prorl_async.learner_service", str(run_dir)],
                             run_dir / "logs" / "learner.log")
        self.generators: list[Child] = []
        self.stopping = False  # generators that exit from now on are not restarted
        self._interrupted = False
        self._reported = 0  # step records already printed

    async def main(self) -> int:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals_loop, nursery.cancel_scope)
                code = await self._run(nursery)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()
        return code

    async def _run(self, nursery: trio.Nursery) -> int:
        await self.learner.start(self.env, self.pids_file)
        endpoints = await self._wait_for_endpoints()
        if endpoints is None:
            return self._learner_failed()
        for i in range(self.cfg.generator.num_generators):
            log_path = self.run_dir / "logs" / f"generator-{i}.log"
            child = Child(f"generator-{i}", self._generator_argv(i, endpoints), log_path)
            self.generators.append(child)
            await child.start(self.env, self.pids_file)
            nursery.start_soon(self._watch_generator_loop, child, endpoints)
        nursery.start_soon(self._report_loop)
        assert self.learner.process is not None
        code = await self.learner.process.wait()
        self.stopping = True
        if code != 0 and not self._interrupted:
            return self._learner_failed()
        self._summary()
        return 130 if self._interrupted else 0

    async def _signals_loop(self, cancel_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self._interrupted:
                    cancel_scope.cancel()  # second Ctrl-C: stop waiting, shut down now
                    return
                self._interrupted = True
                self.stopping = True
                print("prorl-async: stopping (the learner writes a checkpoint; Ctrl-C again to abort)", flush=True)
                if self.learner.process is not None and self.learner.process.returncode is None:
                    self.learner.process.send_signal(signal.SIGINT)

    async def _wait_for_endpoints(self) -> dict | None:
        path = self.run_dir / "endpoints.json"
        assert self.learner.process is not None
        while not path.exists():
            if self.learner.process.poll() is not None:
                return None
            await trio.sleep(0.2)
        return json.loads(path.read_text())

    def _generator_argv(self, i: int, endpoints: dict, sampler_state: Path | None = None) -> list[str]:
        ws = endpoints["weight_sync"]
        argv = [sys.executable, "-m", "prorl_async.generator", "--config", str(self.run_dir / "config.toml"),
                "--generator-id", str(i), "--groups", endpoints["groups"], "--control", endpoints["control"],
                "--weight-sync", f"{ws['host']}:{ws['port']}", "--run-dir", str(self.run_dir)]
        if sampler_state is not None:
            argv += ["--sampler-state", str(sampler_state)]
        return argv

    async def _watch_generator_loop(self, child: Child, endpoints: dict) -> None:
        backoff = 1.0
        while True:
            assert child.process is not None
            started = time.monotonic()
            code = await child.process.wait()
            if self.stopping or code == 0:
                return
            if time.monotonic() - started > 5 * _MAX_BACKOFF_S:
                backoff = 1.0
            print(f"prorl-async: {child.name} exited with {code}; restarting in {backoff:.0f} s "
                  f"(log: {child.log_path})\n{child.tail(5)}", flush=True)
            await trio.sleep(backoff)
            backoff = min(2 * backoff, _MAX_BACKOFF_S)
            if self.stopping:
                return
            state = self._last_sampler_state(child)
            child.argv = self._generator_argv(int(child.name.rsplit("-", 1)[1]), endpoints, state)
            child.restarts += 1
            await child.start(self.env, self.pids_file)

    def _last_sampler_state(self, child: Child) -> Path | None:
        """The generator's last reported prompt position (unfinished prompts re-queued), from metrics.jsonl."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return None
        states = [r["sampler_state"] for r in read_metrics(path, kind="generator")
                  if "sampler_state" in r and r.get("source") == child.name]
        if not states:
            return None
        out = self.run_dir / f"{child.name}-sampler-state.json"
        state = states[-1]
        out.write_text(state if isinstance(state, str) else json.dumps(state))
        return out

    async def _report_loop(self) -> None:
        """Plain progress lines from the metrics file (the live TUI lands with the orchestrator issue)."""
        while True:
            await trio.sleep(self.cfg.run.log_every_s)
            self._report_new_steps()

    def _report_new_steps(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        steps = read_metrics(path, kind="step") if path.exists() else []
        for r in steps[self._reported :]:
            print(f"step {r['version']}: reward {r['reward_mean']:.3f}  loss {r['loss']:.4f}  kl {r['kl']:.2e}  "
                  f"staleness {r['staleness_mean']:.2f}  train {r['step_time_s']:.1f} s  wait {r['wait_s']:.1f} s  "
                  f"sync {r.get('sync_s', 0.0):.2f} s", flush=True)
        self._reported = len(steps)

    def _learner_failed(self) -> int:
        code = self.learner.process.returncode if self.learner.process else None
        checkpoints = sorted((self.run_dir / "checkpoints").glob("step-*"))
        last = checkpoints[-1] if checkpoints else "none"
        print(f"prorl-async: the learner stopped with exit code {code}; last checkpoint: {last}; "
              f"log: {self.learner.log_path}\n{self.learner.tail()}", file=sys.stderr, flush=True)
        return 1

    def _summary(self) -> None:
        self._report_new_steps()
        path = self.run_dir / "metrics.jsonl"
        steps = read_metrics(path, kind="step") if path.exists() else []
        if steps:
            first, last = steps[0]["reward_mean"], steps[-1]["reward_mean"]
            print(f"done: {len(steps)} steps, reward {first:.3f} -> {last:.3f}; metrics: {path}", flush=True)

    async def _shutdown(self) -> None:
        """Learner first (it checkpoints, then publishes Stop); generators get Stop, then SIGTERM, then SIGKILL."""
        self.stopping = True
        deadline = trio.current_time() + _GRACE_S
        for child in [self.learner, *self.generators]:
            if child.process is None:
                continue
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
