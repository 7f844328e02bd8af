"""The lines ``prorl-async run`` prints when a run ends: how far it got, whether the policy learned, what to resume.

    done: 24 steps; policy reward 0.170 -> 0.820 (every scored sample, last 5 steps pooled); validation pass@1
    0.250 -> 0.630 (v0 -> v24); batch reward (filtered) 0.359 -> 0.609; metrics: runs/default-.../metrics.jsonl
    checkpoint: runs/default-.../checkpoints/step-000024 (continue with: prorl-async run --resume runs/default-...)

Invariants: pure (the caller reads the records and finds the checkpoint); every figure may be missing — no step, no
scored sample, no validation round, no checkpoint — and the line then says so instead of failing. The policy reward
is the one the TUI's headline shows (:mod:`prorl_async.monitor.progress`): from the first step's arrivals (the
weights the run started with) to the samples of the last steps; validation compares complete rounds when there are
any; the batch reward is the first and the last step's, labelled ``(filtered)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prorl_async.monitor.progress import WINDOW_STEPS, pass_at_1, policy_rewards


def _policy(steps: list[dict[str, Any]]) -> str:
    policy = policy_rewards(steps).get("all")
    if policy is None or policy.value is None or policy.start is None:
        return "policy reward n/a (no scored sample arrived)"
    pooled = min(WINDOW_STEPS, len(steps))
    return (f"policy reward {policy.start:.3f} -> {policy.value:.3f} (every scored sample, last {pooled} "
            f"step{'s' if pooled != 1 else ''} pooled)")


def _validation(records: list[dict[str, Any]]) -> str:
    rounds = [r for r in records if r.get("kind") == "validation" and pass_at_1(r) is not None]
    rounds = [r for r in rounds if r.get("complete") is not False] or rounds  # partial rounds measure fewer prompts
    if not rounds:
        return "validation pass@1 n/a (no round finished)"
    first, last = rounds[0], rounds[-1]
    if first is last:
        return f"validation pass@1 {pass_at_1(last):.3f} (v{last.get('version', '?')})"
    return (f"validation pass@1 {pass_at_1(first):.3f} -> {pass_at_1(last):.3f} "
            f"(v{first.get('version', '?')} -> v{last.get('version', '?')})")


def _batch(steps: list[dict[str, Any]]) -> str | None:
    rewards = [r["reward_mean"] for r in steps if isinstance(r.get("reward_mean"), int | float)]
    return f"batch reward (filtered) {rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else None


def closing_lines(records: list[dict[str, Any]], *, metrics_path: Path, run_dir: Path, checkpoint: Path | None,
                  interrupted: bool) -> list[str]:
    """The run's last two lines from its ``records`` (the whole metrics file) and its newest ``checkpoint``."""
    steps = [r for r in records if r.get("kind") == "step"]
    head = f"{'stopped' if interrupted else 'done'}: {len(steps)} step{'s' if len(steps) != 1 else ''}"
    parts = [head, _policy(steps), _validation(records), _batch(steps), f"metrics: {metrics_path}"]
    where = (f"checkpoint: {checkpoint} (continue with: prorl-async run --resume {run_dir})" if checkpoint is not None
             else "checkpoint: none written (nothing to resume)")
    return ["; ".join(p for p in parts if p), where]
