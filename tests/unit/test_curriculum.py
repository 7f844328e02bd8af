"""Curriculum: the levels of a spec (level 0 is its params, each next one harder), the controller's moves (window,
promotion, demotion, reset, groups from a level left behind), its state, and the mix's problems at a level."""

from __future__ import annotations

import itertools
import json

import pytest

from prorl_async.config import CurriculumConfig, TasksConfig, TaskSpec
from prorl_async.envs.curriculum import Curriculum, LevelChange, gym_levels, spec_labels, spec_levels
from prorl_async.envs.tasks import TaskMix
from prorl_async.errors import UserError

EASY_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # configs/default.toml's chain_sum
FEW_WORDS = {"min_words": 1, "max_words": 3}  # and its letter_counting
SUM_FIELDS = ("min_terms", "max_terms", "min_digits", "max_digits")


def tasks(*specs: TaskSpec, **kwargs) -> TasksConfig:
    kwargs.setdefault("train_size", 300)
    kwargs.setdefault("validation_size", 16)
    return TasksConfig(mix=list(specs) or [TaskSpec(domain="logic", name="chain_sum", params=EASY_SUM)], **kwargs)


def harder(a: dict, b: dict, fields: tuple[str, ...]) -> bool:
    """``a`` is strictly harder than ``b``: no field smaller (every field here grows with difficulty), one larger."""
    return all(a[f] >= b[f] for f in fields) and any(a[f] > b[f] for f in fields)


# ------------------------------------------------------------------------------------------ levels


@pytest.mark.parametrize(("name", "params", "fields"), [
    ("chain_sum", EASY_SUM, SUM_FIELDS),
    ("letter_counting", FEW_WORDS, ("min_words", "max_words")),
])
def test_levels_start_at_the_params_and_get_strictly_harder(name: str, params: dict, fields: tuple) -> None:
    levels = spec_levels(TaskSpec(domain="logic", name=name, params=params), tasks())
    assert levels[0] == params and len(levels) == CurriculumConfig().max_levels == 8
    for easier, next_one in itertools.pairwise(levels):
        assert set(next_one) == set(fields) and harder(next_one, easier, fields), (easier, next_one)
    assert levels == gym_levels(name, params, 8)  # a pure function: the same in every process


def test_chain_sum_levels_follow_reasoning_gym_and_never_go_below_the_spec() -> None:
    levels = spec_levels(TaskSpec(name="chain_sum", params=EASY_SUM), tasks())
    # reasoning-gym's global level 0 is the spec itself (dropped); level L widens both ranges by L, reached here one
    # attribute at a time: terms, then digits
    assert levels[1] == {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}
    assert levels[2] == {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
    assert levels[4] == {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3}
    hard = {"min_terms": 4, "max_terms": 4, "min_digits": 1, "max_digits": 1, "allow_negation": True}
    raised = spec_levels(TaskSpec(name="chain_sum", params=hard), tasks())
    assert raised[0] == hard and all(level["min_terms"] >= 4 and level["allow_negation"] for level in raised)
    assert raised[1]["max_terms"] == 4 and raised[1]["max_digits"] == 2  # terms held at the spec's, digits grow
    assert len(spec_levels(TaskSpec(name="chain_sum", params=EASY_SUM), tasks(curriculum={"max_levels": 3}))) == 3


def test_a_wide_jump_between_reasoning_gym_levels_is_climbed_in_even_steps() -> None:
    # the default's letter_counting (1-3 words) against reasoning-gym's first level (5-7 words): measured on the
    # default run, the pass rate fell from ~0.8 to ~0.15-0.4 in one move and the level went back and forth
    levels = spec_levels(TaskSpec(name="letter_counting", params=FEW_WORDS), tasks())
    assert [(lv["min_words"], lv["max_words"]) for lv in levels[:6]] == [(1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (5, 8)]
    # a doubling attribute (leg_counting's instances: 2, 4, 8, ... 1024) gets at most MAX_STEPS steps per level
    legs = spec_levels(TaskSpec(name="leg_counting", params={}), tasks(curriculum={"max_levels": 30}))
    tops = [lv.get("max_instances") for lv in legs[1:]]
    assert tops == sorted(tops) and len(legs) == 30


def test_which_specs_have_a_curriculum() -> None:
    spec = TaskSpec(name="chain_sum", params=EASY_SUM)
    assert len(spec_levels(spec.model_copy(update={"curriculum": "off"}), tasks())) == 1
    off = tasks(curriculum={"enabled": False})
    assert len(spec_levels(spec, off)) == 1 and len(spec_levels(spec.model_copy(update={"curriculum": "on"}), off)) > 1
    assert spec_levels(TaskSpec(domain="math", name="gsm_symbolic"), tasks()) == [{}]  # no reasoning-gym curriculum
    assert spec_levels(TaskSpec(domain="code", name="humaneval"), tasks()) == [{}]  # a fixed data set
    explicit = spec.model_copy(update={"levels": [{"max_terms": 3}, {"max_terms": 5, "max_digits": 2}]})
    assert spec_levels(explicit, tasks()) == [EASY_SUM, {**EASY_SUM, "max_terms": 3},
                                              {**EASY_SUM, "max_terms": 5, "max_digits": 2}]


def test_labels_name_each_spec_once() -> None:
    mix = [TaskSpec(name="chain_sum"), TaskSpec(name="letter_counting"), TaskSpec(name="chain_sum", weight=2)]
    assert spec_labels(mix) == ["logic/chain_sum#0", "logic/letter_counting", "logic/chain_sum#2"]


# ------------------------------------------------------------------------------------------ the mix at a level


def test_level_zero_problems_and_ids_are_those_of_before_curricula() -> None:
    with_levels, without = TaskMix(tasks()), TaskMix(tasks(curriculum={"enabled": False}))
    assert with_levels.levels(0) == 8 and without.levels(0) == 1
    for j in range(0, 300, 7):
        task = with_levels.train_problem(0, j)
        assert task == without.train_problem(0, j) == with_levels.train_problem(0, j, level=0)
        assert task.id == f"logic/chain_sum/0/train/{j}" and "level" not in task.metadata
    assert with_levels.validation_tasks() == without.validation_tasks()


def test_a_level_draws_its_problems_from_its_params() -> None:
    mix = TaskMix(tasks())
    held_out = {t.question for t in mix.validation_tasks()}
    params = mix.level_params(0, 4)
    assert params == {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3}
    problems = [mix.train_problem(0, j, level=4) for j in range(60)]
    assert all(t.id == f"logic/chain_sum/0/train@4/{j}" for j, t in enumerate(problems))
    assert all(t.metadata["level"] == 4 and t.metadata["split"] == "train@4" for t in problems)
    assert all(t.checker["params"] == params and t.question not in held_out for t in problems)
    terms = {t.checker["metadata"]["num_terms"] for t in problems}
    assert terms == {2, 3, 4}  # more terms than level 0's two
    assert max(t.checker["metadata"]["num_digits"] for t in problems) == 3
    assert [mix.train_problem(0, j, level=4) for j in range(60)] == problems  # deterministic
    assert [t.question for t in problems] != [mix.train_problem(0, j, level=5).question for j in range(60)]
    with pytest.raises(ValueError, match="8 curriculum levels"):
        mix.train_problem(0, 0, level=8)


def test_bad_level_params_are_a_user_error_at_start_up() -> None:
    bad = TaskSpec(name="chain_sum", params=EASY_SUM, levels=[{"max_terms": 3}, {"bogus": 1}])
    with pytest.raises(UserError, match=r"tasks.mix\[0\] \(logic/chain_sum\) curriculum level 2 .*bogus"):
        TaskMix(tasks(bad))
    invalid = TaskSpec(name="chain_sum", params=EASY_SUM, levels=[{"max_terms": 1}])  # below min_terms
    with pytest.raises(UserError, match="curriculum level 1"):
        TaskMix(tasks(invalid))
    with pytest.raises(UserError, match="procedural"):
        TaskMix(tasks(TaskSpec(domain="code", name="humaneval", levels=[{"timeout_s": 2}]), validation_size=8))
    assert TaskMix(tasks(bad.model_copy(update={"curriculum": "off"}))).levels(0) == 1  # off: its levels unused


# ------------------------------------------------------------------------------------------ the controller


def feed(c: Curriculum, spec: int, rates: list[float]) -> list[LevelChange]:
    changes = [c.observe(spec, c.level(spec), r) for r in rates]
    return [x for x in changes if x is not None]


def test_promotes_above_and_demotes_below_after_a_full_window() -> None:
    c = Curriculum([3, 1], ["a", "b"], window_groups=4, promote_above=0.75, demote_below=0.25)
    assert feed(c, 0, [1.0, 1.0, 1.0]) == [] and c.level(0) == 0  # not a full window yet
    [up] = feed(c, 0, [1.0])
    assert up == LevelChange(0, "a", 0, 1, 3, 1.0, 4) and c.level(0) == 1
    assert c.summary() == {"a": {"level": 1, "levels": 3, "pass_rate": None, "groups": 0}}  # the window reset
    assert feed(c, 0, [0.9, 0.8, 0.9]) == [] and c.level(0) == 1
    assert [x.level for x in feed(c, 0, [0.9])] == [2]
    assert feed(c, 0, [1.0] * 12) == [] and c.level(0) == 2  # the top level: no further
    assert feed(c, 0, [0.5, 0.5, 0.5, 0.5]) == [] and c.level(0) == 2  # the window slides: mean 0.5 stays put
    assert [x.level for x in feed(c, 0, [0.0] * 4)] == [1]
    assert [x.level for x in feed(c, 0, [0.1] * 4)] == [0]
    assert feed(c, 0, [0.0] * 12) == [] and c.level(0) == 0  # never below 0
    assert feed(c, 1, [1.0] * 8) == [] and c.level(1) == 0  # one level: no curriculum
    assert c.summary()["a"] == {"level": 0, "levels": 3, "pass_rate": 0.0, "groups": 4}


def test_groups_requested_at_a_level_left_behind_do_not_count() -> None:
    c = Curriculum([4], window_groups=2)
    feed(c, 0, [1.0, 1.0])
    assert c.level(0) == 1
    for _ in range(5):  # still in flight when the level moved: they say nothing about level 1
        assert c.observe(0, 0, 1.0) is None
    assert c.level(0) == 1 and c.ignored == 5 and c.summary()["0"]["groups"] == 0
    assert c.observe(0, 1, 0.0) is None and c.summary()["0"]["groups"] == 1


def test_the_defaults_are_the_config_defaults() -> None:
    c = Curriculum.from_config(tasks(), [8])
    cfg = CurriculumConfig()
    assert (c.window_groups, c.promote_above, c.demote_below) == (cfg.window_groups, 0.75, 0.25) and cfg.enabled
    assert c.labels == ["logic/chain_sum"]
    with pytest.raises(ValueError, match="demote_below"):
        CurriculumConfig(promote_above=0.5, demote_below=0.5)


def test_state_round_trips_and_a_smaller_curriculum_clamps() -> None:
    c = Curriculum([5, 3], window_groups=4)
    feed(c, 0, [1.0] * 8)
    feed(c, 1, [1.0] * 4 + [0.6, 0.7])
    c.observe(0, 0, 1.0)
    saved = json.loads(json.dumps(c.state()))
    resumed = Curriculum([5, 3], window_groups=4)
    resumed.restore(saved)
    assert resumed.state() == c.state() and resumed.summary() == c.summary()
    rates = [0.9, 0.9, 1.0, 0.2, 0.0, 0.0, 0.1, 0.0]
    assert feed(resumed, 1, rates) == feed(c, 1, rates)  # the same moves from here on
    smaller = Curriculum([2, 3], window_groups=4)  # a config that gives spec 0 fewer levels
    smaller.restore(saved)
    assert smaller.level(0) == 1 and smaller.summary()["0"]["groups"] == 0 and smaller.level(1) == 1
    fresh = Curriculum([5, 3], window_groups=4)
    fresh.restore(fresh.initial_state())
    assert fresh.levels == [0, 0]
    for broken in ({}, {"levels": [0], "windows": [[]]}, {"levels": [0, -1], "windows": [[], []]},
                   {"levels": [0, 0], "windows": [["x"], []]}):
        with pytest.raises(ValueError, match="curriculum state"):
            Curriculum([5, 3]).restore(broken)
