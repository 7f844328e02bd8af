"""Masked k3 KL to the reference policy, reduced per sequence and per batch, differentiable w.r.t. logp.

Per token t of sequence b, with ``d = ref_logp - logp`` (log-probs of the sampled tokens)::

    kl_t = exp(d) - d - 1        # k3 estimator of KL(pi || pi_ref): unbiased, >= 0, no sampling noise sign flips

``kl_reduce`` is what the learner calls; ``kl_reduce_reference`` is the plain-PyTorch definition that the
native op (``native/``, one fused pass, its own backward) must match. Masked tokens count as nothing, whatever
the inputs hold there (padding may carry -inf or NaN): they add 0 to the sums and get a zero gradient.

Usage in a loss (token-mean aggregation; ``loss = pg + beta * kl``)::

    kl = kl_reduce(logp, ref_logp, mask)   # logp (B, T) requires grad; ref_logp (B, T) without
    loss = pg_sum / kl.tokens.clamp(min=1) + beta * kl.token_mean()
    metrics["kl"] = kl.token_mean().item()
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from prorl_async.algo import native as _native


class KLReduction(NamedTuple):
    """Masked k3 sums of a (B, T) batch; the ``kl_*`` fields carry the gradient to logp (and ref_logp)."""

    kl_per_seq: torch.Tensor
    """(B,) float32: sum of kl_t over the unmasked tokens of each sequence (0 for a fully masked row)."""
    tokens_per_seq: torch.Tensor
    """(B,) int64: unmasked tokens of each sequence."""
    kl_sum: torch.Tensor
    """() float32: sum of kl_t over the unmasked tokens of the batch."""
    tokens: torch.Tensor
    """() int64: unmasked tokens of the batch."""

    def token_mean(self) -> torch.Tensor:
        """Mean kl_t over all unmasked tokens of the batch (DAPO token-level aggregation); 0 if there are none."""
        return self.kl_sum / self.tokens.clamp(min=1)

    def seq_mean(self) -> torch.Tensor:
        """Mean over the sequences of each sequence's mean kl_t (sequence-level aggregation); fully masked
        sequences count as 0 but still count, like a per-sequence loss of 0."""
        return (self.kl_per_seq / self.tokens_per_seq.clamp(min=1)).mean()


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # the token dtypes the op takes


def _check(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> None:
    if logp.dim() != 2 or ref_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            "kl_reduce: logp, ref_logp and mask must all be (B, T), got "
            f"{tuple(logp.shape)}, {tuple(ref_logp.shape)}, {tuple(mask.shape)}"
        )


def kl_reduce_reference(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> KLReduction:
    """The definition: (B, T) log-probs and mask in, masked k3 sums out (float32 for float32/bfloat16 inputs)."""
    _check(logp, ref_logp, mask)
    dtype = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    keep = mask.bool()
    d = torch.where(keep, ref_logp.to(dtype) - logp.to(dtype), 0.0)  # (B, T); 0 where masked, so kl_t = 0 there
    kl_per_seq = (torch.exp(d) - d - 1).sum(dim=1)  # (B,)
    tokens_per_seq = keep.sum(dim=1)  # (B,) int64
    return KLReduction(kl_per_seq, tokens_per_seq, kl_per_seq.sum(), tokens_per_seq.sum())


def kl_reduce(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> KLReduction:
    """Masked k3 sums through the native op when enabled (float32/bfloat16 on a device it serves), else the reference.

    Mixed dtypes (a bfloat16 policy against a float32 reference) are promoted first; ``mask`` may be bool or 0/1.
    """
    _check(logp, ref_logp, mask)
    if not _native.enabled_for(logp.device):
        return kl_reduce_reference(logp, ref_logp, mask)
    # The common case (one token dtype, a bool mask) goes straight to the op: even a no-op .to() costs
    # microseconds, a sizeable share of the op at small sizes.
    if logp.dtype != ref_logp.dtype or logp.dtype not in _NATIVE_DTYPES or mask.dtype != torch.bool:
        dtype = torch.promote_types(logp.dtype, ref_logp.dtype)
        if dtype not in _NATIVE_DTYPES:
            return kl_reduce_reference(logp, ref_logp, mask)
        logp, ref_logp, mask = logp.to(dtype), ref_logp.to(dtype), mask != 0
    return KLReduction._make(_native.kl_reduce_op(logp, ref_logp, mask))
