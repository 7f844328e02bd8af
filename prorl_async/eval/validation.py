"""Periodic validation during training: the generators' reports, their bookkeeping and the ``validation`` record.

Pure (standard library, no I/O, time passed in), shared by both sides:

- a generator answers ``Validate(version, round)`` with its **shard** of the held-out split (prompt ``i`` of
  ``TaskMix.validation_tasks()`` when ``i % generators == generator``), ``eval.samples`` scored samples per
  prompt. :func:`encode_shard` packs the rewards into :class:`ValidationAnswer` messages (flat arrays), split
  into parts of at most ``MAX_PART_PROMPTS`` prompts;
- the learner checks each part (the decoder its structure, :func:`shard_part` its meaning: any deviation is a
  ``ValueError``, counted, never a crash), gathers them per request in a :class:`ValidationTracker`, and when
  every generator's shard has
  arrived, or the request timed out, or training was interrupted, writes :func:`validation_record` (what
  arrived, saying whether it is complete).

Invariants: one request is in flight at a time (a new one is refused while the previous waits: validation
never piles up behind itself); a part is matched by ``(version, round)`` and counted once; a record's
statistics come from :func:`prorl_async.eval.stats.validation_metrics` over the union of the shards, each
prompt once.

Usage (learner side)::

    tracker = ValidationTracker(generators=2, timeout_s=600)
    r = tracker.request(version=4, step=4, now=time.monotonic())   # None while one is still in flight
    tracker.add(shard_part(answer))                                # "accepted", "late", "duplicate"
    for finished, reason in tracker.due(now):                      # complete or timed out
        record = validation_record(finished, ks=(1, 4), threshold=1.0, now=now, reason=reason)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prorl_async.eval.stats import validation_metrics
from prorl_async.transport.messages import ValidationAnswer

MAX_PART_PROMPTS = 1024
"""Most prompts in one answer message (far under the wire's limits)."""
MAX_PARTS = 4096
"""Most parts one shard may announce (a bound for the learner's memory, far above any real split)."""
DEFAULT_TIMEOUT_S = 900.0
"""How long the learner waits for every shard of a request before writing what arrived."""

@dataclass(frozen=True)
class PromptRewards:
    """One validated prompt: its id, its task label (``domain/name``) and the reward of each sample."""

    id: str
    task: str
    rewards: tuple[float, ...]


@dataclass(frozen=True)
class ShardPart:
    """One decoded part of a generator's answer to ``Validate(version, round)``."""

    version: int
    round: int
    generator: int
    generators: int
    part: int
    parts: int
    weights_version: int
    """Lowest weight version a token of the shard was sampled under (>= ``version``)."""
    weights_version_last: int
    """Highest: weights loaded while the shard was sampled (the learner trains on meanwhile) widen the span."""
    seconds: float
    """Time the generator spent on the whole shard."""
    failed: int
    """Prompts of the shard that could not be generated or scored (the generator counted and logged them)."""
    skipped: int
    """Prompts of the shard too long for ``model.max_model_len``."""
    prompts: tuple[PromptRewards, ...]


# ------------------------------------------------------------------------------------------ generator side


def encode_shard(*, source: str, version: int, round: int, generator: int, generators: int,
                 weights_version: int | tuple[int, int], seconds: float, failed: int, skipped: int,
                 prompts: Sequence[PromptRewards],
                 max_prompts: int = MAX_PART_PROMPTS) -> list[ValidationAnswer]:
    """The messages of one shard's answer, prompts in order, at most ``max_prompts`` each; always at least one.

    ``weights_version``: the versions the shard's tokens were sampled under, ``(lowest, highest)`` (one number:
    both). Raises ``ValueError`` when the shard needs more than :data:`MAX_PARTS` parts."""
    first, last = weights_version if isinstance(weights_version, tuple) else (weights_version, weights_version)
    chunks = [list(prompts[i:i + max_prompts]) for i in range(0, len(prompts), max_prompts)] or [[]]
    if len(chunks) > MAX_PARTS:
        raise ValueError(f"a shard of {len(prompts)} prompts needs {len(chunks)} parts (limit {MAX_PARTS})")
    seconds = round_seconds(max(seconds, 0.0))
    return [ValidationAnswer(source=source, version=version, round=round, generator=generator, generators=generators,
                             part=i, parts=len(chunks), weights_version=first, weights_version_last=last,
                             seconds=seconds,
                             failed=failed, skipped=skipped, prompt_ids=[p.id for p in chunk],
                             tasks=[p.task for p in chunk],
                             counts=np.array([len(p.rewards) for p in chunk], dtype=np.int32),
                             rewards=np.array([r for p in chunk for r in p.rewards], dtype=np.float64))
            for i, chunk in enumerate(chunks)]


def round_seconds(seconds: float) -> float:
    return round(float(seconds), 3) if math.isfinite(seconds) else 0.0


# -------------------------------------------------------------------------------------------- learner side


def shard_part(msg: ValidationAnswer) -> ShardPart:
    """The part an answer carries; ``ValueError`` when it contradicts itself (the decoder checked its structure:
    types, finite rewards, ``counts`` that add up to the rewards)."""
    if not msg.part < msg.parts <= MAX_PARTS:
        raise ValueError(f"part {msg.part} of {msg.parts} (at most {MAX_PARTS} parts)")
    if not msg.generator < msg.generators:
        raise ValueError(f"generator {msg.generator} of {msg.generators}")
    if not msg.version <= msg.weights_version <= msg.weights_version_last:
        raise ValueError(f"weights versions {msg.weights_version}..{msg.weights_version_last} for a validation of "
                         f"version {msg.version}")
    ends = np.cumsum(msg.counts, dtype=np.int64)
    starts = ends - msg.counts
    prompts = tuple(PromptRewards(pid, task, tuple(float(r) for r in msg.rewards[a:b]))
                    for pid, task, a, b in zip(msg.prompt_ids, msg.tasks, starts, ends, strict=True))
    return ShardPart(version=msg.version, round=msg.round, generator=msg.generator, generators=msg.generators,
                     part=msg.part, parts=msg.parts, weights_version=msg.weights_version,
                     weights_version_last=msg.weights_version_last, seconds=msg.seconds,
                     failed=msg.failed, skipped=msg.skipped, prompts=prompts)


@dataclass
class ValidationRound:
    """One request and the parts that answered it so far, per generator."""

    version: int
    """Weights version the generators validate (they wait until they hold it)."""
    round: int
    step: int
    """The learner's version when it asked."""
    generators: int
    requested_s: float
    """Monotonic time of the request (the tracker's clock)."""
    parts: dict[int, dict[int, ShardPart]] = field(default_factory=dict)
    """``generator -> part index -> part``."""

    def shard_complete(self, generator: int) -> bool:
        got = self.parts.get(generator, {})
        return bool(got) and len(got) == next(iter(got.values())).parts

    @property
    def answered(self) -> list[int]:
        """Generators whose whole shard arrived."""
        return [g for g in range(self.generators) if self.shard_complete(g)]

    @property
    def complete(self) -> bool:
        return len(self.answered) == self.generators


class ValidationTracker:
    """The learner's validation requests: at most one in flight; parts in, finished rounds out.

    Usage::

        tracker = ValidationTracker(generators=2, timeout_s=600)
        r = tracker.request(version=2, step=2, now=0.0)  # -> round 0
        tracker.add(part, now=1.0)                       # "accepted"
        tracker.due(now=2.0)                             # [(round, "complete")] once both shards are in
    """

    def __init__(self, generators: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if generators < 1:
            raise ValueError(f"generators must be >= 1, got {generators}")
        self.generators, self.timeout_s = generators, timeout_s
        self.pending: ValidationRound | None = None
        self.next_round = 0

    def request(self, version: int, step: int, now: float) -> ValidationRound | None:
        """A new round, or None while the previous one is still waiting for answers."""
        if self.pending is not None:
            return None
        self.pending = ValidationRound(version, self.next_round, step, self.generators, now)
        self.next_round += 1
        return self.pending

    def add(self, part: ShardPart) -> str:
        """File ``part``: ``accepted``, ``duplicate`` (already had it), ``late`` (not the round in flight, e.g.
        one already written after a timeout) or ``mismatch`` (the sender splits the split another way)."""
        r = self.pending
        if r is None or (part.version, part.round) != (r.version, r.round):
            return "late"
        if part.generators != r.generators:
            return "mismatch"
        shard = r.parts.setdefault(part.generator, {})
        known = next(iter(shard.values()), None)
        if known is not None and known.parts != part.parts:
            return "mismatch"
        if part.part in shard:
            return "duplicate"
        shard[part.part] = part
        return "accepted"

    def due(self, now: float, force: str | None = None) -> list[tuple[ValidationRound, str]]:
        """The round to write now with why (``complete``, ``timeout`` or ``force``), taken out of the tracker."""
        r = self.pending
        if r is None:
            return []
        if r.complete:
            reason = "complete"
        elif force is not None:
            reason = force
        elif now - r.requested_s >= self.timeout_s:
            reason = "timeout"
        else:
            return []
        self.pending = None
        return [(r, reason)]


def validation_record(r: ValidationRound, ks: Iterable[int], threshold: float, now: float,
                      reason: str) -> dict[str, Any]:
    """The ``validation`` record of a finished round (``now`` on the tracker's clock).

    Keys: ``version``, ``step``, ``round``, ``complete``, ``reason``, ``generators`` (answered / expected),
    ``missing`` (generator ids without a whole shard), ``prompts``, ``samples``, ``failed``, ``skipped``,
    ``seconds`` (request to record), ``generator_seconds`` (slowest shard), ``weights_versions`` (the lowest and
    highest version any of the round's tokens was sampled under), then the statistics of
    :func:`validation_metrics` with ``@`` spelled ``_at_`` (``pass_at_1``, ``pass_at_4``, ``mean_reward``,
    ``dang_bound_at_4``...) and the same per task under ``by_task``. Parts of a shard that did not arrive whole
    still count: the record says what it is made of.
    """
    parts = [p for shard in r.parts.values() for p in shard.values()]
    scored: dict[str, tuple[float, ...]] = {}
    labels: dict[str, str] = {}
    for p in parts:
        for prompt in p.prompts:
            scored[prompt.id] = prompt.rewards
            labels[prompt.id] = prompt.task
    answered = r.answered
    record: dict[str, Any] = {
        "version": r.version, "step": r.step, "round": r.round, "complete": len(answered) == r.generators,
        "reason": reason, "generators": [len(answered), r.generators],
        "missing": [g for g in range(r.generators) if g not in answered],
        "failed": sum(p.failed for p in parts if p.part == 0), "skipped": sum(p.skipped for p in parts if p.part == 0),
        "seconds": round_seconds(now - r.requested_s),
        "generator_seconds": max((p.seconds for p in parts), default=0.0),
        "weights_versions": [min(p.weights_version for p in parts), max(p.weights_version_last for p in parts)]
        if parts else [],
    }
    stats = validation_metrics(scored, sorted(set(ks)), threshold=threshold, groups=labels)
    by_task: dict[str, dict[str, float | int]] = {}
    for key, value in stats.items():
        task, slash, name = key.rpartition("/")
        name = name.replace("@", "_at_")
        shown = int(value) if name in ("prompts", "samples") else value
        if slash:
            by_task.setdefault(task, {})[name] = shown
        else:
            record[name] = shown
    record["by_task"] = by_task
    return record
