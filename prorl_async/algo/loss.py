"""The ProRL loss as pure functions over token tensors (DESIGN.md section 3).

For token t of sample i: ``logp`` current log-prob (with grad), ``old`` proximal log-prob (the learner's
weights at the start of the step), ``behav`` behaviour log-prob (the generator's), ``ref`` reference
log-prob, ``A_i`` the group advantage, ``m`` the response mask::

    w_t   = min(exp(old_t - behav_t), C)                   off-policy correction, no gradient
    r_t   = exp(logp_t - old_t)
    pg_t  = -w_t * min(r_t * A_i, clip(r_t, 1 - eps_low, 1 + eps_high) * A_i)     decoupled clip
    kl_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                          k3 estimator
    loss  = aggregate(pg_t + beta * kl_t)    token mean over the batch (DAPO) or mean of sequence means

Choices:
- ``is_correction="decoupled"`` is decoupled PPO as in AReaL: ``w = exp(old - behav)`` untruncated, and a
  token whose weight exceeds C is dropped from the loss (w = 0) instead of truncated.
- The effective sample size is computed from the raw ratio ``exp(old - behav)`` whatever the mode, so it
  measures how far the behaviour policy is from the learner, not what the correction made of it:
  ``ess = mean(w)^2 / mean(w^2)`` in (0, 1].
- Micro-batching: pass ``denominator`` (the token or sequence count of the whole mini-batch) so that the
  gradients of the micro-batches add up to the gradient of the whole; :func:`merge_stats` combines their
  stats (``SUM_KEYS`` add, ``MEAN_KEYS`` are token-weighted means).
- ``kl_share``, the reset trigger's measure (:mod:`prorl_async.learner.reset`), is the KL term's share of the update,
  taken on the gradient with respect to the token log-probs (both terms depend on the policy only through
  ``logp_t``, so this is exact per token and needs no extra backward)::

      g_pg_t = d pg_t / d logp_t = -w_t * A_i * r_t where the unclipped branch is active, 0 where the clip binds
      g_kl_t = beta * d kl_t / d logp_t = beta * (1 - exp(ref_t - logp_t))
      kl_share = sum_t a_t |g_kl_t| / (sum_t a_t |g_pg_t| + sum_t a_t |g_kl_t|)   a_t: the aggregation's weight

  i.e. the L1 norms of d kl_loss / d logp and d pg_loss / d logp. Not the loss values: the token-mean pg loss
  of zero-mean group advantages is ~0 whatever the update, so a share of loss values reads ~1 even for a tiny beta.
- Everything here is float32 maths: :func:`token_logprobs` returns float32 log-probs whatever the model's
  precision or an enclosing autocast.
- The KL term's masked sums come from :func:`prorl_async.algo.kl.kl_reduce`: the fused native op when enabled
  (``learner.ops``), else its PyTorch reference; both give the same values and gradients to float32 rounding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from prorl_async.algo.kl import kl_reduce

if TYPE_CHECKING:
    from prorl_async.config import LossConfig

# Stats that add up across micro-batches (they already carry the global denominator; grad_*_abs_sum are the L1
# norms over the tokens of d pg_loss / d logp and d kl_loss / d logp, from which kl_share derives) ...
SUM_KEYS = ("loss", "pg_loss", "kl_loss", "tokens", "sequences", "grad_pg_abs_sum", "grad_kl_abs_sum")
# ... and stats that are token means (merged with token weights).
MEAN_KEYS = (
    "kl",
    "entropy",
    "clip_frac_low",
    "clip_frac_high",
    "is_truncated_frac",
    "is_weight_mean",
    "is_weight_sq_mean",
    "approx_kl",
)
# |old - behav| is clamped to this before exp: e^20 ~ 5e8 is beyond any useful is_cap (so truncation and
# dropping are unchanged), its square (~2e17) still sums in float32 over any batch, and e^-20 ~ 2e-9 is 0 for
# the loss; a -inf behaviour log-prob (the generator sends -1e30) then gives finite IS stats and ESS.
MAX_LOG_IS_RATIO = 20.0


def importance_weights(
    old_logp: torch.Tensor, behav_logp: torch.Tensor, mode: str, cap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Off-policy weights ``(w, raw, corrected)``, no gradient; ``corrected`` marks truncated or dropped tokens.

    ``none``: w = 1; ``truncated``: w = min(raw, cap); ``decoupled``: w = raw, or 0 where raw > cap.
    ``raw = exp(old - behav)`` with the log-ratio clamped to +-``MAX_LOG_IS_RATIO``: always finite.
    """
    log_raw = (old_logp.detach() - behav_logp.detach()).clamp(-MAX_LOG_IS_RATIO, MAX_LOG_IS_RATIO)
    raw = torch.exp(log_raw)
    over = raw > cap
    if mode == "none":
        return torch.ones_like(raw), raw, torch.zeros_like(over)
    if mode == "truncated":
        return raw.clamp(max=cap), raw, over
    if mode == "decoupled":
        return torch.where(over, torch.zeros_like(raw), raw), raw, over
    raise ValueError(f"unknown is_correction mode {mode!r} (none, truncated, decoupled)")


def prorl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    entropy: torch.Tensor | None = None,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The scalar ProRL loss and its stats. Token tensors are (B, T), ``advantages`` (B,), ``mask`` (B, T) bool.

    ``ref_logp=None`` drops the KL term (``kl_beta = 0`` needs no reference model). ``denominator``
    defaults to this batch's unmasked tokens (``aggregation="token"``) or non-empty sequences
    (``"sequence"``). ``entropy`` (B, T), when given, is only reported. Stats: see ``SUM_KEYS``, ``MEAN_KEYS``
    and :func:`derive_stats`; ``kl_share`` is the KL term's share of d loss / d logp (module docstring).
    """
    mask = mask.bool()
    # Padding may hold anything (inf, nan): zero it first, so that neither the values nor the gradients see it.
    logp, old_logp, behav_logp = (torch.where(mask, x, torch.zeros_like(x)) for x in (logp, old_logp, behav_logp))
    if ref_logp is not None:
        ref_logp = torch.where(mask, ref_logp, torch.zeros_like(ref_logp))
    adv = advantages.to(logp.dtype)[:, None]  # (B, 1)
    w, raw_w, corrected = importance_weights(old_logp, behav_logp, cfg.is_correction, cfg.is_cap)
    ratio = torch.exp(logp - old_logp.detach())  # (B, T)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv
    pg_tok = -w * torch.minimum(unclipped, clipped)  # (B, T)

    seq_tokens = mask.sum(dim=1)  # (B,)
    if cfg.aggregation == "token":
        per_token_weight = mask.to(logp.dtype)
        default_denominator = float(seq_tokens.sum())
    elif cfg.aggregation == "sequence":
        per_token_weight = mask.to(logp.dtype) / seq_tokens.clamp(min=1)[:, None].to(logp.dtype)
        default_denominator = float((seq_tokens > 0).sum())
    else:
        raise ValueError(f"unknown aggregation {cfg.aggregation!r} (token, sequence)")
    scale = 1.0 / max(default_denominator if denominator is None else denominator, 1.0)

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        return (x * per_token_weight).sum() * scale

    def aggregate_rows(row_sums: torch.Tensor) -> torch.Tensor:
        """``aggregate`` of a term given as its (B,) sums over each sequence's unmasked tokens."""
        if cfg.aggregation == "sequence":
            row_sums = row_sums / seq_tokens.clamp(min=1).to(row_sums.dtype)
        return row_sums.sum() * scale

    pg_loss = aggregate(pg_tok)
    kl = kl_reduce(logp, ref_logp.detach(), mask) if ref_logp is not None else None  # k3 sums, one fused pass
    kl_loss = cfg.kl_beta * aggregate_rows(kl.kl_per_seq) if kl is not None else pg_loss.new_zeros(())
    loss = pg_loss + kl_loss

    with torch.no_grad():
        n = seq_tokens.sum().clamp(min=1).to(torch.float32)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x.float(), torch.zeros((), device=x.device)).sum() / n

        log_ratio = logp.detach() - old_logp.detach()
        clipped_low = (ratio < 1 - cfg.eps_low) & (adv < 0)  # the clip binds: constant in logp
        clipped_high = (ratio > 1 + cfg.eps_high) & (adv > 0)
        d_loss_d_term = per_token_weight * scale  # (B, T): d loss / d (pg_t + beta kl_t); 0 at padding
        g_pg = torch.where(clipped_low | clipped_high, 0.0, w * adv * ratio)  # |d pg_t / d logp_t|
        grad_pg_abs_sum = (d_loss_d_term * g_pg.abs()).sum()
        if kl is not None:  # |beta d kl_t / d logp_t| = beta |1 - exp(ref_t - logp_t)|, padding zeroed above
            g_kl = cfg.kl_beta * torch.expm1(ref_logp.detach().float() - logp.detach().float()).abs()
            grad_kl_abs_sum = (d_loss_d_term * g_kl).sum()
        else:
            grad_kl_abs_sum = torch.zeros((), device=logp.device)
        values = {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "tokens": seq_tokens.sum().float(),
            "sequences": (seq_tokens > 0).sum().float(),
            "grad_pg_abs_sum": grad_pg_abs_sum,
            "grad_kl_abs_sum": grad_kl_abs_sum,
            "kl": kl.kl_sum.detach() / n if kl is not None else torch.zeros((), device=logp.device),
            "entropy": token_mean(entropy) if entropy is not None else torch.full((), math.nan, device=logp.device),
            "clip_frac_low": token_mean(clipped_low.float()),
            "clip_frac_high": token_mean(clipped_high.float()),
            "is_truncated_frac": token_mean(corrected.float()),
            "is_weight_mean": token_mean(raw_w),
            "is_weight_sq_mean": token_mean(raw_w * raw_w),
            "approx_kl": token_mean(torch.expm1(log_ratio) - log_ratio),  # k3 of KL(old || new)
        }
        # One device-to-host transfer for all of them.
        stats = dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist(), strict=True))
    return loss, derive_stats(stats)


def derive_stats(stats: dict[str, float]) -> dict[str, float]:
    """Add the stats that are functions of the additive ones: ``ess`` and ``kl_share``.

    ``kl_share = grad_kl_abs_sum / (grad_pg_abs_sum + grad_kl_abs_sum)`` in [0, 1], 0 when both are 0: the KL
    term's share of the gradient of the loss with respect to the token log-probs.
    """
    out = dict(stats)
    mean_sq = out["is_weight_sq_mean"]
    out["ess"] = out["is_weight_mean"] ** 2 / mean_sq if mean_sq > 0 else 1.0
    grad_kl = out["grad_kl_abs_sum"]
    denom = out["grad_pg_abs_sum"] + grad_kl
    out["kl_share"] = grad_kl / denom if denom > 0 else 0.0
    return out


def stats_to_sums(stats: dict[str, float]) -> list[float]:
    """The additive form of stats (``SUM_KEYS`` as is, ``MEAN_KEYS`` times tokens), e.g. for an all-reduce."""
    return [stats[k] for k in SUM_KEYS] + [stats[k] * stats["tokens"] for k in MEAN_KEYS]


def stats_from_sums(sums: list[float]) -> dict[str, float]:
    """Inverse of :func:`stats_to_sums` over a sum of such vectors; derived stats recomputed."""
    out = dict(zip(SUM_KEYS, sums[: len(SUM_KEYS)], strict=True))
    tokens = max(out["tokens"], 1.0)
    out.update({k: v / tokens for k, v in zip(MEAN_KEYS, sums[len(SUM_KEYS) :], strict=True)})
    return derive_stats(out)


def merge_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    """Stats of several micro-batches as one: sums add, means are token-weighted."""
    if not parts:
        raise ValueError("merge_stats needs at least one part")
    vectors = [stats_to_sums(p) for p in parts]
    return stats_from_sums([math.fsum(col) for col in zip(*vectors, strict=True)])


# ------------------------------------------------------------------------------------------ log-probs


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_tokens: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N,) float32 of ``targets`` (N,) under ``softmax(hidden @ weight.T / temperature)``.

    ``hidden`` (N, H), ``weight`` (V, H). The vocabulary projection runs ``chunk_tokens`` rows at a time;
    with gradient each chunk is checkpointed, so at most one chunk of (chunk, V) logits is alive in the
    forward and in the backward. ``with_entropy`` also returns the per-token entropy (no gradient).

    The projection, log-softmax and entropy run in float32 with autocast off, whatever the dtype of ``hidden``
    and ``weight`` or an enclosing ``torch.autocast``: the log-probs feed the ratio exp(logp - old), where bf16
    logits (errors of ~1e-2 nats) would be ~1% noise. Gradients reach ``hidden`` and ``weight`` in their dtypes.
    """
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start : start + chunk_tokens], weight, targets[start : start + chunk_tokens])
        if needs_grad:
            lp, ent = checkpoint(_chunk_logprobs, *args, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args, temperature, with_entropy)
        logps.append(lp)
        entropies.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropies) of one chunk, all in float32: autocast would run the projection in bf16.

    The weight is cast per chunk (a no-op for float32 master weights), so no float32 copy outlives the chunk.
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(hidden.float(), weight.float())  # (C, V) float32
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1)  # (C,)
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        if not with_entropy:
            return logp, lse.new_zeros(0)
        with torch.no_grad():
            entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy
