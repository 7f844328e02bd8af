"""Code rows with input/output tests (verl / PRIME / TACO / APPS): programs run in the sandbox against the tests.

Through a verl-format parquet as a user would give it (``domain = "code"``, nothing else), then the scorer's cases.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs.data import check
from prorl_async.envs.domains import code_io
from prorl_async.envs.score import score
from prorl_async.envs.tasks import TaskMix
from prorl_async.errors import UserError

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ADD = "a, b = map(int, input().split())\nprint(a + b)"
STDIO = {"inputs": ["1 2\n", "10 20\n", "-5 5\n"], "outputs": ["3\n", "30\n", "0\n"]}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


def fenced(code: str) -> str:
    return f"Let me think.\n```python\n{code}\n```\n"


def verl_code_rows(n: int) -> list[dict]:
    """PRIME's Eurus-2-RL code rows in verl's schema: the tests are a JSON string in ``reward_model.ground_truth``."""
    return [{"data_source": "codecontests", "ability": "code",
             "prompt": [{"role": "user", "content": f"Read two integers and print their sum. (variant {i})"}],
             "reward_model": {"style": "rule", "ground_truth": json.dumps(STDIO)},
             "extra_info": {"index": i}} for i in range(n)]


def test_a_verl_code_parquet_trains_with_only_its_path_and_domain(tmp_path):
    pq.write_table(pa.Table.from_pylist(verl_code_rows(12)), tmp_path / "code.parquet")
    spec = TaskSpec(domain="code", source={"path": str(tmp_path / "code.parquet")}, params={"max_tests": 2})
    assert check(spec).answer == "reward_model.ground_truth"
    task = TaskMix(TasksConfig(mix=[spec], validation_size=2)).train_problem(0, 0)
    assert task.metadata["messages"] == task.checker["row"]["prompt"]  # the row's own prompt, as it is
    assert score(fenced(ADD), task) == (1.0, "2/2 tests passed")  # max_tests: the first two
    assert score(fenced("print(3)"), task) == (0.0, "1/2 tests passed")


def test_rows_whose_answer_is_not_tests_are_one_line_at_start_up(tmp_path):
    rows = verl_code_rows(3)
    for row in rows:
        row["reward_model"]["ground_truth"] = "42"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "code.parquet")
    with pytest.raises(UserError, match=r"need input/output tests in 'reward_model\.ground_truth'"):
        check(TaskSpec(domain="code", source={"path": str(tmp_path / "code.parquet")}))


def test_standard_input_programs_pass_fail_and_earn_partial_credit():
    limits = {"timeout_s": 2.0}
    assert code_io.score(fenced(ADD), STDIO, limits) == (1.0, "3/3 tests passed")
    wrong = "a, b = map(int, input().split())\nprint(abs(a) + b)"  # wrong on the negative case
    assert code_io.score(fenced(wrong), json.dumps(STDIO), limits) == (0.0, "2/3 tests passed")
    assert code_io.score(fenced(wrong), STDIO, limits, partial_credit=True) == (pytest.approx(2 / 3),
                                                                              "2/3 tests passed")
    via_buffer = "import sys\na, b = map(int, sys.stdin.buffer.read().split())\nsys.stdout.write(f'{a + b}  \\n\\n')"
    assert code_io.score(fenced(via_buffer), STDIO, limits)[0] == 1.0  # stdin.buffer; trailing blanks ignored
    exits = "a, b = map(int, input().split())\nprint(a + b)\nexit()"
    assert code_io.score(fenced(exits), STDIO, limits)[0] == 1.0  # exit() works without site
    floats = {"inputs": ["1\n"], "outputs": ["0.3333333\n"]}
    assert code_io.score(fenced("print(1 / 3)"), floats, limits)[0] == 1.0  # within 1e-6
    assert code_io.score(fenced("print(0.34)"), floats, limits)[0] == 0.0


def test_call_based_tests_call_the_function_or_a_solution_method():
    tests = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]}  # APPS wraps outputs in a list
    assert code_io.score(fenced("def add(a, b):\n    return a + b"), tests, {})[0] == 1.0
    method = "class Solution:\n    def add(self, a, b):\n        return a + b"
    assert code_io.score(fenced(method), tests, {})[0] == 1.0
    prime = {"fn_name": "add", "inputs": ["1\n2", "[1]\n[2]"], "outputs": ["3", "[1, 2]"]}  # PRIME: JSON lines
    assert code_io.score(fenced("def add(a, b):\n    return a + b"), json.dumps(prime), {})[0] == 1.0
    pairs = {"fn_name": "pair", "inputs": [[1]], "outputs": [[1, 1]]}
    assert code_io.score(fenced("def pair(x):\n    return (x, x)"), pairs, {})[0] == 1.0  # a tuple is a list
    assert code_io.score(fenced("def add(a, b):\n    raise ValueError"), tests, {}) == (0.0, "0/2 tests passed")


def test_what_cannot_pass_scores_zero_with_a_reason():
    limits = {"timeout_s": 0.5}
    assert code_io.score(fenced("while True:\n    pass"), STDIO, limits)[0] == 0.0
    assert code_io.score("I cannot solve this.", STDIO, limits)[1].startswith("syntax error")
    assert code_io.score(fenced("print("), STDIO, limits)[1].startswith("syntax error")
    assert code_io.score(fenced(ADD), {"inputs": ["1 2"]}, limits)[1].startswith("unusable tests")
    assert code_io.score(fenced(ADD), "not json", limits)[1].startswith("unusable tests")
    around = "import os\nos.write(1, b'noise\\n')\n" + ADD  # bytes written around the capture break no report
    assert code_io.score(fenced(around), STDIO, {"timeout_s": 2.0}) == (1.0, "3/3 tests passed")
