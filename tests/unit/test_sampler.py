"""PromptSampler: determinism, disjoint shards within an epoch, weights (and replacing them), re-queue,
checkpoint/restore; Admission: the (K+1) x batch bound per generator and its release as the learner version moves;
PromptSource: every draw in exactly one place, admission and per-generator caps, the task balance moving the draws
toward the informative spec and resuming with the same weights; merging the per-generator states of an old
checkpoint."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prorl_async.learner.balance import TaskBalance
from prorl_async.learner.prompts import (
    Admission,
    Draw,
    PromptSampler,
    PromptSource,
    merge_shard_states,
)


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


def test_set_weights_changes_the_spec_picks_from_the_next_draw_on() -> None:
    a, b = sampler(sizes=(1000, 1000)), sampler(sizes=(1000, 1000))
    assert [a.next() for _ in range(10)] == [b.next() for _ in range(10)]
    a.set_weights([9.0, 1.0])
    b.set_weights([0.9, 0.1])  # only the ratios matter: the same picks
    picks = [a.next() for _ in range(2000)]
    assert picks == [b.next() for _ in range(2000)]
    assert 0.87 < sum(d.spec == 0 for d in picks) / 2000 < 0.93
    for bad in ([1.0], [1.0, 0.0], [1.0, float("nan")], [1.0, -2.0]):
        with pytest.raises(ValueError):
            a.set_weights(bad)
    assert a.weights == [9.0, 1.0]


def test_a_state_restores_whatever_the_weights() -> None:
    # The weights are not part of the sampler's state (the task balance restores its own): a sampler drawn under
    # other weights restores into one built with the config's.
    s = sampler(sizes=(30, 12), weights=(1.0, 2.0))
    s.set_weights([5.0, 1.0])
    for _ in range(9):
        s.next()
    resumed = sampler(sizes=(30, 12), weights=(1.0, 2.0))
    resumed.restore(json.loads(json.dumps(s.state())))
    resumed.set_weights(s.weights)
    assert [resumed.next() for _ in range(30)] == [s.next() for _ in range(30)]


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


# ------------------------------------------------------------------------------------------ prompt source


def source(budget: int = 1000, max_staleness: int = 0, per_generator: int = 1000, sizes=(7, 5),
           weights=(1.0, 2.0)) -> PromptSource:
    return PromptSource(sampler(sizes=sizes, weights=weights), Admission(budget, max_staleness), per_generator)


def _stream(n: int, sizes=(7, 5), weights=(1.0, 2.0)) -> list[Draw]:
    """The first ``n`` draws of a fresh stream: what the prompt order hands out, re-queues aside."""
    s = sampler(sizes=sizes, weights=weights)
    return [s.next() for _ in range(n)]


def _places(src: PromptSource, ended: list[Draw]) -> Counter[Draw]:
    """Every draw taken from the stream, by where it is now: ended (answered or skipped), in flight, re-queued."""
    requeued = [Draw(*d) for d in src.sampler.state()["requeued"]]
    return Counter(ended) + Counter(r.draw for r in src.inflight.values()) + Counter(requeued)


def test_every_draw_is_in_exactly_one_place_across_answers_returns_orphans_and_a_checkpoint() -> None:
    src = source()
    issued = {}
    for i in range(12):  # two generators, alternately
        request_id, draw, min_version = src.issue(i % 2, 0, 0)  # type: ignore[misc]
        assert (request_id, min_version) == (i, 0)
        issued[request_id] = draw
    assert issued == dict(enumerate(_stream(12))) and src.held(0) == src.held(1) == 6
    ended: list[Draw] = []
    for request_id, kept in ((0, True), (1, False), (4, True)):
        assert src.answered(request_id, kept=kept).draw == issued[request_id]  # type: ignore[union-attr]
        ended.append(issued[request_id])
    assert src.answered(0, kept=True) is None  # answered already: the caller drops the group
    assert src.returned(2, "stale").draw == issued[2]  # type: ignore[union-attr]
    assert src.issue(0, 0, 0) == (12, issued[2], 0)  # a stale return is handed out again first...
    issued[12] = issued[2]
    assert src.returned(6, "too_long") is not None and src.returned(6, "stale") is None
    ended.append(issued[6])  # ... a too-long prompt is skipped for good
    assert src.issue(1, 0, 0)[1] == _stream(13)[12]  # type: ignore[index]
    assert src.orphan(1) == 6 and src.held(1) == 0  # requests 3, 5, 7, 9, 11 and 13 go back to the queue
    assert src.orphan(1) == 0
    assert dict(src.counts) == {"issued": 14, "answered": 3, "returned_stale": 1, "returned_too_long": 1,
                                "orphaned": 6}
    assert _places(src, ended) == Counter(_stream(src.sampler.draws))  # nothing lost, nothing twice

    saved = json.loads(json.dumps(src.state()))
    resumed = source()
    resumed.restore(saved)
    assert resumed.inflight == {} and resumed.next_id == src.next_id == 14
    pending = len(saved["sampler"]["requeued"])  # in flight at the checkpoint, then the orphaned ones
    assert pending == src.held(0) + 6
    later = [resumed.issue(0, 0, 0) for _ in range(pending + 4)]
    assert [r[0] for r in later] == list(range(14, 14 + pending + 4))  # type: ignore[index]
    # what was handed out before and not answered comes first: the checkpoint's requests in flight in id order
    in_flight = [src.inflight[i].draw for i in sorted(src.inflight)]
    assert [r[1] for r in later[:len(in_flight)]] == in_flight  # type: ignore[index]
    afterwards = Counter(r[1] for r in later)  # type: ignore[index]
    assert afterwards + Counter(ended) == Counter(_stream(resumed.sampler.draws))
    assert resumed.sampler.draws == src.sampler.draws + 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["issue", "kept", "dropped", "stale", "too_long", "orphan", "resume"]),
                          st.integers(0, 2), st.integers(0, 30)), max_size=60))
def test_no_sequence_of_events_loses_or_repeats_a_draw(ops: list[tuple[str, int, int]]) -> None:
    src = source(budget=6, max_staleness=1, per_generator=3)
    ended: list[Draw] = []
    version = 0
    for op, gid, pick in ops:
        ids = sorted(src.inflight)
        if op == "issue":
            got = src.issue(gid, version, version)
            if got is not None:
                assert src.held(gid) <= 3 and src.admission.counted(version) <= 6
        elif op == "resume":  # a checkpoint and a resume: nothing in flight any more, all of it re-queued
            restored = source(budget=6, max_staleness=1, per_generator=3)
            restored.restore(json.loads(json.dumps(src.state())))
            src = restored
        elif op == "orphan":
            src.orphan(gid)
        elif ids:
            request_id = ids[pick % len(ids)]
            draw = src.inflight[request_id].draw
            if op in ("kept", "dropped"):
                src.answered(request_id, kept=op == "kept")
                ended.append(draw)
                if op == "kept" and pick % 3 == 0:  # now and then the learner moves on
                    version += 1
                    src.admission.forget_before(version)
            else:
                src.returned(request_id, op)
                if op == "too_long":
                    ended.append(draw)
        assert _places(src, ended) == Counter(_stream(src.sampler.draws))
    assert max(Counter(ended).values(), default=1) == 1  # no draw (spec, index, epoch) answered twice


def test_admission_bounds_the_requests_in_flight_and_frees_slots() -> None:
    batch, k = 2, 1
    src = source(budget=(k + 1) * batch, max_staleness=k)
    first = [src.issue(g % 2, 0, 0) for g in range(4)]
    assert [src.inflight[r[0]].target for r in first] == [0, 0, 1, 1]  # type: ignore[index]
    assert {max(r[2], 0) for r in first} == {0}  # type: ignore[index]  # min_version: the oldest usable, 0 - K
    assert src.issue(0, 0, 0) is None and src.issue(1, 0, 0) is None  # every slot is used
    src.answered(first[2][0], kept=True)  # type: ignore[index]
    assert src.issue(0, 0, 0) is None  # a kept group holds its slot until the learner passes its target
    src.answered(first[0][0], kept=False)  # type: ignore[index]
    again = src.issue(0, 0, 0)
    assert again is not None and src.inflight[again[0]].target == 0  # a dropped group frees its slot
    assert src.issue(0, 0, 0) is None
    src.returned(again[0], "stale")
    assert src.issue(1, 0, 0) is not None  # so does a returned request
    assert src.issue(0, 0, 0) is None
    src.admission.forget_before(1)  # the learner trained version 0: target 0's slots are free
    assert src.issue(0, 1, 0) is None  # weights of version 0 feed targets up to 0 + K only, and 1 is full
    assert [src.issue(0, 1, 1)[2], src.issue(0, 1, 1)[2]] == [0, 0]  # type: ignore[index]  # targets 2, 2
    assert [r.target for r in src.inflight.values()].count(2) == 2
    assert src.issue(0, 1, 1) is None  # target 1 holds two groups, 2 as well: the budget again
    assert src.issue(0, 3, 1) is None  # weights older than 3 - K: a group started on them would come too stale


def test_each_generator_holds_at_most_its_share_of_requests() -> None:
    src = source(per_generator=2)
    a, b = src.issue(0, 0, 0), src.issue(0, 0, 0)
    assert a is not None and b is not None and src.issue(0, 0, 0) is None and src.held(0) == 2
    assert src.issue(1, 0, 0) is not None and src.issue(1, 0, 0) is not None and src.issue(1, 0, 0) is None
    src.answered(a[0], kept=True)
    assert src.issue(0, 0, 0) is not None and src.issue(0, 0, 0) is None
    src.returned(b[0], "failed")
    src.orphan(1)
    assert src.held(0) == 1 and src.held(1) == 0
    with pytest.raises(ValueError, match="per_generator"):
        source(per_generator=0)


MIXED, SOLVED = [1.0, 0.0, 1.0, 1.0], [1.0] * 4


def balanced(window: int = 32, min_share: float = 0.25, enabled: bool = True) -> PromptSource:
    """Two specs of equal weight, the task balance on."""
    balance = TaskBalance([1.0, 1.0], ["mixed", "solved"], enabled=enabled, window_groups=window, min_share=min_share)
    return PromptSource(sampler(sizes=(40, 40), weights=(1.0, 1.0)), Admission(10**6, 0), 10**6, balance=balance)


def _answer_all(src: PromptSource, n: int) -> list[Draw]:
    """Issue ``n`` requests and answer each: spec 0's groups informative, spec 1's all correct; what was handed out."""
    out = []
    for _ in range(n):
        request_id, draw, _ = src.issue(0, 0, 0)  # type: ignore[misc]
        request = src.answered(request_id, kept=True)
        assert request is not None
        src.observe(request, MIXED if draw.spec == 0 else SOLVED)
        out.append(draw)
    return out


def test_the_balance_moves_the_draws_toward_the_informative_spec_down_to_the_floor() -> None:
    src = balanced()
    _answer_all(src, 100)
    assert src.sampler.weights == src.balance.weights()
    assert src.sampler.weights[1] == 0.25 * 0.5  # spec 1's informative estimate is ~0.03: held at its floor
    later = _answer_all(src, 400)
    assert 0.83 < sum(d.spec == 0 for d in later) / 400 < 0.92  # share 0.875 against 0.5 without the balance
    assert sum(d.spec == 1 for d in later) > 0  # never starved
    assert set(src.balance.summary()) == {"mixed", "solved"}
    off = balanced(enabled=False)
    drawn = _answer_all(off, 400)
    assert off.sampler.weights == [1.0, 1.0] and 0.45 < sum(d.spec == 0 for d in drawn) / 400 < 0.55


def test_a_resume_draws_by_the_same_weights_and_hands_out_the_same_prompts() -> None:
    src = balanced(window=8)
    _answer_all(src, 50)
    saved = json.loads(json.dumps(src.state()))
    assert saved["balance"] == src.balance.state()
    resumed = balanced(window=8)
    resumed.restore(saved)
    assert resumed.sampler.weights == src.sampler.weights != [1.0, 1.0]
    assert resumed.state() == saved
    assert _answer_all(resumed, 60) == _answer_all(src, 60)
    old = {k: v for k, v in saved.items() if k != "balance"}  # written before the balance: it starts afresh
    again = balanced(window=8)
    again.restore(old)
    assert again.balance.state() == again.balance.initial_state() and again.sampler.weights == [0.5, 0.5]
    with pytest.raises(ValueError, match="task balance state"):
        balanced().restore({**saved, "balance": {"windows": [[1.0]]}})


def test_restore_refuses_a_broken_prompt_source_state() -> None:
    src = source()
    for broken in ({}, {"sampler": src.sampler.state()}, {"sampler": {}, "next_request_id": 0}):
        with pytest.raises(ValueError):
            source().restore(broken)


# ------------------------------------------------------------------------------------------ merging old shards


def _first_per_spec(s: PromptSampler, positions: list[int]) -> Counter[Draw]:
    """The draws a sampler that reached ``positions`` took: each spec's first ``positions[spec]`` (the order across
    specs aside, a spec's problems come in a fixed order)."""
    got: dict[int, list[Draw]] = {spec: [] for spec in range(len(positions))}
    while any(len(got[spec]) < n for spec, n in enumerate(positions)):
        d = s.next()
        got[d.spec].append(d)
    return Counter(d for spec, n in enumerate(positions) for d in got[spec][:n])


def test_merged_shard_states_cover_exactly_the_problems_the_shards_drew() -> None:
    sizes, weights = (6, 10), (1.0, 1.0)  # even sizes: both shards have equal shares, epochs end together

    def shards_that_met(seed: int) -> tuple[PromptSampler, PromptSampler, list[Draw], list[Draw]] | None:
        """Two shards drawn in lockstep until each drew as many of every spec as the other, past an epoch end."""
        shard0, shard1 = sampler(0, 2, sizes, weights, seed), sampler(1, 2, sizes, weights, seed)
        drawn0, drawn1 = [], []
        for _ in range(40):
            drawn0.append(shard0.next())
            drawn1.append(shard1.next())
            if shard0.positions == shard1.positions and min(shard0.positions) >= 4:
                return shard0, shard1, drawn0, drawn1
        return None

    met = next(m for seed in range(20) if (m := shards_that_met(seed)) is not None)
    shard0, shard1, drawn0, drawn1 = met
    seed = shard0.seed
    assert shard0.positions[0] > sizes[0] // 2  # shard 0 is in spec 0's second epoch
    in_flight = drawn0.pop()  # shard 0's last draw had not finished, shard 1 had one aborted
    shard1.requeue(drawn1[0])
    states = [json.loads(json.dumps(shard0.state(in_flight=[in_flight]))), json.loads(json.dumps(shard1.state()))]

    merged = merge_shard_states(states)
    assert merged["positions"] == [2 * p for p in shard0.positions] and merged["shard"] == 0
    assert merged["num_shards"] == 1 and merged["draws"] == shard0.draws + shard1.draws
    assert merged["requeued"] == [in_flight.as_list(), drawn1[0].as_list()]
    resumed = sampler(0, 1, sizes, weights, seed)
    resumed.restore(merged)
    assert [resumed.next(), resumed.next()] == [in_flight, drawn1[0]]  # the unfinished prompts first
    covered = _first_per_spec(sampler(0, 1, sizes, weights, seed), merged["positions"])
    assert covered == Counter(drawn0) + Counter([in_flight]) + Counter(drawn1)  # the same problems, same epochs
    # and the merged stream goes on with problems neither shard drew in the current epoch of each spec
    upcoming = [resumed.next() for _ in range(4)]
    assert not set(upcoming) & set(covered)


def test_merging_states_of_different_runs_is_refused() -> None:
    a, b = sampler(0, 2, (6, 10)), sampler(1, 2, (6, 10), seed=8)
    with pytest.raises(ValueError, match="different runs"):
        merge_shard_states([a.state(), b.state()])
    with pytest.raises(ValueError, match="different runs"):
        merge_shard_states([a.state(), sampler(1, 2, (6, 12)).state()])
    with pytest.raises(ValueError, match="no sampler states"):
        merge_shard_states([])
