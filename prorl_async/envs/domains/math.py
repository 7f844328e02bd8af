"""Math: reasoning-gym math generators (gsm_symbolic, basic_arithmetic, chain_sum, ...) and CHAMP.

Answers are compared with the reference by value: two plain integers directly (the common case, in
microseconds), anything else with math-verify (``verify(parse(gold), parse(answer))``, sympy-based).
math-verify's own timeouts use ``signal.alarm`` and are disabled here (``parsing_timeout=None``,
``timeout_seconds=None``): :func:`prorl_async.envs.score.score` enforces the time limit. Answers that would
make sympy compute huge integers in C (power towers, big factorials), where no signal can interrupt it,
are refused before parsing.

``champ``: the problems of champ-dataset (read from its JSON file) whose reference answer is a single
closed-form expression (116 of 270; answers in prose, lists or equations are left out).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from prorl_async.envs.domains import logic
from prorl_async.envs.domains.extract import final_answer, parse_number
from prorl_async.envs.problem import FiniteProblems, Problem, ProceduralProblems, Task
from prorl_async.errors import UserError

MAX_VERIFY_CHARS = 300
_PROSE = re.compile(r"[A-Za-z]{2,}")
_MATH_WORDS = {"sqrt", "ln", "log", "sin", "cos", "tan", "pi", "frac", "cdot", "times"}


def problems(name: str, params: dict[str, Any]) -> FiniteProblems | ProceduralProblems:
    if name == "champ":
        if params:
            raise UserError(f"math/champ takes no params (got {sorted(params)})")
        return FiniteProblems(champ_problems())
    return logic.problems(name, params)


prompt = logic.prompt  # the same question + answer-format line as the reasoning-gym logic tasks


def score(text: str, task: Task) -> tuple[float, str]:
    candidate = final_answer(text, task.checker.get("answer_format", "answer_tag"))
    if candidate is None:
        return 0.0, "no answer found"
    if task.answer is None:  # a generator that checks answers itself (no single reference)
        return logic.gym_score(candidate, task)
    if equivalent(task.answer, candidate):
        return 1.0, "correct"
    return 0.0, f"wrong answer {logic._short(candidate)} (expected {logic._short(task.answer)})"


def equivalent(gold: str, candidate: str) -> bool:
    """Whether ``candidate`` has the value of ``gold``."""
    exact_gold, exact_candidate = parse_number(gold), parse_number(candidate)
    both_numbers = exact_gold is not None and exact_candidate is not None
    if both_numbers and (exact_gold == exact_candidate or exact_gold.denominator == exact_candidate.denominator == 1):
        return exact_gold == exact_candidate  # equal, or two different integers: no rounding question
    if len(candidate) > MAX_VERIFY_CHARS or explosive(candidate):
        return False
    parsed_gold = _parse(gold)
    return bool(parsed_gold) and bool(_math_verify().verify(parsed_gold, _parse(candidate), timeout_seconds=None))


def explosive(expression: str) -> bool:
    """Would evaluating this make sympy build a huge number: a power inside an exponent, an exponent
    over 4 digits, or the factorial of a number over 3 digits."""
    text = expression.replace("**", "^")
    for match in re.finditer(r"\^", text):
        exponent, end = _operand(text, match.end())
        tower = "^" in exponent or text[end:].lstrip().startswith("^")  # a^(b^c), or a^b^c (right-assoc)
        if tower or any(len(d) > 4 for d in re.findall(r"\d+", exponent)):
            return True
    return bool(re.search(r"\d{4,}\s*!", text))


def _operand(text: str, start: int) -> tuple[str, int]:
    """The exponent after ``^`` (a balanced {...} or (...) group, or the next token) and where it ends."""
    offset = len(text[start:]) - len(text[start:].lstrip())
    begin = start + offset
    rest = text[begin:]
    if rest[:1] in ("{", "("):
        close = {"{": "}", "(": ")"}[rest[0]]
        depth = 0
        for i, char in enumerate(rest):
            depth += (char == rest[0]) - (char == close)
            if depth == 0:
                return rest[1:i], begin + i + 1
        return rest, len(text)
    token = re.match(r"[-+]?[\w.\\]+", rest)
    return (token.group(0), begin + token.end()) if token else ("", begin)


@functools.lru_cache(maxsize=4096)
def _parse(expression: str) -> list:
    text = expression if "$" in expression or "\\boxed" in expression else f"${expression}$"
    return _math_verify().parse(text, parsing_timeout=None)


@functools.lru_cache(maxsize=1)
def _math_verify():
    """The math_verify module, its "timeout is disabled" warnings silenced: we enforce the time limit."""
    import math_verify
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    return math_verify


# --------------------------------------------------------------------------------------------- CHAMP


@functools.lru_cache(maxsize=1)
def champ_problems() -> tuple[Problem, ...]:
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("math/champ needs the champ-dataset package (scripts/setup.sh installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_files" / "v0.json"
    records = json.loads(path.read_text())["problems"]
    out = []
    for key in sorted(records):
        record = records[key]
        answer = record["_answer"].strip()
        if not _closed_form(answer):
            continue
        out.append(Problem(
            question=record["_text"],
            answer=answer,
            metadata={"source": "champ", "identifier": record["identifier"], "category": record["category"]},
        ))
    return tuple(out)


def _closed_form(answer: str) -> bool:
    """A single expression: no prose, lists, equations or floor/ceil (math-verify misreads those)."""
    if any(mark in answer for mark in ("=", ",", "±", "...", "floor", "ceil")):
        return False
    return all(word in _MATH_WORDS for word in _PROSE.findall(answer))
