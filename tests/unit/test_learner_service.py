"""The learner process's pure parts: wire groups -> GroupBatch, batch summaries, step records, the metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prorl_async.learner.batch import build_batch
from prorl_async.learner.records import StepRecords, batch_summary
from prorl_async.monitor.metrics import MetricsLog, read_metrics
from prorl_async.transport.messages import Sample, TrajectoryGroup


def _group(prompt_id: str, rewards: list[float], version: int, domain: str = "logic") -> TrajectoryGroup:
    samples = [
        Sample(
            token_ids=np.array([5 + i, 6, 7][: 1 + i % 3], dtype=np.int32),
            logprobs=np.full(1 + i % 3, -0.5, dtype=np.float32),
            versions=np.full(1 + i % 3, version, dtype=np.int32),
            finish_reason="stop",
            reward=r,
        )
        for i, r in enumerate(rewards)
    ]
    return TrajectoryGroup(prompt_id=prompt_id, task="chain_sum", domain=domain,
                           prompt_token_ids=np.array([1, 2, 3], dtype=np.int32), samples=samples,
                           generator_id=0, seq=0)


def test_build_batch_keeps_group_order_and_fields() -> None:
    batch = build_batch([_group("a", [1.0, 0.0], 3), _group("b", [0.0, 1.0], 4)])
    assert (batch.num_groups, batch.group_size, batch.num_samples) == (2, 2, 4)
    assert batch.rewards.dtype == torch.float64 and batch.rewards.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert batch.prompt_ids.tolist() == [1, 2, 3, 1, 2, 3] and batch.prompt_lens.tolist() == [3, 3]
    assert batch.response_lens.tolist() == [[1, 2], [1, 2]]
    assert [r.tolist() for r in batch.responses()] == [[5], [6, 6], [5], [6, 6]]
    assert [p.tolist() for p in batch.prompts()] == [[1, 2, 3], [1, 2, 3]]
    assert batch.response_ids.dtype == batch.prompt_ids.dtype == batch.policy_versions.dtype == torch.int64
    assert batch.behaviour_logprobs.dtype == torch.float32 and batch.behaviour_logprobs.tolist() == [-0.5] * 6
    assert batch.policy_versions.tolist() == [3, 3, 3, 4, 4, 4]


def test_build_batch_rejects_ragged_and_malformed_groups() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        build_batch([_group("a", [1.0, 0.0], 0), _group("b", [0.0, 1.0, 1.0], 0)])
    with pytest.raises(ValueError, match="no groups"):
        build_batch([])
    bad = _group("c", [1.0, 0.0], 0)
    bad.samples[1].versions = bad.samples[1].versions[:1]
    with pytest.raises(ValueError, match=r"group 1 \('c'\) sample 1: 2 response tokens but per-token fields"):
        build_batch([_group("a", [1.0, 0.0], 0), bad])


def test_batch_summary() -> None:
    s = batch_summary([_group("a", [1.0, 0.0], 3, "logic"), _group("b", [1.0, 1.0], 5, "math")], learner_version=5)
    assert s["reward_mean"] == 0.75
    assert s["reward_by_domain"] == {"logic": 0.5, "math": 1.0}
    assert (s["group_staleness_mean"], s["group_staleness_max"]) == (1.0, 2)


def test_step_records_count_every_arrival_once_and_per_domain() -> None:
    """The arrived reward is over every group received since the previous record, filtered ones included, per domain
    too; the batch summary's figures win over the step's duplicates."""
    records = StepRecords()
    for group in (_group("a", [1.0, 0.0, 0.0, 0.0], 0, "logic"), _group("b", [1.0, 1.0, 1.0, 1.0], 0, "logic"),
                  _group("c", [0.0, 0.0], 0, "math")):
        records.arrived(group)
    first = records.step({"loss": 0.5, "samples": 1}, {"reward_mean": 0.5, "samples": 8}, {"sync_s": 0.1}, version=1)
    assert (first["loss"], first["samples"], first["sync_s"], first["version"]) == (0.5, 8, 0.1, 1)
    assert first["samples_arrived"] == 10 and first["reward_arrived_mean"] == pytest.approx(0.5)
    assert first["reward_arrived_by_domain"] == {"logic": pytest.approx(5 / 8), "math": 0.0}
    assert first["samples_arrived_by_domain"] == {"logic": 8, "math": 2}
    assert sum(first["samples_arrived_by_domain"].values()) == first["samples_arrived"]
    records.arrived(_group("d", [1.0, 0.0], 1, "math"))
    second = records.step({}, {}, {})  # counted once: only what arrived since the first record
    assert (second["samples_arrived"], second["reward_arrived_mean"]) == (2, 0.5)
    assert second["reward_arrived_by_domain"] == {"math": 0.5} and second["samples_arrived_by_domain"] == {"math": 2}
    empty = records.step({}, {}, {})
    assert (empty["samples_arrived"], empty["reward_arrived_mean"]) == (0, None)
    assert empty["reward_arrived_by_domain"] == {} and empty["samples_arrived_by_domain"] == {}


def test_metrics_log_appends_valid_json(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.write("step", step=1, loss=float("nan"), values=np.float32(0.5), nested={"a": 1})
    log.close()
    again = MetricsLog(tmp_path)  # resume appends
    again.write("event", event="x")
    again.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "step", "torn')  # a crashed writer's last line
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["step", "event"]
    assert records[0]["loss"] == "nan" and records[0]["values"] == 0.5 and records[0]["nested"] == {"a": 1}
    assert read_metrics(tmp_path / "metrics.jsonl", kind="event")[0]["event"] == "x"
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:2]:
        json.loads(line)


def _events(directory: Path) -> list:
    """Every Event in the TFRecord files under ``directory`` (length, crc, data, crc per record)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def test_metrics_log_writes_tensorboard_scalars(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.write("step", version=1, loss=0.5, reward_by_domain={"math": 0.25}, reset_reason="", flag=True)
    log.write("step", version=2, loss=0.25, reward_by_domain={"math": 0.5}, kl=float("inf"))
    log.write("generator", source="generator-0", tokens_per_s=123.0, sampler_state="{}")
    log.write("event", event="checkpoint", version=2)
    log.close()
    scalars = [(v.tag, e.step, v.simple_value) for e in _events(tmp_path / "tensorboard") for v in e.summary.value]
    assert ("loss", 1, 0.5) in scalars and ("loss", 2, 0.25) in scalars
    assert ("reward_by_domain/math", 2, 0.5) in scalars
    assert any(tag == "generator-0/tokens_per_s" and value == 123.0 for tag, _, value in scalars)
    tags = {tag for tag, _, _ in scalars}
    assert not tags & {"kl", "flag", "reset_reason", "sampler_state", "event", "version"}  # inf, bool, strings


def test_auto_staleness_follows_the_step_cycle(tmp_path: Path) -> None:
    from prorl_async.config import Config
    from prorl_async.learner.service import LearnerService

    cfg = Config.model_validate({"model": {"name": "tiny-random"}, "buffer": {"max_staleness": "auto",
                                                                             "auto_max_staleness": 2}})
    service = LearnerService(cfg, tmp_path)
    assert service.buffer.buffer.max_staleness == 2  # the buffer keeps what the ceiling allows
    service.generators = {"generator-0": {"idle_s": 1.0}}
    # first step: no idle figure over a cycle yet
    assert service.staleness.revise(5.0, 5.0, service.generators, now=100.0) == 1
    service.generators["generator-0"]["idle_s"] = 5.0  # idle 4 s of the 10 s cycle, the learner waited half
    assert service.staleness.revise(5.0, 5.0, service.generators, now=110.0) == 2
    service.generators["generator-0"]["idle_s"] = 9.0
    assert service.staleness.revise(5.0, 5.0, service.generators, now=120.0) == 2  # the ceiling
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "max_staleness"]
    assert [(e["previous"], e["bound"]) for e in events] == [(1, 2)]
    fixed = LearnerService(Config.model_validate({"model": {"name": "tiny-random"}}), tmp_path / "fixed")
    assert fixed.staleness.auto is None and fixed.staleness.revise(9.0, 1.0, fixed.generators) == 1
