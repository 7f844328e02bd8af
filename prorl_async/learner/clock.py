"""The training clock: when training ends (``run.max_steps``, ``run.time_budget_s``) and how long the learner idled.

Invariants:

- Training time spans resumes: a checkpoint holds the training time so far (``train_elapsed_s``) and a resumed run
  counts on from it, so a run trains ``run.time_budget_s`` in all however often it is resumed.
- The budget also ends a wait for groups, not only a step: no pull timeout reaches past it.
- ``idle_s`` is the learner's wait for full batches, over every process of the run (``learner_idle_s``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prorl_async.config import RunConfig


class TrainClock:
    """Training time, the step and time budgets, and the learner's idle time.

    Usage::

        clock = TrainClock(cfg.run)
        clock.start()                                   # training begins (or resumes)
        while not clock.done(learner.policy_version):
            batch = await pull(timeout_s=clock.pull_timeout_s(cfg.buffer.pull_timeout_s))
            clock.idle_s += waited
    """

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.idle_s = 0.0
        self.elapsed_before_s = 0.0  # training time of the run before this process (resume)
        self.started_s: float | None = None  # monotonic time training started, minus elapsed_before_s

    def start(self) -> None:
        self.started_s = time.monotonic() - self.elapsed_before_s

    def elapsed_s(self) -> float:
        """Training time of the whole run so far."""
        return self.elapsed_before_s if self.started_s is None else time.monotonic() - self.started_s

    def done(self, version: int) -> bool:
        """``run.max_steps`` reached, or ``run.time_budget_s`` spent."""
        if self.run.max_steps and version >= self.run.max_steps:
            return True
        return bool(self.run.time_budget_s and self.elapsed_s() >= self.run.time_budget_s)

    def pull_timeout_s(self, timeout_s: float) -> float:
        """``timeout_s``, cut at the end of the time budget (at least 10 ms)."""
        if not self.run.time_budget_s:
            return timeout_s
        return max(0.01, min(timeout_s, self.run.time_budget_s - self.elapsed_s()))

    def idle_ratio(self) -> float:
        """The learner's share of the training time spent waiting for groups."""
        return self.idle_s / max(self.elapsed_s(), 1e-9)

    def state(self) -> dict[str, float]:
        return {"learner_idle_s": self.idle_s, "train_elapsed_s": self.elapsed_s()}

    def restore(self, state: dict[str, Any]) -> None:
        self.idle_s = float(state["learner_idle_s"])
        self.elapsed_before_s = float(state.get("train_elapsed_s", 0.0))  # absent in older checkpoints
