"""Answer extraction: the common variants are found, junk gives None."""

from __future__ import annotations

from fractions import Fraction

import pytest

from prorl_async.envs.domains.extract import choice_letter, code_block, final_answer, parse_number


@pytest.mark.parametrize(("text", "expected"), [
    ("<answer>7</answer>", "7"), ("<answer>7", "7"), ("7</answer>", "7"), ("<Answer> 7 </Answer>", "7"),
    ("<answer>1</answer> later <answer>2</answer>", "2"), ("<answer>1</answer> then <answer>2", "2"),
    ("<think>a <answer>1</answer></think> <answer>2</answer>", "2"), ("<think>never closed <answer>1</answer>", None),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("<answer>\\boxed{5}</answer>", "5"), ("The answer is 42.", "42"),
    ("Answer: $x+1$", "x+1"), ("<answer>The answer is 12</answer>", "12"), ("<answer>**son**.</answer>", "son"),
    ("<answer>\\text{yes}</answer>", "yes"),
    ("<answer></answer>", None), ("nothing here", None), ("<answer>\u22123</answer>", "-3"),
    ("<answer>1 0\n0 1</answer>", "1 0\n0 1"),
])
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_boxed_format_prefers_boxed():
    assert final_answer("<answer>1</answer> \\boxed{2}", "boxed") == "2"
    assert final_answer("<answer>1</answer> \\boxed{2}", "answer_tag") == "1"


@pytest.mark.parametrize(("text", "value"), [
    ("7", 7), ("-3.50", Fraction(-7, 2)), ("1,000", 1000), ("3/4", Fraction(3, 4)), ("x = 7", 7),
    ("4 + 3 = 7", 7), ("1e3", 1000), ("$-2$", -2), ("abc", None), ("7 apples", None), ("1/0", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_choice_letter():
    choices = ["red", "green", "a blue ball", "none."]
    assert choice_letter("<answer>(c)</answer>", "answer_tag", choices) == "C"
    assert choice_letter("<answer>A blue ball</answer>", "answer_tag", choices) == "C"
    assert choice_letter("<answer>none</answer>", "answer_tag", choices) == "D"
    assert choice_letter("<answer>A or B</answer>", "answer_tag", choices) is None


def test_code_block():
    text = "```python\ndef helper():\n    pass\n```\nand\n```python\ndef f(x):\n    return x\n```\n```python\nf(1)\n```"
    assert code_block(text, "f") == "def f(x):\n    return x\n"
    assert code_block("<answer>```py\ndef f(): pass\n```</answer>", "f") == "def f(): pass\n"
    assert code_block("```python\ndef f():\n    return 1", "f") == "def f():\n    return 1"  # unclosed fence
    assert code_block("    return x\n", "f") == "    return x"
    assert code_block("   ", "f") is None
