"""What the live TUI shows: a :class:`RunView` that follows ``RUN_DIR/metrics.jsonl`` and keeps a snapshot.

Invariants:
- the file is read incrementally: the view keeps a byte offset and consumes only complete lines (ending in
  ``\\n``), so a line the learner is still writing (a torn last line) is read on a later poll, whole;
- a line that is not a JSON object is counted in ``snapshot.malformed`` and skipped, never raised;
- a file that shrank (a new run in the same place) is read again from the start into a fresh snapshot;
- the snapshot holds the last record of each kind and source plus short trends; rendering reads it and
  computes nothing over the history, so a refresh costs the same at step 10 and at step 10,000;
- process states (``alive``, ``restarting``, ``exited``) come from the supervisor through
  :meth:`RunView.set_process_state`; without one (replay) a generator's state is derived from its records;
- the policy reward (every scored sample, smoothed over the last steps, with its change since the start), the first
  and the last validation and the start-up phases are kept as they arrive (:mod:`prorl_async.monitor.progress`);
  a record older than ``since_s`` (a resumed run's earlier starts) makes no phase line.

Why a file and not a socket: the learner already appends every metric there (the record of the run), and
a reader of an append-only file cannot slow training down or lose a record.

Usage::

    view = RunView("runs/tiny-20260101-000000")
    view.set_process_state("generator-0", "alive", pid=4242)
    view.poll()                   # reads what was appended since the last poll
    view.snapshot.step["loss"]    # the last step record's loss
"""

from __future__ import annotations

import itertools
import json
import time
import tomllib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prorl_async.monitor.progress import Phases, PolicyReward, add_step, pass_at_1

_READ_CHUNK = 1 << 20  # bytes per read
_POLL_BYTES = 16 << 20  # at most this much per poll: catching up on a long run never stalls the event loop
RATE_WINDOW_S = 30.0  # generator tokens/s: over the reports of this many seconds
TREND_STEPS = 32  # reward points kept for the sparklines (a narrow panel shows the last few)


@dataclass
class ProcessStatus:
    """One supervised process as the TUI shows it."""

    name: str
    state: str = "starting"
    """``alive`` / ``restarting`` / ``exited`` from the supervisor; else ``ready``, ``running``, ``finished``."""
    pid: int | None = None
    restarts: int = 0
    host: str = ""
    """The node's host name on a cluster (``cluster.launcher = "ray"``); empty on this machine."""
    supervised: bool = False
    """True once the supervisor set the state; records then no longer change it."""
    values: dict[str, Any] = field(default_factory=dict)
    """The last ``generator`` record of this source (empty for the learner and before the first report)."""
    sent: deque[tuple[float, float]] = field(default_factory=deque)
    """(time_s, tokens_sent) of the reports of the last :data:`RATE_WINDOW_S` seconds."""

    @property
    def recent_tokens_per_s(self) -> float | None:
        """Tokens sent per second over the last reports; the record's ``tokens_per_s`` averages since start-up
        (vLLM's load included), which hides a generator slowing down."""
        if len(self.sent) < 2 or self.sent[-1][0] <= self.sent[0][0]:
            return None
        (t0, n0), (t1, n1) = self.sent[0], self.sent[-1]
        return (n1 - n0) / (t1 - t0)


@dataclass
class Snapshot:
    """Everything on screen; plain data, replaced field by field as records arrive."""

    title: str = ""
    model: str | None = None
    max_steps: int | None = None
    time_budget_s: float | None = None
    batch_groups: int | None = None
    buffer_capacity: int | None = None
    auto_staleness: bool = False
    configured_bound: int | None = None
    """``buffer.max_staleness`` when fixed: the bound row shows it for records that predate the per-step field."""
    num_generators: int | None = None
    elapsed_s: float | None = None
    now_s: float | None = None
    """Wall clock of the view (the poll time live, the last record's time in a replay)."""
    version: int | None = None
    """The learner's version: its last step, or what it announced at start (``learner_ready``, ``resumed``)."""
    step: dict[str, Any] = field(default_factory=dict)
    """The last ``step`` record."""
    learner: ProcessStatus = field(default_factory=lambda: ProcessStatus("learner"))
    learner_ranks: dict[str, ProcessStatus] = field(default_factory=dict)
    """Ranks 1.. of a learner of several (``learner-1``, ...); rank 0 is ``learner``."""
    generators: dict[str, ProcessStatus] = field(default_factory=dict)
    reward_trend: dict[str, deque[float]] = field(default_factory=dict)
    """Batch reward (filtered): ``"all"`` (reward_mean) and each domain, the last :data:`TREND_STEPS` step values."""
    policy: dict[str, PolicyReward] = field(default_factory=dict)
    """The policy reward (every scored sample that arrived, smoothed): ``"all"`` and each domain."""
    resets: list[tuple[int, str]] = field(default_factory=list)
    """(learner version, reason) of every reference reset."""
    validation: dict[str, Any] = field(default_factory=dict)
    """The last ``validation`` record."""
    first_validation: dict[str, Any] = field(default_factory=dict)
    """The first complete ``validation`` record with a pass@1: what later rounds are compared with."""
    validating: dict[str, Any] = field(default_factory=dict)
    """The last ``validation_requested`` event while its round runs (empty once a record follows)."""
    phases: Phases = field(default_factory=Phases)
    """Start-up and stop phases, one line each."""
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=3))
    last_checkpoint: str | None = None
    records: int = 0
    malformed: int = 0


class RunView:
    """Follows a metrics file (or is fed records) and keeps the :class:`Snapshot` the TUI renders.

    ``clock`` gives the wall time used for the header's elapsed time (``None``: the records' own times,
    what a replay and the tests use). ``config`` is the resolved run config as a dict; by default it is
    read from ``config.toml`` beside the metrics file once that exists. ``since_s``: records older than this
    (wall clock) make no start-up phase line (the supervisor passes its own start).
    """

    def __init__(self, run_dir: str | Path | None = None, *, metrics_path: str | Path | None = None,
                 title: str | None = None, config: Mapping[str, Any] | None = None,
                 clock: Callable[[], float] | None = time.time, since_s: float | None = None) -> None:
        if metrics_path is None:
            if run_dir is None:
                raise ValueError("RunView needs run_dir or metrics_path")
            metrics_path = Path(run_dir) / "metrics.jsonl"
        self.path = Path(metrics_path)
        self.clock = clock
        self._title = title or self.path.resolve().parent.name
        self._config = dict(config) if config is not None else None
        self._offset = 0
        self._inode: int | None = None
        self._pending_states: dict[str, tuple[str, int | None, int, str]] = {}
        self._since_s = since_s
        self._phase_counter = itertools.count(1)  # phase numbers stay increasing across fresh snapshots
        self.snapshot = self._fresh_snapshot()

    # ------------------------------------------------------------------------------------ input

    def poll(self) -> int:
        """Read the complete lines appended since the last poll; returns how many records were applied."""
        if self._config is None:
            self._load_config()
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._tick()
            return 0
        if stat.st_size < self._offset or stat.st_ino != self._inode:  # replaced or truncated: read it afresh
            self._offset, self._inode = 0, stat.st_ino
            self.snapshot = self._fresh_snapshot()
        applied, budget, tail = 0, _POLL_BYTES, b""
        with self.path.open("rb") as f:
            f.seek(self._offset)
            while (budget > 0 or tail) and (chunk := f.read(_READ_CHUNK)):  # a giant line is read whole
                budget -= len(chunk)
                data = tail + chunk  # tail starts at self._offset: the unfinished line of the previous chunk
                end = data.rfind(b"\n")
                if end < 0:
                    tail = data
                    continue
                for line in data[: end + 1].splitlines():
                    applied += self.feed_line(line)
                self._offset += end + 1
                tail = data[end + 1 :]
        self._tick()
        return applied

    def feed_line(self, line: bytes | str) -> int:
        """Apply one line of a metrics file; 1 if it held a record, 0 if it was blank or malformed."""
        if not line.strip():
            return 0
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.snapshot.malformed += 1
            return 0
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            self.snapshot.malformed += 1
            return 0
        self.feed(record)
        return 1

    def feed(self, record: dict[str, Any]) -> None:
        """Apply one record (a dict as ``MetricsLog.write`` returns it)."""
        snap = self.snapshot
        snap.records += 1
        if isinstance(record.get("time_s"), int | float):
            snap.now_s = max(snap.now_s or 0.0, float(record["time_s"]))
        if isinstance(record.get("elapsed_s"), int | float):
            snap.elapsed_s = float(record["elapsed_s"])
            if isinstance(record.get("time_s"), int | float):
                self._started_s = float(record["time_s"]) - float(record["elapsed_s"])
        snap.phases.record(record)
        kind = record["kind"]
        if kind == "step":
            self._on_step(record)
        elif kind == "generator" and isinstance(record.get("source"), str):
            self._on_generator(record)
        elif kind == "event":
            self._on_event(record)
        elif kind == "reset":
            self._add_reset(record.get("version"), str(record.get("reason", record.get("reset_reason", ""))))
        elif kind == "validation":
            snap.validation, snap.validating = record, {}
            if not snap.first_validation and record.get("complete") is not False and pass_at_1(record) is not None:
                snap.first_validation = record

    def set_process_state(self, name: str, state: str, pid: int | None = None, restarts: int = 0,
                          host: str = "") -> None:
        """What the supervisor knows of a process: ``alive``, ``restarting``, ``exited`` (or any short word), and
        the host it runs on (on a cluster; empty on this machine)."""
        self._pending_states[name] = (state, pid, restarts, host)  # survives a fresh snapshot (file replaced)
        if name == "learner":
            proc = self.snapshot.learner
        elif name.startswith("learner-"):
            proc = self.snapshot.learner_ranks.setdefault(name, ProcessStatus(name))
        else:
            proc = self._generator(name)
        proc.state, proc.pid, proc.restarts, proc.host, proc.supervised = state, pid, restarts, host, True
        now = self.clock() if self.clock is not None else self.snapshot.now_s
        if now is not None:
            self.snapshot.phases.process(name, state, pid, now)

    # ---------------------------------------------------------------------------------- records

    def _on_step(self, record: dict[str, Any]) -> None:
        snap = self.snapshot
        snap.step = record
        if isinstance(record.get("version"), int):
            snap.version = record["version"]
        if not snap.learner.supervised:
            snap.learner.state = "running"
        add_step(snap.policy, record)
        if isinstance(record.get("reward_mean"), int | float):
            self._trend("all", float(record["reward_mean"]))
        by_domain = record.get("reward_by_domain")
        if isinstance(by_domain, dict):
            for domain, value in sorted(by_domain.items()):
                if isinstance(value, int | float):
                    self._trend(str(domain), float(value))
        if record.get("reset") or record.get("reset_reason"):
            self._add_reset(record.get("version"), str(record.get("reset_reason") or ""))

    def _on_generator(self, record: dict[str, Any]) -> None:
        gen = self._generator(record["source"])
        gen.values = record
        if not gen.supervised:
            gen.state = "finished" if record.get("final") else "running"
        t, n = record.get("time_s"), record.get("tokens_sent")
        if isinstance(t, int | float) and isinstance(n, int | float):
            if gen.sent and n < gen.sent[-1][1]:  # a restarted generator counts from 0 again
                gen.sent.clear()
            gen.sent.append((float(t), float(n)))
            while gen.sent[-1][0] - gen.sent[0][0] > RATE_WINDOW_S:
                gen.sent.popleft()

    def _on_event(self, record: dict[str, Any]) -> None:
        snap = self.snapshot
        snap.events.append(record)
        name = record.get("event")
        if name == "validation_requested":
            snap.validating = record
        if name in ("learner_ready", "resumed") and isinstance(record.get("version"), int):
            snap.version = record["version"]
        if name == "learner_ready" and not snap.learner.supervised:
            snap.learner.state = "ready"
        elif name == "checkpoint":
            snap.last_checkpoint = Path(str(record.get("path", ""))).name or None
        elif name == "generator_ready" and isinstance(record.get("source"), str):
            gen = self._generator(record["source"])
            if not gen.supervised and not gen.values:
                gen.state = "ready"

    def _add_reset(self, version: Any, reason: str) -> None:
        version = int(version) if isinstance(version, int | float) else -1
        if all(v != version for v, _ in self.snapshot.resets):  # a step record and a reset record name one reset
            self.snapshot.resets.append((version, reason))

    def _trend(self, key: str, value: float) -> None:
        self.snapshot.reward_trend.setdefault(key, deque(maxlen=TREND_STEPS)).append(value)

    def _generator(self, name: str) -> ProcessStatus:
        gens = self.snapshot.generators
        if name not in gens:
            gens[name] = ProcessStatus(name)
            self.snapshot.generators = dict(sorted(gens.items(), key=lambda kv: _natural_key(kv[0])))
        return self.snapshot.generators[name]

    # ------------------------------------------------------------------------------ run settings

    def _fresh_snapshot(self) -> Snapshot:
        self._started_s: float | None = None
        snap = Snapshot(title=self._title, phases=Phases(self._since_s, counter=self._phase_counter))
        self.snapshot = snap
        if self._config is not None:
            self._apply_config(self._config)
        for name, (state, pid, restarts, host) in self._pending_states.items():
            self.set_process_state(name, state, pid, restarts, host)
        return snap

    def _load_config(self) -> None:
        path = self.path.parent / "config.toml"
        try:
            self._config = tomllib.loads(path.read_text())
        except (FileNotFoundError, tomllib.TOMLDecodeError):
            return
        self._apply_config(self._config)

    def _apply_config(self, cfg: Mapping[str, Any]) -> None:
        from prorl_async.learner.buffer import admission_capacity

        run, learner, buffer = cfg.get("run", {}), cfg.get("learner", {}), cfg.get("buffer", {})
        snap = self.snapshot
        snap.model = cfg.get("model", {}).get("name")
        snap.max_steps = run.get("max_steps")
        snap.time_budget_s = run.get("time_budget_s")
        snap.num_generators = cfg.get("generator", {}).get("num_generators")
        snap.batch_groups = learner.get("batch_groups")
        snap.phases.batch_groups = snap.batch_groups
        snap.auto_staleness = buffer.get("max_staleness") == "auto"
        ceiling = buffer.get("auto_max_staleness") if snap.auto_staleness else buffer.get("max_staleness")
        snap.configured_bound = None if snap.auto_staleness or not isinstance(ceiling, int) else ceiling
        if isinstance(snap.batch_groups, int) and isinstance(ceiling, int):
            snap.buffer_capacity = admission_capacity(snap.batch_groups, ceiling)
        for i in range(snap.num_generators or 0):  # a row per generator before its first report
            self._generator(f"generator-{i}")

    def _tick(self) -> None:
        """Live: the header's clock (and the time in the current start-up phase) runs between records."""
        if self.clock is None:
            return
        now = self.clock()
        self.snapshot.now_s = max(self.snapshot.now_s or 0.0, now)
        if self._started_s is not None:
            self.snapshot.elapsed_s = max(self.snapshot.elapsed_s or 0.0, now - self._started_s)


def _natural_key(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, -1)
