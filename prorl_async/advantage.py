"""GRPO group advantages: ``A_i = (R_i - mean_g R) / (std_g R + eps)`` for the n samples of each group.

``group_advantage`` is what the learner calls; ``group_advantage_reference`` is the plain-PyTorch
definition that the native extension (``native/``) must match. Rewards arrive flat, grouped
contiguously: ``rewards[g * group_size + j]`` is sample j of group g.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def group_advantage_reference(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """Advantages of flat ``rewards`` (G * n,), float32 out; std is the population std of each group."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # (G, n)
    centered = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centered.reshape(-1)


def group_advantage(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """Group advantages through the fastest available implementation (the reference until native/ lands)."""
    return group_advantage_reference(rewards, group_size, eps, normalize_std)
