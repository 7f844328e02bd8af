"""ScoringPool with real worker processes: the built-in scorer on a real chain_sum task, and reward functions
that raise, hang, return junk or kill their process — each scores 0 with a reason, is counted, and the
pool keeps scoring (a hung or dead worker is replaced)."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prorl_async.config import TasksConfig, TaskSpec
from prorl_async.envs.scoring_pool import ScoringError, ScoringPool, _score_one
from prorl_async.envs.tasks import TaskMix

pytestmark = pytest.mark.timeout(60)

REWARDS = textwrap.dedent(
    """
    import os, time

    def reward(text, task):
        if text == "raise":
            raise ZeroDivisionError("boom")
        if text == "hang":
            time.sleep(60)
        if text == "junk":
            return float("nan"), "nan"
        if text == "die":
            os._exit(3)
        print("noise on stdout must not corrupt the answers")
        return (1.0 if text == task["answer"] else 0.0), f"pid {os.getpid()}"
    """
)


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "fake_rewards.py").write_text(REWARDS)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    return "fake_rewards:reward"


def test_builtin_scorer_scores_a_real_chain_sum_task() -> None:
    cfg = TasksConfig(mix=[TaskSpec(params={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})],
                      train_size=50, validation_size=4)
    task = TaskMix(cfg).train_task(0)

    async def main() -> list:
        pool = ScoringPool(workers=1, timeout_s=20, warm_tasks=[task.to_dict()])
        await pool.start()
        try:
            return [await pool.score(f"<answer>{task.answer}</answer>", task.to_dict()),
                    await pool.score("<answer>-12345</answer>", task.to_dict())]
        finally:
            await pool.close()

    right, wrong = asyncio.run(main())
    assert (right.reward, right.status) == (1.0, "ok")
    assert (wrong.reward, wrong.status) == (0.0, "ok")


def test_raising_hanging_junk_and_dying_rewards_score_zero_and_the_pool_goes_on(reward_module: str) -> None:
    task = {"answer": "42"}

    async def main():
        pool = ScoringPool(workers=2, timeout_s=1.5, reward_function=reward_module)
        await pool.start()
        try:
            start = time.monotonic()
            bad = await asyncio.gather(*(pool.score(t, task) for t in ("raise", "hang", "junk", "die")))
            good = await asyncio.gather(*(pool.score(t, task) for t in ("42", "41", "42", "42")))
            seconds = time.monotonic() - start
            while pool.idle_workers < 2 and time.monotonic() - start < 30:  # both replacements come up
                await asyncio.sleep(0.1)
            return bad, good, seconds, dict(pool.counters), pool.idle_workers
        finally:
            await pool.close()

    bad, good, seconds, counters, idle = asyncio.run(main())
    assert [r.status for r in bad] == ["error", "timeout", "error", "crash"]
    assert all(r.reward == 0.0 for r in bad)
    assert "ZeroDivisionError" in bad[0].reason and "timeout" in bad[1].reason
    assert [r.reward for r in good] == [1.0, 0.0, 1.0, 1.0]
    assert all(r.status == "ok" for r in good)
    assert idle == 2  # the hung and the dead worker were replaced
    assert counters["replaced"] == 2 and counters["timeout"] == 1 and counters["crash"] == 1
    assert seconds < 30  # the hung worker was killed at its timeout, not waited for


def test_a_reward_function_that_cannot_be_imported_is_a_clear_error() -> None:
    async def main() -> None:
        pool = ScoringPool(workers=1, timeout_s=1, reward_function="no_such_module_xyz:reward")
        await pool.start()

    with pytest.raises(ScoringError, match="no_such_module_xyz"):
        asyncio.run(main())


def test_score_one_validates_requests_and_results() -> None:
    assert _score_one(lambda t, k: (0.5, "half"), {"text": "x", "task": {}}) == {
        "reward": 0.5, "reason": "half", "status": "ok"}
    assert _score_one(lambda t, k: 1, {"text": "x"})["reward"] == 1.0
    assert _score_one(lambda t, k: "1", {"text": "x"})["status"] == "error"
    assert _score_one(lambda t, k: True, {"text": "x"})["reward"] == 1.0  # a bool is 0 or 1 (rewards.interpret)
    assert _score_one(lambda t, k: {"reward": 0.5, "n": 2}, {"text": "x"}) == {
        "reward": 0.5, "reason": "", "status": "ok", "extras": {"n": 2.0}}
    assert _score_one(lambda t, k: 1.0, {"text": 3})["status"] == "error"


def test_cancelled_request_replaces_its_worker(reward_module: str) -> None:
    async def main():
        pool = ScoringPool(workers=1, timeout_s=5, reward_function=reward_module)
        await pool.start()
        try:
            pending = asyncio.ensure_future(pool.score("hang", {"answer": "1"}))
            await asyncio.sleep(0.3)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            return await pool.score("1", {"answer": "1"}), dict(pool.counters)
        finally:
            await pool.close()

    result, counters = asyncio.run(main())
    assert (result.reward, result.status) == (1.0, "ok")
    assert counters["replaced"] == 1
