"""Staleness: how many policy versions a token or group lags behind the learner, and its bound (DESIGN.md section 4).

Invariant: ``staleness = learner_version - policy_version``, in policy versions (trainer steps, not optimizer
steps); a group's staleness is its oldest token's, ``learner_version - group.min_version``.

Every learner-side figure (the buffer's bound and histogram, the batch summary, the step's token staleness)
goes through :func:`group_staleness` and :func:`token_staleness`, so they cannot drift apart. No torch import: the
token form works on any array type that supports ``int - array`` (numpy, torch) and keeps its dtype.

The bound the generators obey (``buffer.max_staleness``) is :class:`StalenessController`'s: the configured one, or
under ``"auto"`` :class:`AutoStaleness`'s revision after each step. No trio, no I/O beyond the metrics log.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from prorl_async.monitor.metrics import MetricsLog

ArrayT = TypeVar("ArrayT")


def group_staleness(learner_version: int, group_min_version: int) -> int:
    """Versions the group's oldest token lags behind ``learner_version`` (a group is usable while this <= K)."""
    return int(learner_version) - int(group_min_version)


def token_staleness(learner_version: int, policy_versions: ArrayT) -> ArrayT:
    """Per-token staleness of an array of policy versions (numpy or torch), in the array's dtype."""
    return learner_version - policy_versions  # type: ignore[operator,return-value]


class AutoStaleness:
    """``buffer.max_staleness = "auto"``: the smallest bound that keeps both sides busy, revised after each step.

    A larger bound lets the generators run further ahead; it buys throughput only when the bound is what stops
    them while the learner has nothing to train on. So, after each step (fractions of the step's cycle: the
    learner's wait for groups plus its step):

    - *raise* the bound by one, up to ``ceiling``, when the learner waited for more than ``gap`` of the cycle
      while the generators sat idle (no request in their engines: held at the admission bound) for more than
      ``gap`` of it too — both sides idle at once;
    - *lower* it by one, down to 1, after ``patience`` steps in a row in which the learner waited less than
      ``gap / 2``: the generators keep up with room to spare, and a smaller bound trains on fresher samples.

    Generator-bound runs (the learner waits, the generators never idle) stay at 1: a larger bound adds
    staleness there and no samples. The bound never drops to 0 (synchronous), which idles one side by design.

    Usage::

        auto = AutoStaleness(ceiling=4)
        bound = auto.update(learner_wait_fraction=0.3, generator_idle_fraction=0.2)   # 2
    """

    def __init__(self, ceiling: int, bound: int = 1, gap: float = 0.1, patience: int = 3) -> None:
        if ceiling < 1 or not 1 <= bound <= ceiling or not 0 < gap < 1 or patience < 1:
            raise ValueError(f"need 1 <= bound <= ceiling, 0 < gap < 1, patience >= 1 (got {bound}, {ceiling}, "
                             f"{gap}, {patience})")
        self.ceiling, self.bound, self.gap, self.patience = ceiling, bound, gap, patience
        self._calm_steps = 0

    def update(self, learner_wait_fraction: float, generator_idle_fraction: float | None) -> int:
        """The bound for the next step; ``generator_idle_fraction`` None: no generator report yet (no raise)."""
        if learner_wait_fraction > self.gap and (generator_idle_fraction or 0.0) > self.gap:
            self.bound = min(self.bound + 1, self.ceiling)
            self._calm_steps = 0
        elif learner_wait_fraction < self.gap / 2:
            self._calm_steps += 1
            if self._calm_steps >= self.patience and self.bound > 1:
                self.bound -= 1
                self._calm_steps = 0
        else:
            self._calm_steps = 0
        return self.bound

    def state(self) -> dict[str, int]:
        return {"bound": self.bound, "calm_steps": self._calm_steps}

    def restore(self, state: dict[str, Any]) -> None:
        bound, calm = state.get("bound"), state.get("calm_steps", 0)
        if not isinstance(bound, int) or not 1 <= bound <= self.ceiling or not isinstance(calm, int) or calm < 0:
            raise ValueError(f"auto staleness state {state!r}: bound must be in [1, {self.ceiling}]")
        self.bound, self._calm_steps = bound, calm


class StalenessController:
    """The staleness bound announced with every ``WeightsReady``, revised after each trainer step.

    Fixed (``buffer.max_staleness`` an integer): always ``ceiling``, and nothing is announced (``announced()`` is
    None: generators keep the configured bound). ``"auto"``: :class:`AutoStaleness` revises it from the learner's
    wait and the generators' idle time over the step's cycle; the generators report idle time as a cumulative
    ``idle_s`` in their status, so the controller keeps the previous reading (``_idle_mark``) and takes the
    difference. Every change of the bound is one ``max_staleness`` event.

    Usage::

        staleness = StalenessController(ceiling=4, auto=AutoStaleness(4), metrics=metrics)
        bound = staleness.revise(waited=2.0, step_s=8.0, generators={"generator-0": {"idle_s": 1.5}})
    """

    def __init__(self, ceiling: int, auto: AutoStaleness | None, metrics: MetricsLog) -> None:
        self.ceiling, self.auto, self.metrics = ceiling, auto, metrics
        self._idle_mark: tuple[float, dict[str, float]] | None = None  # (monotonic time, idle_s per generator)

    def announced(self) -> int | None:
        """The bound sent with ``WeightsReady``: the automatic one, or None under a fixed bound."""
        return self.auto.bound if self.auto is not None else None

    def revise(self, waited: float, step_s: float, generators: Mapping[str, Mapping[str, Any]],
               now: float | None = None) -> int:
        """The staleness bound after this step (``waited`` for its batch, ``step_s`` training it), given the
        generators' latest reported figures: the fixed one, or :class:`AutoStaleness`'s revision."""
        if self.auto is None:
            return self.ceiling
        now = time.monotonic() if now is None else now
        idle = {source: float(g["idle_s"]) for source, g in generators.items()
                if isinstance(g.get("idle_s"), (int, float))}
        fraction = None
        if self._idle_mark is not None and idle:
            since, before = self._idle_mark
            deltas = [max(0.0, v - before.get(source, v)) for source, v in idle.items()]
            fraction = min(1.0, sum(deltas) / len(deltas) / max(now - since, 1e-9))
        self._idle_mark = (now, idle)
        previous = self.auto.bound
        bound = self.auto.update(waited / max(waited + step_s, 1e-9), fraction)
        if bound != previous:
            self.metrics.write("event", event="max_staleness", bound=bound, previous=previous,
                               learner_wait_fraction=round(waited / max(waited + step_s, 1e-9), 3),
                               generator_idle_fraction=None if fraction is None else round(fraction, 3))
        return bound

    def state(self) -> dict[str, Any]:
        """For a checkpoint's counters: ``auto_staleness``, the automatic bound's state; nothing under a fixed one."""
        return {"auto_staleness": self.auto.state()} if self.auto is not None else {}

    def restore(self, counters: Mapping[str, Any]) -> None:
        """From a checkpoint's counters; ignored under a fixed bound or when absent (an older checkpoint)."""
        state = counters.get("auto_staleness")
        if self.auto is not None and isinstance(state, dict):
            self.auto.restore(state)
