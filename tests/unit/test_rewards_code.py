"""Code domain: HumanEval solutions run against the tests in the sandbox; hostile code scores 0."""

from __future__ import annotations

import pytest

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs.score import score
from prorl_async.envs.tasks import TaskMix


@pytest.fixture(scope="module")
def humaneval():
    mix = TaskMix(TasksConfig(mix=[TaskSpec(domain="code", name="humaneval", params={"timeout_s": 2.0})],
                              validation_size=0))
    tasks = [mix.train_problem(0, j) for j in range(mix.train_size(0))]
    return {t.metadata["task_id"]: t for t in tasks}


def fenced(code: str) -> str:
    return f"Here is the solution.\n```python\n{code}\n```\n"


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/32", "HumanEval/38", "HumanEval/162"])
def test_canonical_solution_passes(humaneval, task_id):
    task = humaneval[task_id]
    assert len(humaneval) == 164
    assert score(fenced(task.question + task.answer), task) == (1.0, "all tests passed")  # full function
    assert score(fenced(task.answer), task)[0] == 1.0  # body only: completes the prompt's stub
    assert score(f"<answer>{fenced(task.question + task.answer)}</answer>", task)[0] == 1.0


def test_wrong_solutions_score_zero(humaneval):
    task = humaneval["HumanEval/0"]  # has_close_elements(numbers, threshold) -> bool
    cases = {
        "def has_close_elements(numbers, threshold):\n    return True": "tests failed",
        "def has_close_elements(numbers, threshold):\n    return numbers[": "syntax error",
        "def has_close_elements(numbers, threshold):\n    raise KeyError('x')": "KeyError",
        "I don't know.": "syntax error",
    }
    for code, reason in cases.items():
        reward, why = score(fenced(code), task)
        assert reward == 0.0 and reason in why, (code, why)
    assert score("", task)[0] == 0.0


def test_reward_hacks_do_not_pass(humaneval):
    task = humaneval["HumanEval/0"]
    exits = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"]
    for code in exits:
        reward, reason = score(fenced(code), task)
        assert reward == 0.0 and "exited before the tests finished" in reason, (code, reason)
    always_equal = ("class Anything:\n    def __eq__(self, other):\n        return True\n\n"
                    "def has_close_elements(numbers, threshold):\n    return Anything()")
    reward, reason = score(fenced(always_equal), task)
    assert reward == 0.0 and "not plain data" in reason


@pytest.mark.parametrize(("code", "reason"), [
    ("while True:\n    pass", "CPU time limit|timeout"),
    ("import os\nwhile True:\n    os.fork()", "os.fork is not allowed"),
    ("x = bytearray(16 * 1024 ** 3)", "memory limit"),
    ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "output limit"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 22))", "socket"),
    ("open('/etc/passwd-escape', 'w').write('x')", "PermissionError|OSError"),
    ("open('big', 'wb').write(b'x' * (64 * 1024 ** 2))", "file size limit"),
])
def test_hostile_programs_score_zero_with_a_reason(humaneval, code, reason):
    import re

    reward, why = score(fenced(code), humaneval["HumanEval/0"])
    assert reward == 0.0 and re.search(reason, why), why
