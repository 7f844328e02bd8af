"""Math domain: numbers compared exactly, expressions through math-verify, pathological inputs refused."""

from __future__ import annotations

import time

import pytest

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs.domains.math import equivalent, explosive
from prorl_async.envs.score import score
from prorl_async.envs.tasks import TaskMix


@pytest.fixture(scope="module")
def gsm():
    mix = TaskMix(TasksConfig(mix=[TaskSpec(domain="math", name="gsm_symbolic")], validation_size=2, train_size=20))
    return mix.train_problem(0, 0)


@pytest.fixture(scope="module")
def champ_tasks():
    mix = TaskMix(TasksConfig(mix=[TaskSpec(domain="math", name="champ")], validation_size=8))
    return [mix.train_problem(0, j) for j in range(mix.train_size(0))]


@pytest.mark.parametrize("template", ["<answer>{a}</answer>", "\\boxed{{{a}}}", "<answer>{a}.00</answer>",
                                      "<answer>\\boxed{{{a}}}</answer>", "The final answer is {a}"])
def test_gsm_symbolic_correct(gsm, template):
    assert score(template.format(a=gsm.answer), gsm) == (1.0, "correct")


@pytest.mark.parametrize("template", ["<answer>{w}</answer>", "<answer>{a}{a}</answer>", "<answer>x</answer>", "{a}"])
def test_gsm_symbolic_wrong(gsm, template):
    assert score(template.format(a=gsm.answer, w=int(gsm.answer) + 1), gsm)[0] == 0.0


def test_champ_expression_answers(champ_tasks):
    powers = [t for t in champ_tasks if t.answer == "2^(n-1)"] or [t for t in champ_tasks if "^" in t.answer]
    assert powers, "expected a CHAMP problem with a power in its answer"
    task = powers[0]
    assert score(f"<answer>{task.answer}</answer>", task)[0] == 1.0
    if task.answer == "2^(n-1)":
        assert score("<answer>2^{n-1}</answer>", task)[0] == 1.0
        assert score("<answer>\\frac{2^n}{2}</answer>", task)[0] == 1.0
        assert score("<answer>2^n</answer>", task)[0] == 0.0


@pytest.mark.parametrize(("gold", "candidate", "same"), [
    ("1/2", "\\frac{1}{2}", True), ("1/2", "0.5", True), ("1/2", "0.6", False), ("7", "7.0", True),
    ("7", "8", False), ("sqrt(2)", "\\sqrt{2}", True), ("n(n-3)/2", "\\frac{n^2-3n}{2}", True),
    ("n(n-3)/2", "n^2", False), ("-4", "\u22124", True),
])
def test_equivalence(gold, candidate, same):
    assert equivalent(gold, candidate) is same


def test_power_towers_are_refused_quickly():
    for tower in ("9^{9^{9^9}}", "10^{10^{10}}", "2**2**40", "2^{123456}", "99999!"):
        assert explosive(tower)
        start = time.monotonic()
        assert equivalent("7", tower) is False
        assert time.monotonic() - start < 0.5
    assert not explosive("x^2 + y^2") and not explosive("2^{100}")
