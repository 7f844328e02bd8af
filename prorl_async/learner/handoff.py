"""The weight handoff: after a trainer step, ``WeightsReady(v)`` then the broadcast of v to the generators; and the
catch-up of generators that joined holding older weights.

Invariants (``weights_lock`` is the lock every trainer step holds):

- ``WeightsReady(v)`` is published before ``broadcast(v)`` starts: generators learn the version on the control
  socket and join the collective that the sender is about to start.
- *A broadcast never reads weights that a step may change.* Under ``max_staleness = 0`` (or
  ``weight_sync.overlap = false``) it is synchronous, from the live weights under ``weights_lock``: the next batch
  waits for every generator's reload. With a bound >= 1
  (generators may sample one version behind anyway) the broadcast of v overlaps step v + 1 and sends a snapshot, a
  copy of ``learner.weights()`` (on their device) taken under the lock right after step v. A snapshot rather than
  holding step v + 1's optimizer update until the broadcast ends: no hook inside ``train_step`` (mini-batches,
  FSDP), for one copy of the weights per broadcast.
- At most one broadcast in flight: step v + 1 waits for broadcast v at its end, before it starts its own, so
  generators trail the learner's weights by at most one step. The ``sync_*`` figures of v go into step v + 1's
  record (``sync_version``: v; ``sync_wait_s``: how long the step waited for it).
- A catch-up is never concurrent with a step, a synchronous broadcast or an overlapped one: it runs under
  ``weights_lock`` and only while :attr:`WeightHandoff.idle` is set, which :meth:`WeightHandoff.after_step` clears
  before the lock is released.
- The end of training waits for the last broadcast: overlapped ones run shielded in the nursery of
  :meth:`WeightHandoff.overlapping`, which returns (or passes on an interrupt) only once they are done; the last
  one's figures, which no step record follows, become a ``weights_sync`` event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.learner.trainer import Learner
    from prorl_async.monitor.metrics import MetricsLog

_CATCH_UP_POLL_S = 0.5


def figures(version: int, stats: Any) -> dict[str, Any]:
    """A finished broadcast's figures, for a step record."""
    return {"sync_version": version, "sync_s": stats.seconds, "sync_bytes": stats.payload_bytes,
            "sync_delivered": len(stats.delivered), "sync_failed": stats.failed}


def snapshot(learner: Learner) -> list[tuple[str, Any]]:
    """A copy of ``learner.weights()`` (one copy, not two, when the generators' dtype differs from the master
    weights'); a tied weight comes under two names as one tensor, so the sender aliases it."""
    return list(learner.weights(copy=True))


class WeightHandoff:
    """Hands each new policy version to the generators, overlapped with the next step when the bound allows it.

    ``publish_weights(control, version)`` publishes ``WeightsReady(version)``.

    Usage (inside trio)::

        handoff = WeightHandoff(cfg, metrics, weights_lock, publish_weights)
        nursery.start_soon(handoff.catch_up_loop, control, sender, learner)
        async with handoff.overlapping(learner):           # the end of training waits for the last broadcast
            async with weights_lock:
                step = await trio.to_thread.run_sync(learner.train_step, batch)
                sync = await handoff.after_step(control, sender, learner)   # figures for the step record
    """

    def __init__(self, cfg: Config, metrics: MetricsLog, weights_lock: trio.Lock,
                 publish_weights: Callable[[Any, int], None]) -> None:
        self.cfg, self.metrics, self._lock, self._publish_weights = cfg, metrics, weights_lock, publish_weights
        self.idle = trio.Event()  # set while no overlapped broadcast is in flight
        self.idle.set()
        self._sync: dict[str, Any] = {}  # the figures of a finished overlapped broadcast, for the next step record
        self._nursery: trio.Nursery | None = None  # where overlapped broadcasts run (``overlapping``)

    @asynccontextmanager
    async def overlapping(self, learner: Learner) -> AsyncIterator[None]:
        """The span in which steps may start overlapped broadcasts; leaving it waits for the one in flight."""
        try:
            async with trio.open_nursery() as self._nursery:
                yield
        finally:
            self._nursery = None
            if self._sync:  # the last broadcast: no step record follows it
                self.metrics.write("event", event="weights_sync", version=learner.policy_version, **self._sync)
                self._sync = {}

    async def after_step(self, control: Any, sender: Any, learner: Learner) -> dict[str, Any]:
        """Hand the version the step just made to the generators; the caller holds ``weights_lock``.

        Returns the ``sync_*`` figures for this step's record: the previous overlapped broadcast's, this one's when
        synchronous, or none (``weight_sync.sync_every_steps``, or the first overlapped broadcast)."""
        t_wait = time.monotonic()
        await self.idle.wait()  # the broadcast of the previous version, overlapped with this step
        sync, self._sync = self._sync, {}
        if sync:
            sync["sync_wait_s"] = time.monotonic() - t_wait
        version = learner.policy_version
        if version % self.cfg.weight_sync.sync_every_steps:
            return sync
        if self.cfg.buffer.ceiling >= 1 and self.cfg.weight_sync.overlap:
            weights = await trio.to_thread.run_sync(snapshot, learner)
            self._publish_weights(control, version)
            self.idle = trio.Event()  # before the lock is released: catch_up_loop sees it
            if self._nursery is None:
                raise RuntimeError("an overlapped broadcast needs WeightHandoff.overlapping")
            self._nursery.start_soon(self._broadcast_overlapped, sender, version, weights, self.idle)
        else:
            self._publish_weights(control, version)
            stats = await trio.to_thread.run_sync(sender.broadcast, version, learner.weights())
            sync = figures(version, stats)
        return sync

    async def _broadcast_overlapped(self, sender: Any, version: int, weights: list[tuple[str, Any]],
                                    done: trio.Event) -> None:
        try:
            with trio.CancelScope(shield=True):  # an interrupt waits for it (``overlapping``'s nursery)
                stats = await trio.to_thread.run_sync(sender.broadcast, version, weights)
            self._sync = figures(version, stats)
        finally:
            done.set()

    async def catch_up_loop(self, control: Any, sender: Any, learner: Learner) -> None:
        """Send the current weights to members that joined holding older ones (restarted generators, resume).

        Alone, from the live weights: under ``weights_lock`` (no step, no synchronous broadcast) and never while an
        overlapped broadcast is in flight (``after_step`` starts one under that lock, clearing :attr:`idle`).
        """
        while True:
            await trio.sleep(_CATCH_UP_POLL_S)
            if not sender.behind(learner.policy_version) or self._lock.locked() or not self.idle.is_set():
                continue
            async with self._lock:
                version = learner.policy_version  # read under the lock: the version of the weights sent
                behind = sender.behind(version)
                if not behind or not self.idle.is_set():
                    continue
                self._publish_weights(control, version)
                stats = await trio.to_thread.run_sync(_catch_up, sender, version, learner, behind)
                self.metrics.write("event", event="weights_catch_up", version=version, members=behind,
                                   delivered=stats.delivered, failed=stats.failed, seconds=stats.seconds)


def _catch_up(sender: Any, version: int, learner: Learner, members: list[str]) -> Any:
    return sender.broadcast(version, learner.weights(), members=members)
