"""When to hard-reset the reference policy (pi_ref <- pi_theta) and the optimizer: a pure state machine.

Three causes, each off when its knob is 0 (``ResetConfig``):

- ``schedule``: ``interval_steps`` trainer steps have passed since the last reset (any reset, so a
  triggered one restarts the clock);
- ``kl_share``: the KL term's share of the update, averaged over the last ``kl_window_steps`` steps since
  the last reset (a full window), is above ``kl_share_threshold`` - the penalty dominates the policy gradient.
  The share is taken on the gradient of the loss with respect to the token log-probs,
  ``sum|d kl_loss/d logp| / (sum|d pg_loss/d logp| + sum|d kl_loss/d logp|)`` in [0, 1]
  (:mod:`prorl_async.algo.loss`), not on the loss values: the pg loss of zero-mean group advantages is ~0
  whatever the update, so a share of loss values read ~1 even for a tiny beta;
- ``validation_plateau``: a validation reward arrived that is not above the best seen so far, and neither
  the best nor a reset happened in the last ``val_patience_steps`` steps. Validation results arrive
  between steps; the reset they call for is taken at the end of the next step.

Steps are trainer steps: the learner's ``policy_version`` (one per batch, whatever ``learner.mini_batches``
is), the unit validation results are measured in too. No torch, no I/O; the learner owns the action.

Usage::

    policy = ResetPolicy(cfg.reset)
    policy.observe_validation(step=learner.policy_version, reward=0.41)  # whenever validation runs
    reason = policy.after_step(step=learner.policy_version, kl_share=stats["kl_share"])
    if reason is not None:
        ...  # copy the policy into the reference, clear the optimizer, then:
        policy.mark_reset(step=learner.policy_version)
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prorl_async.config import ResetConfig


class ResetPolicy:
    """Decides reference resets from the step count, the KL term's share of the update and validation rewards."""

    def __init__(self, cfg: ResetConfig) -> None:
        self.cfg = cfg
        self.last_reset_step = 0
        self.resets = 0
        self.best_val_reward: float | None = None
        self.best_val_step = 0
        self._kl_shares: deque[float] = deque(maxlen=cfg.kl_window_steps)
        self._val_stalled = False

    def after_step(self, step: int, kl_share: float) -> str | None:
        """Record the step's ``kl_share`` (loss stats, in [0, 1]); the reason for a reset due now, or None."""
        self._kl_shares.append(kl_share)
        cfg = self.cfg
        if cfg.interval_steps and step - self.last_reset_step >= cfg.interval_steps:
            return "schedule"
        window_full = len(self._kl_shares) == self._kl_shares.maxlen
        if cfg.kl_share_threshold and window_full:
            mean_share = sum(self._kl_shares) / len(self._kl_shares)
            if mean_share > cfg.kl_share_threshold:
                return "kl_share"
        if self._val_stalled:
            return "validation_plateau"
        return None

    def observe_validation(self, step: int, reward: float) -> None:
        """Record a validation reward measured with the weights of ``step``."""
        if self.best_val_reward is None or reward > self.best_val_reward:
            self.best_val_reward, self.best_val_step = reward, step
            return
        patience = self.cfg.val_patience_steps
        if patience and step - max(self.best_val_step, self.last_reset_step) >= patience:
            self._val_stalled = True

    def mark_reset(self, step: int) -> None:
        """A reset happened at ``step`` (whatever its cause): restart the clocks and the window."""
        self.last_reset_step = step
        self.resets += 1
        self._kl_shares.clear()
        self._val_stalled = False

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, for checkpoints."""
        return {
            "last_reset_step": self.last_reset_step,
            "resets": self.resets,
            "best_val_reward": self.best_val_reward,
            "best_val_step": self.best_val_step,
            "kl_shares": list(self._kl_shares),
            "val_stalled": self._val_stalled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_reset_step = int(state["last_reset_step"])
        self.resets = int(state["resets"])
        self.best_val_reward = state["best_val_reward"]
        self.best_val_step = int(state["best_val_step"])
        self._kl_shares = deque(state["kl_shares"], maxlen=self.cfg.kl_window_steps)
        self._val_stalled = bool(state["val_stalled"])
