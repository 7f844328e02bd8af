"""Periodic validation: shard encoding and strict decoding, the learner's tracker, the record, and the service's path
from ``Validate`` to the ``validation`` record and the reset policy (fake control socket and learner)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import trio

from prorl_async.config import load_config
from prorl_async.eval.validation import (
    MAX_PART_PROMPTS,
    MAX_PARTS,
    PromptRewards,
    ShardPart,
    ValidationTracker,
    encode_shard,
    shard_part,
    validation_record,
)
from prorl_async.learner import validation as learner_validation
from prorl_async.learner.prompts import Admission, PromptSource
from prorl_async.learner.reset import ResetPolicy
from prorl_async.learner.service import LearnerService
from prorl_async.learner.validation import ValidationSchedule
from prorl_async.monitor.metrics import read_metrics
from prorl_async.transport.messages import (
    Limits,
    MessageError,
    Ready,
    Status,
    Validate,
    ValidationAnswer,
    WeightsReady,
    decode,
    encode,
)

ROOT = Path(__file__).resolve().parents[2]

# Two generators' shards of a 4-prompt split (prompt i goes to generator i % 2), 4 samples each.
SHARDS = {
    0: [PromptRewards("logic/chain_sum/0/validation/0", "logic/chain_sum", (1.0, 0.0, 0.0, 1.0)),
        PromptRewards("logic/chain_sum/0/validation/2", "logic/chain_sum", (0.0, 0.0, 0.0, 0.0))],
    1: [PromptRewards("math/gsm/1/validation/1", "math/gsm", (1.0, 1.0, 1.0, 1.0)),
        PromptRewards("math/gsm/1/validation/3", "math/gsm", (1.0, 0.0, 0.0, 0.0))],
}


def parts_of(gid: int, version: int = 2, round: int = 0, max_prompts: int = MAX_PART_PROMPTS,
             **over: object) -> list[ValidationAnswer]:
    fields = dict(source=f"generator-{gid}", version=version, round=round, generator=gid, generators=2,
                  weights_version=version, seconds=1.5, failed=0, skipped=0, prompts=SHARDS[gid])
    fields.update(over)
    return encode_shard(**fields, max_prompts=max_prompts)  # type: ignore[arg-type]


def wire(msg: ValidationAnswer, limits: Limits | None = None) -> ValidationAnswer:
    """Through the wire and the learner's decoder, as the groups socket delivers it."""
    decoded = decode(encode(msg), limits or Limits())
    assert isinstance(decoded, ValidationAnswer)
    return decoded


def part_of(gid: int, **over: object) -> ShardPart:
    """The single part of generator ``gid``'s shard, as the learner files it."""
    [answer] = parts_of(gid, **over)
    return shard_part(wire(answer))


# ------------------------------------------------------------------------------------------ wire format


def test_shard_round_trips_and_splits_into_parts_of_at_most_max_prompts() -> None:
    [whole] = parts_of(0)
    assert wire(whole) == whole and whole.source == "generator-0"
    part = shard_part(wire(whole))
    assert (part.version, part.round, part.generator, part.generators, part.part, part.parts) == (2, 0, 0, 2, 0, 1)
    assert part.prompts == tuple(SHARDS[0]) and part.seconds == 1.5

    many = [PromptRewards(f"p{i}", f"t{i % 3}", (i / 7, 1.0, 0.0)[: 1 + i % 3]) for i in range(200)]
    answers = encode_shard(source="generator-1", version=1, round=3, generator=1, generators=3, weights_version=1,
                           seconds=0.0, failed=2, skipped=1, prompts=many, max_prompts=64)
    assert [len(a.prompt_ids) for a in answers] == [64, 64, 64, 8]
    decoded = [shard_part(wire(a)) for a in answers]
    assert [d.part for d in decoded] == list(range(4)) and {d.parts for d in decoded} == {4}
    assert {(d.failed, d.skipped, d.generator, d.generators) for d in decoded} == {(2, 1, 1, 3)}
    assert [p for d in decoded for p in d.prompts] == many  # order kept, rewards exact, nothing split or lost


@pytest.mark.parametrize("overrides", [[], ["eval.samples=32"]])  # more validation samples than a group has
def test_a_full_part_passes_the_decoder_under_a_runs_limits(overrides: list[str]) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.toml", overrides)
    prompts = [PromptRewards(f"p{i}", "t", (0.5,) * cfg.eval.samples) for i in range(MAX_PART_PROMPTS + 1)]
    answers = encode_shard(source="generator-0", version=1, round=0, generator=0, generators=1, weights_version=1,
                           seconds=0.25, failed=0, skipped=0, prompts=prompts)
    limits = Limits.from_config(cfg, vocab_size=100)
    assert [len(shard_part(wire(a, limits)).prompts) for a in answers] == [MAX_PART_PROMPTS, 1]


def test_an_empty_shard_is_one_part_and_too_many_parts_are_refused() -> None:
    [answer] = encode_shard(source="generator-0", version=1, round=0, generator=0, generators=1, weights_version=1,
                            seconds=float("nan"), failed=3, skipped=0, prompts=[])
    part = shard_part(wire(answer))
    assert part.prompts == () and (part.part, part.parts, part.failed) == (0, 1, 3)
    assert part.seconds == 0.0  # a non-finite duration is not sent as one (the decoder refuses it)
    with pytest.raises(ValueError, match="parts"):
        encode_shard(source="generator-0", version=1, round=0, generator=0, generators=1, weights_version=1,
                     seconds=0.0, failed=0, skipped=0, prompts=[PromptRewards("p", "t", (0.5,))] * (MAX_PARTS + 1),
                     max_prompts=1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"part": 1}, "part 1 of 1"),  # part must be < parts
        ({"part": 3, "parts": 2}, "part 3 of 2"),
        ({"parts": MAX_PARTS + 1, "part": 0}, "at most"),
        ({"generator": 2}, "generator 2 of 2"),  # generator must be < generators
        ({"generators": 0, "generator": 0}, "generator 0 of 0"),
    ],
)
def test_shard_part_refuses_an_answer_that_contradicts_itself(change: dict, match: str) -> None:
    answer = dataclasses.replace(parts_of(0)[0], **change)
    with pytest.raises(ValueError, match=match):
        shard_part(wire(answer))  # the decoder checks structure only: these pass it


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"counts": [4, 3]}, "value"),  # 7 rewards announced, 8 sent
        ({"counts": [4, 5]}, "value"),
        ({"counts": [0, 4], "rewards": [1.0] * 4}, "value"),  # a prompt without rewards
        ({"counts": [-1, 9]}, "value"),
        ({"rewards": [1.0, float("nan"), 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]}, "nonfinite"),
        ({"rewards": [float("inf")] + [0.0] * 7}, "nonfinite"),
        ({"prompt_ids": ["only one"]}, "field"),  # one id per prompt
        ({"tasks": ["t", 3]}, "field"),
        ({"version": -1}, "version"),
        ({"round": True}, "field"),
        ({"seconds": -1.0}, "value"),
        ({"seconds": float("nan")}, "nonfinite"),
    ],
)
def test_the_decoder_refuses_a_malformed_answer(change: dict, reason: str) -> None:
    answer = dataclasses.replace(parts_of(0)[0], **change)
    with pytest.raises(MessageError) as err:
        decode(encode(answer), Limits())
    assert err.value.reason == reason


# ------------------------------------------------------------------------------------------ tracker + record


def test_two_generators_results_make_the_record() -> None:
    tracker = ValidationTracker(generators=2, timeout_s=60)
    r = tracker.request(version=2, step=2, now=10.0)
    assert r is not None and r.round == 0
    assert tracker.request(version=4, step=4, now=11.0) is None  # one round in flight at a time
    assert tracker.add(part_of(0)) == "accepted"
    assert tracker.due(now=12.0) == []  # generator 1 has not answered
    assert tracker.add(part_of(0)) == "duplicate"
    assert tracker.add(part_of(1, round=7)) == "late"  # another request
    assert tracker.add(part_of(1, generators=3)) == "mismatch"
    assert tracker.add(part_of(1)) == "accepted"
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
    [answer] = encode_shard(source="generator-0", version=1, round=0, generator=0, generators=1, weights_version=1,
                            seconds=0.0, failed=0, skipped=0, prompts=[PromptRewards("p", "t", (0.5, 0.0))])
    tracker.add(shard_part(wire(answer)))
    assert validation_record(r, [1], 1.0, 0.0, "complete")["pass_at_1"] == 0.0  # type: ignore[arg-type]
    assert validation_record(r, [1], 0.5, 0.0, "complete")["pass_at_1"] == 0.5  # type: ignore[arg-type]


def test_a_timeout_writes_what_arrived_and_says_so() -> None:
    tracker = ValidationTracker(generators=2, timeout_s=5)
    r = tracker.request(version=2, step=2, now=0.0)
    first, _second = parts_of(1, max_prompts=1)  # generator 1 answers in two parts, only the first arrives
    tracker.add(shard_part(wire(first)))
    assert tracker.due(now=4.9) == []
    [(done, reason)] = tracker.due(now=5.0)
    rec = validation_record(done, [1, 4], 1.0, 5.0, reason)
    assert done is r and reason == "timeout" and not rec["complete"]
    assert rec["missing"] == [0, 1] and rec["generators"] == [0, 2]
    assert rec["prompts"] == len(first.prompt_ids) == 1 and "pass_at_1" in rec

    empty = ValidationTracker(generators=1)
    empty.request(version=3, step=3, now=0.0)
    [(done, reason)] = empty.due(now=0.0, force="interrupted")
    rec = validation_record(done, [1], 1.0, 0.0, reason)
    assert rec["reason"] == "interrupted" and rec["prompts"] == 0 and "pass_at_1" not in rec
    assert rec["weights_versions"] == []


# ------------------------------------------------------------------------------------------ schedule


def test_schedule_validates_at_start_then_by_steps_or_minutes_whichever_comes_first() -> None:
    s = ValidationSchedule(every_steps=10, every_minutes=5.0, at_start=True)
    assert s.start(version=0, now=0.0) == "start"
    s.requested(0, 0.0)
    assert s.after_step(1, 60.0) is None
    assert s.after_step(4, 299.0) is None
    assert s.after_step(5, 300.0) == "minutes"
    s.requested(5, 300.0)
    assert s.after_step(6, 400.0) is None  # the minutes count from the last request
    assert s.after_step(10, 420.0) == "steps"  # a multiple of every_steps first
    s.requested(10, 420.0)
    assert s.after_step(11, 700.0) is None
    assert s.after_step(12, 720.0) == "minutes"
    assert s.after_step(13, 800.0) == "minutes"  # not asked for (a round in flight): still due after the next step
    s.requested(13, 800.0)
    assert s.after_step(20, 801.0) == "steps"  # steps count versions, not the time since the last round


def test_schedule_triggers_turn_off_one_by_one_and_never_repeat_a_version() -> None:
    off = ValidationSchedule(every_steps=0, every_minutes=0.0, at_start=True)
    assert not off.enabled and off.start(0, 0.0) is None and off.after_step(5, 1e9) is None  # no baseline either
    steps = ValidationSchedule(every_steps=4, every_minutes=0.0, at_start=False)
    assert steps.start(0, 0.0) is None
    assert [v for v in range(1, 13) if steps.after_step(v, v * 1e4)] == [4, 8, 12]
    minutes = ValidationSchedule(every_steps=0, every_minutes=1.0, at_start=False)
    minutes.start(3, 100.0)  # resumed at version 3: the minutes count from the start
    assert minutes.after_step(4, 159.0) is None and minutes.after_step(5, 160.0) == "minutes"
    resumed = ValidationSchedule(every_steps=0, every_minutes=1.0, at_start=True)
    assert resumed.start(3, 0.0) == "start"
    resumed.requested(3, 0.0)
    assert resumed.after_step(3, 100.0) is None  # the weights validated at start: not again
    lazy = ValidationSchedule(every_steps=0, every_minutes=1.0, at_start=False)  # no start(): from the first call
    assert lazy.after_step(1, 500.0) is None and lazy.after_step(2, 560.0) == "minutes"
    with pytest.raises(ValueError, match="periods"):
        ValidationSchedule(every_steps=-1, every_minutes=0.0, at_start=False)


# ------------------------------------------------------------------------------------------ learner service


class FakeControl:
    def __init__(self) -> None:
        self.published: list[object] = []

    def publish(self, msg: object, latest: bool = True) -> None:
        self.published.append(msg)


class FakeLearner:
    def __init__(self, cfg: object, version: int) -> None:
        self.policy_version = version
        self.vocab_size = 1 << 20
        self.reset_policy = ResetPolicy(cfg.reset)  # type: ignore[attr-defined]

    def observe_validation(self, reward: float, step: int | None = None) -> None:
        self.reset_policy.observe_validation(self.policy_version if step is None else step, reward)


def _service(tmp_path: Path, every: int = 2) -> tuple[LearnerService, FakeLearner]:
    cfg = load_config(ROOT / "configs" / "tiny.toml", ["generator.num_generators=2", f"eval.every_steps={every}"])
    learner = FakeLearner(cfg, version=2)
    service = LearnerService(cfg, tmp_path, learner=learner)  # type: ignore[arg-type]
    service.dispatch.published_version = 2
    return service, learner


def test_service_requests_collects_writes_the_record_and_feeds_the_reset_policy(tmp_path: Path) -> None:
    service, learner = _service(tmp_path)
    control = service._control = FakeControl()
    service.validation.request(control, learner.policy_version)
    # Validate, then the latest WeightsReady again: a generator subscribing now still gets weights first
    assert control.published == [Validate(version=2, round=0), WeightsReady(version=2)]
    learner.policy_version = 3
    service.validation.request(control, learner.policy_version)  # 3 is not a multiple of every_steps
    learner.policy_version = 4
    service.validation.request(control, learner.policy_version)  # round 0 still in flight: skipped, said so
    assert len(control.published) == 2

    async def main() -> None:
        send, receive = trio.open_memory_channel(16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.ingest_loop, receive)
            nursery.start_soon(service.validation.validation_loop)
            await send.send(Ready("generator-1"))  # restarted while the round waits: it is asked again
            for gid in (0, 1):
                for answer in parts_of(gid, max_prompts=1):  # two parts each
                    await send.send(wire(answer))
            # decodable, but part 2 of 2 does not exist: counted as bad, nothing filed
            await send.send(wire(dataclasses.replace(parts_of(1, max_prompts=1)[0], part=2)))
            await send.send(Status("generator-0", {"groups_sent": 3}))
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
    assert service.generators["generator-0"] == {"groups_sent": 3}  # answers never land in a generator's figures
    assert service.validation.counts == {"accepted": 4, "bad": 1}


def test_service_end_of_run_writes_an_incomplete_round_without_feeding_the_policy(tmp_path: Path) -> None:
    service, learner = _service(tmp_path)
    service.validation.request(FakeControl(), learner.policy_version)
    service.validation.on_answer(wire(parts_of(0)[0]))

    async def main() -> None:
        with trio.fail_after(10):
            await service.validation.finish(interrupted=True)  # SIGINT: no waiting for generator 1

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
    service.validation.request(FakeControl(), learner.policy_version)
    capacity = service.buffer.buffer.capacity
    # every group answers a request in flight (others are dropped as unrequested): more requests than the
    # buffer holds, which the run's admission would not hand out
    service.dispatch.prompts = PromptSource(service.dispatch.prompts.sampler, Admission(4 * capacity, 1),
                                            per_generator=4 * capacity)
    requests = [service.dispatch.prompts.issue(0, 2, 2) for _ in range(capacity + 2)]
    groups = [TrajectoryGroup(f"g{i}", "chain_sum", "logic", np.array([1, 2], dtype=np.int32),
                              [Sample([3], [-0.1], [2], "stop", float(j % 2)) for j in range(4)],
                              generator_id=0, seq=r[0]) for i, r in enumerate(requests)]  # type: ignore[index]

    async def main() -> None:
        send, receive = trio.open_memory_channel(64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.ingest_loop, receive)
            for g in groups:  # the buffer fills up: ingestion waits on the group after the last one it admits
                await send.send(g)
            for gid in (0, 1):
                for answer in parts_of(gid):
                    await send.send(wire(answer))
            await trio.sleep(0.2)
            assert service.validation.tracker.pending is not None and not service.validation.tracker.pending.answered
            with trio.fail_after(10):
                await service.validation.finish(interrupted=False)
            nursery.cancel_scope.cancel()

    trio.run(main)
    service.metrics.close()
    [rec] = read_metrics(tmp_path / "metrics.jsonl", kind="validation")
    assert rec["reason"] == "complete" and rec["complete"] and rec["prompts"] == 4
    assert service.intake.outcomes == {"admitted": capacity, "after_final_checkpoint": 2}
    # the parked group was answered; the one discarded while draining stays in flight (a resume hands it out again)
    assert list(service.dispatch.prompts.inflight) == [requests[-1][0]]  # type: ignore[index]
    assert service.dispatch.prompts.counts["answered"] == capacity + 1
    assert learner.reset_policy.best_val_step == 2


def test_service_validates_the_start_weights_then_by_minutes_one_round_at_a_time(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.toml", ["generator.num_generators=2", "eval.every_steps=10",
                                                       "eval.every_minutes=1", "eval.at_start=true"])
    learner = FakeLearner(cfg, version=0)
    service = LearnerService(cfg, tmp_path, learner=learner)  # type: ignore[arg-type]
    clock = [100.0]
    monkeypatch.setattr(learner_validation.time, "monotonic", lambda: clock[0])
    control = service._control = FakeControl()
    service.validation.start(control, learner.policy_version)  # before any generator listens: the base weights
    assert control.published == [Validate(version=0, round=0), WeightsReady(version=0)]

    def step(version: int, seconds: float) -> None:  # a trainer step that took ``seconds`` and published its weights
        clock[0] += seconds
        learner.policy_version = service.dispatch.published_version = version
        service.validation.request(control, version)

    async def main() -> None:
        send, receive = trio.open_memory_channel(16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.ingest_loop, receive)
            nursery.start_soon(service.validation.validation_loop)
            await send.send(Ready("generator-0"))  # its engine starts now: the round asked for at start is repeated
            step(1, 30.0)  # the first step does not wait for the round, nor the round for it
            for gid in (0, 1):
                for answer in parts_of(gid, version=0):
                    await send.send(wire(answer))
            with trio.fail_after(10):
                while not read_metrics(tmp_path / "metrics.jsonl", kind="validation"):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    # asked again, then the latest WeightsReady again (the first step published version 1 meanwhile)
    assert control.published[2:] == [Validate(version=0, round=0), WeightsReady(version=1)]
    step(2, 29.0)  # 59 s since the baseline was asked for
    step(3, 1.0)  # a minute: the weights of version 3
    assert control.published[4:] == [Validate(version=3, round=1), WeightsReady(version=3)]
    step(4, 61.0)  # due by time while round 1 runs: asked after a later step, silently
    step(10, 5.0)  # due by steps while round 1 runs: skipped, said so
    service.metrics.close()
    assert len(control.published) == 6
    [rec] = read_metrics(tmp_path / "metrics.jsonl", kind="validation")
    assert rec["version"] == 0 and rec["step"] == 0 and rec["complete"] and rec["pass_at_1"] == pytest.approx(0.4375)
    events = [e for e in read_metrics(tmp_path / "metrics.jsonl", kind="event") if "validation" in e["event"]]
    assert [(e["event"], e["version"], e.get("reason")) for e in events] == [
        ("validation_requested", 0, "start"), ("validation_requested", 3, "minutes"), ("validation_skipped", 10, None)]
