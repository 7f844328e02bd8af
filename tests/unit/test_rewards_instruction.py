"""Instruction domain: the offline IFEval checkers, one passing and one failing response per type."""

from __future__ import annotations

import pytest

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs.domains import ifeval_checks
from prorl_async.envs.score import score
from prorl_async.envs.tasks import Task, TaskMix

CASES = [  # (instruction id, kwargs, a response that follows it, one that does not)
    ("keywords:existence", {"keywords": ["moon", "tide"]}, "The Moon moves the tide.", "The sun rises."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "cat cat", "one cat"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "one cat", "cat cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "a badge is fine", "this is bad"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zz", "z"),
    ("language:response_language", {"language": "ru"}, "Привет, как дела?", "Hello there"),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith came. He left at 3.5 p.m. today.", "One. Two. Three. Four."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "Only one."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five", "one"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "Start here.\n\nThen, finish.", "Start here.\n\nAnd finish."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", "[name] only"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi. bye"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", "Section 1\nfoo"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{'a': 1}"),
    ("detectable_format:title", {}, "<<My Title>>\ntext", "My Title\ntext"),
    ("combination:two_responses", {}, "first\n******\nsecond", "first\n******\nfirst"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done."),
    ("startend:quotation", {}, '"all quoted"', 'not "quoted"'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "BIG and LOUD", "BIG only"),
    ("change_case:english_capital", {}, "ALL CAPS HERE", "Not all caps"),
    ("change_case:english_lowercase", {}, "all lower here", "Not all lower"),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
]


def test_every_checker_is_covered():
    assert {case[0] for case in CASES} == set(ifeval_checks.CHECKS)


@pytest.mark.parametrize(("instruction", "kwargs", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_checker(instruction, kwargs, good, bad):
    assert ifeval_checks.check(instruction, kwargs, good) is True
    assert ifeval_checks.check(instruction, kwargs, bad) is False


def test_sentence_split_keeps_abbreviations_and_decimals():
    assert ifeval_checks.split_sentences("Mr. Smith paid 3.50 dollars. Then he left! Why? Because.") == [
        "Mr. Smith paid 3.50 dollars.", "Then he left!", "Why?", "Because."]


def instruction_task(ids, kwargs, partial=False) -> Task:
    return Task(id="t", domain="instruction", name="ifeval", question="q",
                checker={"instruction_ids": ids, "kwargs": kwargs, "partial_credit": partial})


def test_score_all_or_nothing_and_partial_credit():
    ids, kwargs = ["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}]
    assert score("all good here", instruction_task(ids, kwargs)) == (1.0, "all 2 instructions followed")
    assert score("All good here", instruction_task(ids, kwargs))[0] == 0.0
    assert score("All good here", instruction_task(ids, kwargs, partial=True))[0] == 0.5
    # The prefill's answer tag and a reasoning block are not part of the checked response.
    assert score("<think>Hmm, OK.</think><answer>all good here</answer>", instruction_task(ids, kwargs))[0] == 1.0
    assert score("", instruction_task(ids, kwargs))[0] == 0.0


def test_ifeval_data_loads_with_checkable_prompts_only():
    mix = TaskMix(TasksConfig(mix=[TaskSpec(domain="instruction", name="ifeval")], validation_size=16))
    total = mix.train_size(0) + len(mix.validation_tasks(0))
    assert 500 <= total <= 541
    no_comma = next(t for t in mix.validation_tasks(0) + [mix.train_problem(0, j) for j in range(mix.train_size(0))]
                    if t.checker["instruction_ids"] == ["punctuation:no_comma"])
    assert score("A reply without any comma.", no_comma)[0] == 1.0
    assert score("A reply, with a comma.", no_comma)[0] == 0.0
