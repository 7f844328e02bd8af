"""Prompt skipping: pass over, before any rollout, prompts whose recent groups were all correct or all wrong.

Pre-rollout filtering in the spirit of GRESO (arXiv 2506.02177): a prompt whose group had equal rewards is likely to
have them again next time, and its rollouts would only feed the variance filter. Kept by the learner, pure state (no
I/O, no clock), for the specs without a curriculum (finite data sets; procedural tasks without one). A spec with a
curriculum is left alone: its level already moves the pass rate into the middle, and passing over its solved
prompts would hide the very pass rate that should promote it.

- A record per prompt ``(spec, level, index)``: its streak n of uninformative visits in a row, a group whose reward
  std is at or below ``buffer.min_reward_std`` (what the variance filter drops); an informative visit deletes it.
  Every requested group that arrives counts, kept or dropped.
- When the stream draws a prompt with streak n >= 1, it is passed over with probability
  ``p(n) = min(max_probability, 1 - 0.5^n)``: 0.5 after one uninformative visit, 0.75 after two, 0.875 after three,
  capped (0.9 by default). Doubling the odds per visit follows GRESO's observation that a prompt that was
  zero-variance is zero-variance again most of the time, and more so the longer it has been; the cap keeps every
  prompt tried again now and then (at least one visit in 1 / (1 - cap) epochs, 10 at the default), so a prompt the
  policy forgot, or one it starts to solve, comes back.
- Deterministic: the coin is an RNG seeded by ``(seed, spec, level, index, n, draw count)``; never dropped for
  good: a passed-over draw is consumed (it counts in its epoch) and the prompt is drawn again next epoch. At most
  ``max_per_draw`` prompts in a row are passed over, then the next one is handed out whatever its record, so a fully
  solved data set still yields prompts.
- :meth:`PromptSkips.state` is plain data (JSON-able): the records and the per-spec counts of skipped draws.

Usage::

    skips = PromptSkips(seed=0, eligible=[True], max_probability=0.9, max_per_draw=32, min_reward_std=1e-6)
    skips.observe(spec=0, level=0, index=17, rewards=[1.0] * 8)   # streak 1
    skips.skip(0, 0, 17, draws=123)                               # True with probability 0.5, the same every time
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np


def skip_probability(streak: int, max_probability: float) -> float:
    """The chance that a prompt with ``streak`` uninformative visits in a row is passed over."""
    return 0.0 if streak <= 0 else min(max_probability, 1.0 - 0.5**streak)


class PromptSkips:
    """Per-prompt streaks of uninformative groups and the deterministic decision to pass a prompt over.

    ``eligible[i]``: whether spec ``i`` is skipped at all (skipping on, and the spec has no curriculum). Invariants:
    a record exists only for an eligible spec's prompt whose latest visit was uninformative, with its streak >= 1;
    :meth:`skip` is a pure function of the records, its arguments and the seed.
    """

    def __init__(self, seed: int, eligible: Sequence[bool], labels: Sequence[str] | None = None, *,
                 max_probability: float = 0.9, max_per_draw: int = 32, min_reward_std: float = 1e-6) -> None:
        if not 0 <= max_probability < 1 or max_per_draw < 1 or min_reward_std < 0:
            raise ValueError(f"need 0 <= max_probability < 1, max_per_draw >= 1 and min_reward_std >= 0 (got "
                             f"{max_probability}, {max_per_draw}, {min_reward_std})")
        if labels is not None and len(labels) != len(eligible):
            raise ValueError("need one label per spec")
        self.seed, self.eligible = seed, list(eligible)
        self.labels = list(labels) if labels is not None else [str(i) for i in range(len(eligible))]
        self.max_probability, self.max_per_draw, self.min_reward_std = max_probability, max_per_draw, min_reward_std
        self.streaks: dict[tuple[int, int, int], int] = {}
        self.skipped = [0] * len(self.eligible)  # draws passed over, per spec

    @property
    def enabled(self) -> bool:
        return any(self.eligible)

    def observe(self, spec: int, level: int, index: int, rewards: Sequence[float]) -> None:
        """A group of prompt ``(spec, level, index)`` arrived with ``rewards``: extend or clear its streak."""
        if not self.eligible[spec] or not len(rewards):
            return
        key = (spec, level, index)
        if float(np.std(np.asarray(rewards, dtype=np.float64))) > self.min_reward_std:
            self.streaks.pop(key, None)
        else:
            self.streaks[key] = self.streaks.get(key, 0) + 1

    def skip(self, spec: int, level: int, index: int, draws: int) -> bool:
        """Whether to pass over prompt ``(spec, level, index)``, drawn as the stream's draw number ``draws``; counted
        when it is."""
        streak = self.streaks.get((spec, level, index), 0) if self.eligible[spec] else 0
        if not streak:
            return False
        coin = random.Random(f"{self.seed}/skip/{spec}/{level}/{index}/{streak}/{draws}").random()
        if coin >= skip_probability(streak, self.max_probability):
            return False
        self.skipped[spec] += 1
        return True

    def summary(self) -> dict[str, int]:
        """For the step record: draws passed over so far, per eligible spec."""
        return {label: n for label, n, ok in zip(self.labels, self.skipped, self.eligible, strict=True) if ok}

    def state(self) -> dict[str, Any]:
        """Plain data to resume from: ``[spec, level, index, streak]`` records (sorted) and the per-spec counts."""
        return {"streaks": [[*key, n] for key, n in sorted(self.streaks.items())], "skipped": list(self.skipped)}

    def initial_state(self) -> dict[str, Any]:
        """The :meth:`state` of fresh records: none, nothing passed over."""
        return {"streaks": [], "skipped": [0] * len(self.eligible)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`; raises ``ValueError`` for a broken state or another number of specs."""
        if not isinstance(state, dict):
            raise ValueError("prompt skip state: expected a map")
        streaks, skipped = state.get("streaks"), state.get("skipped")
        specs = len(self.eligible)
        if not isinstance(streaks, list) or not isinstance(skipped, list) or len(skipped) != specs:
            raise ValueError(f"prompt skip state: expected streaks and skipped counts for {specs} specs")
        if not all(isinstance(n, int) and n >= 0 for n in skipped):
            raise ValueError("prompt skip state: bad skipped counts")
        records: dict[tuple[int, int, int], int] = {}
        for item in streaks:
            valid = isinstance(item, list) and len(item) == 4 and all(isinstance(x, int) and x >= 0 for x in item)
            if not valid or item[0] >= specs or item[3] < 1:
                raise ValueError(f"prompt skip state: bad record {item!r}")
            if self.eligible[item[0]]:  # a spec this run does not skip (config changed): its records go
                records[(item[0], item[1], item[2])] = item[3]
        self.streaks, self.skipped = records, list(skipped)
