"""One rollout: render a task's prompt, sample completions, score them. Training groups, periodic validation and
``prorl-async eval`` all go through these functions, so a prompt is rendered, sampled and scored the same way
wherever it is measured.

- :func:`render`: the prompt's token ids (the model's chat template, few-shot turns, prefill), or None when the
  prompt and the longest response do not fit ``model.max_model_len`` (the caller counts it, never truncates);
- :func:`sample`: render -> :meth:`Engine.generate` -> score every completion in the :class:`ScoringPool`
  (other processes, per-sample timeout: user reward code cannot take the generator down);
- :func:`score`: the scorer sees the prefill and the completion joined, as the model "wrote" both.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.envs.scoring_pool import ScoreResult, ScoringPool
    from prorl_async.envs.tasks import Task
    from prorl_async.generator.engine import Completion, Engine, Sampling


@dataclass
class Rollout:
    """A task's prompt, its completions and their scores (in completion order)."""

    task: Task
    prompt_ids: list[int]
    completions: list[Completion]
    scores: list[ScoreResult]


def render(tokenizer: Any, task: Task, cfg: Config, max_tokens: int) -> list[int] | None:
    """The prompt's token ids, or None when it leaves no room for ``max_tokens`` response tokens."""
    from prorl_async.envs.tasks import render_prompt

    ids = tokenizer.encode(render_prompt(tokenizer, task, cfg.tasks), add_special_tokens=False)
    return ids if len(ids) + max_tokens <= cfg.model.max_model_len else None


async def score(pool: ScoringPool, cfg: Config, task: Task, texts: list[str]) -> list[ScoreResult]:
    task_dict = task.to_dict()
    return list(await asyncio.gather(*(pool.score(cfg.tasks.prefill + text, task_dict) for text in texts)))


async def sample(engine: Engine, pool: ScoringPool, cfg: Config, task: Task, prompt_ids: list[int],
                 sampling: Sampling, request_id: str, *, generated: Any = None) -> Rollout:
    """Sample and score one rendered prompt. ``generated``: called once sampling is done, before scoring (the
    caller frees the engine slot then)."""
    completions = await engine.generate(prompt_ids, sampling, request_id)
    if generated is not None:
        generated()
    scores = await score(pool, cfg, task, [c.text for c in completions])
    return Rollout(task, prompt_ids, completions, scores)
