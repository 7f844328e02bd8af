"""Curriculum: a task spec's difficulty levels, and the level the learner trains each spec at.

Why: a group of n samples of a prompt the policy solves with probability p has equal rewards (all correct or all
wrong) with probability ``p^n + (1 - p)^n``, and the variance filter throws it away. Measured on the default run,
85% of the groups went that way, more as the policy learned. A procedural task can be made harder or easier, so the
learner moves each spec's difficulty to keep its pass rate in the informative middle.

**Levels** (:func:`spec_levels`): a pure function of the spec and ``tasks.curriculum``, so the learner and every
generator compute the same list; a request carries only the level's number (``GroupRequest.level``).

- Level 0 is the spec's own ``params``, exactly: validation always uses level 0 (validation numbers compare across
  a run and across runs), and a run that stays at level 0 trains on the very problems it trained on before.
- A spec's explicit ``levels``: level k is ``params`` updated with ``levels[k - 1]`` (each over ``params``, not over
  the previous level), all of them.
- Otherwise, for a reasoning-gym task with a curriculum: its configurations at global levels 0, 1, 2, ... (every
  attribute at ``min(L, its last level)``, ranges inclusive from the attribute's first level), of which only the
  curriculum's own fields are kept over ``params``. Each field is taken no easier than the spec's value (the
  direction of an attribute is that of its level values), so no level is easier than level 0; a configuration no
  harder than the previous level (identical, or no field harder) is dropped. Between two of reasoning-gym's levels
  the fields move one attribute at a time, an integer field in at most :data:`MAX_STEPS` even steps: measured on
  the default run, letter_counting's one move from the spec's 1-3 words to reasoning-gym's 5-7 took the pass rate
  from ~0.8 to ~0.15-0.4, and the level went back and forth (21 moves in 30 minutes); the steps 2-4, 3-5, 4-6 sit
  in between. At most ``max_levels`` levels in all.
  reasoning-gym's ``get_max_level()`` reports the *current* level, not how many there are: the count here is the
  longest attribute's.
- Finite data sets and tasks without a curriculum have one level: no curriculum (the learner logs it once).

**Controller** (:class:`Curriculum`, kept by the learner; pure state, no I/O, no clock): per spec the current level
and a window of the pass rates (a group's mean reward) of groups that arrived *at the current level*: every
requested group, the ones the variance filter drops included (they are the signal). A group requested at another
level (in flight across a move) says nothing about this one and is not counted. Once the window holds
``window_groups`` groups, a mean above ``promote_above`` moves one level up (if there is one), below
``demote_below`` one level down (not below 0); the window starts empty after every move.

Defaults (window 16, promote above 0.75, demote below 0.25), for the default group size 8: a prompt of pass rate p
gives an informative group with probability ``1 - p^8 - (1 - p)^8``: at least 0.90 for p in [0.25, 0.75], 0.57 at
0.9, 0.34 at 0.95. The band is wide enough that the drop after a promotion does not demote at once (hysteresis),
and 16 groups (two default batches, 128 samples) average out most of the prompt-to-prompt spread (about 0.3
per group: 0.08 on the mean) before a move.

Usage::

    levels = spec_levels(spec, cfg.tasks)          # [params of level 0, of level 1, ...]
    curriculum = Curriculum.from_config(cfg.tasks, [len(levels), ...])
    level = curriculum.level(spec=0)               # ask for the group at this level
    change = curriculum.observe(0, level, pass_rate=0.9)  # LevelChange once the window says move, else None
    saved = curriculum.state()                     # JSON-able; Curriculum(...).restore(saved)
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prorl_async.config import TasksConfig, TaskSpec

log = logging.getLogger("prorl_async.envs.curriculum")

_GYM_DOMAINS = ("logic", "math")  # domains whose tasks are reasoning-gym generators (math/champ aside)
MAX_STEPS = 4  # steps at most between two of reasoning-gym's levels, per attribute (gym_levels)


# -------------------------------------------------------------------------------------------- levels


def spec_labels(mix: Sequence[TaskSpec]) -> list[str]:
    """``domain/name`` per spec, with ``#i`` (its position) when the mix holds that task more than once."""
    names = [f"{s.domain}/{s.name}" for s in mix]
    return [name if names.count(name) == 1 else f"{name}#{i}" for i, name in enumerate(names)]


def curriculum_wanted(spec: TaskSpec, cfg: TasksConfig) -> bool:
    """Whether ``spec`` asks for a curriculum: its own ``curriculum`` switch, or ``tasks.curriculum.enabled``."""
    return spec.curriculum == "on" or (spec.curriculum == "auto" and cfg.curriculum.enabled)


def spec_levels(spec: TaskSpec, cfg: TasksConfig) -> list[dict[str, Any]]:
    """The params of each level of ``spec``, level 0 first (module docstring); one level when it has no curriculum.

    The levels' params are not checked here: :class:`~prorl_async.envs.tasks.TaskMix` builds each level's problems
    at start-up, where bad params are a UserError naming the level. A data source (``spec.source``) has one level:
    its rows have no difficulty to move (its config refuses ``levels``)."""
    params = dict(spec.params)
    if spec.source is not None or not curriculum_wanted(spec, cfg):
        return [params]
    if spec.levels:
        return [params, *({**params, **override} for override in spec.levels)]
    if spec.domain in _GYM_DOMAINS and spec.name != "champ":
        return gym_levels(spec.name, params, cfg.curriculum.max_levels)
    return [params]


def gym_levels(name: str, params: dict[str, Any], max_levels: int) -> list[dict[str, Any]]:
    """Levels of reasoning-gym task ``name`` over ``params`` from its curriculum (module docstring); ``[params]``
    when it has none. Deterministic: the same list in every process."""
    import reasoning_gym.factory as factory

    if name not in factory.DATASETS or not factory.has_curriculum(name):
        return [dict(params)]
    curriculum = factory.create_curriculum(name)
    attributes = list(curriculum.attributes.values())
    directions: dict[str, int] = {}  # config field -> +1: larger is harder, -1: smaller is harder, 0: cannot tell
    groups: list[list[str]] = []  # the config fields of each attribute (a range's two bounds move together)
    for attr in attributes:
        keys = ("lower_field_name", "upper_field_name", "field_name")
        fields = [f for key in keys if (f := getattr(attr, key, None))]
        directions.update(dict.fromkeys(fields, _direction(attr.levels)))
        groups.append(fields)
    base = _effective(factory.DATASETS[name][1], params, directions)
    levels, previous = [dict(params)], base
    for global_level in range(max((len(a.levels) for a in attributes), default=0)):
        if len(levels) >= max_levels:
            break
        curriculum.set_global_level(global_level)
        try:
            config = curriculum.generate_configuration()
        except Exception as err:  # a curriculum that cannot build its own configuration: the levels so far
            log.warning("%s: reasoning-gym curriculum level %d: %s", name, global_level, err)
            break
        values = {f: _no_easier(getattr(config, f), base[f], d) for f, d in directions.items()}
        if not _harder(values, previous, directions):
            continue
        for step in _steps(previous, values, groups):
            if len(levels) >= max_levels:
                break
            levels.append({**params, **step})
        previous = values
    return levels


def _steps(previous: dict[str, Any], target: dict[str, Any], groups: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """The configurations from ``previous`` to ``target`` (the last one), one attribute at a time, each integer
    field in at most :data:`MAX_STEPS` even steps: ``{1-3 words} -> {5-7 words}`` becomes 2-4, 3-5, 4-6, 5-7, and
    ``{2 terms, 1 digit} -> {2-3 terms, 1-2 digits}`` becomes terms first, then digits. A field that is not an
    integer (a float, a list, a flag) takes its target value at its attribute's last step."""
    steps, current = [], dict(previous)
    for fields in groups:
        moving = [f for f in fields if current[f] != target[f]]
        if not moving:
            continue
        gaps = [abs(target[f] - current[f]) for f in moving if _integer(current[f]) and _integer(target[f])]
        count = min(max(gaps, default=1), MAX_STEPS)
        start = {f: current[f] for f in moving}
        for k in range(1, count + 1):
            for f in moving:
                if k == count:
                    current[f] = target[f]
                elif _integer(start[f]) and _integer(target[f]):
                    current[f] = start[f] + round((target[f] - start[f]) * k / count)
            steps.append(dict(current))
    return steps or [dict(target)]


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _magnitude(value: Any) -> float | None:
    """A level value as one number (a range given as a list: its top), or None."""
    if _number(value):
        return value
    if isinstance(value, list | tuple) and value and all(_number(v) for v in value):
        return max(value)
    return None


def _direction(levels: Sequence[Any]) -> int:
    """+1 when an attribute's values grow with its level, -1 when they shrink, 0 when that cannot be told."""
    if len(levels) < 2:
        return 0
    first, last = _magnitude(levels[0]), _magnitude(levels[-1])
    if first is None or last is None:
        return 0
    return (last > first) - (last < first)


def _effective(config_cls: type, params: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The values ``params`` give the fields ``names`` (the config's default where params leave one out)."""
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return {n: params.get(n, defaults.get(n)) for n in names}


def _no_easier(value: Any, base: Any, direction: int) -> Any:
    """``value``, raised to the spec's own ``base`` where both are numbers and the harder direction is known."""
    if direction and _number(value) and _number(base):
        return max(value, base) if direction > 0 else min(value, base)
    return value


def _harder(values: dict[str, Any], previous: dict[str, Any], directions: dict[str, int]) -> bool:
    """Whether ``values`` is harder than ``previous`` in some field (a change whose direction is unknown counts)."""
    for f, direction in directions.items():
        new, old = values[f], previous[f]
        if new == old:
            continue
        if not (direction and _number(new) and _number(old)) or (new - old) * direction > 0:
            return True
    return False


# ------------------------------------------------------------------------------------------ controller


@dataclass(frozen=True)
class LevelChange:
    """Spec ``spec`` (``label``) moved from level ``previous`` to ``level`` (of ``levels``) after ``groups`` groups of
    mean pass rate ``pass_rate``."""

    spec: int
    label: str
    previous: int
    level: int
    levels: int
    pass_rate: float
    groups: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Curriculum:
    """Per spec, the level to train at, moved by the pass rates of the groups that arrive at it (module docstring).

    ``levels[i]`` is how many levels spec ``i`` has (1: no curriculum, always level 0). Invariants: ``0 <= level(i) <
    levels[i]``; the window of spec i holds only pass rates of groups requested at ``level(i)``, at most
    ``window_groups`` of them (the latest), and is empty right after a move; :meth:`state` is plain data (JSON-able).
    """

    def __init__(self, levels: Sequence[int], labels: Sequence[str] | None = None, *, window_groups: int = 16,
                 promote_above: float = 0.75, demote_below: float = 0.25) -> None:
        if not levels or min(levels) < 1 or (labels is not None and len(labels) != len(levels)):
            raise ValueError(f"need at least one level per spec and one label per spec (levels {list(levels)})")
        if window_groups < 1 or not 0 <= demote_below < promote_above <= 1:
            raise ValueError(f"need window_groups >= 1 and 0 <= demote_below < promote_above <= 1 (got "
                             f"{window_groups}, {demote_below}, {promote_above})")
        self.counts = list(levels)
        self.labels = list(labels) if labels is not None else [str(i) for i in range(len(levels))]
        self.window_groups, self.promote_above, self.demote_below = window_groups, promote_above, demote_below
        self.levels = [0] * len(self.counts)
        self._windows: list[deque[float]] = [deque(maxlen=window_groups) for _ in self.counts]
        self.ignored = 0  # groups that arrived for a level their spec had left

    @classmethod
    def from_config(cls, cfg: TasksConfig, levels: Sequence[int]) -> Curriculum:
        """The controller for ``cfg.mix`` whose specs have ``levels`` levels each; logs once each spec that asks
        for a curriculum and has none."""
        labels = spec_labels(cfg.mix)
        for i, (spec, count) in enumerate(zip(cfg.mix, levels, strict=True)):
            if count == 1 and curriculum_wanted(spec, cfg):
                log.info("tasks.mix[%d] (%s): no curriculum (reasoning-gym has none for it and the spec gives no "
                         "levels); it trains at its own params", i, labels[i])
        c = cfg.curriculum
        return cls(levels, labels, window_groups=c.window_groups, promote_above=c.promote_above,
                   demote_below=c.demote_below)

    def active(self, spec: int) -> bool:
        """Whether spec ``spec`` has a curriculum (more than one level)."""
        return self.counts[spec] > 1

    def level(self, spec: int) -> int:
        return self.levels[spec]

    def observe(self, spec: int, level: int, pass_rate: float) -> LevelChange | None:
        """A group requested at ``level`` of ``spec`` arrived with mean reward ``pass_rate``; the move it causes."""
        if not self.active(spec):
            return None
        if level != self.levels[spec]:
            self.ignored += 1
            return None
        window = self._windows[spec]
        window.append(float(pass_rate))
        if len(window) < self.window_groups:
            return None
        mean = sum(window) / len(window)
        move = 0
        if mean > self.promote_above and level + 1 < self.counts[spec]:
            move = 1
        elif mean < self.demote_below and level > 0:
            move = -1
        if not move:
            return None
        self.levels[spec] = level + move
        window.clear()
        return LevelChange(spec, self.labels[spec], level, level + move, self.counts[spec], round(mean, 4),
                           self.window_groups)

    def summary(self) -> dict[str, dict[str, Any]]:
        """For the step record: per spec with a curriculum, its level, level count, and the window's pass rate so
        far (None while empty) over ``groups`` groups."""
        out: dict[str, dict[str, Any]] = {}
        for spec, label in enumerate(self.labels):
            if self.active(spec):
                window = self._windows[spec]
                rate = round(sum(window) / len(window), 4) if window else None
                out[label] = {"level": self.levels[spec], "levels": self.counts[spec], "pass_rate": rate,
                              "groups": len(window)}
        return out

    def state(self) -> dict[str, Any]:
        """Plain data to resume from: the levels and the windows."""
        return {"levels": list(self.levels), "windows": [list(w) for w in self._windows], "ignored": self.ignored}

    def initial_state(self) -> dict[str, Any]:
        """The :meth:`state` of a fresh controller: every spec at level 0, empty windows."""
        return {"levels": [0] * len(self.counts), "windows": [[] for _ in self.counts], "ignored": 0}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`. A level beyond what this run's config gives its spec is lowered to the top
        one (with an empty window); raises ``ValueError`` for a broken state or another number of specs."""
        if not isinstance(state, dict):
            raise ValueError("curriculum state: expected a map")
        levels, windows, ignored = state.get("levels"), state.get("windows"), state.get("ignored", 0)
        ok = isinstance(levels, list) and isinstance(windows, list) and len(levels) == len(windows) == len(self.counts)
        if not ok or not all(isinstance(x, int) and x >= 0 for x in levels) or not isinstance(ignored, int):
            raise ValueError(f"curriculum state: expected levels and windows for {len(self.counts)} specs")
        if not all(isinstance(w, list) and all(_number(r) for r in w) for w in windows):
            raise ValueError("curriculum state: windows must be lists of pass rates")
        restored = [deque(w, maxlen=self.window_groups) for w in windows]
        levels = list(levels)
        for spec, level in enumerate(levels):
            if level >= self.counts[spec]:
                levels[spec] = self.counts[spec] - 1
                restored[spec].clear()
        self.levels, self._windows, self.ignored = levels, restored, ignored
