"""Periodic validation during training: the generators' reports, their bookkeeping and the ``validation`` record.

Pure (standard library, no I/O, time passed in), shared by both sides:

- a generator answers ``Validate(version, round)`` with its **shard** of the held-out split (prompt ``i`` of
  ``TaskMix.validation_tasks()`` when ``i % generators == generator``), ``eval.samples`` scored samples per
  prompt. :func:`encode_shard` packs the rewards into JSON strings for ``Metrics`` messages under the key
  :data:`RESULTS_KEY`, split into parts that each stay under the wire's string limit;
- the learner decodes each part strictly (:func:`decode_part`: any deviation is a ``ValueError``, counted, never
  a crash), gathers them per request in a :class:`ValidationTracker`, and when every generator's shard has
  arrived, or the request timed out, or training was interrupted, writes :func:`validation_record` (what
  arrived, saying whether it is complete).

Invariants: one request is in flight at a time (a new one is refused while the previous waits: validation
never piles up behind itself); a part is matched by ``(version, round)`` and counted once; a record's
statistics come from :func:`prorl_async.eval.stats.validation_metrics` over the union of the shards, each
prompt once.

Usage (learner side)::

    tracker = ValidationTracker(generators=2, timeout_s=600)
    r = tracker.request(version=4, step=4, now=time.monotonic())   # None while one is still in flight
    tracker.add(decode_part(metrics.values[RESULTS_KEY]), now)     # "accepted", "late", "duplicate"
    for finished, reason in tracker.due(now):                      # complete or timed out
        record = validation_record(finished, ks=(1, 4), threshold=1.0, now=now, reason=reason)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prorl_async.eval.stats import validation_metrics

RESULTS_KEY = "validation_results"
"""Key of a ``Metrics`` message that carries one part of a generator's validation shard."""
MAX_PART_CHARS = 60_000
"""Longest JSON text of one part: under the wire's string limit (``Limits.max_string_chars``, 65536)."""
MAX_PARTS = 4096
"""Most parts one shard may announce (a bound for the learner's memory, far above any real split)."""
DEFAULT_TIMEOUT_S = 900.0
"""How long the learner waits for every shard of a request before writing what arrived."""

_PART_KEYS = frozenset({"version", "round", "generator", "generators", "part", "parts", "weights_version",
                        "seconds", "failed", "skipped", "prompts"})


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
    """Weights the generator held when it started the shard (>= ``version``)."""
    seconds: float
    """Time the generator spent on the whole shard."""
    failed: int
    """Prompts of the shard that could not be generated or scored (the generator counted and logged them)."""
    skipped: int
    """Prompts of the shard too long for ``model.max_model_len``."""
    prompts: tuple[PromptRewards, ...]


# ------------------------------------------------------------------------------------------ generator side


def encode_shard(*, version: int, round: int, generator: int, generators: int, weights_version: int,
                 seconds: float, failed: int, skipped: int, prompts: Sequence[PromptRewards],
                 max_chars: int = MAX_PART_CHARS) -> list[str]:
    """JSON texts of the parts of one shard, each at most ``max_chars`` long; always at least one part.

    Prompts keep their order and are never split across parts. Raises ``ValueError`` when a single prompt's
    entry cannot fit in a part (thousands of samples per prompt): the caller counts it as a failure.
    """
    header = {"version": version, "round": round, "generator": generator, "generators": generators,
              "weights_version": weights_version, "seconds": round_seconds(seconds), "failed": failed,
              "skipped": skipped}
    # The largest header text (part numbers at MAX_PARTS) plus an empty prompt list: what every part costs.
    overhead = len(_dumps({**header, "part": MAX_PARTS, "parts": MAX_PARTS, "prompts": []}))
    chunks: list[list[list[Any]]] = [[]]
    used = overhead
    for p in prompts:
        entry = [p.id, p.task, [float(r) for r in p.rewards]]
        size = len(_dumps(entry)) + 1  # the separating comma
        if overhead + size > max_chars:
            raise ValueError(f"prompt {p.id}: {len(p.rewards)} rewards do not fit in one part of {max_chars} chars")
        if used + size > max_chars:
            chunks.append([])
            used = overhead
        chunks[-1].append(entry)
        used += size
    if len(chunks) > MAX_PARTS:
        raise ValueError(f"a shard of {len(prompts)} prompts needs {len(chunks)} parts (limit {MAX_PARTS})")
    return [_dumps({**header, "part": i, "parts": len(chunks), "prompts": chunk}) for i, chunk in enumerate(chunks)]


def round_seconds(seconds: float) -> float:
    return round(float(seconds), 3) if math.isfinite(seconds) else 0.0


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


# -------------------------------------------------------------------------------------------- learner side


def decode_part(text: object) -> ShardPart:
    """The part a generator sent as ``Metrics.values[RESULTS_KEY]``; ``ValueError`` for anything malformed.

    Checks: a JSON object with exactly the expected keys, non-negative integers (never booleans),
    ``part < parts <= MAX_PARTS``, ``generator < generators``, a finite non-negative ``seconds``, and prompts as
    ``[id, task, [reward, ...]]`` with string ids, at least one reward each, every reward a finite number.
    """
    if not isinstance(text, str):
        raise ValueError(f"{RESULTS_KEY} must be a JSON string, got {type(text).__name__}")
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{RESULTS_KEY} is not JSON: {err}") from None
    if not isinstance(body, dict) or body.keys() != _PART_KEYS:
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise ValueError(f"{RESULTS_KEY} must be an object with keys {sorted(_PART_KEYS)}, got {got}")
    ints = {k: _count(body, k) for k in ("version", "round", "generator", "generators", "part", "parts",
                                         "weights_version", "failed", "skipped")}
    if not ints["part"] < ints["parts"] <= MAX_PARTS:
        raise ValueError(f"part {ints['part']} of {ints['parts']} (at most {MAX_PARTS} parts)")
    if not ints["generator"] < ints["generators"]:
        raise ValueError(f"generator {ints['generator']} of {ints['generators']}")
    seconds = body["seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < math.inf:
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
    if not isinstance(body["prompts"], list):
        raise ValueError("prompts must be a list")
    prompts = tuple(_prompt(entry) for entry in body["prompts"])
    return ShardPart(**ints, seconds=float(seconds), prompts=prompts)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{RESULTS_KEY} holds {name}")


def _count(body: dict[str, Any], key: str) -> int:
    value = body[key]
    if type(value) is not int or value < 0:
        raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    return value


def _prompt(entry: object) -> PromptRewards:
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str)
            and isinstance(entry[2], list) and entry[2]):
        raise ValueError(f"a prompt must be [id, task, [reward, ...]], got {str(entry)[:200]}")
    rewards = entry[2]
    if not all(type(r) in (int, float) and math.isfinite(r) for r in rewards):
        raise ValueError(f"prompt {entry[0][:200]}: rewards must be finite numbers")
    return PromptRewards(entry[0], entry[1], tuple(float(r) for r in rewards))


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
    ``seconds`` (request to record), ``generator_seconds`` (slowest shard), ``weights_versions`` ([min, max]),
    then the statistics of :func:`validation_metrics` with ``@`` spelled ``_at_`` (``pass_at_1``,
    ``pass_at_4``, ``mean_reward``, ``dang_bound_at_4``...) and the same per task under ``by_task``. Parts of
    a shard that did not arrive whole still count: the record says what it is made of.
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
        "weights_versions": [min(p.weights_version for p in parts), max(p.weights_version for p in parts)]
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
