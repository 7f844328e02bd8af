"""STEM domain: MMLU STEM multiple choice."""

from __future__ import annotations

import pytest

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs.score import score
from prorl_async.envs.tasks import TaskMix, build_messages
from prorl_async.errors import UserError


@pytest.fixture(scope="module")
def task():
    cfg = TasksConfig(mix=[TaskSpec(domain="stem", name="mmlu_stem")], validation_size=4)
    return TaskMix(cfg).train_problem(0, 0)


def test_prompt_lists_the_choices(task):
    content = build_messages(task, TasksConfig())[-1]["content"]
    assert task.question in content and "\nA. " in content and "\nD. " in content
    assert content.endswith("Reply in the form <answer>LETTER</answer>.")


@pytest.mark.parametrize("template", ["<answer>{c}</answer>", "<answer>({c})</answer>", "<answer>{l}</answer>",
                                      "<answer>{c}. {t}</answer>", "\\boxed{{{c}}}", "<answer>**{c}**</answer>",
                                      "The answer is {c}", "<answer>{t}</answer>"])
def test_correct_choice_scores_one(task, template):
    letter = task.answer
    text = task.checker["choices"]["ABCD".index(letter)]
    assert score(template.format(c=letter, l=letter.lower(), t=text), task)[0] == 1.0


def test_wrong_or_ambiguous_choice_scores_zero(task):
    wrong = next(c for c in "ABCD" if c != task.answer)
    for text in (f"<answer>{wrong}</answer>", "<answer>A B C D</answer>", f"<answer>{task.answer} or {wrong}</answer>",
                 "<answer>E</answer>", "I am not sure", "<answer></answer>"):
        assert score(text, task)[0] == 0.0, text


def test_subjects_param():
    cfg = TasksConfig(mix=[TaskSpec(domain="stem", name="mmlu_stem", params={"subjects": ["astronomy"]})],
                      validation_size=4)
    mix = TaskMix(cfg)
    assert 140 <= mix.train_size(0) <= 152 - 4  # 152 astronomy questions, a few repeated
    assert {mix.train_problem(0, j).metadata["subject"] for j in range(20)} == {"astronomy"}
    with pytest.raises(UserError, match="not STEM"):
        TaskMix(TasksConfig(mix=[TaskSpec(domain="stem", name="mmlu_stem", params={"subjects": ["marketing"]})]))
