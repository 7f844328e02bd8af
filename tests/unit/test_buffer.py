"""Replay buffer: admission capacity, staleness bound, variance filter, counters, state/restore, trio waits."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from prorl_async.learner.buffer import (
    DROP_REASONS,
    BufferStarved,
    ReplayBuffer,
    WaitingReplayBuffer,
    admission_capacity,
    variance_outcome,
)
from prorl_async.learner.staleness import AutoStaleness
from prorl_async.transport.messages import Sample, TrajectoryGroup

MIXED, ALL_RIGHT, ALL_WRONG, ALL_HALF = (0.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.5, 0.5, 0.5)


def group(
    min_version: int, rewards: tuple[float, ...] = MIXED, seq: int = 0, max_version: int | None = None
) -> TrajectoryGroup:
    top = min_version if max_version is None else max_version
    samples = [Sample([7, 8], [-0.5, -0.25], [min_version, top], "stop", r, "") for r in rewards]
    return TrajectoryGroup(f"p{seq}", "chain_sum", "logic", [1, 2], samples, generator_id=0, seq=seq)


def test_capacity_is_k_plus_one_batches() -> None:
    assert admission_capacity(batch_groups=8, max_staleness=0) == 8
    assert ReplayBuffer(batch_groups=8, max_staleness=2).capacity == 24


def test_put_admits_until_full_and_full_takes_nothing() -> None:
    buf = ReplayBuffer(batch_groups=2, max_staleness=1)
    assert [buf.put(group(0, seq=i)) for i in range(4)] == ["admitted"] * 4
    assert buf.room == 0 and buf.put(group(0, seq=4)) == "full"
    assert len(buf) == 4 and buf.counters["received"] == 4
    assert buf.put(group(0, ALL_WRONG)) == "all_wrong"  # filtered groups take no room: dropped even when full


def test_variance_filter_reasons() -> None:
    assert variance_outcome(np.array([0.0, 1.0]), 1e-6) == "admitted"
    assert variance_outcome(np.array(ALL_RIGHT), 1e-6) == "all_correct"
    assert variance_outcome(np.array(ALL_WRONG), 1e-6) == "all_wrong"
    assert variance_outcome(np.array(ALL_HALF), 1e-6) == "no_variance"
    assert variance_outcome(np.array([0.5, 0.6]), 0.1) == "no_variance"  # std 0.05 under the threshold
    assert variance_outcome(np.array([1.0]), 0.0) == "all_correct"  # a group of one has no variance
    buf = ReplayBuffer(batch_groups=4, max_staleness=0, min_reward_std=1e-6)
    for rewards in (ALL_RIGHT, ALL_WRONG, ALL_WRONG, ALL_HALF, MIXED):
        buf.put(group(0, rewards))
    assert buf.counters == {"received": 5, "yielded": 0, "stale": 0, "all_correct": 1, "all_wrong": 2, "no_variance": 1,
                            "untrainable": 0}


def test_pull_returns_exactly_n_in_arrival_order_or_nothing() -> None:
    buf = ReplayBuffer(batch_groups=3, max_staleness=1)
    for i in range(2):
        buf.put(group(0, seq=i))
    assert buf.pull(3, learner_version=0) is None and len(buf) == 2  # never a short batch, nothing taken
    buf.put(group(0, seq=2))
    buf.put(group(0, seq=3))
    assert [g.seq for g in buf.pull(3, learner_version=0)] == [0, 1, 2]
    assert len(buf) == 1 and buf.counters["yielded"] == 3


def test_pull_takes_the_groups_nearest_to_expiry_first() -> None:
    # A group that started on older weights can arrive after a newer one (a slow scorer, an overlapped weight
    # broadcast): handing out the newer one first let the older one expire unused (seen in CI: one stale group
    # at bound 1 with two mini-batches). Oldest min_version first, arrival order among equals.
    buf = ReplayBuffer(batch_groups=2, max_staleness=1)
    buf.put(group(1, seq=0))
    buf.put(group(0, seq=1))
    buf.put(group(1, seq=2))
    assert [g.seq for g in buf.pull(1, learner_version=1)] == [1]
    assert [g.seq for g in buf.pull(2, learner_version=2)] == [0, 2]
    assert buf.counters["stale"] == 0


def test_staleness_bound_at_put_and_at_pull() -> None:
    buf = ReplayBuffer(batch_groups=2, max_staleness=1)
    buf.put(group(0, seq=0))
    buf.put(group(1, seq=1))
    buf.put(group(0, seq=2, max_version=2))  # started at 0, finished at 2 (in-flight update): min decides
    assert buf.pull(1, learner_version=1) is not None  # at version 1 every held group is usable
    assert buf.staleness_histogram() == {0: 1, 1: 1}
    assert buf.pull(1, learner_version=2) is not None  # version 2 drops the remaining min_version-0 group
    assert buf.counters["stale"] == 1 and len(buf) == 0
    assert buf.put(group(0, seq=3)) == "stale"  # too stale on arrival
    assert buf.counters["stale"] == 2


def test_synchronous_k0_yields_only_current_version() -> None:
    buf = ReplayBuffer(batch_groups=2, max_staleness=0)
    for seq, version in enumerate([0, 0, 1, 1]):
        assert buf.put(group(version, seq=seq)) == ("admitted" if seq < 2 else "full")
    assert [g.min_version for g in buf.pull(2, 0)] == [0, 0]
    assert buf.put(group(1, seq=9)) == "admitted"
    assert buf.pull(1, 1)[0].min_version == 1


def test_pull_rejects_impossible_requests() -> None:
    buf = ReplayBuffer(batch_groups=2, max_staleness=0)
    with pytest.raises(ValueError, match="capacity"):
        buf.pull(3, 0)
    buf.pull(1, 5)
    with pytest.raises(ValueError, match="went back"):
        buf.pull(1, 4)


def test_state_restore_is_exact_and_msgpack_able() -> None:
    buf = ReplayBuffer(batch_groups=2, max_staleness=1, min_reward_std=1e-6)
    for seq, (version, rewards) in enumerate([(0, MIXED), (0, ALL_WRONG), (1, MIXED), (1, MIXED), (1, MIXED)]):
        buf.put(group(version, rewards, seq=seq))
    buf.pull(2, 1)
    saved = msgpack.unpackb(msgpack.packb(buf.state()))  # what a checkpoint writes and reads back
    restored = ReplayBuffer(batch_groups=2, max_staleness=1, min_reward_std=1e-6)
    restored.restore(saved)
    assert restored.state() == buf.state()
    assert restored.counters == buf.counters and restored.learner_version == 1
    assert restored.pull(2, 2) == buf.pull(2, 2)


def test_restore_refuses_other_settings() -> None:
    state = ReplayBuffer(batch_groups=2, max_staleness=1).state()
    with pytest.raises(ValueError, match="max_staleness"):
        ReplayBuffer(batch_groups=2, max_staleness=2).restore(state)


# ------------------------------------------------------------------------------------------ properties


class BufferMachine(RuleBasedStateMachine):
    """Random puts and pulls; the invariants of the module docstring hold after every step."""

    @initialize(batch=st.integers(1, 4), k=st.integers(0, 3), threshold=st.sampled_from([0.0, 1e-6, 0.3]))
    def setup(self, batch: int, k: int, threshold: float) -> None:
        self.buf = ReplayBuffer(batch, k, threshold)
        self.version = 0
        self.seq = 0
        self.taken = 0  # groups the buffer took (every outcome but "full")
        self.yielded: set[int] = set()

    @rule(age=st.integers(0, 5), rewards=st.sampled_from([MIXED, ALL_RIGHT, ALL_WRONG, ALL_HALF, (0.2, 0.9, 0.4)]))
    def put(self, age: int, rewards: tuple[float, ...]) -> None:
        g = group(max(0, self.version - age), rewards, seq=self.seq)
        self.seq += 1
        before = len(self.buf)
        outcome = self.buf.put(g)
        if outcome == "full":
            assert before == self.buf.capacity
        else:
            self.taken += 1
            assert outcome != "admitted" or before < self.buf.capacity

    @rule(n=st.integers(1, 4), advance=st.integers(0, 2))
    def pull(self, n: int, advance: int) -> None:
        n = min(n, self.buf.capacity)
        self.version += advance
        batch = self.buf.pull(n, self.version)
        if batch is None:
            assert len(self.buf) < n
            return
        assert len(batch) == n
        for g in batch:
            assert self.version - g.min_version <= self.buf.max_staleness  # never staler than K
            assert float(np.std(g.rewards)) > self.buf.min_reward_std  # never a zero-variance group
            assert g.seq not in self.yielded  # never twice
            self.yielded.add(g.seq)

    @invariant()
    def bounded_and_nothing_lost_without_a_counter(self) -> None:
        c = self.buf.counters
        assert 0 <= len(self.buf) <= self.buf.capacity
        assert c["received"] == self.taken
        assert c["received"] == len(self.buf) + c["yielded"] + sum(c[r] for r in DROP_REASONS)
        assert c["yielded"] == len(self.yielded)


TestBufferMachine = BufferMachine.TestCase
TestBufferMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------------------------------------ trio wrapper


def test_waiting_pull_waits_for_a_full_batch_and_put_waits_for_room() -> None:
    async def main() -> None:
        wbuf = WaitingReplayBuffer(ReplayBuffer(batch_groups=2, max_staleness=0))
        batches = []

        async def learner() -> None:
            batches.append(await wbuf.pull(2, 0, timeout_s=60))
            batches.append(await wbuf.pull(2, 0, timeout_s=60))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(learner)
            for seq in range(6):  # capacity 2: the 5th and 6th puts wait until the learner pulled
                assert await wbuf.put(group(0, seq=seq)) == "admitted"
                await trio.sleep(1)
        assert [[g.seq for g in b] for b in batches] == [[0, 1], [2, 3]]
        assert len(wbuf.buffer) == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_waiting_pull_times_out_loudly() -> None:
    async def main() -> None:
        wbuf = WaitingReplayBuffer(ReplayBuffer(batch_groups=2, max_staleness=0))
        await wbuf.put(group(0))
        with pytest.raises(BufferStarved, match="1 held"):
            await wbuf.pull(2, 0, timeout_s=600)
        assert len(wbuf.buffer) == 1  # nothing taken

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_variance_filter_off_keeps_zero_variance_groups() -> None:
    buf = ReplayBuffer(batch_groups=2, max_staleness=0, min_reward_std=None)
    assert buf.put(group(0, ALL_WRONG, seq=0)) == "admitted"
    assert buf.put(group(0, (1.0, 1.0), seq=1)) == "admitted"
    assert len(buf.pull(2, learner_version=0)) == 2


def test_auto_staleness_raises_when_both_sides_idle_and_lowers_when_calm() -> None:
    auto = AutoStaleness(ceiling=3, gap=0.1, patience=2)
    assert auto.update(0.5, None) == 1  # no generator report yet: no evidence that the bound holds them back
    assert auto.update(0.5, 0.0) == 1  # generator-bound: the learner waits, the generators never idle
    assert auto.update(0.0, 0.5) == 1  # learner-bound: the generators idle at the bound, the learner does not wait
    assert [auto.update(0.3, 0.2) for _ in range(3)] == [2, 3, 3]  # both idle: up to the ceiling
    assert auto.update(0.01, 0.0) == 3  # one calm step: not yet
    assert auto.update(0.07, 0.0) == 3  # between gap/2 and gap: neither calm nor starved, the streak restarts
    assert [auto.update(0.0, 0.0) for _ in range(6)] == [3, 2, 2, 1, 1, 1]  # never below 1
    state = auto.state()
    again = AutoStaleness(ceiling=3)
    again.restore(state)
    assert again.state() == state
    for bad in ({"bound": 0}, {"bound": 4}, {"bound": 2, "calm_steps": -1}, {}):
        with pytest.raises(ValueError):
            again.restore(bad)
    with pytest.raises(ValueError):
        AutoStaleness(ceiling=0)
