"""A learner of several ranks: rank 0 runs the service and leads, the other ranks follow its commands.

    rank 0: LearnerService ── LeadingLearner ── command ─(gloo broadcast)─► rank r: follow() ── Learner
                                   └── Learner ◄────────── FSDP2 collectives (NCCL / gloo) ──────────► Learner

The service (sockets, buffer, dispatch, checkpoints) runs on rank 0 only; every rank holds a shard of the policy
and the reference (:class:`~prorl_async.learner.trainer.Learner` under FSDP2). The ranks are processes started by
the launcher (``cluster.learner_nodes x cluster.ranks_per_node``): ``python -m prorl_async.learner RUN_DIR --rank R
--world W --rendezvous NONCE``.

- **Rendezvous.** Rank 0 opens the world group's store on ``weight_sync.host`` (loopback on one machine, the node's
  address when a launcher spans machines; the store listens there only) on a free port and writes host, port and
  the launch's nonce to ``RUN_DIR/learner-ranks.json`` (storage every node sees). The other ranks wait for a file
  with their nonce (a file left by an earlier launch is never joined) for ``cluster.placement_timeout_s``.
- **Commands.** Every collective rank 0's learner makes (a trainer step, the weights gathered for a broadcast, a
  checkpoint) is preceded by the command that makes every follower make it too, under one lock: the ranks never
  disagree on what they are in. A command is an int64 header (code, length) and a msgpack body broadcast on a
  gloo group of its own (CPU tensors, even when the model's group is NCCL): a batch travels as its seven tensors'
  raw bytes. Nothing is pickled.
- **Same state on every rank.** Validation rewards for the reset policy's plateau trigger travel with the next
  command and are applied on every rank before it, so every rank's reset decision is the same (the KL share it
  also reads is reduced over the ranks already).
- **Weights.** :meth:`LeadingLearner.weights` gathers every parameter in full on every rank before it returns them
  (rank 0 keeps the list): a consumer that stops early (a failed broadcast) cannot leave a follower inside a
  gather.
- **No hang.** While no command runs, rank 0 pings every :data:`PING_S`; a follower that hears nothing for
  :data:`HEARING_S` (rank 0 frozen, its node gone silently), or whose leader is gone (a gloo error), exits with 1
  and says so. A follower that dies makes rank 0's next command fail; the supervisor stops the run on either.
- **The end.** :meth:`LeadingLearner.close` sends ``STOP``: followers exit with 0.

Usage (rank 0, in the learner service; the other ranks run :func:`follow`)::

    commands = join_ranks(cfg, run_dir, spec)           # the world group, and the command group
    learner = LeadingLearner(Learner(cfg), commands)    # the Learner's surface; every rank follows its collectives
    learner.train_step(batch); learner.weights(); learner.save_checkpoint(path)
    learner.close()                                     # STOP
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import timedelta
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import torch
import torch.distributed as dist

from prorl_async.learner.batch import GroupBatch
from prorl_async.utils.fs import write_atomic

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.learner.trainer import Learner, StepMetrics

log = logging.getLogger("prorl_async.learner.ranks")

RENDEZVOUS_FILE = "learner-ranks.json"
PING_S = 5.0
"""Rank 0 pings the followers after this long without a command."""
HEARING_S = 120.0
"""A follower that hears nothing from rank 0 for this long exits (gloo's timeout on the command group)."""
COLLECTIVE_TIMEOUT_S = 1800.0
"""The longest one collective of the model's group may wait for a rank (a step's rank that lags, a lost node)."""
_DTYPES = {"int64", "float32", "float64"}  # the only dtypes a GroupBatch holds


class Command(IntEnum):
    PING = 0
    TRAIN = 1
    WEIGHTS = 2
    SAVE = 3
    STOP = 4


@dataclass(frozen=True)
class RankSpec:
    """This process's place among the learner's ranks (from ``--rank``, ``--world``, ``--rendezvous``)."""

    rank: int
    world: int
    nonce: str

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"--rank {self.rank} is outside a world of {self.world}")


# ------------------------------------------------------------------------------------------ rendezvous


def join_ranks(cfg: Config, run_dir: Path, spec: RankSpec) -> Any:
    """Initialise ``torch.distributed`` for the learner's ranks; returns the command group (gloo).

    The model's group is NCCL on GPUs and gloo on CPU; the store listens on ``weight_sync.host`` only.
    """
    from prorl_async.transport.weights.sender import tcp_store

    timeout_s = cfg.cluster.placement_timeout_s
    path = run_dir / RENDEZVOUS_FILE
    if spec.rank == 0:
        store = tcp_store(cfg.weight_sync.host, 0, master=True, timeout_s=timeout_s)
        where = {"nonce": spec.nonce, "host": cfg.weight_sync.host, "port": store.port, "world": spec.world}
        write_atomic(path, json.dumps(where, indent=2) + "\n")
    else:
        where = wait_for_leader(path, spec.nonce, timeout_s)
        store = tcp_store(where["host"], int(where["port"]), master=False, timeout_s=timeout_s)
    gpu = torch.cuda.is_available() and cfg.learner.device != "cpu"
    dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo", store=store, rank=spec.rank,
                            world_size=spec.world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=HEARING_S))


def wait_for_leader(path: Path, nonce: str, timeout_s: float) -> dict[str, Any]:
    """What rank 0 of this launch wrote to ``path``; TimeoutError after ``timeout_s`` without it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            where = json.loads(path.read_text())
            if where.get("nonce") == nonce:
                return where
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 of the learner did not write {path} within {timeout_s:g} s "
                               "(cluster.placement_timeout_s): is it running, and does this node see RUN_DIR?")
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------ commands


class CommandChannel:
    """Rank 0 broadcasts ``(code, body)``; the other ranks receive it. The body is msgpack (no pickle)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def send(self, code: Command, body: dict[str, Any]) -> None:
        payload = msgpack.packb(body, use_bin_type=True)
        dist.broadcast(torch.tensor([int(code), len(payload)], dtype=torch.int64), src=0, group=self.group)
        dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=self.group)

    def receive(self) -> tuple[Command, dict[str, Any]]:
        header = torch.empty(2, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.group)
        code, size = (int(v) for v in header.tolist())
        data = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.group)
        return Command(code), msgpack.unpackb(data.numpy().tobytes(), raw=False)


def pack_batch(batch: GroupBatch) -> dict[str, Any]:
    """A batch's tensors as dtype, shape and raw bytes."""
    out = {}
    for f in fields(GroupBatch):
        array = getattr(batch, f.name).numpy()
        out[f.name] = [str(array.dtype), list(array.shape), np.ascontiguousarray(array).tobytes()]
    return out


def unpack_batch(body: dict[str, Any]) -> GroupBatch:
    """The batch :func:`pack_batch` packed; ValueError on a dtype a batch never holds."""
    tensors = {}
    for f in fields(GroupBatch):
        dtype, shape, raw = body[f.name]
        if dtype not in _DTYPES:
            raise ValueError(f"batch field {f.name}: dtype {dtype!r}")
        tensors[f.name] = torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy())
    return GroupBatch(**tensors)


def _observe(learner: Learner, observations: list[list[float]]) -> None:
    for step, reward in observations:
        learner.observe_validation(float(reward), step=int(step))


# ------------------------------------------------------------------------------------------ rank 0


class LeadingLearner:
    """Rank 0's learner: the :class:`Learner`'s surface, each collective call preceded by its command.

    Other attributes (``policy_version``, ``vocab_size``, ``device``, ...) are the learner's own. Thread-safe: the
    service calls it from worker threads; one command runs at a time.
    """

    def __init__(self, learner: Learner, commands: Any) -> None:
        self.learner = learner
        self._channel = CommandChannel(commands)
        self._lock = threading.Lock()  # one command (and its collectives) at a time
        self._pending: list[list[float]] = []  # validation rewards not yet sent: [step, reward]
        self._pending_lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._broken: BaseException | None = None
        self._closed = threading.Event()
        self._pinger = threading.Thread(target=self._ping_loop, name="learner-ranks-ping", daemon=True)
        self._pinger.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.learner, name)

    def train_step(self, batch: GroupBatch) -> StepMetrics:
        return self._run(Command.TRAIN, {"batch": pack_batch(batch)}, lambda: self.learner.train_step(batch))

    def weights(self, copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``Learner.weights`` on every rank (the FSDP gathers are collectives); the followers' own copies are
        dropped as they come."""
        return iter(self._run(Command.WEIGHTS, {}, lambda: list(self.learner.weights(copy=copy))))

    def save_checkpoint(self, directory: str | Path) -> Path:
        return self._run(Command.SAVE, {"path": str(directory)}, lambda: self.learner.save_checkpoint(directory))

    def observe_validation(self, reward: float, step: int | None = None) -> None:
        """Applied on every rank with the next command (a checkpoint is one)."""
        with self._pending_lock:
            self._pending.append([self.learner.policy_version if step is None else step, reward])

    def close(self, timeout_s: float = 10.0) -> None:
        """``STOP`` to the followers (they exit with 0); skipped when a command is stuck or a rank is gone."""
        self._closed.set()
        if not self._lock.acquire(timeout=timeout_s):
            log.warning("learner ranks: a command is still running; the followers get no STOP")
            return
        try:
            if self._broken is None:
                self._channel.send(Command.STOP, {})
        except Exception as err:  # a follower is gone already
            log.warning("learner ranks: STOP not delivered: %s", err)
        finally:
            self._lock.release()

    def _run(self, code: Command, body: dict[str, Any], call: Callable[[], Any]) -> Any:
        with self._lock:
            if self._broken is not None:
                raise RuntimeError(f"a learner rank is gone ({self._broken}): the run cannot go on") from self._broken
            if self._closed.is_set():
                raise RuntimeError("the learner's ranks were stopped")
            with self._pending_lock:
                pending, self._pending = self._pending, []
            try:
                self._channel.send(code, {**body, "validation": pending})
                _observe(self.learner, pending)
                return call()
            except Exception as err:
                self._broken = err
                raise
            finally:
                self._last_sent = time.monotonic()

    def _ping_loop(self) -> None:
        while not self._closed.wait(PING_S / 2):
            if time.monotonic() - self._last_sent < PING_S or not self._lock.acquire(blocking=False):
                continue
            try:
                if self._broken is None and not self._closed.is_set():
                    self._channel.send(Command.PING, {})
                    self._last_sent = time.monotonic()
            except Exception as err:
                log.error("learner ranks: a follower does not answer: %s", err)
                self._broken = err
                return
            finally:
                self._lock.release()


# ------------------------------------------------------------------------------------------ ranks > 0


def follow(cfg: Config, run_dir: Path, spec: RankSpec, resume_from: Path | None = None) -> int:
    """A follower rank's whole life: join, load (or resume) its shard, run rank 0's commands until ``STOP``."""
    from prorl_async.learner.trainer import Learner

    commands = join_ranks(cfg, run_dir, spec)
    try:
        learner = Learner.resume_or_new(cfg, resume_from)
        channel = CommandChannel(commands)
        log.info("rank %d of %d: following rank 0", spec.rank, spec.world)
        while True:
            try:
                code, body = channel.receive()
            except RuntimeError as err:  # gloo: the peer closed, or the command group's timeout
                log.error("rank %d: lost rank 0 of the learner (nothing heard for up to %g s): %s", spec.rank,
                          HEARING_S, str(err).splitlines()[0] if str(err) else type(err).__name__)
                return 1
            _observe(learner, body.get("validation", []))
            if code is Command.TRAIN:
                learner.train_step(unpack_batch(body["batch"]))
            elif code is Command.WEIGHTS:
                for _ in learner.weights():
                    pass
            elif code is Command.SAVE:
                learner.save_checkpoint(body["path"])
            elif code is Command.STOP:
                log.info("rank %d: stopped by rank 0 at version %d", spec.rank, learner.policy_version)
                return 0
    finally:
        dist.destroy_process_group()
