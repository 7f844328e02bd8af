"""A verifiers taskset as a data source: its tasks as rows, its own scoring as the reward, and what is refused.

``vf_tiny_sums`` (next to this file) is a real single-turn taskset written against verifiers' API: a reward
(``correct``) and a metric (``length``); the refused kinds are written here, into modules of their own (a taskset
module exports one ``Taskset``).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from prorl_async.config import TaskSpec
from prorl_async.envs import data
from prorl_async.envs.verifiers_source import REWARD, reward, task_rows
from prorl_async.errors import UserError

pytest.importorskip("verifiers.v1", reason="needs verifiers: pip install 'prorl-async[verifiers]'")
HERE = Path(__file__).resolve().parent

TOOLS = '''
from collections.abc import Iterable
import verifiers.v1 as vf


class BoxedTask(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    NEEDS_CONTAINER = True


class BoxedTaskset(vf.Taskset[BoxedTask, vf.TasksetConfig]):
    def load(self) -> Iterable[BoxedTask]:
        yield BoxedTask(vf.TaskData(prompt="ls /"), self.config.task)


__all__ = ["BoxedTaskset"]
'''
ENDLESS = '''
import itertools
from collections.abc import Iterable
import verifiers.v1 as vf


class EchoTask(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def echoed(self, trace) -> float:
        return float(self.data.prompt in trace.last_reply)


class EndlessTaskset(vf.Taskset[EchoTask, vf.TasksetConfig]):
    INFINITE = True

    def load(self) -> Iterable[EchoTask]:
        for i in itertools.count():
            yield EchoTask(vf.TaskData(prompt=f"say {i}"), self.config.task)


__all__ = ["EndlessTaskset"]
'''


def _spec(taskset: str, **options) -> TaskSpec:
    return TaskSpec.model_validate({"source": {"format": "verifiers", "path": taskset, "options": options}})


@pytest.fixture(autouse=True)
def importable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The tasksets import in the child process that loads them (as installed packages would)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path))  # and here, where the reward runs in these tests


def test_a_tasksets_tasks_are_rows_and_its_own_scoring_is_the_reward() -> None:
    spec = _spec("vf-tiny-sums", count=5)
    assert (spec.name, spec.reward) == ("vf-tiny-sums", REWARD)  # named by the taskset, scored by it
    source = data.check(spec)
    assert source.num_rows == 5 and source.chat and source.answer is None
    row = source.row(2)
    assert row["prompt"] == [{"role": "system", "content": "Answer with a number."},
                             {"role": "user", "content": "What is 2 + 3?"}]
    assert (row["vf_index"], row["vf_taskset"], json.loads(row["vf_options"])) == (2, "vf-tiny-sums", {"count": 5})

    right = asyncio.run(reward("It is 5", row["vf_taskset"], row["vf_options"], row["vf_index"]))
    assert right == {"reward": 1.0, "correct": 1.0, "length": 7.0}  # the metric comes along as an extra
    wrong = asyncio.run(reward("It is 4", row["vf_taskset"], row["vf_options"], row["vf_index"]))
    assert wrong["reward"] == 0.0


def test_what_a_single_turn_trainer_cannot_run_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "vf_boxed.py").write_text(TOOLS)
    (tmp_path / "vf_endless.py").write_text(ENDLESS)
    # in this process (task_rows: what the loading child runs), then through the child once (data.check)
    with pytest.raises(UserError, match="BoxedTask needs a container; prorl-async trains single-turn tasks"):
        task_rows("vf-boxed", {})
    with pytest.raises(UserError, match=r"is infinite: set source\.max_rows"):
        task_rows("vf-endless", {})
    assert [row["prompt"][0]["content"] for row in task_rows("vf-endless", {}, max_rows=3)] == ["say 0", "say 1",
                                                                                               "say 2"]
    assert asyncio.run(reward("say 7", "vf-endless", "{}", 7))["reward"] == 1.0  # drawn as far as asked
    with pytest.raises(UserError, match="verifiers taskset 'no-such-taskset': taskset 'no-such-taskset' not found"):
        data.check(_spec("no-such-taskset"))
