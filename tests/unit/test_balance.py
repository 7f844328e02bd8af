"""TaskBalance: shares follow configured weight x informative estimate, the floor holds exactly after renormalising,
an unseen spec counts as one half, disabled or one spec gives the configured weights, determinism, and a state that
round-trips through JSON and refuses a broken or foreign one."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prorl_async.learner.balance import TaskBalance

MIXED, SOLVED, WRONG = [1.0, 0.0, 1.0, 1.0], [1.0] * 4, [0.0] * 4


def balance(weights=(1.0, 1.0), *, enabled: bool = True, window: int = 32, min_share: float = 0.25) -> TaskBalance:
    return TaskBalance(list(weights), [f"task{i}" for i in range(len(weights))], enabled=enabled,
                       window_groups=window, min_share=min_share)


def feed(b: TaskBalance, spec: int, mixed: int, flat: int) -> None:
    for _ in range(mixed):
        b.observe(spec, MIXED)
    for i in range(flat):
        b.observe(spec, SOLVED if i % 2 else WRONG)


def test_shares_follow_weight_times_the_informative_estimate() -> None:
    b = balance((1.0, 1.0))
    feed(b, 0, mixed=2, flat=8)  # (2 + 1) / (10 + 2) = 0.25
    feed(b, 1, mixed=8, flat=2)  # (8 + 1) / (10 + 2) = 0.75
    assert b.informative(0) == pytest.approx(0.25) and b.informative(1) == pytest.approx(0.75)
    assert b.weights() == pytest.approx([0.25, 0.75])
    weighted = balance((3.0, 1.0))
    feed(weighted, 0, mixed=2, flat=8)
    feed(weighted, 1, mixed=8, flat=2)
    assert weighted.weights() == pytest.approx([0.5, 0.5])  # 3 x 0.25 against 1 x 0.75


def test_a_group_is_informative_unless_its_rewards_are_all_equal() -> None:
    b = balance()
    for rewards in ([0.3] * 4, [1.0, 1.0 + 1e-12], [0.0, 0.5], [0.2, 0.2, 0.7]):
        b.observe(0, rewards)
    b.observe(0, [])  # nothing to say
    assert b.state()["windows"][0] == [0.0, 0.0, 1.0, 1.0]


def test_an_unseen_spec_counts_as_one_half() -> None:
    b = balance((1.0, 1.0, 2.0))
    assert [b.informative(i) for i in range(3)] == [0.5, 0.5, 0.5]
    assert b.weights() == pytest.approx([0.25, 0.25, 0.5])  # the configured shares
    feed(b, 0, mixed=0, flat=4)  # 1/6
    assert b.informative(1) == 0.5 and b.weights()[1] > b.weights()[0]


def test_the_window_keeps_the_latest_groups() -> None:
    b = balance(window=4)
    feed(b, 0, mixed=10, flat=0)
    feed(b, 0, mixed=0, flat=3)
    assert b.state()["windows"][0] == [1.0, 0.0, 0.0, 0.0] and b.informative(0) == pytest.approx(2 / 6)


def test_the_floor_holds_exactly_after_renormalising() -> None:
    # spec 0 never informative, spec 1 and 2 always: spec 0's raw share is far below min_share x its configured share
    b = balance((2.0, 1.0, 1.0), min_share=0.5)
    feed(b, 0, mixed=0, flat=32)  # 1/34
    feed(b, 1, mixed=32, flat=0)
    feed(b, 2, mixed=16, flat=16)
    shares = b.weights()
    assert sum(shares) == pytest.approx(1.0)
    assert shares[0] == 0.5 * 2.0 / 4.0  # exactly at its floor, a quarter
    rest = 1.0 - shares[0]  # the others share the rest in proportion to weight x estimate (33/34 and 17/34)
    assert shares[1:] == pytest.approx([rest * 33 / 50, rest * 17 / 50])


def test_the_floor_is_applied_again_when_renormalising_pushes_another_spec_under() -> None:
    # A first pass fixes spec 0 at its floor; scaling the rest down then pushes spec 1 under its own floor.
    b = balance((1.0, 1.0, 1.0), min_share=0.9)
    feed(b, 0, mixed=0, flat=32)
    feed(b, 1, mixed=14, flat=18)
    feed(b, 2, mixed=32, flat=0)
    shares = b.weights()
    assert shares[0] == shares[1] == 0.9 / 3
    assert shares[2] == pytest.approx(1.0 - 2 * 0.9 / 3)


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.floats(0.01, 100.0), min_size=2, max_size=6),
       mixed=st.lists(st.integers(0, 40), min_size=6, max_size=6), min_share=st.floats(0.0, 1.0))
@example(weights=[16.0, 4.0], mixed=[0, 1, 0, 0, 0, 0], min_share=1.0)  # rounding put every spec under its floor
def test_shares_sum_to_one_are_positive_and_never_under_the_floor(weights: list[float], mixed: list[int],
                                                                   min_share: float) -> None:
    b = balance(weights, window=40, min_share=min_share)
    for spec in range(len(weights)):
        feed(b, spec, mixed=mixed[spec], flat=40 - mixed[spec])
    shares = b.weights()
    assert sum(shares) == pytest.approx(1.0) and min(shares) > 0
    total = sum(weights)
    for share, w in zip(shares, weights, strict=True):
        assert share >= min_share * w / total * (1 - 1e-12)
    if min_share == 1.0:
        assert shares == pytest.approx([w / total for w in weights])


def test_disabled_or_one_spec_gives_the_configured_weights_and_records_nothing() -> None:
    for b in (balance((3.0, 1.0), enabled=False), balance((2.5,))):
        feed(b, 0, mixed=1, flat=20)
        assert not b.active and b.weights() == b.base and b.summary() == {}
        assert b.state() == b.initial_state()


def test_summary_per_label() -> None:
    b = balance((1.0, 1.0))
    feed(b, 0, mixed=2, flat=8)
    feed(b, 1, mixed=8, flat=2)
    assert b.summary() == {"task0": {"share": 0.25, "informative": 0.25, "groups": 10},
                           "task1": {"share": 0.75, "informative": 0.75, "groups": 10}}


def test_the_same_groups_give_the_same_weights() -> None:
    a, b = balance((1.0, 2.0, 0.5)), balance((1.0, 2.0, 0.5))
    for x in (a, b):
        for i in range(50):
            x.observe(i % 3, MIXED if i % 7 < 3 else SOLVED)
    assert a.weights() == b.weights() and a.state() == b.state()


def test_state_round_trips_through_json() -> None:
    b = balance((1.0, 2.0), window=8)
    feed(b, 0, mixed=3, flat=9)
    feed(b, 1, mixed=5, flat=1)
    saved = json.loads(json.dumps(b.state()))
    resumed = balance((1.0, 2.0), window=8)
    resumed.restore(saved)
    assert resumed.state() == b.state() and resumed.weights() == b.weights()
    shorter = balance((1.0, 2.0), window=2)  # a smaller window keeps the latest groups
    shorter.restore(saved)
    assert shorter.state()["windows"] == [w[-2:] for w in saved["windows"]]
    fresh = balance((1.0, 2.0))
    fresh.restore(fresh.initial_state())
    assert fresh.weights() == pytest.approx([1 / 3, 2 / 3])


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ([], "expected a map"),
        ({}, "windows for 2 specs"),
        ({"windows": [[]]}, "windows for 2 specs"),
        ({"windows": [[], [], []]}, "windows for 2 specs"),
        ({"windows": [[1.0], "x"]}, "lists of 0.0 / 1.0"),
        ({"windows": [[0.5], []]}, "lists of 0.0 / 1.0"),
        ({"windows": [[True], []]}, "lists of 0.0 / 1.0"),
    ],
)
def test_restore_refuses_a_broken_or_foreign_state(state: object, match: str) -> None:
    b = balance()
    feed(b, 0, mixed=1, flat=0)
    before = b.state()
    with pytest.raises(ValueError, match=match):
        b.restore(state)  # type: ignore[arg-type]
    assert b.state() == before


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="one label per spec"):
        TaskBalance([1.0, 1.0], ["a"], enabled=True)
    with pytest.raises(ValueError, match="> 0"):
        TaskBalance([1.0, 0.0], ["a", "b"], enabled=True)
    with pytest.raises(ValueError, match="min_share"):
        TaskBalance([1.0], ["a"], enabled=True, min_share=1.5)
