"""GRPO group advantages: ``A_i = (R_i - mean_g R) / (std_g R + eps)`` for the n samples of each group.

``group_advantage`` is what the learner calls; ``group_advantage_reference`` is the plain-PyTorch
definition that the native extension (``native/``) must match. Rewards arrive flat, grouped
contiguously: ``rewards[g * group_size + j]`` is sample j of group g.

Both compute in float64 and return float32: in float32 the mean of n equal rewards can miss them by an
ulp (16 rewards of 0.7), and that ulp over (std ~ ulp) + eps gives a zero-variance group advantages of
~0.06 instead of 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prorl_async.algo import native as _native

if TYPE_CHECKING:
    import torch


def _check(rewards: torch.Tensor, group_size: int) -> None:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")


def group_advantage_reference(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """Advantages of flat ``rewards`` (G * n,), float32 out; std is the population std of each group."""
    _check(rewards, group_size)
    r = rewards.double().view(-1, group_size)  # (G, n)
    centered = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centered.reshape(-1).float()


def group_advantage(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """Group advantages through the native op when enabled for ``rewards``' device, else the reference."""
    _check(rewards, group_size)
    if rewards.is_floating_point() and _native.enabled_for(rewards.device):
        return _native.group_advantage_op(rewards, group_size, eps, normalize_std)
    return group_advantage_reference(rewards, group_size, eps, normalize_std)
