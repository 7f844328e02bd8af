"""The ``score`` contract: never raises, always a reward in [0, 1] and a reason, bounded time."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs import score as rewards
from prorl_async.envs.score import score
from prorl_async.envs.tasks import Task, TaskMix

JUNK = [
    "", " ", "<answer>", "</answer>", "<answer></answer>" * 1000, "<answer>" * 10000, "\\boxed{" * 5000,
    "```python\n" * 100, "<think>" + "x" * 100000, "\x00\x01\ud7ff\ufffd", "9^{9^{9^9}}",
    "<answer>9^{9^{9^9}}</answer>",
    "<answer>" + "(" * 5000 + "</answer>", "<answer>1/0</answer>", "<answer>nan</answer>", "x" * 1_000_000,
]


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    mix = TaskMix(TasksConfig(mix=[TaskSpec(domain=d, name=n) for d, n in (
        ("logic", "chain_sum"), ("logic", "prime_factorization"), ("logic", "countdown"), ("math", "gsm_symbolic"),
        ("math", "champ"), ("stem", "mmlu_stem"), ("instruction", "ifeval"), ("code", "humaneval"))],
        validation_size=2, train_size=20))
    return [mix.train_problem(i, 0) for i in range(len(mix))]


def check(result) -> None:
    reward, reason = result
    assert isinstance(reward, float) and 0.0 <= reward <= 1.0
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize("junk", JUNK, ids=range(len(JUNK)))
def test_junk_never_raises(tasks, junk):
    for task in tasks:
        start = time.monotonic()
        check(score(junk, task))
        assert time.monotonic() - start < 5, task.domain


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300), wrap=st.sampled_from(["{}", "<answer>{}</answer>", "\\boxed{{{}}}", "<answer>{}"]))
def test_random_text_never_raises(tasks, text, wrap):
    for task in tasks[:-1]:  # code runs the sandbox per sample: covered by JUNK and its own tests
        check(score(wrap.format(text), task))


def test_bad_inputs_become_zero_with_a_reason(tasks):
    assert score(None, tasks[0])[0] == 0.0
    assert score(b"<answer>7</answer>", tasks[0])[0] == 0.0
    assert "error" in score("x", {"id": "x"})[1]
    broken = Task(id="x", domain="logic", name="chain_sum", question="q", answer="7", checker={})
    assert score("<answer>7</answer>", broken)[0] in (0.0, 1.0)
    assert "unknown task domain" in score("x", Task(id="x", domain="poetry", name="x", question="q"))[1]


def test_slow_scorer_is_interrupted(monkeypatch, tasks):
    def forever(text, task):
        while True:
            pass

    monkeypatch.setattr(rewards.domain_module("logic"), "score", forever)
    start = time.monotonic()
    reward, reason = score("<answer>1</answer>", tasks[0], time_limit_s=0.3)
    assert reward == 0.0 and reason.startswith("timeout")
    assert time.monotonic() - start < 2


def test_outer_timer_is_restored():
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        with rewards.time_limit(0.5):
            pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < remaining <= 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
