"""Task mix: determinism, weights, disjoint splits, plain-data tasks, prompts through the chat template."""

from __future__ import annotations

import collections
import pickle

import pytest

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs.score import score
from prorl_async.envs.tasks import Task, TaskMix, build_messages, render_prompt
from prorl_async.errors import UserError
from prorl_async.models import build_tiny_tokenizer

EASY_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # about 200 distinct problems


def config(**kwargs) -> TasksConfig:
    kwargs.setdefault("mix", [TaskSpec(domain="logic", name="chain_sum", params=EASY_SUM, weight=3.0),
                              TaskSpec(domain="math", name="basic_arithmetic", params=EASY_SUM, weight=1.0)])
    kwargs.setdefault("train_size", 500)
    return TasksConfig(**kwargs)


def test_training_stream_is_deterministic_and_seeded():
    first, second = TaskMix(config()), TaskMix(config())
    assert [first.train_task(i) for i in range(40)] == [second.train_task(i) for i in range(40)]
    assert [second.train_task(i) for i in (39, 3, 17)] == [first.train_task(i) for i in (39, 3, 17)]  # any order
    other = TaskMix(config(seed=1))
    assert [t.question for t in other.validation_tasks()] != [t.question for t in first.validation_tasks()]


def test_specs_are_drawn_by_weight():
    mix = TaskMix(config())
    counts = collections.Counter(mix.train_task(i).name for i in range(2000))
    assert 0.70 < counts["chain_sum"] / 2000 < 0.80


def test_validation_is_distinct_and_disjoint_from_training():
    mix = TaskMix(config(validation_size=64))
    for spec_index in range(len(mix)):
        held = [t.question for t in mix.validation_tasks(spec_index)]
        assert len(held) == len(set(held)) == 64
        training = {mix.train_problem(spec_index, j).question for j in range(mix.train_size(spec_index))}
        assert not training & set(held)
        assert len(training) > 50  # the small problem space is still mostly available for training
    assert all(t.metadata["split"] == "validation" for t in mix.validation_tasks())
    assert all(mix.train_task(i).metadata["split"] == "train" for i in range(100))


def test_finite_data_sets_split_by_problem():
    mix = TaskMix(TasksConfig(mix=[TaskSpec(domain="code", name="humaneval")], validation_size=64))
    held = {t.metadata["task_id"] for t in mix.validation_tasks()}
    training = {mix.train_problem(0, j).metadata["task_id"] for j in range(mix.train_size(0))}
    assert len(held) == 64 and len(training) == 100 and not held & training


def test_split_does_not_depend_on_position_in_the_mix():
    alone = TaskMix(config(mix=[TaskSpec(domain="logic", name="chain_sum", params=EASY_SUM)]))
    together = TaskMix(config())
    assert [t.question for t in alone.validation_tasks(0)] == [t.question for t in together.validation_tasks(0)]


def test_problem_space_too_small_for_validation_is_a_user_error():
    tiny = TaskSpec(domain="logic", name="chain_sum", params=EASY_SUM)
    with pytest.raises(UserError, match="distinct problems"):
        TaskMix(TasksConfig(mix=[tiny], validation_size=400)).validation_tasks()
    with pytest.raises(UserError, match="unknown stem task"):
        TaskMix(TasksConfig(mix=[TaskSpec(domain="stem", name="chemistry")]))


def test_tasks_are_plain_data():
    mix = TaskMix(TasksConfig(mix=[TaskSpec(domain=d, name=n) for d, n in (
        ("logic", "graph_color"), ("math", "champ"), ("code", "humaneval"), ("stem", "mmlu_stem"),
        ("instruction", "ifeval"))], validation_size=2, train_size=20))
    for spec_index in range(len(mix)):
        task = mix.train_problem(spec_index, 0)
        assert pickle.loads(pickle.dumps(task)) == task
        assert Task.from_dict(task.to_dict()) == task
        assert score("<answer>nothing</answer>", task.to_dict()) == score("<answer>nothing</answer>", task)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_render_prompt_uses_the_chat_template_and_prefill(tokenizer):
    cfg = config(system_prompt="You are precise.", prefill="<answer>")
    task = TaskMix(cfg).train_task(0)
    text = render_prompt(tokenizer, task, cfg)
    assert text.startswith("<|im_start|>system\nYou are precise.<|im_end|>\n<|im_start|>user\n")
    assert task.question in text and "Reply in the form <answer>NUMBER</answer>." in text
    assert text.endswith("<|im_start|>assistant\n<answer>")
    assert [m["role"] for m in build_messages(task, config())] == ["user"]


def test_prefill_joined_with_completion_scores(tokenizer):
    cfg = config(prefill="<answer>")
    task = TaskMix(cfg).train_task(0)
    assert score(cfg.prefill + f"{task.answer}</answer>", task)[0] == 1.0
    assert score(cfg.prefill + f"{task.answer}", task)[0] == 1.0  # stopped at the </answer> stop string
    assert score(cfg.prefill + f"{int(task.answer) + 1}</answer>", task)[0] == 0.0


def test_boxed_format(tokenizer):
    cfg = config(answer_format="boxed")
    task = TaskMix(cfg).train_task(0)
    assert "\\boxed{}" in build_messages(task, cfg)[-1]["content"]
    assert score(f"So the result is \\boxed{{{task.answer}}}.", task)[0] == 1.0


def test_tokenizer_without_chat_template_is_a_user_error(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(UserError, match="chat template"):
        render_prompt(tokenizer, TaskMix(config()).train_task(0), config())


def test_few_shot_demonstrations_come_before_the_question_in_the_asked_format() -> None:
    spec = TaskSpec(domain="logic", name="chain_sum",
                    params={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    for fmt, opener in (("answer_tag", "<answer>"), ("boxed", "\\boxed{")):
        cfg = TasksConfig(mix=[spec], few_shot=2, answer_format=fmt, validation_size=8)
        mix = TaskMix(cfg)
        for task in (mix.train_task(7), mix.validation_tasks(0)[0]):
            messages = build_messages(task, cfg)
            assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
            assert all(m["content"].startswith(opener) for m in messages[1::2])
            assert task.question in messages[-1]["content"]
            assert task.question not in messages[0]["content"] + messages[2]["content"]
    plain = TasksConfig(mix=[spec], validation_size=8)
    assert len(build_messages(TaskMix(plain).train_task(7), plain)) == 1


def test_a_problem_is_never_its_own_few_shot_demonstration() -> None:
    # measured with examples/own_data: training problems 0 and 1 were shown with their own answers as demonstrations
    spec = TaskSpec(domain="logic", name="chain_sum",
                    params={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    cfg = TasksConfig(mix=[spec], few_shot=2, validation_size=8, train_size=50)
    mix = TaskMix(cfg)
    first = [mix.train_problem(0, j) for j in range(3)]
    for j, task in enumerate(first):
        shown = [question for question, _ in task.metadata["few_shot"]]
        assert len(shown) == 2 and task.question not in shown
        assert shown == [t.question for t in first if t is not task][:2], j
    assert [q for q, _ in mix.train_problem(0, 9).metadata["few_shot"]] == [t.question for t in first[:2]]
