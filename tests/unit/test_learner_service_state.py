"""The learner service's bookkeeping with a fake learner: nothing lost across a checkpoint, no poison group,
a time budget for the whole run. Real trio, real buffer, real checkpoint files; no model, no sockets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import trio
import trio.testing

from prorl_async.config import load_config
from prorl_async.learner.buffer import ReplayBuffer
from prorl_async.learner.ingest import untrainable
from prorl_async.learner.reset import ResetPolicy
from prorl_async.learner.service import LearnerService
from prorl_async.transport.messages import Sample, TrajectoryGroup

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 100


class FakeLearner:
    """What the service asks of a learner outside a step: versions, vocabulary, reset policy, checkpoint files."""

    def __init__(self, cfg: object) -> None:
        self.policy_version = 0
        self.vocab_size = VOCAB
        self.reset_policy = ResetPolicy(cfg.reset)  # type: ignore[attr-defined]

    def save_checkpoint(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "learner.json").write_text(json.dumps({"policy_version": self.policy_version}))
        return directory


def _config(*overrides: str):
    # batch 1, bound 0: the buffer holds one group, so a second one parks ingestion (backpressure)
    return load_config(ROOT / "configs" / "tiny.toml",
                       ["learner.batch_groups=1", "buffer.max_staleness=0", *overrides])


def _group(seq: int, token: int = 5, response: int = 2) -> TrajectoryGroup:
    samples = [Sample(np.full(response, token, np.int32), np.full(response, -0.5, np.float32),
                      np.zeros(response, np.int32), "stop", float(i % 2)) for i in range(4)]
    return TrajectoryGroup(prompt_id=f"p{seq}", task="chain_sum", domain="logic",
                           prompt_token_ids=np.array([1, 2, 3], np.int32), samples=samples, generator_id=0, seq=seq,
                           min_version=0, max_version=0)


def _requests(service: LearnerService, n: int) -> list[int]:
    """Hand ``n`` prompts to generator 0 (as the dispatch loop does); their request ids."""
    issued = [service.dispatch.prompts.issue(0, 0, 0) for _ in range(n)]
    assert all(r is not None for r in issued)
    return [r[0] for r in issued]  # type: ignore[index]


def test_a_checkpoint_taken_while_ingestion_waits_for_room_loses_nothing(tmp_path: Path) -> None:
    cfg = _config("generator.admission_groups=2")

    async def first_run() -> Path:
        service = LearnerService(cfg, tmp_path, learner=FakeLearner(cfg))  # type: ignore[arg-type]
        send, receive = trio.open_memory_channel(16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.ingest_loop, receive)
            assert _requests(service, 2) == [0, 1]
            await send.send(_group(0))
            await send.send(_group(1))  # the buffer is full: ingestion parks on it
            await trio.testing.wait_all_tasks_blocked()
            assert len(service.buffer.buffer) == 1 and service.buffer.parked is not None
            path = await service.checkpoint()
            nursery.cancel_scope.cancel()
        return path

    path = trio.run(first_run)
    requeued = json.loads((path / "prompts.json").read_text())["sampler"]["requeued"]
    assert requeued == []  # both groups were received: neither prompt is handed out again on resume...

    async def resumed_run() -> list[str]:
        service = LearnerService(cfg, tmp_path, learner=FakeLearner(cfg), resume_from=path)  # type: ignore[arg-type]
        service.restore(path)
        trained = [g.prompt_id for g in service.buffer.buffer.pull(1, 0) or []]
        _send, receive = trio.open_memory_channel(16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.ingest_loop, receive)
            await trio.testing.wait_all_tasks_blocked()
            trained += [g.prompt_id for g in service.buffer.buffer.pull(1, 0) or []]
            nursery.cancel_scope.cancel()
        return trained

    # ... so the checkpoint must hold both: the buffered one and the parked one, each trained once.
    assert trio.run(resumed_run) == ["p0", "p1"]


def test_untrainable_groups_are_dropped_and_counted_and_ingestion_goes_on(tmp_path: Path) -> None:
    cfg = _config("learner.batch_groups=4")
    assert untrainable(_group(0), VOCAB) is None
    assert "vocabulary" in (untrainable(_group(1, token=VOCAB), VOCAB) or "")
    assert "empty response" in (untrainable(_group(2, response=0), VOCAB) or "")

    async def main() -> LearnerService:
        service = LearnerService(cfg, tmp_path, learner=FakeLearner(cfg))  # type: ignore[arg-type]
        send, receive = trio.open_memory_channel(16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.ingest_loop, receive)
            _requests(service, 4)
            for g in (_group(1, token=VOCAB), _group(2, response=0), _group(3)):
                await send.send(g)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        return service

    service = trio.run(main)
    counters = service.buffer.buffer.counters
    assert (counters["received"], counters["untrainable"], len(service.buffer.buffer)) == (3, 2, 1)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "untrainable_group" for e in events) == 2


def test_a_checkpoint_holding_a_poison_group_resumes_without_it(tmp_path: Path) -> None:
    cfg = _config("learner.batch_groups=4")
    service = LearnerService(cfg, tmp_path, learner=FakeLearner(cfg))  # type: ignore[arg-type]
    held = ReplayBuffer(4, 0, None)
    for g in (_group(0), _group(1, token=VOCAB + 7), _group(2)):  # admitted by an older, looser learner
        assert held.put(g) == "admitted"
    path = tmp_path / "ckpt"
    path.mkdir()
    state = held.state()
    state["min_reward_std"] = service.buffer.buffer.min_reward_std
    (path / "buffer.msgpack").write_bytes(__import__("msgpack").packb(state, use_bin_type=True))
    (path / "prompts.json").write_text(json.dumps(service.dispatch.prompts.state()))
    (path / "service.json").write_text(json.dumps({"groups_arrived": 3, "outcomes": {}, "learner_idle_s": 0.0}))
    service.restore(path)
    assert [g.prompt_id for g in service.buffer.buffer.pull(2, 0) or []] == ["p0", "p2"]
    assert service.buffer.buffer.counters["untrainable"] == 1


def test_the_time_budget_spans_resumes(tmp_path: Path) -> None:
    cfg = _config("run.time_budget_s=60")
    service = LearnerService(cfg, tmp_path, learner=FakeLearner(cfg))  # type: ignore[arg-type]
    service.clock.started_s = time.monotonic() - 50  # trained 50 s of its 60 s budget, then checkpointed
    path = trio.run(service.checkpoint)
    assert json.loads((path / "service.json").read_text())["train_elapsed_s"] >= 50

    resumed = LearnerService(cfg, tmp_path, learner=FakeLearner(cfg))  # type: ignore[arg-type]
    resumed.restore(path)

    async def train() -> float:
        t0 = time.monotonic()
        with trio.fail_after(30):
            await resumed.train_loop(control=None, sender=None)  # no groups come: it waits out the 10 s left
        return time.monotonic() - t0

    assert 5 < trio.run(train) < 20  # a budget restarted on resume would wait the whole 60 s
