"""The ``step`` record: one per trainer step in ``RUN_DIR/metrics.jsonl``, read by the TUI, the reports and the bench.

Invariants:

- A record's figures are layered, later ones winning over duplicates: the trainer's step figures, the batch summary,
  the weight handoff's ``sync_*`` figures, then the learner service's (version, waits, buffer, admission).
- ``reward_mean`` is over the batch: the groups that passed the variance filter. ``reward_arrived_mean`` and
  ``samples_arrived`` are over every requested group received since the previous record, filtered ones included:
  the policy's actual reward. Each received group is counted in exactly one record.
- ``reward_arrived_by_domain`` / ``samples_arrived_by_domain`` split the same samples by the group's domain: the
  counts add up to ``samples_arrived``, and a domain with no arrival since the previous record is absent (not 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prorl_async.learner.staleness import group_staleness

if TYPE_CHECKING:
    from prorl_async.learner.buffer import ReplayBuffer
    from prorl_async.transport.messages import TrajectoryGroup


def batch_summary(groups: list[TrajectoryGroup], learner_version: int) -> dict[str, Any]:
    """Reward and staleness figures of one batch, per domain as well."""
    rewards = [s.reward for g in groups for s in g.samples]
    by_domain: dict[str, list[float]] = {}
    for g in groups:
        by_domain.setdefault(g.domain, []).extend(s.reward for s in g.samples)
    staleness = [group_staleness(learner_version, g.min_version) for g in groups]  # type: ignore[arg-type]
    lengths = [len(s.token_ids) for g in groups for s in g.samples]
    return {
        "reward_mean": sum(rewards) / len(rewards),
        "reward_by_domain": {d: sum(v) / len(v) for d, v in by_domain.items()},
        "group_staleness_mean": sum(staleness) / len(staleness),
        "group_staleness_max": max(staleness),
        "response_tokens_mean": sum(lengths) / len(lengths),
        "samples": len(rewards),
        "prompt_ids": [g.prompt_id for g in groups],  # what was trained on: resume must not repeat any
    }


def buffer_figures(buffer: ReplayBuffer) -> dict[str, Any]:
    """What the replay buffer holds and has counted, for the step record."""
    return {"buffer_held": len(buffer), "buffer_counters": buffer.counters,
            "buffer_staleness_hist": {str(k): v for k, v in buffer.staleness_histogram().items()}}


class StepRecords:
    """Assembles the ``step`` records; counts the reward of every group received between two of them.

    Usage::

        records = StepRecords()
        records.arrived(group)                       # each requested group received, kept or not
        record = records.step(step.as_dict(), batch_summary(groups, v), sync, version=v, wait_s=0.5)
        metrics.write("step", **record)
    """

    def __init__(self) -> None:
        self._reward_sums: dict[str, float] = {}  # domain -> reward sum of the samples arrived since the last record
        self._samples: dict[str, int] = {}  # domain -> samples arrived since the last record

    def arrived(self, group: TrajectoryGroup) -> None:
        rewards = [x.reward for x in group.samples]
        self._reward_sums[group.domain] = self._reward_sums.get(group.domain, 0.0) + sum(rewards)
        self._samples[group.domain] = self._samples.get(group.domain, 0) + len(rewards)

    def step(self, step: dict[str, Any], summary: dict[str, Any], sync: dict[str, Any],
             **figures: Any) -> dict[str, Any]:
        """One step's record from its layers (see the module's invariants); starts the next arrival count."""
        record = {**step, **summary, **sync}  # the batch summary's figures win over duplicates
        record.update(figures)
        count = sum(self._samples.values())
        record["reward_arrived_mean"] = sum(self._reward_sums.values()) / count if count else None
        record["samples_arrived"] = count
        record["reward_arrived_by_domain"] = {d: self._reward_sums[d] / n for d, n in sorted(self._samples.items())
                                              if n}
        record["samples_arrived_by_domain"] = {d: n for d, n in sorted(self._samples.items()) if n}
        self._reward_sums, self._samples = {}, {}
        return record
