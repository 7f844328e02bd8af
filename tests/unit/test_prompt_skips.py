"""Prompt skipping and the curriculum inside the learner's prompt source: the skip probability and its determinism,
records cleared by an informative group, a solved data set that still yields prompts, passed-over draws consumed in
their epoch, requests at their spec's level, groups from a level left behind, and an exact resume (also from a state
written before either existed)."""

from __future__ import annotations

import json

import pytest

from prorl_async.envs.curriculum import Curriculum
from prorl_async.learner.prompts import Admission, Draw, PromptSampler, PromptSource
from prorl_async.learner.skips import PromptSkips, skip_probability

SOLVED, MIXED = [1.0] * 8, [1.0, 0.0] * 4


def source(levels=(1,), eligible=(True,), sizes=(10,), window: int = 4, max_per_draw: int = 32,
           seed: int = 7) -> PromptSource:
    sampler = PromptSampler(seed, 0, 1, list(sizes), [1.0] * len(sizes))
    curriculum = Curriculum(list(levels), window_groups=window)
    skips = PromptSkips(seed, list(eligible), max_per_draw=max_per_draw)
    return PromptSource(sampler, Admission(10**6, 0), 10**6, curriculum=curriculum, skips=skips)


def answer(src: PromptSource, request_id: int, rewards: list[float]) -> None:
    request = src.answered(request_id, kept=True)
    assert request is not None
    src.observe(request, rewards)


def issue(src: PromptSource) -> tuple[int, Draw, int]:
    """Issue one request: ``(request_id, draw, level)``."""
    got = src.issue(0, 0, 0)
    assert got is not None
    return got[0], got[1], src.inflight[got[0]].level


def solve_everything(src: PromptSource, spec: int = 0, visits: int = 4) -> None:
    for index in range(src.sampler.sizes[spec]):
        for _ in range(visits):
            src.skips.observe(spec, 0, index, SOLVED)


def test_the_skip_probability_doubles_its_odds_per_visit_up_to_the_cap() -> None:
    assert [skip_probability(n, 0.9) for n in range(5)] == [0.0, 0.5, 0.75, 0.875, 0.9]
    assert skip_probability(40, 0.6) == 0.6


def test_the_decision_is_deterministic_and_as_likely_as_said() -> None:
    a, b = PromptSkips(3, [True, False]), PromptSkips(3, [True, False])
    for skips in (a, b):
        skips.observe(0, 0, 5, [0.0] * 8)  # all wrong: streak 1
        skips.observe(1, 0, 5, [0.0] * 8)  # a spec that is not skipped keeps no record
    decisions = [a.skip(0, 0, 5, draws) for draws in range(4000)]
    assert decisions == [b.skip(0, 0, 5, draws) for draws in range(4000)]
    assert 0.45 < sum(decisions) / 4000 < 0.55 and a.skipped == [sum(decisions), 0]
    assert not any(a.skip(1, 0, 5, draws) for draws in range(100)) and a.skip(0, 0, 6, 0) is False
    a.observe(0, 0, 5, MIXED)  # informative: the record goes
    assert a.streaks == {} and not any(a.skip(0, 0, 5, draws) for draws in range(100))
    assert a.summary() == {"0": sum(decisions)}


def test_a_solved_data_set_still_yields_prompts_and_each_comes_back() -> None:
    src = source(max_per_draw=3)
    solve_everything(src)
    before, drawn = 0, []
    for _ in range(300):
        request_id, draw, _ = issue(src)
        assert src.sampler.draws - before <= 1 + 3  # at most max_per_draw passed over per request
        before = src.sampler.draws
        drawn.append(draw.index)
        answer(src, request_id, SOLVED)
    assert len(drawn) == 300 and set(drawn) == set(range(10))  # nothing dropped for good
    skipped = src.skips.skipped[0]
    assert src.sampler.draws == 300 + skipped and 0.6 < skipped / src.sampler.draws < 0.9


def test_passed_over_draws_are_consumed_in_their_epoch() -> None:
    src = source(sizes=(10,))
    for index in (0, 1, 2, 3, 4):
        src.skips.observe(0, 0, index, SOLVED)
        src.skips.observe(0, 0, index, SOLVED)  # streak 2: passed over with probability 0.75
    stream = PromptSampler(7, 0, 1, [10], [1.0])
    expected = [stream.next() for _ in range(200)]
    issued = [issue(src)[1] for _ in range(25)]
    taken = expected[:src.sampler.draws]  # every draw the stream gave, in its order
    assert len(set(taken)) == len(taken)  # (index, epoch) never repeats: an epoch holds each problem once
    passed_over = set(taken) - set(issued)
    assert issued == [d for d in taken if d not in passed_over]  # the others handed out in the stream's order
    assert len(passed_over) == src.skips.skipped[0] > 0 and {d.index for d in passed_over} <= {0, 1, 2, 3, 4}
    later = {d.index for d in issued if d.epoch > min(p.epoch for p in passed_over)}
    assert later & {d.index for d in passed_over}  # passed over in one epoch, handed out in a later one


def test_a_requeued_draw_is_never_passed_over() -> None:
    src = source()
    solve_everything(src, visits=20)
    request_id, draw, _ = issue(src)
    src.returned(request_id, "stale")
    draws = src.sampler.draws
    assert issue(src)[1] == draw and src.sampler.draws == draws


def test_specs_with_a_curriculum_move_levels_and_requests_carry_them() -> None:
    src = source(levels=(3, 1), eligible=(False, True), sizes=(20, 20), window=4)
    old = []
    while len(old) < 6:  # requests of spec 0 at level 0
        request_id, draw, level = issue(src)
        if draw.spec == 0:
            old.append(request_id)
            assert level == 0
    changes = []
    for request_id in old[:4]:
        request = src.answered(request_id, kept=True)
        assert request is not None
        changes.append(src.observe(request, SOLVED))
    assert changes[:3] == [None] * 3 and changes[3] is not None and changes[3].level == 1
    for request_id in old[4:]:  # requested at level 0, arriving at level 1: not counted
        answer(src, request_id, [0.0] * 8)
    assert src.curriculum.level(0) == 1 and src.curriculum.summary()["0"]["groups"] == 0
    assert src.curriculum.ignored == 2 and src.skips.streaks == {}  # spec 0 is not skipped: it has a curriculum
    levels = {draw.spec: level for _, draw, level in (issue(src) for _ in range(20))}
    assert levels == {0: 1, 1: 0}


def test_groups_without_finite_rewards_say_nothing() -> None:
    src = source(levels=(3,), window=1)
    request_id, _, _ = issue(src)
    request = src.answered(request_id, kept=False)
    assert request is not None
    assert src.observe(request, [float("nan")] * 8) is None and src.observe(request, []) is None
    assert src.curriculum.level(0) == 0 and src.skips.streaks == {}


def _run(src: PromptSource, n: int) -> list[tuple[Draw, int]]:
    """Issue ``n`` requests and answer each (solved when its index is even, else mixed); what was handed out."""
    out = []
    for _ in range(n):
        request_id, draw, level = issue(src)
        out.append((draw, level))
        answer(src, request_id, SOLVED if draw.index % 2 == 0 else MIXED)
    return out


def test_a_resume_hands_out_the_same_prompts_at_the_same_levels() -> None:
    def make() -> PromptSource:
        return source(levels=(4, 1, 1), eligible=(False, True, True), sizes=(12, 9, 7), window=3)

    src = make()
    _run(src, 60)
    saved = json.loads(json.dumps(src.state()))
    assert set(saved) == {"sampler", "next_request_id", "curriculum", "skips", "balance"}
    resumed = make()
    resumed.restore(saved)
    assert resumed.state() == saved
    assert _run(resumed, 80) == _run(src, 80)
    assert resumed.skips.skipped == src.skips.skipped and sum(src.skips.skipped) > 0
    assert resumed.curriculum.levels == src.curriculum.levels and src.curriculum.level(0) > 0


def test_a_state_from_before_curricula_and_skipping_restores() -> None:
    src = source(levels=(4, 1), eligible=(False, True), sizes=(12, 9), window=3)
    _run(src, 40)
    saved = json.loads(json.dumps(src.state()))
    old = {k: saved[k] for k in ("sampler", "next_request_id")}
    resumed = source(levels=(4, 1), eligible=(False, True), sizes=(12, 9), window=3)
    resumed.curriculum.levels[0] = 2  # whatever it held: a state without the keys starts those afresh
    resumed.restore(old)
    assert resumed.curriculum.levels == [0, 0] and resumed.skips.streaks == {} and resumed.skips.skipped == [0, 0]
    assert resumed.sampler.draws == src.sampler.draws and resumed.next_id == src.next_id
    with pytest.raises(ValueError, match="prompt skip state"):
        resumed.restore({**saved, "skips": {"streaks": [[0, 0, 1, 0]], "skipped": [0, 0]}})
