"""Logic domain: reasoning-gym generators scored by their own verifiers, through ``score``."""

from __future__ import annotations

import json

import pytest

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs.score import score
from prorl_async.envs.tasks import TaskMix
from prorl_async.errors import UserError

EASY_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def first_task(name: str, params: dict | None = None, **spec):
    mix = TaskMix(TasksConfig(mix=[TaskSpec(domain="logic", name=name, params=params or {}, **spec)],
                              validation_size=2, train_size=50))
    return mix.train_problem(0, 0)


@pytest.fixture(scope="module")
def chain_sum():
    task = first_task("chain_sum", EASY_SUM)
    assert task.answer is not None
    return task


@pytest.mark.parametrize("template", [
    "<answer>{a}</answer>", "<answer> {a} </answer>", "<answer>{a}", "<ANSWER>{a}</ANSWER>", "{a}</answer>",
    "Let me add.\n<answer>{a}</answer>", "<think>maybe 3</think><answer>{a}</answer>", "\\boxed{{{a}}}",
    "<answer>\\boxed{{{a}}}</answer>", "<answer>${a}$</answer>", "<answer>{a}.</answer>", "The answer is {a}.",
])
def test_correct_answer_scores_one(chain_sum, template):
    assert score(template.format(a=chain_sum.answer), chain_sum) == (1.0, "correct")


def test_equal_number_in_another_form_scores_one(chain_sum):
    assert score(f"<answer>{chain_sum.answer}.0</answer>", chain_sum)[0] == 1.0
    assert score(f"<answer>x = {chain_sum.answer}</answer>", chain_sum)[0] == 1.0


@pytest.mark.parametrize("template", [
    "<answer>{w}</answer>", "<answer>1{a}</answer>", "<answer></answer>", "{a}", "no answer at all",
    "<think><answer>{a}</answer>", "<answer>{a} or {w}</answer>",
])
def test_wrong_or_missing_answer_scores_zero(chain_sum, template):
    wrong = int(chain_sum.answer) + 1
    reward, reason = score(template.format(a=chain_sum.answer, w=wrong), chain_sum)
    assert reward == 0.0 and reason


def test_partial_credit_only_when_asked():
    strict = first_task("chain_sum", EASY_SUM)
    graded = first_task("chain_sum", EASY_SUM, partial_credit=True)
    assert strict.question == graded.question
    text = f"<answer>1{strict.answer}</answer>"  # contains the reference: reasoning-gym gives partial credit
    assert score(text, strict)[0] == 0.0
    assert 0.0 < score(text, graded)[0] < 1.0


def test_family_relationships():
    task = first_task("family_relationships")
    assert score(f"<answer>{task.answer}</answer>", task)[0] == 1.0
    assert score("<answer>grandfather-in-law-twice-removed</answer>", task)[0] == 0.0


def test_checker_task_without_reference_answer():
    task = first_task("graph_color")
    assert task.answer is None
    coloring = {str(k): v for k, v in task.checker["metadata"]["possible_answer"].items()}
    assert score(f"<answer>{json.dumps(coloring)}</answer>", task) == (1.0, "correct")
    assert score("<answer>{}</answer>", task)[0] == 0.0


def test_scorer_that_raises_on_junk_scores_zero():
    task = first_task("prime_factorization")
    assert score(f"<answer>{task.answer}</answer>", task)[0] == 1.0
    reward, reason = score("<answer>x*y</answer>", task)  # reasoning-gym raises ValueError here
    assert reward == 0.0 and "rejected" in reason


def test_unknown_generator_or_params_is_a_user_error():
    with pytest.raises(UserError, match="unknown reasoning-gym generator"):
        TaskMix(TasksConfig(mix=[TaskSpec(domain="logic", name="no_such_generator")]))
    with pytest.raises(UserError, match="unknown params"):
        TaskMix(TasksConfig(mix=[TaskSpec(domain="logic", name="chain_sum", params={"bogus": 1})]))
    with pytest.raises(UserError, match="invalid params"):
        TaskMix(TasksConfig(mix=[TaskSpec(domain="logic", name="chain_sum", params={"min_terms": 0})]))
