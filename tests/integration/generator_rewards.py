"""A reward function for the generator integration test (``generator.reward_function =
"generator_rewards:reward"``): across all scoring workers, call 0 hangs, call 1 raises, every other call is
the built-in verifier. Calls are numbered with exclusive file creation in ``$GENERATOR_TEST_CALLS``."""

from __future__ import annotations

import os
import time
from itertools import count

from prorl_async.envs.score import score

HANG_S = 3600.0


def _call_number() -> int:
    folder = os.environ["GENERATOR_TEST_CALLS"]
    for k in count():
        try:
            os.close(os.open(os.path.join(folder, f"call-{k}"), os.O_CREAT | os.O_EXCL))
            return k
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def reward(text: str, task: dict) -> tuple[float, str]:
    k = _call_number()
    if k == 0:
        time.sleep(HANG_S)
    if k == 1:
        raise RuntimeError("reward function failure injected by the test")
    return score(text, task)
