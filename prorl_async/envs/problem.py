"""The plain data of tasks: a :class:`Task` (what a prompt asks and how its answer is checked), a domain's
:class:`Problem` and problem sources, and :func:`derive_seed`.

Kept apart from :mod:`prorl_async.envs.tasks` (the mix, splits and prompts) so that the domains and the data sources,
which the mix builds on, import these without importing the mix: no import circle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Task:
    """One problem, ready to prompt and to score.

    ``checker`` holds what the domain's scorer needs beyond ``answer`` (tests, instruction arguments,
    choices, a generator's metadata) plus ``answer_format`` and ``partial_credit``, and the spec's ``reward_fn``
    and a data row's columns (``row``) where there are; ``metadata`` is informational (split, index, spec, source,
    difficulty), but for the prompt of a data row (``messages``) and few-shot demonstrations (``few_shot``).
    """

    id: str
    domain: str
    name: str
    question: str
    answer: str | None = None
    checker: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        return cls(**data)


@dataclass(frozen=True)
class Problem:
    """What a domain yields for one problem; :class:`TaskMix` adds the id, split and scoring options."""

    question: str
    answer: str | None
    checker: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FiniteProblems:
    """A fixed data set (HumanEval, MMLU, IFEval, CHAMP), in a stable order."""

    problems: Sequence[Problem]


@dataclass(frozen=True)
class ProceduralProblems:
    """A generator: ``make(seed, size)`` returns ``item(index) -> Problem`` for ``0 <= index < size``."""

    make: Callable[[int, int], Callable[[int], Problem]]


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed from any parts, the same in every process (no ``hash()`` randomisation)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "little")
