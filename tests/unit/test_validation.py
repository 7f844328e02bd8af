"""Periodic validation: shard encoding and strict decoding, the learner's tracker, the record, and the service's path
from ``Validate`` to the ``validation`` record and the reset policy (fake control socket and learner)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import trio

from prorl_async.config import load_config
from prorl_async.eval.validation import (
    RESULTS_KEY,
    PromptRewards,
    ValidationTracker,
    decode_part,
    encode_shard,
    validation_record,
)
from prorl_async.learner.reset import ResetPolicy
from prorl_async.learner.service import LearnerService
from prorl_async.monitor.metrics import read_metrics
from prorl_async.transport.messages import Metrics, Ready, Validate, WeightsReady

ROOT = Path(__file__).resolve().parents[2]

# Two generators' shards of a 4-prompt split (prompt i goes to generator i % 2), 4 samples each.
SHARDS = {
    0: [PromptRewards("logic/chain_sum/0/validation/0", "logic/chain_sum", (1.0, 0.0, 0.0, 1.0)),
        PromptRewards("logic/chain_sum/0/validation/2", "logic/chain_sum", (0.0, 0.0, 0.0, 0.0))],
    1: [PromptRewards("math/gsm/1/validation/1", "math/gsm", (1.0, 1.0, 1.0, 1.0)),
        PromptRewards("math/gsm/1/validation/3", "math/gsm", (1.0, 0.0, 0.0, 0.0))],
}


def parts_of(gid: int, version: int = 2, round: int = 0, max_chars: int = 60_000, **over: object) -> list[str]:
    fields = dict(version=version, round=round, generator=gid, generators=2, weights_version=version, seconds=1.5,
                  failed=0, skipped=0, prompts=SHARDS[gid])
    fields.update(over)
    return encode_shard(**fields, max_chars=max_chars)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ wire format


def test_shard_round_trips_and_splits_into_parts_under_the_limit() -> None:
    [whole] = parts_of(0)
    part = decode_part(whole)
    assert (part.version, part.round, part.generator, part.generators, part.part, part.parts) == (2, 0, 0, 2, 0, 1)
    assert part.prompts == tuple(SHARDS[0]) and part.seconds == 1.5

    many = [PromptRewards(f"p{i}", "t", (i / 7, 1.0, 0.0)) for i in range(200)]
    texts = encode_shard(version=1, round=3, generator=1, generators=3, weights_version=1, seconds=0.0, failed=2,
                         skipped=1, prompts=many, max_chars=2_000)
    assert len(texts) > 1 and all(len(t) <= 2_000 for t in texts)
    decoded = [decode_part(t) for t in texts]
    assert [d.part for d in decoded] == list(range(len(texts))) and {d.parts for d in decoded} == {len(texts)}
    assert [p for d in decoded for p in d.prompts] == many  # order kept, rewards exact, nothing split or lost


def test_an_empty_shard_is_one_part_and_an_oversized_prompt_is_refused() -> None:
    [text] = encode_shard(version=1, round=0, generator=0, generators=1, weights_version=1, seconds=0.0,
                          failed=0, skipped=0, prompts=[])
    assert decode_part(text).prompts == ()
    with pytest.raises(ValueError, match="do not fit"):
        encode_shard(version=1, round=0, generator=0, generators=1, weights_version=1, seconds=0.0, failed=0,
                     skipped=0, prompts=[PromptRewards("p", "t", (0.5,) * 100)], max_chars=260)


def _mutated(**changes: object) -> str:
    body = json.loads(parts_of(0)[0])
    body.update(changes)
    return json.dumps(body)


@pytest.mark.parametrize(
    "text",
    [
        b"{}",  # not a string
        "not json",
        "[1, 2]",
        '{"version": NaN}',
        _mutated(extra=1),
        _mutated(version=-1),
        _mutated(round=1.0),
        _mutated(generator=True),
        _mutated(generator=2),  # generator must be < generators
        _mutated(part=1),  # part must be < parts
        _mutated(parts=10_000),
        _mutated(seconds=-1),
        _mutated(seconds="1"),
        _mutated(prompts={}),
        _mutated(prompts=[["p", "t"]]),
        _mutated(prompts=[["p", "t", []]]),  # no samples
        _mutated(prompts=[[1, "t", [1.0]]]),
        _mutated(prompts=[["p", "t", [True]]]),
        _mutated(prompts=[["p", "t", ["1"]]]),
        _mutated(prompts=[["p", "t", [1e400]]]),  # json reads it as inf
    ],
)
def test_malformed_parts_are_refused_with_a_value_error(text: object) -> None:
    with pytest.raises(ValueError):
        decode_part(text)


# ------------------------------------------------------------------------------------------ tracker + record


def test_two_generators_results_make_the_record() -> None:
    tracker = ValidationTracker(generators=2, timeout_s=60)
    r = tracker.request(version=2, step=2, now=10.0)
    assert r is not None and r.round == 0
    assert tracker.request(version=4, step=4, now=11.0) is None  # one round in flight at a time
    assert tracker.add(decode_part(parts_of(0)[0])) == "accepted"
    assert tracker.due(now=12.0) == []  # generator 1 has not answered
    assert tracker.add(decode_part(parts_of(0)[0])) == "duplicate"
    assert tracker.add(decode_part(parts_of(1, round=7)[0])) == "late"  # another request
    assert tracker.add(decode_part(parts_of(1, generators=3)[0])) == "mismatch"
    assert tracker.add(decode_part(parts_of(1)[0])) == "accepted"
    [(done, reason)] = tracker.due(now=12.5)
    assert done is r and reason == "complete" and tracker.pending is None

    rec = validation_record(done, ks=[4, 1], threshold=1.0, now=13.0, reason=reason)
    # pass@1 per prompt 2/4, 0, 4/4, 1/4; pass@4 with n = 4 is "any correct": 1, 0, 1, 1
    assert rec["pass_at_1"] == pytest.approx(0.4375) and rec["pass_at_4"] == pytest.approx(0.75)
    assert rec["mean_reward"] == pytest.approx(7 / 16)
    assert (rec["prompts"], rec["samples"]) == (4, 16)
    assert (rec["solved_none"], rec["solved_all"]) == (0.25, 0.25)
    assert rec["by_task"]["logic/chain_sum"]["pass_at_1"] == pytest.approx(0.25)
    assert rec["by_task"]["logic/chain_sum"]["pass_at_4"] == pytest.approx(0.5)
    assert rec["by_task"]["math/gsm"]["pass_at_1"] == pytest.approx(0.625)
    assert rec["by_task"]["math/gsm"]["pass_at_4"] == pytest.approx(1.0) and rec["by_task"]["math/gsm"]["prompts"] == 2
    assert "dang_bound_at_4" in rec and not any("@" in k for k in rec)
    assert (rec["version"], rec["step"], rec["round"], rec["complete"], rec["reason"]) == (2, 2, 0, True, "complete")
    assert rec["generators"] == [2, 2] and rec["missing"] == [] and rec["seconds"] == 3.0
    assert rec["weights_versions"] == [2, 2]
    assert tracker.request(version=4, step=4, now=14.0).round == 1  # type: ignore[union-attr]


def test_a_threshold_below_one_counts_partial_credit_as_solved() -> None:
    tracker = ValidationTracker(generators=1)
    r = tracker.request(version=1, step=1, now=0.0)
    [text] = encode_shard(version=1, round=0, generator=0, generators=1, weights_version=1, seconds=0.0, failed=0,
                          skipped=0, prompts=[PromptRewards("p", "t", (0.5, 0.0))])
    tracker.add(decode_part(text))
    assert validation_record(r, [1], 1.0, 0.0, "complete")["pass_at_1"] == 0.0  # type: ignore[arg-type]
    assert validation_record(r, [1], 0.5, 0.0, "complete")["pass_at_1"] == 0.5  # type: ignore[arg-type]


def test_a_timeout_writes_what_arrived_and_says_so() -> None:
    tracker = ValidationTracker(generators=2, timeout_s=5)
    r = tracker.request(version=2, step=2, now=0.0)
    first, _second = parts_of(1, max_chars=260)  # generator 1 answers in two parts, only the first arrives
    tracker.add(decode_part(first))
    assert tracker.due(now=4.9) == []
    [(done, reason)] = tracker.due(now=5.0)
    rec = validation_record(done, [1, 4], 1.0, 5.0, reason)
    assert done is r and reason == "timeout" and not rec["complete"]
    assert rec["missing"] == [0, 1] and rec["generators"] == [0, 2]
    assert rec["prompts"] == len(decode_part(first).prompts) == 1 and "pass_at_1" in rec

    empty = ValidationTracker(generators=1)
    empty.request(version=3, step=3, now=0.0)
    [(done, reason)] = empty.due(now=0.0, force="interrupted")
    rec = validation_record(done, [1], 1.0, 0.0, reason)
    assert rec["reason"] == "interrupted" and rec["prompts"] == 0 and "pass_at_1" not in rec
    assert rec["weights_versions"] == []


# ------------------------------------------------------------------------------------------ learner service


class FakeControl:
    def __init__(self) -> None:
        self.published: list[object] = []

    def publish(self, msg: object) -> None:
        self.published.append(msg)


class FakeLearner:
    def __init__(self, cfg: object, version: int) -> None:
        self.policy_version = version
        self.vocab_size = 1 << 20
        self.reset_policy = ResetPolicy(cfg.reset)  # type: ignore[attr-defined]


def _service(tmp_path: Path, every: int = 2) -> tuple[LearnerService, FakeLearner]:
    cfg = load_config(ROOT / "configs" / "tiny.toml", ["generator.num_generators=2", f"eval.every_steps={every}"])
    learner = FakeLearner(cfg, version=2)
    service = LearnerService(cfg, tmp_path, learner=learner)  # type: ignore[arg-type]
    service._published_version = 2
    return service, learner


def test_service_requests_collects_writes_the_record_and_feeds_the_reset_policy(tmp_path: Path) -> None:
    service, learner = _service(tmp_path)
    control = service._control = FakeControl()
    service._request_validation(control)
    # Validate, then the latest WeightsReady again: a generator subscribing now still gets weights first
    assert control.published == [Validate(version=2, round=0), WeightsReady(version=2)]
    learner.policy_version = 3
    service._request_validation(control)  # 3 is not a multiple of every_steps
    learner.policy_version = 4
    service._request_validation(control)  # round 0 still in flight: skipped, said so
    assert len(control.published) == 2

    async def main() -> None:
        send, receive = trio.open_memory_channel(16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.ingest_loop, receive)
            nursery.start_soon(service.validation_loop)
            await send.send(Ready("generator-1"))  # restarted while the round waits: it is asked again
            for gid in (0, 1):
                for text in parts_of(gid, max_chars=260):
                    await send.send(Metrics(f"generator-{gid}", {RESULTS_KEY: text}))
            await send.send(Metrics("generator-1", {RESULTS_KEY: "{broken"}))
            await send.send(Metrics("generator-0", {"groups_sent": 3}))
            with trio.fail_after(10):
                while not read_metrics(tmp_path / "metrics.jsonl", kind="validation"):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    service.metrics.close()
    assert control.published[2:] == [Validate(version=2, round=0), WeightsReady(version=2)]
    [rec] = read_metrics(tmp_path / "metrics.jsonl", kind="validation")
    assert rec["version"] == 2 and rec["complete"] and rec["pass_at_1"] == pytest.approx(0.4375)
    assert rec["pass_at_4"] == pytest.approx(0.75) and rec["reset_signal"] == "mean_reward"
    assert learner.reset_policy.best_val_reward == pytest.approx(7 / 16)
    assert learner.reset_policy.best_val_step == 2  # the version measured, not the learner's version now
    events = read_metrics(tmp_path / "metrics.jsonl", kind="event")
    assert [e["event"] for e in events] == ["validation_requested", "validation_skipped", "generator_ready",
                                            "bad_validation_results"]
    generator_records = read_metrics(tmp_path / "metrics.jsonl", kind="generator")
    assert [r.get("groups_sent") for r in generator_records] == [3]  # results never land in generator records
    assert RESULTS_KEY not in service.generators.get("generator-0", {})
    assert service.validation_counts == {"accepted": sum(len(parts_of(g, max_chars=260)) for g in (0, 1)), "bad": 1}


def test_service_end_of_run_writes_an_incomplete_round_without_feeding_the_policy(tmp_path: Path) -> None:
    service, learner = _service(tmp_path)
    service._request_validation(FakeControl())
    service._on_validation_part(Metrics("generator-0", {RESULTS_KEY: parts_of(0)[0]}))
    service._interrupted = True  # SIGINT: no waiting for generator 1

    async def main() -> None:
        with trio.fail_after(10):
            await service.finish_validation()

    trio.run(main)
    service.metrics.close()
    [rec] = read_metrics(tmp_path / "metrics.jsonl", kind="validation")
    assert rec["reason"] == "interrupted" and not rec["complete"] and rec["missing"] == [1]
    assert rec["prompts"] == 2 and rec["reset_signal"] == ""
    assert learner.reset_policy.best_val_reward is None
    assert math.isclose(rec["pass_at_1"], 0.25)


def test_service_end_of_run_drains_a_full_buffer_to_reach_the_answers_queued_behind_it(tmp_path: Path) -> None:
    import numpy as np

    from prorl_async.transport.messages import Sample, TrajectoryGroup

    service, learner = _service(tmp_path)
    service._request_validation(FakeControl())
    capacity = service.buffer.buffer.capacity
    groups = [TrajectoryGroup(f"g{i}", "chain_sum", "logic", np.array([1, 2], dtype=np.int32),
                              [Sample([3], [-0.1], [2], "stop", float(j % 2)) for j in range(4)],
                              generator_id=0, seq=i) for i in range(capacity + 2)]

    async def main() -> None:
        send, receive = trio.open_memory_channel(64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.ingest_loop, receive)
            for g in groups:  # the buffer fills up: ingestion waits on the group after the last one it admits
                await send.send(g)
            for gid in (0, 1):
                for text in parts_of(gid):
                    await send.send(Metrics(f"generator-{gid}", {RESULTS_KEY: text}))
            await trio.sleep(0.2)
            assert service.validations.pending is not None and not service.validations.pending.answered
            with trio.fail_after(10):
                await service.finish_validation()
            nursery.cancel_scope.cancel()

    trio.run(main)
    service.metrics.close()
    [rec] = read_metrics(tmp_path / "metrics.jsonl", kind="validation")
    assert rec["reason"] == "complete" and rec["complete"] and rec["prompts"] == 4
    assert service.outcomes == {"admitted": capacity, "after_final_checkpoint": 2}
    assert learner.reset_policy.best_val_step == 2
