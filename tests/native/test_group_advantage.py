"""prorl::group_advantage (CPU kernel) against group_advantage_reference, and the dispatcher."""

from __future__ import annotations

import pytest
import torch

from prorl_async.algo.advantage import group_advantage, group_advantage_reference


def _rewards(groups: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    binary = (torch.rand(groups, n, generator=gen) < 0.5).double()  # pass/fail rewards, the common case
    graded = torch.rand(groups, n, generator=gen, dtype=torch.float64)
    rows = torch.rand(groups, 1, generator=gen) < 0.5
    return torch.where(rows, binary, graded).reshape(-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("groups", "n"), [(1, 1), (4, 1), (3, 2), (7, 3), (16, 16), (33, 17), (256, 16)])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_kernel_matches_reference(native_ops, groups: int, n: int, dtype: torch.dtype, normalize_std: bool) -> None:
    rewards = _rewards(groups, n, dtype, seed=groups * 100 + n)
    got = torch.ops.prorl.group_advantage(rewards, n, 1e-6, normalize_std)
    want = group_advantage_reference(rewards, n, 1e-6, normalize_std)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_random_shapes(native_ops) -> None:
    rng = torch.Generator().manual_seed(99)
    for case in range(30):
        groups, n = (int(x) for x in torch.randint(1, 40, (2,), generator=rng))
        rewards = _rewards(groups, n, torch.float32, seed=case)
        normalize_std = bool(case % 3)
        got = torch.ops.prorl.group_advantage(rewards, n, 1e-6, normalize_std)
        want = group_advantage_reference(rewards, n, 1e-6, normalize_std)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.7, 0.1, 1 / 3])
@pytest.mark.parametrize("n", [1, 3, 7, 12, 16])
def test_zero_variance_groups_get_zero_advantage(native_ops, value: float, n: int) -> None:
    # In float32, the mean of 16 rewards of 0.7 misses 0.7 by an ulp; that ulp / (ulp + eps) used to give ~0.06.
    rewards = torch.full((2 * n,), value)
    rewards[n:] = torch.linspace(0, 1, n)  # a second group with signal, next to the flat one
    for adv in (torch.ops.prorl.group_advantage(rewards, n, 1e-6, True), group_advantage_reference(rewards, n)):
        assert adv[:n].abs().max().item() < 1e-8


def test_group_size_one_gives_zeros(native_ops) -> None:
    rewards = torch.rand(10)
    assert torch.equal(torch.ops.prorl.group_advantage(rewards, 1, 1e-6, True), torch.zeros(10))


def test_non_contiguous_and_empty(native_ops) -> None:
    base = _rewards(8, 8, torch.float32, seed=1)
    strided = torch.stack([base, base], dim=1).reshape(-1)[::2]  # (64,), stride 2
    assert not strided.is_contiguous()
    torch.testing.assert_close(
        torch.ops.prorl.group_advantage(strided, 8, 1e-6, True), group_advantage_reference(base, 8)
    )
    assert torch.ops.prorl.group_advantage(torch.empty(0), 4, 1e-6, True).shape == (0,)


@pytest.mark.parametrize("mode", ["native", "reference"])
def test_dispatcher(native_ops, ops_mode, mode: str) -> None:
    ops_mode(mode)
    rewards = _rewards(16, 8, torch.float32, seed=2)
    torch.testing.assert_close(group_advantage(rewards, 8), group_advantage_reference(rewards, 8), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not split into groups"):
        group_advantage(torch.rand(10), 3)
    with pytest.raises(ValueError, match="do not split into groups"):
        group_advantage(torch.rand(2, 4), 4)
    # Integer rewards take the reference (the kernel takes floating types).
    ints = torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(group_advantage(ints, 2), group_advantage_reference(ints.float(), 2))


def test_op_rejects_bad_arguments(native_ops) -> None:
    with pytest.raises(RuntimeError, match="do not split into groups"):
        torch.ops.prorl.group_advantage(torch.rand(10), 3, 1e-6, True)
    with pytest.raises(RuntimeError, match="floating"):
        torch.ops.prorl.group_advantage(torch.arange(4), 2, 1e-6, True)


def test_opcheck(native_ops) -> None:
    rewards = _rewards(6, 4, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.prorl.group_advantage.default, (rewards, 4, 1e-6, True))
    torch.library.opcheck(torch.ops.prorl.group_advantage.default, (rewards.bfloat16(), 2, 1e-3, False))
