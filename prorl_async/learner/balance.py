"""Task balancing: draw each task spec in proportion to its configured weight and to how informative its groups are.

Why: the variance filter throws away a group whose rewards are all equal (all correct or all wrong); its rollouts
were paid for and taught nothing. Tasks differ in how often that happens (on the default run's first steps,
chain_sum's groups came back mostly all wrong while letter_counting's were mostly mixed). With spec shares ``s_i``
and informative rates ``r_i``, the share of generated groups that reach the learner is ``reach = sum_i s_i * r_i``.
At equal shares (0.5, 0.5) and rates (0.2, 0.6) that is 0.40; at shares proportional to ``base_i * r_i`` (0.25,
0.75) it is 0.50. Task choice is treated as a non-stationary bandit rewarded by learning signal, in the spirit of
Self-Evolving Curriculum (SEC, arXiv 2505.14970), here with the plainest estimate of that signal: the recent share
of informative groups.

**The rule** (:class:`TaskBalance`, kept by the learner; pure state, no I/O, no clock, deterministic):

- per spec a window of its last ``window_groups`` groups that arrived (every requested group, kept or dropped by
  the variance filter): 1.0 when its rewards are not all equal (``max - min > 1e-9``), else 0.0;
- the informative estimate ``r_i = (mixed + 1) / (n + 2)`` over the window's n groups (Laplace's rule): an unseen
  spec counts as one half, so it is drawn and measured rather than starved before it has a record;
- the weight ``w_i = base_i * r_i``, normalised to shares.

**The floor**: a spec's share is at least ``min_share`` times its configured share ``base_i / sum(base)`` (0.25 by
default: a task configured at half the mix gets at least an eighth of it). Specs under their floor are fixed at it
and the others scaled to fill the rest, repeated until none is under (at most one pass per spec; the floors sum to
``min_share <= 1``, so some spec is always left to scale). A task whose groups are all uninformative today keeps
being drawn, and its rate can recover as the policy (or the curriculum's level) moves.

What it does not do: it never changes a task's difficulty (that is the curriculum, ``prorl_async.envs.curriculum``)
and never drops a task or a prompt (that is prompt skipping, ``prorl_async.learner.skips``, which passes prompts
over within a spec). Disabled, or with one spec, the weights are the configured ones, unchanged.

Usage::

    balance = TaskBalance([1.0, 1.0], ["logic/chain_sum", "logic/letter_counting"], enabled=True)
    balance.observe(spec=0, rewards=[1.0, 0.0, 1.0, 1.0])   # informative
    balance.observe(spec=1, rewards=[0.0] * 4)              # not
    sampler.set_weights(balance.weights())                  # [2/3, 1/3]: estimates 2/3 and 1/3, as shares
    saved = balance.state()                                 # JSON-able; TaskBalance(...).restore(saved)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

_EQUAL = 1e-9  # rewards closer than this are equal: the group carries no signal


class TaskBalance:
    """Per spec, the window of informative (1.0) and uninformative (0.0) groups, and the drawing shares they give.

    Invariants: each window holds at most ``window_groups`` entries, each 0.0 or 1.0, the latest groups of its spec;
    :meth:`weights` is a pure function of the windows and the configuration, sums to 1, every share is > 0 and at
    least ``min_share`` times the spec's configured share; nothing is recorded while the balance is inactive
    (disabled or one spec); :meth:`state` is plain data (JSON-able).
    """

    def __init__(self, base_weights: Sequence[float], labels: Sequence[str], *, enabled: bool,
                 window_groups: int = 32, min_share: float = 0.25) -> None:
        if not base_weights or len(labels) != len(base_weights):
            raise ValueError(f"need at least one spec and one label per spec (weights {list(base_weights)}, labels "
                             f"{list(labels)})")
        if not all(math.isfinite(w) and w > 0 for w in base_weights):
            raise ValueError(f"spec weights must be finite and > 0 (got {list(base_weights)})")
        if window_groups < 1 or not 0 <= min_share <= 1:
            raise ValueError(f"need window_groups >= 1 and 0 <= min_share <= 1 (got {window_groups}, {min_share})")
        self.base = [float(w) for w in base_weights]
        self.labels = list(labels)
        self.enabled, self.window_groups, self.min_share = enabled, window_groups, min_share
        self._windows: list[deque[float]] = [deque(maxlen=window_groups) for _ in self.base]

    @property
    def active(self) -> bool:
        """Whether the weights follow the windows: enabled and more than one spec."""
        return self.enabled and len(self.base) > 1

    def observe(self, spec: int, rewards: Sequence[float]) -> None:
        """A group of ``spec`` arrived with ``rewards`` (kept or dropped): informative unless they are all equal."""
        if not self.active or not len(rewards):
            return
        self._windows[spec].append(1.0 if max(rewards) - min(rewards) > _EQUAL else 0.0)

    def informative(self, spec: int) -> float:
        """The estimate ``(mixed + 1) / (n + 2)`` over the spec's window: 0.5 before any group."""
        window = self._windows[spec]
        return (sum(window) + 1.0) / (len(window) + 2.0)

    def weights(self) -> list[float]:
        """The drawing weights: the configured ones when inactive, else the shares of the rule and the floor (module
        docstring), summing to 1."""
        if not self.active:
            return list(self.base)
        total = sum(self.base)
        floors = [self.min_share * b / total for b in self.base]
        raw = [b * self.informative(i) for i, b in enumerate(self.base)]
        fixed: set[int] = set()
        while True:
            free = [i for i in range(len(raw)) if i not in fixed]
            rest = 1.0 - sum(floors[i] for i in fixed)
            scale = rest / sum(raw[i] for i in free)  # free is never empty: see the module docstring
            shares = [floors[i] if i in fixed else raw[i] * scale for i in range(len(raw))]
            under = [i for i in free if shares[i] < floors[i]]
            if not under:
                return shares
            if len(under) == len(free):  # only by rounding, when the floors fill the mix (min_share ~ 1)
                return floors
            fixed.update(under)

    def summary(self) -> dict[str, dict[str, Any]]:
        """For the step record: per spec its drawing ``share``, ``informative`` estimate and window size ``groups``
        (empty when inactive)."""
        if not self.active:
            return {}
        return {label: {"share": round(share, 4), "informative": round(self.informative(i), 4),
                        "groups": len(self._windows[i])}
                for i, (label, share) in enumerate(zip(self.labels, self.weights(), strict=True))}

    def state(self) -> dict[str, Any]:
        """Plain data to resume from: the windows."""
        return {"windows": [list(w) for w in self._windows]}

    def initial_state(self) -> dict[str, Any]:
        """The :meth:`state` of a fresh balance: empty windows."""
        return {"windows": [[] for _ in self.base]}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (a window longer than this run's ``window_groups`` keeps its latest groups);
        raises ``ValueError`` for a broken state or another number of specs."""
        if not isinstance(state, dict):
            raise ValueError("task balance state: expected a map")
        windows = state.get("windows")
        if not isinstance(windows, list) or len(windows) != len(self.base):
            raise ValueError(f"task balance state: expected windows for {len(self.base)} specs")
        for w in windows:
            if not isinstance(w, list) or not all(type(x) in (int, float) and x in (0, 1) for x in w):
                raise ValueError("task balance state: windows must be lists of 0.0 / 1.0")
        self._windows = [deque((float(x) for x in w), maxlen=self.window_groups) for w in windows]
