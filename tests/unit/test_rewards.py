"""User reward functions (``prorl_async.envs.rewards``): resolving a spec by module and by file, ``fn(completion,
**row)`` with the row filtered to the function's parameters, what a function may return, per-spec dispatch in
real scoring workers beside built-in tasks, zero scores counted by cause with the first traceback logged once,
extras reported as means in the generator's Status, and the start-up check's one-line errors."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from prorl_async.envs import rewards
from prorl_async.envs.rewards import ExtrasTotals, RewardFunction, check, interpret, row_of, window_means
from prorl_async.envs.scoring_pool import ScoringError, ScoringPool
from prorl_async.envs.tasks import Task
from prorl_async.errors import UserError

pytestmark = pytest.mark.timeout(90)

USER_REWARDS = textwrap.dedent(
    """
    import asyncio, math, os, time

    def exact(completion, answer):
        return completion.strip() == str(answer)

    def everything(completion, **row):
        return {"reward": 1.0, "columns": float(len(row)), "has_level": float("level" in row), "note": "dropped"}

    def graded(completion, answer, level=1, *, weight=1.0):
        return float(completion == answer) * weight, f"level {level}"

    async def awaited(completion, answer):
        await asyncio.sleep(0.01)
        return {"reward": float(completion == answer), "length": float(len(completion))}

    def bad(completion, kind):
        if kind == "raise":
            raise ZeroDivisionError("boom")
        if kind == "nan":
            return float("nan")
        if kind == "inf":
            return {"reward": math.inf}
        if kind == "none":
            return None
        if kind == "string":
            return "1.0"
        if kind == "no_reward":
            return {"value": 1.0}
        if kind == "hang":
            time.sleep(60)
        if kind == "die":
            os._exit(3)
        print("noise on stdout must not corrupt the answers")
        return 0.5

    def global_reward(text, task):
        return {"reward": 0.25, "global": 1}

    NOT_CALLABLE = 3

    def keyword_only(*, completion):
        return 1.0
    """
)
BY_PATH = textwrap.dedent(
    """
    from prorl_test_sibling import TARGET  # a neighbour of this file

    def reward(completion, **row):
        return {"reward": float(completion == TARGET), "seen_answer": float(row.get("answer") == TARGET)}
    """
)


@pytest.fixture
def user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``user_rewards`` importable by module name (workers and this process); ``rewards_dir/by_path.py`` by path,
    relative to the working directory (``tmp_path``)."""
    (tmp_path / "user_rewards.py").write_text(USER_REWARDS)
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('cannot import\\nthis module')\n")
    (tmp_path / "hanging_rewards.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "rewards_dir").mkdir()
    (tmp_path / "rewards_dir" / "by_path.py").write_text(BY_PATH)
    (tmp_path / "rewards_dir" / "prorl_test_sibling.py").write_text("TARGET = '12'\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("user_rewards", "broken_rewards"):
        sys.modules.pop(name, None)
    return tmp_path


def user_task(spec: str, **row: Any) -> dict[str, Any]:
    return Task(id="mine/0", domain="math", name="mine", question="q?", answer=None,
                checker={"reward_fn": spec, "row": row}).to_dict()


def builtin_task() -> Task:
    return Task(id="math/x/0/train/0", domain="math", name="x", question="What is 6 + 6?", answer="12",
                checker={"answer_format": "answer_tag"}, metadata={"split": "train", "index": 0})


# ------------------------------------------------------------------------------------------ in process


def test_interpret_accepts_numbers_pairs_and_dicts_and_names_every_bad_return() -> None:
    assert interpret(1) == (1.0, "", {}, "")
    assert interpret(True) == (1.0, "", {}, "")
    assert interpret(np.float32(0.5)).reward == 0.5
    assert interpret(np.bool_(True)).reward == 1.0 and interpret(np.array(0.25)).reward == 0.25
    assert interpret(np.array([1.0])).cause == "not_number"
    assert interpret((0.25, "quarter")) == (0.25, "quarter", {}, "")
    out = interpret({"reward": 2, "reason": "why", "format": True, "len": 3, "text": "x", "bad": math.nan})
    assert out == (2.0, "why", {"format": 1.0, "len": 3.0}, "")
    causes = {name: interpret(value).cause for name, value in {
        "nan": math.nan, "inf": -math.inf, "dict_inf": {"reward": math.inf}, "none": None,
        "dict_none": {"reward": None}, "string": "1.0", "dict": {"value": 1.0}, "list": [1.0]}.items()}
    assert causes == {"nan": "nonfinite", "inf": "nonfinite", "dict_inf": "nonfinite", "none": "none",
                      "dict_none": "none", "string": "not_number", "dict": "not_number", "list": "not_number"}
    assert interpret({"value": 1.0}).reason.startswith("returned a dict without 'reward'")
    # verl's compute_score may return {"score": ..., "acc": ...}: "score" is the reward, the rest extras
    assert interpret({"score": 0.5, "acc": True}) == (0.5, "", {"acc": 1.0}, "")
    assert all(interpret(v).reward == 0.0 and interpret(v).extras == {} for v in (math.nan, "x", {"x": 1}))


def test_row_of_a_data_set_row_and_of_a_builtin_task() -> None:
    assert row_of(user_task("m:f", question="q", answer="1")) == {"question": "q", "answer": "1"}
    row = row_of(builtin_task().to_dict())
    assert row == {"prompt": "What is 6 + 6?", "answer": "12", "task_id": "math/x/0/train/0", "domain": "math",
                   "task_name": "x", "metadata": {"split": "train", "index": 0},
                   "checker": {"answer_format": "answer_tag"}}


def test_verl_and_trl_reward_functions_work_as_written_for_those_trainers(tmp_path: Path) -> None:
    (tmp_path / "others.py").write_text(textwrap.dedent("""
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):  # verl's custom_reward_function
            return {"score": float(ground_truth in solution_str), "source": len(data_source), "i": extra_info["i"]}

        def trl_reward(prompts, completions, answer, **kwargs):  # TRL's reward_funcs: a batch in, a list out
            return [float(a in c) + 0.5 * (p is not None) for p, c, a in zip(prompts, completions, answer)]
    """))
    verl_row = {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "6 * 7?"}], "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": "42"}, "extra_info": {"i": 3}}
    out = RewardFunction(f"{tmp_path / 'others.py'}:compute_score")("so 42", verl_row)
    assert interpret(out) == (1.0, "", {"source": 5.0, "i": 3.0}, "")
    trl = RewardFunction(f"{tmp_path / 'others.py'}:trl_reward")
    assert trl("it is 42", {"prompt": "6 * 7?", "answer": "42"}) == 1.5
    assert trl("it is 41", {"answer": "42"}) == 0.0


def test_a_function_gets_only_the_columns_it_names_unless_it_takes_kwargs(user_code: Path) -> None:
    row = {"answer": "7", "level": 3, "question": "q", "completion": "a column named like the first parameter"}
    assert RewardFunction("user_rewards:exact")("7", row) is True
    assert RewardFunction("user_rewards:graded")("7", row) == (1.0, "level 3")
    assert RewardFunction("user_rewards:everything")("x", row)["columns"] == 3.0  # `completion` is not passed
    assert RewardFunction("user_rewards:awaited")("7", row) == {"reward": 1.0, "length": 1.0}
    assert RewardFunction("rewards_dir/by_path.py:reward")("12", {"answer": "12"})["reward"] == 1.0
    with pytest.raises(TypeError, match="answer"):  # a column it needs is missing: its error, scored 0 as raised
        RewardFunction("user_rewards:exact")("7", {"question": "q"})


def test_extras_are_means_over_the_window_since_the_last_reported_status() -> None:
    totals = ExtrasTotals()
    totals.add({"format": 1.0, "length": 10.0})
    totals.add({"format": 0.0})
    first = totals.snapshot()
    assert window_means(first, {}) == {"reward_extras/format": 0.5, "reward_extras/length": 10.0}
    totals.add({"format": 1.0})
    assert window_means(totals.snapshot(), first) == {"reward_extras/format": 1.0}  # length: no new values
    for i in range(rewards.MAX_EXTRAS + 5):
        totals.add({f"name{i}": 1.0})
    assert len(totals.snapshot()) == rewards.MAX_EXTRAS


def test_the_generator_status_carries_causes_and_extras_means_and_a_dropped_status_keeps_its_window() -> None:
    from prorl_async.config import Config
    from prorl_async.generator.service import Generator
    from prorl_async.transport.messages import Status, decode, encode

    class Groups:
        def __init__(self) -> None:
            self.sent: list[Status] = []
            self.drop = False

        def send(self, msg: Any, timeout_s: float) -> None:
            if isinstance(msg, Status):
                if self.drop:
                    raise TimeoutError
                self.sent.append(decode(encode(msg)))  # the values pass the wire's checks

    gen = Generator(Config(), 0, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", None)
    try:
        gen.pool = SimpleNamespace(counters=Counter(ok=3, error=2), reasons=Counter({"reward_raised": 2}),
                                   score_seconds=0.5)
        gen.groups = Groups()
        gen.extras.add({"format": 1.0})
        gen.extras.add({"format": 0.0})
        gen._send_status()
        gen.extras.add({"format": 1.0})
        gen.groups.drop = True
        gen._send_status()  # dropped: its sample counts in the next one
        gen.groups.drop = False
        gen.extras.add({"format": 0.0})
        gen._send_status()
        gen._send_status()  # nothing new: no mean
    finally:
        for pool in gen._threads.values():
            pool.shutdown()
    values = [s.values for s in gen.groups.sent]
    assert values[0]["reward_raised"] == 2 and values[0]["score_error"] == 2
    assert [v.get("reward_extras/format") for v in values] == [0.5, 0.5, None]


# --------------------------------------------------------------------------------------- scoring workers


def test_per_spec_functions_beside_builtin_tasks_in_real_workers(user_code: Path) -> None:
    builtin = builtin_task().to_dict()
    tasks = {
        "exact": user_task("user_rewards:exact", question="q", answer="12"),
        "graded": user_task("user_rewards:graded", answer="12", level=4, unused=[1, 2]),
        "everything": user_task("user_rewards:everything", a=1, level=2),
        "awaited": user_task("user_rewards:awaited", answer="12"),
        "by_path": user_task("rewards_dir/by_path.py:reward", answer="12"),
    }

    async def main() -> tuple[dict[str, Any], list[Any], dict[str, int]]:
        pool = ScoringPool(workers=2, timeout_s=20, warm_tasks=[builtin, tasks["exact"], tasks["by_path"]])
        await pool.start()
        try:
            user = dict(zip(tasks, await asyncio.gather(*(pool.score("12", t) for t in tasks.values())), strict=True))
            right_wrong = [await pool.score("<answer>12</answer>", builtin), await pool.score("<answer>1</answer>",
                                                                                              builtin)]
            return user, right_wrong, dict(pool.reasons)
        finally:
            await pool.close()

    user, (right, wrong), reasons = asyncio.run(main())
    assert all(r.status == "ok" and r.reward == 1.0 for r in user.values()), user
    assert user["graded"].reason == "level 4"
    assert dict(user["everything"].extras) == {"columns": 2.0, "has_level": 1.0}
    assert dict(user["awaited"].extras) == {"length": 2.0}
    assert dict(user["by_path"].extras) == {"seen_answer": 1.0}
    assert (right.reward, right.status, wrong.reward, wrong.status) == (1.0, "ok", 0.0, "ok")  # the built-in verifier
    assert set(reasons) == set(rewards.COUNTERS) and not any(reasons.values())


def test_bad_rewards_score_zero_counted_by_cause_first_traceback_logged_once_beside_a_global_function(
        user_code: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="prorl_async.envs.scoring_pool")
    bad = "user_rewards:bad"
    kinds = ["raise", "raise", "nan", "inf", "none", "string", "no_reward", "hang", "raise", "die"]

    async def main() -> tuple[list[Any], list[Any], Any, dict[str, int], dict[str, int]]:
        pool = ScoringPool(workers=2, timeout_s=3, reward_function="user_rewards:global_reward",
                           warm_tasks=[user_task(bad, kind="ok")])
        await pool.start()
        try:
            results = list(await asyncio.gather(*(pool.score("x", user_task(bad, kind=k)) for k in kinds)))
            after = [await pool.score("x", user_task(bad, kind="ok")) for _ in range(2)]
            after.append(await pool.score("x", builtin_task().to_dict()))  # no reward_fn: the global function
            lazy = await pool.score("x", user_task("no_such_module_xyz:f"))  # not warmed: imported on first use
            return results, after, lazy, dict(pool.reasons), dict(pool.counters)
        finally:
            await pool.close()

    results, after, lazy, reasons, counters = asyncio.run(main())
    assert all(r.reward == 0.0 and not r.extras for r in results)
    assert [r.cause for r in results] == ["raised", "raised", "nonfinite", "nonfinite", "none", "not_number",
                                          "not_number", "timeout", "raised", "crash"]
    assert [r.status for r in results].count("timeout") == 1 and results[-1].status == "crash"
    assert "ZeroDivisionError: boom" in results[0].reason
    assert [(r.reward, r.status) for r in after] == [(0.5, "ok"), (0.5, "ok"), (0.25, "ok")]  # the pool goes on
    assert dict(after[-1].extras) == {"global": 1.0}
    assert (lazy.reward, lazy.cause) == (0.0, "unloadable") and "no_such_module_xyz" in lazy.reason
    assert reasons == {"reward_raised": 3, "reward_nonfinite": 2, "reward_none": 1, "reward_not_number": 2,
                       "reward_timeout": 1, "reward_crash": 1, "reward_unloadable": 1}
    assert counters["error"] == 9 and counters["timeout"] == 1 and counters["crash"] == 1
    logged = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    raised = [m for m in logged if "reward_raised" in m]
    assert len(raised) == 1 and "Traceback" in raised[0] and 'raise ZeroDivisionError("boom")' in raised[0]
    assert len(logged) == 6  # once per cause: raised, nonfinite, none, not_number, timeout, crash


def test_a_spec_that_does_not_import_in_a_worker_fails_the_pool_start(user_code: Path) -> None:
    async def main() -> None:
        pool = ScoringPool(workers=1, timeout_s=5, warm_tasks=[user_task("broken_rewards:f")])
        await pool.start()

    with pytest.raises(ScoringError, match="importing broken_rewards failed: RuntimeError: cannot import this"):
        asyncio.run(main())


# ------------------------------------------------------------------------------------------------ check


def test_check_accepts_a_module_and_a_file(user_code: Path) -> None:
    check("user_rewards:exact")
    check("rewards_dir/by_path.py:reward")
    check(f"{user_code}/rewards_dir/by_path.py:reward")


@pytest.mark.parametrize(("spec", "message"), [
    ("user_rewards", "must be 'package.module:function' or 'path/to/file.py:function'"),
    ("user_rewards:", "must be 'package.module:function'"),
    ("user rewards:f", "must be 'package.module:function'"),
    ("rewards_dir/missing.py:reward", "no file rewards_dir/missing.py (relative to "),
    ("no_such_module_xyz:f", "importing no_such_module_xyz failed: ModuleNotFoundError: No module named"),
    ("broken_rewards:f", "importing broken_rewards failed: RuntimeError: cannot import this module"),
    ("user_rewards:missing", "user_rewards has no missing"),
    ("user_rewards:NOT_CALLABLE", "NOT_CALLABLE is a int, not a callable"),
    ("user_rewards:keyword_only", "must take the completion as its first positional parameter"),
])
def test_check_errors_are_one_line_user_errors(user_code: Path, spec: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        check(spec)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert spec.strip() in str(err.value)


def test_check_reports_an_import_that_hangs(user_code: Path) -> None:
    with pytest.raises(UserError, match=r"^reward function 'hanging_rewards:f': importing it took over 1 s$"):
        check("hanging_rewards:f", timeout_s=1)
