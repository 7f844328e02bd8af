"""Group intake: every group that reaches the learner is accounted for, once.

Invariants:

- Each ``TrajectoryGroup`` that arrives is counted in :attr:`GroupIntake.outcomes` under one reason: ``admitted``, or
  dropped by the buffer (``stale``, ``all_correct``, ``all_wrong``, ``no_variance``; the buffer's counters), or
  ``untrainable`` (the learner cannot train on it: counted and logged, never an exception in a step), or
  ``unrequested`` (it answers no request in flight: never trained), or ``after_final_checkpoint`` (it arrived while
  draining). :attr:`GroupIntake.arrived` counts the requested ones.
- A requested group answers its request before it may wait for room: a checkpoint taken while it waits holds it
  as the buffer's *parked* group, so its prompt is not also re-queued. A group the buffer drops frees its admission
  slot.
- Every requested group answers its request exactly once (``Dispatcher.answered``), untrainable or filtered ones
  included: that is where its rewards reach the curriculum and the prompt's skip record.
- The groups a checkpoint held parked go in first, in their order; untrainable ones never come back from a
  checkpoint (a checkpoint written under looser rules).
- After :meth:`GroupIntake.drain` (the end of a run) groups are discarded and a put waiting for room gives up, so
  that a full buffer does not hold back the messages queued behind it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from prorl_async.learner.buffer import WaitingReplayBuffer
    from prorl_async.learner.dispatch import Dispatcher
    from prorl_async.monitor.metrics import MetricsLog
    from prorl_async.transport.messages import TrajectoryGroup

log = logging.getLogger("prorl_async.learner.ingest")

_UNTRAINABLE_EVENTS = 10  # events written for untrainable groups; later ones are only counted


def untrainable(group: TrajectoryGroup, vocab_size: int) -> str | None:
    """Why the learner cannot train on ``group`` (one line), or None. The decoder enforces the same rules given the
    vocabulary; this is the last line for groups that reached the buffer another way (a checkpoint)."""
    if not len(group.prompt_token_ids):
        return "empty prompt"
    for i, s in enumerate(group.samples):
        if not len(s.token_ids):
            return f"sample {i}: empty response"
        if len(s.logprobs) != len(s.token_ids) or len(s.versions) != len(s.token_ids):
            return f"sample {i}: per-token fields of another length"
        if not math.isfinite(s.reward):
            return f"sample {i}: reward {s.reward} is not finite"
    ids = [group.prompt_token_ids, *(s.token_ids for s in group.samples)]
    if any(int(a.min()) < 0 or int(a.max()) >= vocab_size for a in ids):
        return f"a token id outside the model's vocabulary [0, {vocab_size})"
    return None


class GroupIntake:
    """Takes the groups that arrive into the replay buffer: checks them against the requests in flight and the
    learner's vocabulary, counts every outcome. ``on_arrival(group)`` sees every requested group, kept or not.

    Usage (inside trio, from the one task that ingests)::

        intake = GroupIntake(buffer, dispatch, metrics, on_arrival=records.arrived)
        await intake.put_parked()                       # a resumed run's parked groups first
        await intake.ingest(group, vocab_size=32000)    # each TrajectoryGroup
    """

    def __init__(self, buffer: WaitingReplayBuffer, dispatch: Dispatcher, metrics: MetricsLog,
                 on_arrival: Callable[[TrajectoryGroup], None]) -> None:
        self.buffer, self.dispatch, self.metrics, self._on_arrival = buffer, dispatch, metrics, on_arrival
        self.arrived = 0
        self.outcomes: dict[str, int] = {}
        self._parked: list[TrajectoryGroup] = []  # restored from a checkpoint: put before anything new
        self._draining = False  # after the final checkpoint: groups are discarded
        self._put_scope: trio.CancelScope | None = None

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    async def put_parked(self) -> None:
        """The groups a checkpoint held parked, in their order."""
        while self._parked:
            await self._put(self._parked.pop(0))

    async def ingest(self, msg: TrajectoryGroup, vocab_size: int) -> None:
        if self._draining:  # after the final checkpoint, which re-queues this group's prompt on resume
            self.count("after_final_checkpoint")
            return
        request = self.dispatch.request_for(msg)
        if request is None:  # answers no request in flight: never trained
            self.count("unrequested")
            return
        self.arrived += 1
        self._on_arrival(msg)
        problem = untrainable(msg, vocab_size)
        if problem is not None:  # counted, logged once per reason; the run goes on
            self.dispatch.answered(msg, kept=False)
            self.count(self.buffer.buffer.drop("untrainable"))
            self._log_untrainable(msg, problem)
            return
        # Answered before it may wait for room: a checkpoint taken meanwhile holds it as the parked group, so its
        # prompt must not also be re-queued there.
        self.dispatch.answered(msg, kept=True)
        if await self._put(msg) != "admitted":
            self.dispatch.withdraw(request)

    async def _put(self, msg: TrajectoryGroup) -> str:
        """Into the buffer, waiting for room; while it waits, a checkpoint holds ``msg`` as the parked group."""
        outcome: str = "after_final_checkpoint"
        with trio.CancelScope() as self._put_scope:  # cancelled by drain()
            outcome = await self.buffer.put(msg)
        self._put_scope = None
        self.count(outcome)
        return outcome

    def drain(self) -> None:
        """From now on groups are discarded, and a put waiting for room gives up."""
        self._draining = True
        if self._put_scope is not None:
            self._put_scope.cancel()

    def _log_untrainable(self, group: TrajectoryGroup, problem: str) -> None:
        """The first few as events (a hostile or broken peer must not flood the log); all are counted."""
        if self.outcomes.get("untrainable", 0) <= _UNTRAINABLE_EVENTS:
            log.warning("dropped an untrainable group %s from generator %d: %s", group.prompt_id[:80],
                        group.generator_id, problem)
            self.metrics.write("event", event="untrainable_group", prompt_id=group.prompt_id[:200],
                               generator_id=group.generator_id, detail=problem)

    def state(self) -> dict[str, Any]:
        """The counters, for a checkpoint (the buffer's own state is the buffer's)."""
        return {"groups_arrived": self.arrived, "outcomes": dict(self.outcomes)}

    def restore(self, buffer_state: dict[str, Any], counters: dict[str, Any], vocab_size: int) -> None:
        """The buffer and the counters of a checkpoint; its untrainable groups are dropped, counted as such."""
        self._parked = self.buffer.restore(buffer_state)
        self.buffer.buffer.evict(lambda g: untrainable(g, vocab_size) is None, "untrainable")
        for group in [g for g in self._parked if untrainable(g, vocab_size) is not None]:
            self._parked.remove(group)
            self.buffer.buffer.drop("untrainable")
        self.arrived = int(counters["groups_arrived"])
        self.outcomes = {str(k): int(v) for k, v in counters["outcomes"].items()}
