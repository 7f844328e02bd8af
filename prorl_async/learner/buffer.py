"""Replay buffer: staleness bound, admission capacity and the variance filter (DESIGN.md section 4).

:class:`ReplayBuffer` is a pure state machine — no I/O, no clock, no trio — so every rule is testable
by itself; :class:`WaitingReplayBuffer` is the thin trio wrapper the learner awaits.

Rules, with ``K = max_staleness`` and ``v`` the learner version of the latest :meth:`ReplayBuffer.pull`:

- a group is *usable* at ``v`` while ``v - group.min_version <= K`` (its oldest token is at most K
  versions old);
- admission capacity: at most ``(K + 1) x batch_groups`` usable groups are held — enough for the K+1
  versions that can still consume a group; ``put`` answers ``"full"`` beyond it and takes nothing (the
  caller keeps the group and waits: that is the backpressure that reaches the generators);
- ``put`` drops, and counts by reason, groups already staler than K and groups whose reward std
  (population, ddof 0) is ``<= min_reward_std`` (``None`` turns the filter off): ``all_correct`` (every
  reward 1), ``all_wrong`` (every reward 0), ``no_variance`` (any other constant reward) — no signal;
- ``pull(n, v)`` first drops, counted as ``stale``, every held group that ``v`` made too stale, then
  returns exactly ``n`` groups, those nearest to expiry first (oldest ``min_version``; arrival order among
  equals: a group that started on older weights may arrive after a newer one and must not be left to expire)
  — or ``None`` and takes nothing: never a short batch;
- ``drop("untrainable")`` counts a group the learner cannot train on (the caller's check) as received and
  dropped; :meth:`ReplayBuffer.evict` drops held ones the same way (a checkpoint written under looser rules);
- conservation: ``received == len(buffer) + yielded + stale + all_correct + all_wrong + no_variance +
  untrainable``.

Under ``buffer.max_staleness = "auto"`` the buffer's K is ``auto_max_staleness`` (the most the learner accepts);
:class:`~prorl_async.learner.staleness.AutoStaleness` picks the admission bound the generators obey, at most that.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import trio

from prorl_async.learner.staleness import group_staleness
from prorl_async.transport.messages import MessageError, TrajectoryGroup, decode, encode

PutOutcome = Literal["admitted", "full", "stale", "all_correct", "all_wrong", "no_variance", "untrainable"]
DROP_REASONS = ("stale", "all_correct", "all_wrong", "no_variance", "untrainable")
STATE_VERSION = 1


def admission_capacity(batch_groups: int, max_staleness: int) -> int:
    """Groups that may be outstanding for the versions a learner can still use: ``(K + 1) x batch``."""
    return (max_staleness + 1) * batch_groups


def variance_outcome(rewards: np.ndarray, min_reward_std: float | None) -> PutOutcome:
    """``admitted`` when the rewards of a group vary by more than ``min_reward_std`` (None: filter off), else why."""
    if min_reward_std is None or (len(rewards) and float(np.std(rewards)) > min_reward_std):
        return "admitted"
    if np.allclose(rewards, 1.0):
        return "all_correct"
    if np.allclose(rewards, 0.0):
        return "all_wrong"
    return "no_variance"


class ReplayBuffer:
    """Groups waiting for the learner, bounded in staleness and count; dropped groups are counted by reason.

    Usage::

        buf = ReplayBuffer(batch_groups=8, max_staleness=1, min_reward_std=1e-6)
        outcome = buf.put(group)              # "admitted", "full" (keep it, retry after a pull) or a drop reason
        batch = buf.pull(8, learner_version)  # exactly 8 groups, or None (nothing taken)
        buf.counters                          # {"received": .., "yielded": .., "stale": .., "all_wrong": .., ...}
        saved = buf.state()                   # plain data (msgpack-able); ReplayBuffer(...).restore(saved)
    """

    def __init__(self, batch_groups: int, max_staleness: int, min_reward_std: float | None = 0.0) -> None:
        if batch_groups < 1 or max_staleness < 0 or (min_reward_std is not None and min_reward_std < 0):
            raise ValueError("need batch_groups >= 1, max_staleness >= 0 and min_reward_std >= 0 (or None: no filter)")
        self.batch_groups = batch_groups
        self.max_staleness = max_staleness
        self.min_reward_std = min_reward_std
        self.capacity = admission_capacity(batch_groups, max_staleness)
        self.learner_version = 0
        self._groups: list[TrajectoryGroup] = []
        self._counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._groups)

    @property
    def room(self) -> int:
        """Usable groups ``put`` still admits before answering ``"full"``."""
        return self.capacity - len(self._groups)

    @property
    def counters(self) -> dict[str, int]:
        """``received``, ``yielded`` and one entry per drop reason (zeros included)."""
        return {key: self._counters[key] for key in ("received", "yielded", *DROP_REASONS)}

    def staleness_histogram(self) -> dict[int, int]:
        """Held groups by staleness (``learner_version - min_version``) at the current learner version."""
        return dict(sorted(Counter(group_staleness(self.learner_version, g.min_version) for g in self._groups).items()))

    def _is_stale(self, group: TrajectoryGroup, version: int) -> bool:
        return group_staleness(version, group.min_version) > self.max_staleness  # type: ignore[arg-type]

    def put(self, group: TrajectoryGroup) -> PutOutcome:
        """Admit ``group``, drop it (counted, reason returned), or answer ``"full"`` without taking it."""
        if self._is_stale(group, self.learner_version):
            outcome: PutOutcome = "stale"
        else:
            outcome = variance_outcome(group.rewards, self.min_reward_std)
            if outcome == "admitted" and self.room <= 0:
                return "full"
        self._counters["received"] += 1
        if outcome == "admitted":
            self._groups.append(group)
        else:
            self._counters[outcome] += 1
        return outcome

    def drop(self, reason: PutOutcome) -> PutOutcome:
        """Count a group as received and dropped for ``reason`` without holding it (the caller's verdict)."""
        if reason not in DROP_REASONS:
            raise ValueError(f"not a drop reason: {reason!r}")
        self._counters["received"] += 1
        self._counters[reason] += 1
        return reason

    def evict(self, keep: Callable[[TrajectoryGroup], bool], reason: PutOutcome) -> int:
        """Drop, counted as ``reason``, every held group ``keep`` rejects; how many went."""
        kept = [g for g in self._groups if keep(g)]
        gone = len(self._groups) - len(kept)
        self._groups = kept
        self._counters[reason] += gone
        return gone

    def pull(self, n_groups: int, learner_version: int) -> list[TrajectoryGroup] | None:
        """Exactly ``n_groups`` usable groups, nearest to expiry first, or ``None`` (taking nothing).

        Moves the buffer to ``learner_version`` first (it never goes back) and drops, as ``stale``, the
        groups it leaves more than ``max_staleness`` behind.
        """
        if not 1 <= n_groups <= self.capacity:
            raise ValueError(f"n_groups must be in [1, {self.capacity}] (the capacity), got {n_groups}")
        if learner_version < self.learner_version:
            raise ValueError(f"learner version went back from {self.learner_version} to {learner_version}")
        if learner_version != self.learner_version:
            self.learner_version = learner_version
            kept = [g for g in self._groups if not self._is_stale(g, learner_version)]
            self._counters["stale"] += len(self._groups) - len(kept)
            self._groups = kept
        if len(self._groups) < n_groups:
            return None
        self._groups.sort(key=lambda g: g.min_version)  # stable: arrival order among equal versions
        batch, self._groups = self._groups[:n_groups], self._groups[n_groups:]
        self._counters["yielded"] += n_groups
        return batch

    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: settings, version, counters and the held groups' frames."""
        return {
            "state_version": STATE_VERSION,
            "batch_groups": self.batch_groups,
            "max_staleness": self.max_staleness,
            "min_reward_std": self.min_reward_std,
            "learner_version": self.learner_version,
            "counters": self.counters,
            "groups": [encode(g) for g in self._groups],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Replace this buffer's contents by ``state``; its settings must equal this buffer's."""
        if state.get("state_version") != STATE_VERSION:
            raise ValueError(f"replay buffer state version {state.get('state_version')!r}, expected {STATE_VERSION}")
        for key in ("batch_groups", "max_staleness", "min_reward_std"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpointed buffer has {key}={state[key]}, this run {getattr(self, key)}")
        groups, unreadable = [], 0
        for frames in state["groups"]:
            try:
                groups.append(decode(frames))
            except MessageError:  # admitted under looser rules (an older version): count it, never die on it
                unreadable += 1
        if len(groups) > self.capacity:
            raise ValueError(f"checkpointed buffer holds {len(groups)} groups, over the capacity {self.capacity}")
        self.learner_version = int(state["learner_version"])
        self._counters = Counter({k: int(v) for k, v in state["counters"].items()})
        self._counters["untrainable"] += unreadable
        self._groups = groups  # type: ignore[assignment]


class BufferStarved(TimeoutError):
    """``WaitingReplayBuffer.pull`` found no full batch within its timeout."""


class WaitingReplayBuffer:
    """A :class:`ReplayBuffer` for trio tasks: ``put`` waits for room, ``pull`` for a full batch.

    Usage (one ingest task, one train task, same trio run)::

        wbuf = WaitingReplayBuffer(ReplayBuffer(8, 1, 1e-6))
        outcome = await wbuf.put(group)                            # ingest_loop: blocks while full
        batch = await wbuf.pull(8, learner_version, timeout_s=600)  # train_loop: raises BufferStarved
    """

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer
        self.parked: TrajectoryGroup | None = None
        """The group a waiting ``put`` holds: received, not yet in the buffer. A checkpoint must keep it."""
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def put(self, group: TrajectoryGroup) -> PutOutcome:
        """Like :meth:`ReplayBuffer.put`, but waits for room instead of answering ``"full"``."""
        try:
            while (outcome := self.buffer.put(group)) == "full":
                self.parked = group
                await self._changed.wait()
        finally:
            self.parked = None
        self._notify()
        return outcome

    def state(self) -> dict[str, Any]:
        """:meth:`ReplayBuffer.state` plus the parked group (``"parked"``: frames), so that a checkpoint taken
        while ingestion waits for room (the normal state under backpressure) holds every received group."""
        return {**self.buffer.state(), "parked": [encode(self.parked)] if self.parked is not None else []}

    def restore(self, state: dict[str, Any]) -> list[TrajectoryGroup]:
        """Restore the buffer from :meth:`state`; returns the parked groups, to be ``put`` before anything new."""
        self.buffer.restore(state)
        parked = []
        for frames in state.get("parked", []):
            try:
                parked.append(decode(frames))
            except MessageError:
                self.buffer.drop("untrainable")
        return parked

    async def pull(self, n_groups: int, learner_version: int, timeout_s: float) -> list[TrajectoryGroup]:
        """Exactly ``n_groups`` groups; raises :class:`BufferStarved` after ``timeout_s`` without them."""
        with trio.move_on_after(timeout_s):
            while True:
                batch = self.buffer.pull(n_groups, learner_version)
                self._notify()  # a pull frees room (taken or stale groups): wake a waiting put
                if batch is not None:
                    return batch
                await self._changed.wait()
        raise BufferStarved(
            f"no batch of {n_groups} usable groups within {timeout_s:g} s at learner version {learner_version}: "
            f"{len(self.buffer)} held, counters {self.buffer.counters}"
        )
