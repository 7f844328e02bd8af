"""Logic: any reasoning-gym generator (family_relationships, acre, boxnet, game_of_life, countdown, ...).

``name`` is the generator, ``params`` its config fields (difficulty: ``min_terms``, ``max_digits``, ...;
``seed`` and ``size`` are ours). Answers are scored by the generator's own ``score_answer`` on the
extracted answer, so tasks without a single reference answer (``answer=None``: graph_color,
propositional_logic, ...) work too. reasoning-gym gives partial credit (an answer containing the
reference, for example); unless the spec asks for ``partial_credit`` the reward is 1 only for a full
score. A numeric reference also accepts an equal number in another form (``7.0``, ``x = 7``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from prorl_async.envs.domains.extract import ask_for, final_answer, parse_number
from prorl_async.envs.problem import Problem, ProceduralProblems, Task
from prorl_async.errors import UserError

_OURS = ("seed", "size")


def problems(name: str, params: dict[str, Any]) -> ProceduralProblems:
    check_generator(name, params)

    def make(seed: int, size: int):
        dataset = _create(name, params, seed=seed, size=size)

        def item(index: int) -> Problem:
            entry = dataset[index]
            meta = entry["metadata"]
            answer = entry["answer"]
            return Problem(
                question=entry["question"],
                answer=None if answer is None else str(answer),
                checker={"generator": name, "params": params, "metadata": meta},
                metadata={"source": "reasoning-gym", "difficulty": _plain(meta.get("difficulty"))},
            )

        return item

    return ProceduralProblems(make)


def check_generator(name: str, params: dict[str, Any]) -> None:
    """UserError unless ``name`` is a reasoning-gym generator and ``params`` are fields of its config."""
    import reasoning_gym.factory

    datasets = reasoning_gym.factory.DATASETS
    if name not in datasets:
        examples = ", ".join(sorted(datasets)[:12])
        raise UserError(f"unknown reasoning-gym generator {name!r} (for example: {examples}, ...)")
    fields = [f.name for f in dataclasses.fields(datasets[name][1]) if f.name not in _OURS]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise UserError(f"{name}: unknown params {unknown} (allowed: {', '.join(fields)})")
    try:
        _create(name, params, seed=0, size=1)
    except Exception as err:
        raise UserError(f"{name}: invalid params {params}: {err}") from None


def prompt(task: Task, answer_format: str) -> str:
    noun = "NUMBER" if task.answer is not None and parse_number(task.answer) is not None else "ANSWER"
    return f"{task.question.rstrip()}\n\n{ask_for(answer_format, noun)}"


def score(text: str, task: Task) -> tuple[float, str]:
    candidate = final_answer(text, task.checker.get("answer_format", "answer_tag"))
    if candidate is None:
        return 0.0, "no answer found"
    return gym_score(candidate, task)


def gym_score(candidate: str, task: Task) -> tuple[float, str]:
    """Score an extracted answer with the generator's verifier (shared with the math domain)."""
    checker = task.checker
    entry = {"question": task.question, "answer": task.answer, "metadata": checker["metadata"]}
    try:
        raw = float(_scorer(checker["generator"], json.dumps(checker["params"], sort_keys=True))(candidate, entry))
    except Exception as err:  # some scorers raise on malformed answers (prime_factorization: ValueError)
        return 0.0, f"answer rejected by the verifier ({type(err).__name__})"
    if raw < 1.0 and task.answer is not None:
        gold = parse_number(task.answer)
        if gold is not None and parse_number(candidate) == gold:
            raw = 1.0
    if raw >= 1.0 - 1e-9:
        return 1.0, "correct"
    reward = raw if checker.get("partial_credit") else 0.0
    expected = f" (expected {_short(task.answer)})" if task.answer is not None else ""
    credit = f", partial score {raw:.2f}" if raw > 0 else ""
    return reward, f"wrong answer {_short(candidate)}{expected}{credit}"


@functools.lru_cache(maxsize=64)
def _scorer(name: str, params_json: str):
    """A generator's ``score_answer`` (some load word lists when built: cached per process)."""
    return _create(name, json.loads(params_json), seed=0, size=1).score_answer


def _create(name: str, params: dict[str, Any], seed: int, size: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, seed=seed, size=size, **params)


def _plain(value: Any) -> Any:
    """Difficulty settings as JSON-friendly data (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def _short(text: str | None, limit: int = 60) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
