"""PromptSampler: determinism, disjoint shards within an epoch, weights, re-queue, checkpoint/restore;
Admission: the (K+1) x batch bound per generator and its release as the learner version moves."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prorl_async.learner.prompts import Admission, Draw, PromptSampler, generator_budget


def sampler(shard: int = 0, shards: int = 1, sizes=(10,), weights=None, seed: int = 7) -> PromptSampler:
    return PromptSampler(seed, shard, shards, list(sizes), list(weights or [1.0] * len(sizes)))


def test_same_seed_same_order_other_seed_other_order() -> None:
    a, b, c = sampler(), sampler(), sampler(seed=8)
    draws_a = [a.next() for _ in range(30)]
    assert draws_a == [b.next() for _ in range(30)]
    assert draws_a != [c.next() for _ in range(30)]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 60), shards=st.integers(1, 5), epochs=st.integers(1, 3))
def test_shards_are_disjoint_and_cover_each_epoch(size: int, shards: int, epochs: int) -> None:
    if size < shards:
        with pytest.raises(ValueError, match="fewer than"):
            sampler(shards - 1, shards, (size,))  # the last shard is the one left without a problem
        return
    per_epoch: dict[int, list[int]] = {}
    for shard in range(shards):
        s = sampler(shard, shards, (size,))
        share = len(range(shard, size, shards))
        for _ in range(share * epochs):
            d = s.next()
            per_epoch.setdefault(d.epoch, []).append(d.index)
    assert sorted(per_epoch) == list(range(epochs))
    for indices in per_epoch.values():  # every problem exactly once per epoch, over all generators together
        assert sorted(indices) == list(range(size))


def test_epochs_are_reshuffled() -> None:
    s = sampler(sizes=(50,))
    first, second = [s.next().index for _ in range(50)], [s.next().index for _ in range(50)]
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second


def test_weights_pick_specs_in_proportion() -> None:
    s = sampler(sizes=(1000, 1000), weights=(3.0, 1.0))
    counts = Counter(s.next().spec for _ in range(4000))
    assert 0.70 < counts[0] / 4000 < 0.80


def test_requeued_draws_come_first_in_order() -> None:
    s = sampler(sizes=(20,))
    a, b, c = s.next(), s.next(), s.next()
    s.requeue(c)
    s.requeue(a)
    assert [s.next(), s.next()] == [c, a]
    assert s.next() not in (a, b, c)


def test_state_round_trips_through_json_with_in_flight_draws() -> None:
    s = sampler(shard=1, shards=2, sizes=(30, 12), weights=(1.0, 2.0))
    for _ in range(11):
        s.next()
    in_flight = [s.next(), s.next()]
    s.requeue(s.next())
    saved = json.loads(json.dumps(s.state(in_flight=in_flight)))
    resumed = sampler(shard=1, shards=2, sizes=(30, 12), weights=(1.0, 2.0))
    resumed.restore(saved)
    expected = [*in_flight]
    expected.append(s.next())  # the re-queued one
    expected += [s.next() for _ in range(20)]
    assert [resumed.next() for _ in range(len(expected))] == expected


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": 1}, "seed"),
        ({"shard": 0}, "shard"),
        ({"sizes": [30, 13]}, "sizes"),
        ({"positions": [-1, 0]}, "positions"),
        ({"requeued": [[0, 99, 0]]}, "re-queued"),
        ({"state_version": 9}, "state_version"),
    ],
)
def test_restore_refuses_a_foreign_or_broken_state(change: dict, match: str) -> None:
    s = sampler(shard=1, shards=2, sizes=(30, 12), weights=(1.0, 2.0))
    with pytest.raises(ValueError, match=match):
        s.restore({**s.state(), **change})
    assert s.next() == sampler(shard=1, shards=2, sizes=(30, 12), weights=(1.0, 2.0)).next()  # nothing changed


def test_draw_as_list() -> None:
    assert Draw(1, 2, 3).as_list() == [1, 2, 3]


# ------------------------------------------------------------------------------------------ admission


def test_budget_splits_the_capacity_over_generators() -> None:
    assert [generator_budget(10, 3, g) for g in range(3)] == [4, 3, 3]
    assert generator_budget(10, 3, 2, explicit=7) == 7
    with pytest.raises(ValueError, match="no group"):
        generator_budget(2, 3, 2)


def _fill(adm: Admission, learner_version: int, loaded_version: int) -> list[int]:
    """Start groups until admission refuses; their targets."""
    targets = []
    while adm.may_start(learner_version, loaded_version):
        targets.append(adm.start(learner_version, loaded_version))
        assert len(targets) <= adm.budget
    return targets


def test_admission_holds_the_bound_with_a_frozen_learner_and_releases_as_it_moves() -> None:
    adm = Admission(budget=4, max_staleness=1)
    assert _fill(adm, 0, 0) == [0, 0, 1, 1]  # two slots for version 0, two for version 1: K + 1 batches ahead
    assert _fill(adm, 0, 0) == []  # a frozen learner: nothing more
    assert _fill(adm, 1, 1) == [2, 2]  # the learner passed version 0: its slots are free, one batch per step
    assert adm.counted(1) == 4
    with pytest.raises(RuntimeError):
        adm.start(1, 1)


def test_a_faster_generator_starts_one_batch_per_learner_step() -> None:
    # Slots by start version released a whole budget at once every K + 1 steps (the generator idled a whole
    # step in between); slots by target release one batch per step.
    adm = Admission(budget=8, max_staleness=1)
    assert len(_fill(adm, 0, 0)) == 8
    for v in range(1, 6):
        adm.forget_before(v)
        assert _fill(adm, v, v) == [v + 1] * 4


def test_admission_waits_for_weights_that_are_not_too_old() -> None:
    adm = Admission(budget=4, max_staleness=0)
    assert not adm.may_start(learner_version=3, loaded_version=2)  # K=0: synchronous, wait for version 3
    assert _fill(adm, 3, 3) == [3, 3, 3, 3]
    adm = Admission(budget=6, max_staleness=2)
    assert _fill(adm, 5, 4) == [5, 5, 6, 6]  # weights of 4: targets up to 4 + K only


def test_withdrawn_groups_free_their_slot() -> None:
    adm = Admission(budget=1, max_staleness=0)
    target = adm.start(5, 5)
    assert not adm.may_start(5, 5)
    adm.withdraw(target)
    assert adm.may_start(5, 5)
    adm.start(5, 5)
    adm.forget_before(6)
    assert adm.counted(6) == 0 and adm.may_start(6, 6)


def test_a_moving_bound_under_a_ceiling() -> None:
    # max_staleness = "auto": the learner announces bounds between 1 and the ceiling.
    adm = Admission(budget=4, max_staleness=1, ceiling=3)
    assert _fill(adm, 0, 0) == [0, 0, 1, 1]
    adm.set_bound(2, budget=6)  # one more batch of lead
    assert _fill(adm, 0, 0) == [2, 2]
    assert adm.oldest_usable(3) == 1 and adm.oldest_kept(3) == 0  # groups started at 0 are aborted only past 3
    adm.set_bound(1, budget=4)
    adm.forget_before(1)
    assert adm.counted(1) == 4 and not adm.may_start(1, 1)  # slots already taken stay taken
    with pytest.raises(ValueError):
        adm.set_bound(4, budget=2)  # above the ceiling
    with pytest.raises(ValueError):
        Admission(budget=1, max_staleness=2, ceiling=1)
