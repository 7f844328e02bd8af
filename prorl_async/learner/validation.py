"""Periodic validation, the learner's side: ask for a round, file the answers, write the record, feed the reset policy.

The generators' side and the record's figures are :mod:`prorl_async.eval.validation`. Invariants:

- One round in flight at a time (``eval.every_steps``): after a step whose version is a multiple of it,
  ``Validate(v, round)`` is published for the weights published last (``v``), then the latest ``WeightsReady`` again,
  so that a new subscriber's handshake still answers with weights. A request while a round waits is skipped, and
  said so (``validation_skipped``). A generator that (re)joins while a round waits is asked again (the others
  ignore the repeat: each ``(version, round)`` is answered once).
- Every answer (a ``ValidationAnswer`` on the groups socket) is counted by outcome in :attr:`counts`; a malformed one
  is counted and logged, nothing else.
- One ``validation`` record per round: when every shard is in, or after the tracker's timeout with what arrived
  (``validation_loop``), or at the end of training (:meth:`ValidationCoordinator.finish`). It is written before any
  await, so a cancelled caller still leaves it.
- Only a complete round feeds the reset policy (plateau trigger), at the version it measured, under the weights
  lock: the policy decides at the end of a step, so it never changes while ``train_step`` runs.
- Training never waits for validation, but for the end of a run: :meth:`ValidationCoordinator.finish` waits for the
  round in flight (bounded by the same timeout, not after an interrupt) after draining ingestion (``drain``: a full
  buffer must not hold back the answers queued behind the groups).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from prorl_async.eval.validation import ValidationRound, ValidationTracker, shard_part, validation_record
from prorl_async.transport.messages import Validate, ValidationAnswer

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.monitor.metrics import MetricsLog

log = logging.getLogger("prorl_async.learner.validation")

_VALIDATION_POLL_S = 0.5


class ValidationCoordinator:
    """Validation rounds of one run: requests, answers, records, and the reset policy's validation signal.

    What it needs, as callables: ``observe(version, mean_reward)`` feeds the reset policy (called under
    ``weights_lock``); ``published_version()`` is the version of the latest ``WeightsReady``; ``republish(control)``
    publishes that ``WeightsReady`` again; ``drain()`` makes ingestion discard groups and stop waiting for room.

    Usage (inside trio)::

        validation = ValidationCoordinator(cfg, metrics, weights_lock=lock, observe=observe,
                                           published_version=lambda: 4, republish=republish, drain=drain)
        nursery.start_soon(validation.validation_loop)
        validation.request(control, version=4)       # after step 4: Validate(4, 0), WeightsReady(4)
        validation.on_answer(answer)                 # each ValidationAnswer
        await validation.finish(interrupted=False)   # at the end, under weights_lock
    """

    def __init__(self, cfg: Config, metrics: MetricsLog, *, weights_lock: trio.Lock,
                 observe: Callable[[int, float], None], published_version: Callable[[], int],
                 republish: Callable[[Any], None], drain: Callable[[], None]) -> None:
        self.cfg, self.metrics, self._lock = cfg, metrics, weights_lock
        self._observe, self._published_version, self._republish, self._drain = (observe, published_version,
                                                                                republish, drain)
        self.tracker = ValidationTracker(cfg.generator.num_generators)
        self.counts: dict[str, int] = {}  # answers by outcome (accepted, late, bad, ...)

    def request(self, control: Any, version: int) -> None:
        """After step ``version``: ask the generators to validate the weights just published, every
        ``eval.every_steps``."""
        every = self.cfg.eval.every_steps
        if not every or version % every or not self.cfg.tasks.validation_size:
            return
        r = self.tracker.request(self._published_version(), version, time.monotonic())
        if r is None:
            busy = self.tracker.pending
            self.metrics.write("event", event="validation_skipped", version=version,
                               detail=f"round {busy.round} (version {busy.version}) is still running" if busy else "")
            return
        control.publish(Validate(version=r.version, round=r.round))
        # Restore the latest control message to a WeightsReady: a generator that subscribes now (restarted) is
        # answered with weights, as the handshake expects; the others see a repeat and ignore it.
        self._republish(control)
        self.metrics.write("event", event="validation_requested", version=r.version, round=r.round, step=version)

    def repeat(self, control: Any) -> None:
        """A generator (re)joined while a round waits: ask again, or its shard would only end in the timeout.

        Generators that already answered ignore the repeat (each ``(version, round)`` is answered once).
        """
        r = self.tracker.pending
        if r is None or r.complete:
            return
        control.publish(Validate(version=r.version, round=r.round))
        self._republish(control)

    def on_answer(self, msg: ValidationAnswer) -> None:
        """File one part of a generator's validation answer; a malformed one is counted and logged, nothing else."""
        try:
            part = shard_part(msg)
        except ValueError as err:
            outcome = "bad"
            self.metrics.write("event", event="bad_validation_results", source=msg.source, detail=str(err)[:300])
        else:
            outcome = self.tracker.add(part)
            if outcome != "accepted":
                self.metrics.write("event", event=f"validation_results_{outcome}", source=msg.source,
                                   version=part.version, round=part.round, part=part.part)
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    async def validation_loop(self) -> None:
        """Write the validation round once complete or timed out (never blocks ingestion or training)."""
        while True:
            await trio.sleep(_VALIDATION_POLL_S)
            for r, reason in self.tracker.due(time.monotonic()):
                await self._write(r, reason)

    async def finish(self, interrupted: bool) -> None:
        """At the end of training, the caller holding the weights lock: wait for the round in flight (not after an
        interrupt), then write it."""
        if self.tracker.pending is None:
            return
        self._drain()
        deadline = self.tracker.pending.requested_s + self.tracker.timeout_s
        while not interrupted and time.monotonic() < deadline and self.tracker.pending is not None:
            if self.tracker.pending.complete:
                break
            await trio.sleep(0.1)
        for r, reason in self.tracker.due(time.monotonic(), force="interrupted" if interrupted else "end"):
            await self._write(r, reason, locked=True)

    async def _write(self, r: ValidationRound, reason: str, locked: bool = False) -> None:
        e = self.cfg.eval
        record = validation_record(r, e.k, e.correct_threshold, time.monotonic(), reason)
        record["answers"] = dict(self.counts)
        # Only a complete round feeds the plateau trigger: a partial one measures another set of prompts.
        fed = record["complete"] and record.get("prompts", 0) > 0
        record["reset_signal"] = "mean_reward" if fed else ""
        self.metrics.write("validation", **record)  # before any await: a cancelled caller still leaves the record
        log.info("validation of version %d (%s): %s", r.version, reason,
                 "  ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("pass_at_")) or "no prompts")
        if not fed:
            return
        # Measured with the weights of r.version (the reset policy compares steps).
        if locked:
            self._observe(r.version, record["mean_reward"])
        else:
            async with self._lock:
                self._observe(r.version, record["mean_reward"])
