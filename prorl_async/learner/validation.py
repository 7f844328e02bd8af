"""Periodic validation, the learner's side: ask for a round, file the answers, write the record, feed the reset policy.

The generators' side and the record's figures are :mod:`prorl_async.eval.validation`. Invariants:

- When (:class:`ValidationSchedule`, pure, time passed in): at start when ``eval.at_start`` (the weights the learner
  starts with, asked for before the first batch is gathered: the baseline every later round is compared with), then
  after a step whose version is a multiple of ``eval.every_steps``, or once ``eval.every_minutes`` have passed since
  the last request — whichever comes first. A round asks for the weights published last (``v``).
- One round in flight at a time: ``Validate(v, round)`` is published, then the latest ``WeightsReady`` again, so
  that a new subscriber's handshake still answers with weights. A round due by steps while one waits is skipped, and
  said so (``validation_skipped``); one due by time is asked for after the next step instead. A generator that
  (re)joins while a round waits is asked again (the others ignore the repeat: each ``(version, round)`` is answered
  once) — that is how the round asked for at start, before any generator listens, reaches them.
- Every answer (a ``ValidationAnswer`` on the groups socket) is counted by outcome in :attr:`counts`; a malformed one
  is counted and logged, nothing else.
- One ``validation`` record per round: when every shard is in, or after the tracker's timeout with what arrived
  (``validation_loop``), or at the end of training (:meth:`ValidationCoordinator.finish`). It is written before any
  await, so a cancelled caller still leaves it.
- Only a complete round feeds the reset policy (plateau trigger), at the version it measured, under the weights
  lock: the policy decides at the end of a step, so it never changes while ``train_step`` runs.
- Training never waits for validation, but for the end of a run: :meth:`ValidationCoordinator.finish` waits for the
  round in flight (bounded by the same timeout, not after an interrupt) after draining ingestion (``drain``: a full
  buffer must not hold back the answers queued behind the groups). The round asked for at start needs no weights
  but the ones the generators load at start (or catch up to on resume), so it cannot wait on the first step.
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


class ValidationSchedule:
    """When a validation round is due: at start, then by steps or by minutes, whichever comes first. No I/O; the
    caller passes the time (any monotonic clock, seconds).

    ``every_steps``: after a step whose version is a multiple of it; ``every_minutes``: after a step once that long
    passed since the last request (or since :meth:`start`), and only for weights not validated yet; ``at_start``:
    at :meth:`start`. Either period 0 turns that trigger off; both 0 turn validation off, ``at_start`` included.
    A due round that the caller cannot ask for (one is in flight) is not marked :meth:`requested`, so a round due by
    time stays due until it is.

    Usage::

        schedule = ValidationSchedule(every_steps=25, every_minutes=5.0, at_start=True)
        schedule.start(version=0, now=0.0)             # "start": the baseline
        schedule.requested(version=0, now=0.0)
        schedule.after_step(version=3, now=200.0)      # None
        schedule.after_step(version=4, now=301.0)      # "minutes"
        schedule.requested(version=4, now=301.0)
        schedule.after_step(version=25, now=400.0)     # "steps"
    """

    def __init__(self, every_steps: int, every_minutes: float, at_start: bool) -> None:
        if every_steps < 0 or every_minutes < 0:
            raise ValueError(f"periods must be >= 0, got every_steps={every_steps}, every_minutes={every_minutes}")
        self.every_steps, self.every_s, self.at_start = every_steps, 60.0 * every_minutes, at_start
        self._last_s: float | None = None  # when the last round was asked for (or the schedule started)
        self._last_version: int | None = None  # the version the last round asked for

    @property
    def enabled(self) -> bool:
        return bool(self.every_steps or self.every_s)

    def start(self, version: int, now: float) -> str | None:
        """The learner starts (or resumes) with ``version``: ``"start"`` when a round is due now; the minutes count
        from here."""
        self._last_s = now
        return "start" if self.enabled and self.at_start and version != self._last_version else None

    def after_step(self, version: int, now: float) -> str | None:
        """After the step that made ``version``: ``"steps"`` or ``"minutes"`` when a round is due, else None.

        Without :meth:`start`, the minutes count from the first call."""
        if self._last_s is None:
            self._last_s = now
        if self.every_steps and version % self.every_steps == 0:
            return "steps"
        if self.every_s and version != self._last_version and now - self._last_s >= self.every_s:
            return "minutes"
        return None

    def requested(self, version: int, now: float) -> None:
        """A round for ``version`` was asked for at ``now``."""
        self._last_s, self._last_version = now, version


class ValidationCoordinator:
    """Validation rounds of one run: requests, answers, records, and the reset policy's validation signal.

    What it needs, as callables: ``observe(version, mean_reward)`` feeds the reset policy (called under
    ``weights_lock``); ``published_version()`` is the version of the latest ``WeightsReady``; ``republish(control)``
    publishes that ``WeightsReady`` again; ``drain()`` makes ingestion discard groups and stop waiting for room.

    Usage (inside trio)::

        validation = ValidationCoordinator(cfg, metrics, weights_lock=lock, observe=observe,
                                           published_version=published, republish=republish, drain=drain)
        nursery.start_soon(validation.validation_loop)
        validation.start(control, version=0)         # eval.at_start: Validate(0, 0), WeightsReady(0)
        validation.request(control, version=4)       # after step 4, when due: Validate(4, 1), WeightsReady(4)
        validation.on_answer(answer)                 # each ValidationAnswer
        await validation.finish(interrupted=False)   # at the end, under weights_lock
    """

    def __init__(self, cfg: Config, metrics: MetricsLog, *, weights_lock: trio.Lock,
                 observe: Callable[[int, float], None], published_version: Callable[[], int],
                 republish: Callable[[Any], None], drain: Callable[[], None]) -> None:
        self.cfg, self.metrics, self._lock = cfg, metrics, weights_lock
        self._observe, self._published_version, self._republish, self._drain = (observe, published_version,
                                                                                republish, drain)
        e = cfg.eval
        self.schedule = ValidationSchedule(e.every_steps, e.every_minutes, e.at_start)
        self.tracker = ValidationTracker(cfg.generator.num_generators)
        self.counts: dict[str, int] = {}  # answers by outcome (accepted, late, bad, ...)

    def start(self, control: Any, version: int) -> None:
        """The learner starts with ``version`` (base weights, or a resumed checkpoint): the baseline round when
        ``eval.at_start``. Asked for before any generator listens: each one's ``Ready`` repeats it (:meth:`repeat`)."""
        now = time.monotonic()
        self._ask(control, version, self.schedule.start(version, now), now)

    def request(self, control: Any, version: int) -> None:
        """After step ``version``: ask the generators to validate the weights just published, when the schedule says
        a round is due (``eval.every_steps`` / ``eval.every_minutes``)."""
        now = time.monotonic()
        self._ask(control, version, self.schedule.after_step(version, now), now)

    def _ask(self, control: Any, version: int, reason: str | None, now: float) -> None:
        if reason is None or not self.cfg.tasks.validation_size:
            return
        r = self.tracker.request(self._published_version(), version, now)
        if r is None:
            busy = self.tracker.pending
            if reason == "steps":  # a round due by time is asked for after the next step instead, silently
                self.metrics.write("event", event="validation_skipped", version=version,
                                   detail=f"round {busy.round} (version {busy.version}) is still running" if busy
                                   else "")
            return
        self.schedule.requested(version, now)
        control.publish(Validate(version=r.version, round=r.round))
        # Restore the latest control message to a WeightsReady: a generator that subscribes now (restarted) is
        # answered with weights, as the handshake expects; the others see a repeat and ignore it.
        self._republish(control)
        self.metrics.write("event", event="validation_requested", version=r.version, round=r.round, step=version,
                           reason=reason)

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
