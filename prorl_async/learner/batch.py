"""The trainer's batch: whole groups as flat tensors, built once from the wire's ``TrajectoryGroup``s.

G groups of n samples; sample ``i = g * n + j`` is sample j of group g. One prompt per group, shared by its n
samples (a ``TrajectoryGroup`` has exactly one), so the group structure is explicit: nothing downstream
compares prompts to recover it::

    prompt_ids          (P,)      int64    every group's prompt, concatenated in group order
    prompt_lens         (G,)      int64    tokens of each group's prompt
    response_ids        (T,)      int64    every response, concatenated in sample order
    response_lens       (G, n)    int64    tokens of each response
    behaviour_logprobs  (T,)      float32  log-prob of each response token under the policy that sampled it
    policy_versions     (T,)      int64    policy version that produced each response token
    rewards             (G, n)    float64

:func:`build_batch` checks every group once (a ValueError that names the group and the sample) and copies each
field once: one ``np.concatenate`` over the batch, cast to the dtype above (token ids become int64, what the
embedding and the log-prob gather index with); the tensors are ``torch.from_numpy`` views of those arrays.
It is plain CPU work with no per-token Python, meant for a worker thread:
``batch = await trio.to_thread.run_sync(build_batch, groups)``.

Usage::

    batch = build_batch(groups)             # list[TrajectoryGroup], all of one group size
    batch.num_groups, batch.group_size      # G, n
    prompts, responses = batch.prompts(), batch.responses()   # views: G prompts, G * n responses
    metrics = learner.train_step(batch)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from prorl_async.transport.messages import TrajectoryGroup


@dataclass(frozen=True)
class GroupBatch:
    """Whole groups as flat tensors (layout in the module docstring); the shapes are checked on construction."""

    prompt_ids: torch.Tensor
    prompt_lens: torch.Tensor
    response_ids: torch.Tensor
    response_lens: torch.Tensor
    behaviour_logprobs: torch.Tensor
    policy_versions: torch.Tensor
    rewards: torch.Tensor

    def __post_init__(self) -> None:
        if self.rewards.dim() != 2 or 0 in self.rewards.shape:
            raise ValueError(f"rewards of shape {tuple(self.rewards.shape)}: need (groups, group_size), both >= 1")
        groups, tokens = self.rewards.shape[0], self.response_ids.shape[0]
        if self.prompt_lens.shape != (groups,) or self.response_lens.shape != self.rewards.shape:
            raise ValueError(f"{groups} groups of {self.group_size}: prompt_lens {tuple(self.prompt_lens.shape)} "
                             f"and response_lens {tuple(self.response_lens.shape)} do not match")
        if int(self.prompt_lens.sum()) != self.prompt_ids.shape[0] or int(self.response_lens.sum()) != tokens:
            raise ValueError("prompt or response lengths do not add up to the token tensors")
        if self.behaviour_logprobs.shape != (tokens,) or self.policy_versions.shape != (tokens,):
            raise ValueError(f"{tokens} response tokens but per-token fields of another length")

    @property
    def num_groups(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def group_size(self) -> int:
        return int(self.rewards.shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.rewards.numel())

    def prompts(self) -> list[torch.Tensor]:
        """Each group's prompt (G views of ``prompt_ids``)."""
        return list(self.prompt_ids.split(self.prompt_lens.tolist()))

    def responses(self) -> list[torch.Tensor]:
        """Each sample's response, in sample order (G * n views of ``response_ids``)."""
        return list(self.response_ids.split(self.response_lens.reshape(-1).tolist()))


def build_batch(groups: Sequence[TrajectoryGroup]) -> GroupBatch:
    """``groups`` as one :class:`GroupBatch`, in order; ValueError unless every group is trainable and of one size."""
    _check(groups)
    samples = [s for g in groups for s in g.samples]
    prompts = [g.prompt_token_ids for g in groups]
    return GroupBatch(
        prompt_ids=_flat(prompts, np.int64),
        prompt_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int64),
        response_ids=_flat([s.token_ids for s in samples], np.int64),
        response_lens=torch.tensor([[len(s.token_ids) for s in g.samples] for g in groups], dtype=torch.int64),
        behaviour_logprobs=_flat([s.logprobs for s in samples], np.float32),
        policy_versions=_flat([s.versions for s in samples], np.int64),
        rewards=torch.tensor([[s.reward for s in g.samples] for g in groups], dtype=torch.float64),
    )


def _check(groups: Sequence[TrajectoryGroup]) -> None:
    if not groups:
        raise ValueError("no groups")
    n = len(groups[0].samples)
    total = sum(len(g.samples) for g in groups)
    for k, group in enumerate(groups):
        where = f"group {k} ({group.prompt_id[:80]!r})"
        if len(group.samples) != n or not n:
            raise ValueError(f"{total} samples do not split into groups of {n}: {where} has {len(group.samples)} "
                             f"samples, expected {n}")
        if not len(group.prompt_token_ids):
            raise ValueError(f"{where}: empty prompt or response")
        for j, s in enumerate(group.samples):
            tokens = len(s.token_ids)
            if not tokens:
                raise ValueError(f"{where} sample {j}: empty prompt or response")
            if len(s.logprobs) != tokens or len(s.versions) != tokens:
                raise ValueError(f"{where} sample {j}: {tokens} response tokens but per-token fields of another length")
            if not math.isfinite(s.reward):
                raise ValueError(f"{where} sample {j}: reward {s.reward} is not finite")


def _flat(parts: list[np.ndarray], dtype: type[np.generic]) -> torch.Tensor:
    """One copy (and cast) of ``parts`` into a new array; the tensor shares its memory."""
    return torch.from_numpy(np.concatenate(parts, dtype=dtype))
