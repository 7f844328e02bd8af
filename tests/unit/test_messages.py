"""Wire messages: round trips for every type, and a decoder that rejects every kind of bad input with a reason."""

from __future__ import annotations

import logging
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from prorl_async.transport.messages import (
    REASONS,
    SCHEMA_VERSION,
    GroupRequest,
    Heartbeat,
    Limits,
    MessageError,
    Ready,
    RequestReturned,
    Sample,
    Status,
    Stop,
    TrajectoryGroup,
    Validate,
    ValidationAnswer,
    WeightsReady,
    decode,
    encode,
)
from prorl_async.transport.sockets import Rejections

VOCAB = 1000
LIMITS = Limits(vocab_size=VOCAB, max_samples=16, max_response_tokens=64, max_prompt_tokens=64)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ strategies

texts = st.text(max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def samples(draw: st.DrawFn, start_version: int) -> Sample:
    n = draw(st.integers(1, 64))
    steps = draw(arrays(np.int32, n, elements=st.integers(0, 1)))  # an in-flight update bumps the version
    return Sample(
        token_ids=draw(arrays(np.int32, n, elements=st.integers(0, VOCAB - 1))),
        logprobs=draw(arrays(np.float32, n, elements=st.floats(-1e6, 0, width=32))),
        versions=start_version + np.cumsum(steps, dtype=np.int32),
        finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
        reward=draw(finite),
        reward_reason=draw(texts),
    )


@st.composite
def groups(draw: st.DrawFn) -> TrajectoryGroup:
    start = draw(st.integers(0, 1000))
    members = draw(st.lists(samples(start), min_size=1, max_size=16))
    span = {} if any(len(s.versions) for s in members) else {"min_version": start, "max_version": start}
    return TrajectoryGroup(
        prompt_id=draw(texts),
        task=draw(texts),
        domain=draw(texts),
        prompt_token_ids=draw(arrays(np.int32, draw(st.integers(1, 64)), elements=st.integers(0, VOCAB - 1))),
        samples=members,
        generator_id=draw(st.integers(0, 2**31)),
        seq=draw(st.integers(0, 2**62)),
        **span,
    )


@st.composite
def answers(draw: st.DrawFn) -> ValidationAnswer:
    counts = draw(st.lists(st.integers(1, 8), max_size=6))
    ints = {k: draw(st.integers(0, 2**31)) for k in ("version", "round", "part", "parts", "weights_version",
                                                      "weights_version_last", "failed", "skipped")}
    generators = draw(st.integers(1, 8))
    return ValidationAnswer(source=draw(texts), generator=draw(st.integers(0, generators - 1)),
                            generators=generators, seconds=draw(st.floats(0, 1e6)),
                            prompt_ids=[draw(texts) for _ in counts], tasks=[draw(texts) for _ in counts],
                            counts=np.asarray(counts, dtype=np.int32),
                            rewards=draw(arrays(np.float64, sum(counts), elements=finite)), **ints)


metric_values = st.one_of(st.integers(-(2**63), 2**63 - 1), finite, st.booleans())
messages = st.one_of(
    groups(),
    st.builds(WeightsReady, version=st.integers(0, 2**62)),
    st.builds(WeightsReady, version=st.integers(0, 2**62), max_staleness=st.integers(0, 64)),
    st.builds(Stop, reason=texts),
    st.builds(Validate, version=st.integers(0, 2**62), round=st.integers(0, 2**62)),
    st.builds(Heartbeat, source=texts, time_s=finite),
    st.builds(Ready, source=texts),
    st.builds(Status, source=texts, values=st.dictionaries(texts, metric_values, max_size=8)),
    st.builds(GroupRequest, **{k: st.integers(0, 2**62) for k in ("generator_id", "request_id", "spec", "index",
                                                                   "epoch", "min_version", "level")}),
    st.builds(RequestReturned, source=texts, generator_id=st.integers(0, 2**31), request_id=st.integers(0, 2**62),
              reason=texts),
    answers(),
)


def make_group(lengths: tuple[int, ...] = (3, 2), version: int = 5) -> TrajectoryGroup:
    rng = np.random.default_rng(0)
    return TrajectoryGroup(
        prompt_id="p-0",
        task="chain_sum",
        domain="logic",
        prompt_token_ids=[1, 2, 3],
        samples=[
            Sample(rng.integers(0, VOCAB, k), -rng.random(k), np.full(k, version), "stop", float(i % 2), "ok")
            for i, k in enumerate(lengths)
        ],
        generator_id=0,
        seq=0,
    )


def body_of(msg: object) -> tuple[bytes, dict]:
    kind, payload = encode(msg)  # type: ignore[arg-type]
    return kind, msgpack.unpackb(payload)


def repack(kind: bytes, body: dict) -> list[bytes]:
    return [kind, msgpack.packb(body)]


def reason_of(frames: list, limits: Limits = LIMITS) -> str:
    with pytest.raises(MessageError) as info:
        decode(frames, limits)
    assert info.value.reason in REASONS
    return info.value.reason


# ------------------------------------------------------------------------------------------ round trips


@FAST
@given(messages)
def test_every_message_round_trips(msg: object) -> None:
    frames = encode(msg)  # type: ignore[arg-type]
    assert len(frames) == 2 and len(frames[0]) == 1
    assert decode(frames, LIMITS) == msg


def test_group_fields_and_dtypes_survive() -> None:
    group = make_group((4, 1, 2))
    back = decode(encode(group), LIMITS)
    assert isinstance(back, TrajectoryGroup)
    assert (back.min_version, back.max_version) == (5, 5)
    assert [len(s.token_ids) for s in back.samples] == [4, 1, 2]
    for s in back.samples:
        assert (s.token_ids.dtype, s.logprobs.dtype, s.versions.dtype) == (np.int32, np.float32, np.int32)
    assert back.rewards.tolist() == [0.0, 1.0, 0.0] and back.num_tokens == 7


def test_wire_layout_is_documented_one() -> None:
    kind, body = body_of(make_group((2,)))
    assert kind == b"G" and body["v"] == SCHEMA_VERSION
    dtype, n, data = body["logprobs"]
    assert (dtype, n, len(data)) == ("<f4", 2, 8)
    assert np.array_equal(np.frombuffer(data, "<f4"), make_group((2,)).samples[0].logprobs)


def test_validate_travels_as_its_type_byte_and_two_integers() -> None:
    kind, body = body_of(Validate(version=6, round=2))
    assert kind == b"V" and body == {"v": SCHEMA_VERSION, "version": 6, "round": 2}
    assert decode(repack(kind, body), LIMITS) == Validate(6, 2)


def test_versions_may_drop_across_samples_but_not_within_one() -> None:
    group = make_group((2, 2))
    group.samples[0].versions[:] = [5, 6]  # sample 0 saw an update; sample 1 started before it landed
    group.samples[1].versions[:] = [5, 5]
    group.min_version, group.max_version = 5, 6
    assert decode(encode(group), LIMITS) == group
    group.samples[1].versions[:] = [6, 5]
    assert reason_of(encode(group)) == "version"


# ------------------------------------------------------------------------------------------ rejections


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.update(v=SCHEMA_VERSION + 1), "schema"),
        (lambda b: b.pop("v"), "schema"),
        (lambda b: b.update(v=True), "schema"),
        (lambda b: b.pop("seq"), "field"),
        (lambda b: b.update(extra=1), "field"),
        (lambda b: b.update(seq="7"), "field"),
        (lambda b: b.update(seq=True), "field"),
        (lambda b: b.update(seq=-1), "value"),
        (lambda b: b.update(generator_id=1.5), "field"),
        (lambda b: b.update(prompt_id=b"bytes"), "field"),
        (lambda b: b.update(finish_reasons=["stop"]), "field"),
        (lambda b: b.update(reward_reasons=[1, 2]), "field"),
        (lambda b: b.update(token_ids=[1, 2]), "field"),
        (lambda b: b.update(token_ids=[1, 2, 3]), "array"),
        (lambda b: b.update(token_ids="<i4"), "field"),
        (lambda b: b["token_ids"].__setitem__(0, "<i8"), "array"),
        (lambda b: b["token_ids"].__setitem__(0, ">i4"), "array"),
        (lambda b: b["logprobs"].__setitem__(1, 4), "array"),  # declared length contradicts the bytes
        (lambda b: b["logprobs"].__setitem__(2, b"\0" * 3), "array"),
        (lambda b: b["token_ids"].__setitem__(1, 2**40), "size"),  # huge declared length
        (lambda b: b["lengths"].__setitem__(1, 2**40), "size"),
        (lambda b: b["lengths"].__setitem__(2, np.array([3, 3], "<i4").tobytes()), "value"),  # 6 != 5 tokens
        (lambda b: b["lengths"].__setitem__(2, np.array([6, -1], "<i4").tobytes()), "size"),
        (lambda b: b.update(lengths=["<i4", 0, b""]), "value"),  # no samples
        (lambda b: b["token_ids"].__setitem__(2, np.array([1, 2, VOCAB, 4, 5], "<i4").tobytes()), "token"),
        (lambda b: b["token_ids"].__setitem__(2, np.array([1, -2, 3, 4, 5], "<i4").tobytes()), "token"),
        (lambda b: b["prompt_token_ids"].__setitem__(2, np.array([1, 2, 10**6], "<i4").tobytes()), "token"),
        (lambda b: b["logprobs"].__setitem__(2, np.array([-1, np.nan, -1, -1, -1], "<f4").tobytes()), "logprob"),
        (lambda b: b["logprobs"].__setitem__(2, np.array([-1, -np.inf, -1, -1, -1], "<f4").tobytes()), "logprob"),
        (lambda b: b["logprobs"].__setitem__(2, np.array([-1, np.inf, -1, -1, -1], "<f4").tobytes()), "logprob"),
        (lambda b: b["logprobs"].__setitem__(2, np.array([-1, 0.5, -1, -1, -1], "<f4").tobytes()), "logprob"),
        (lambda b: b["rewards"].__setitem__(2, np.array([1, np.nan], "<f8").tobytes()), "nonfinite"),
        (lambda b: b["rewards"].__setitem__(2, np.array([1, -np.inf], "<f8").tobytes()), "nonfinite"),
        (lambda b: b.update(rewards=["<f8", 1, b"\0" * 8]), "value"),
        (lambda b: b.update(min_version=4), "version"),
        (lambda b: b.update(max_version=9), "version"),
        (lambda b: b.update(min_version=-1), "version"),
        (lambda b: b["versions"].__setitem__(2, np.array([5, 6, 5, 5, 5], "<i4").tobytes()), "version"),
        (lambda b: b.update(task="x" * 70_000), "size"),
    ],
)
def test_bad_group_is_rejected_with_its_reason(mutate, reason: str) -> None:
    kind, body = body_of(make_group((3, 2)))
    mutate(body)
    assert reason_of(repack(kind, body)) == reason


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([], "frames"),
        ([b"W"], "frames"),
        ([b"W", b"\x80", b""], "frames"),
        ([b"WW", msgpack.packb({"v": 1, "version": 1})], "frames"),
        ([b"", msgpack.packb({"v": 1, "version": 1})], "frames"),
        ([b"Z", msgpack.packb({"v": 1, "version": 1})], "type"),
        ([b"W", b""], "msgpack"),
        ([b"W", b"\xc1"], "msgpack"),  # a byte msgpack never uses
        ([b"W", msgpack.packb({"v": 1, "version": 1})[:-1]], "msgpack"),  # truncated
        ([b"W", msgpack.packb({"v": 1, "version": 1}) + b"\0"], "msgpack"),  # trailing data
        ([b"W", msgpack.packb([1, 2])], "msgpack"),
        ([b"W", b"\x91" * 100_000], "msgpack"),  # nested too deep
        ([b"W", b"\xdd\xff\xff\xff\xff"], "msgpack"),  # an array header declaring 4G elements
        ([b"W", b"\xc6\xff\xff\xff\xff"], "msgpack"),  # a bin header declaring 4 GB
        ([b"W", b"\x81\xa1v\xa2\xff\xfe"], "msgpack"),  # invalid utf-8
        ([b"W", msgpack.packb({"v": 1, "version": -3})], "version"),
        ([b"W", msgpack.packb({"v": 1, "version": 2.0})], "field"),
        ([b"S", msgpack.packb({"v": 1})], "field"),
        ([b"V", msgpack.packb({"v": 1, "version": 2})], "field"),  # no round
        ([b"V", msgpack.packb({"v": 1, "version": 2, "round": 0, "extra": 1})], "field"),
        ([b"V", msgpack.packb({"v": 1, "version": -1, "round": 0})], "version"),
        ([b"V", msgpack.packb({"v": 1, "version": 2, "round": -1})], "value"),
        ([b"V", msgpack.packb({"v": 1, "version": 2, "round": 1.0})], "field"),
        ([b"V", msgpack.packb({"v": 1, "version": True, "round": 0})], "field"),
        ([b"V", msgpack.packb({"v": 1, "version": "2", "round": 0})], "field"),
        ([b"V", msgpack.packb({"v": 2, "version": 2, "round": 0})], "schema"),
        ([b"V", msgpack.packb([2, 0])], "msgpack"),
        ([b"H", msgpack.packb({"v": 1, "source": "g", "time_s": math.nan})], "nonfinite"),
        ([b"H", msgpack.packb({"v": 1, "source": "g", "time_s": math.inf})], "nonfinite"),
        ([b"M", msgpack.packb({"v": 1, "source": "g", "values": {"a": math.nan}})], "nonfinite"),
        ([b"M", msgpack.packb({"v": 1, "source": "g", "values": {"a": [1]}})], "field"),
        ([b"M", msgpack.packb({"v": 1, "source": "g", "values": [1]})], "field"),
        ([b"M", msgpack.packb({"v": 1, "source": "g", "values": {str(i): i for i in range(5000)}})], "size"),
        ([b"R", msgpack.packb({"v": 1, "source": 3})], "field"),
    ],
)
def test_bad_frames_are_rejected_with_their_reason(frames: list, reason: str) -> None:
    assert reason_of(frames) == reason


def test_limits_bound_samples_tokens_and_bytes() -> None:
    frames = encode(make_group((3, 2)))
    assert reason_of(frames, Limits(max_samples=1)) == "size"
    assert reason_of(frames, Limits(max_response_tokens=2)) == "size"
    assert reason_of(frames, Limits(max_prompt_tokens=2)) == "size"
    assert reason_of(frames, Limits(max_message_bytes=len(frames[1]) - 1)) == "size"
    assert reason_of(frames, Limits(vocab_size=1)) == "token"
    assert decode(frames, Limits(max_message_bytes=len(frames[1]))) == make_group((3, 2))


# ------------------------------------------------------------------------------------------ fuzzing


@FAST
@given(st.lists(st.binary(max_size=3), max_size=4), st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(head: list[bytes], payload: bytes) -> None:
    for frames in (head, [*head[:1], payload], [b"G", payload], [b"M", payload]):
        try:
            decode(frames, LIMITS)
        except MessageError as err:
            assert err.reason in REASONS


@FAST
@given(messages, st.data())
def test_truncated_or_corrupted_messages_never_crash_the_decoder(msg: object, data: st.DataObject) -> None:
    kind, payload = encode(msg)  # type: ignore[arg-type]
    cut = data.draw(st.integers(0, max(0, len(payload) - 1)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(0, len(payload) - 1)), st.integers(0, 255)), max_size=4))
    corrupted = bytearray(payload)
    for pos, value in flips:
        if corrupted:
            corrupted[pos] = value
    for frames in ([kind, payload[:cut]], [kind, bytes(corrupted)]):
        try:
            decode(frames, LIMITS)  # a flip inside array data may still leave a valid message
        except MessageError as err:
            assert err.reason in REASONS


def test_rejections_count_every_message_and_log_each_reason_once(caplog: pytest.LogCaptureFixture) -> None:
    rejections = Rejections("test receiver")
    bad = [[b"Z", b""], [b"W", b"\xc1"], [b"Z", b""], [b"W", msgpack.packb({"v": 99, "version": 1})], [b"Z", b""]]
    with caplog.at_level(logging.WARNING, logger="prorl_async.transport.sockets"):
        for frames in bad:
            try:
                decode(frames, LIMITS)
            except MessageError as err:
                rejections.add(err)
    assert rejections.counts() == {"type": 3, "msgpack": 1, "schema": 1}
    assert len(caplog.records) == 3


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError):
        encode({"version": 1})  # type: ignore[arg-type]


def test_group_without_tokens_needs_explicit_versions_and_is_refused_on_the_wire() -> None:
    empty = Sample([], [], [], "abort", 0.0)
    with pytest.raises(ValueError, match="min_version"):
        TrajectoryGroup("p", "t", "d", [1], [empty], generator_id=0, seq=0)
    group = TrajectoryGroup("p", "t", "d", [1], [empty], generator_id=0, seq=0, min_version=3, max_version=3)
    with pytest.raises(MessageError) as err:  # the learner cannot train on an empty response
        decode(encode(group), LIMITS)
    assert err.value.reason == "value"


def test_untrainable_groups_are_refused_at_decode() -> None:
    one = Sample([5], [-0.5], [3], "stop", 1.0)
    empty_prompt = TrajectoryGroup("p", "t", "d", [], [one], generator_id=0, seq=0)
    with pytest.raises(MessageError, match="non-empty prompt") as err:
        decode(encode(empty_prompt), LIMITS)
    assert err.value.reason == "value"
    mixed = TrajectoryGroup("p", "t", "d", [1], [one, Sample([], [], [], "stop", 0.0)], generator_id=0, seq=0)
    with pytest.raises(MessageError, match="at least one token"):
        decode(encode(mixed), LIMITS)
    outside = TrajectoryGroup("p", "t", "d", [1], [Sample([VOCAB], [-0.5], [3], "stop", 1.0)], generator_id=0, seq=0)
    with pytest.raises(MessageError) as err:
        decode(encode(outside), LIMITS)
    assert err.value.reason == "token"


def test_weights_ready_bound_is_optional_on_the_wire() -> None:
    plain, bounded = encode(WeightsReady(3)), encode(WeightsReady(3, max_staleness=2))
    assert set(msgpack.unpackb(plain[1])) == {"v", "version"}  # a fixed bound: nothing new on the wire
    assert decode(bounded) == WeightsReady(3, 2) and decode(plain) == WeightsReady(3)
    for bad in ({"max_staleness": -1}, {"max_staleness": "2"}, {"max_staleness": 1, "extra": 0}):
        with pytest.raises(MessageError):
            decode([b"W", msgpack.packb({"v": 1, "version": 3, **bad})])


def test_group_request_level_is_optional_on_the_wire() -> None:
    fields = {"generator_id": 1, "request_id": 7, "spec": 0, "index": 42, "epoch": 2, "min_version": 3}
    leveled, plain = encode(GroupRequest(**fields, level=2)), encode(GroupRequest(**fields))
    assert set(msgpack.unpackb(plain[1])) == {"v", *fields}  # level 0: the request of before curricula
    assert decode(leveled) == GroupRequest(**fields, level=2) and decode(leveled).level == 2
    old = [b"Q", msgpack.packb({"v": 1, **fields})]  # encoded before GroupRequest had a level
    assert decode(old) == GroupRequest(**fields) and decode(old).level == 0
    for bad in ({"level": -1}, {"level": "2"}, {"level": 1, "extra": 0}):
        with pytest.raises(MessageError):
            decode([b"Q", msgpack.packb({"v": 1, **fields, **bad})])
