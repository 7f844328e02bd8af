"""``prorl-async data [CONFIG]``: what a config's tasks will train on, checked before any GPU hour is spent.

For each spec of ``tasks.mix``, in one pass and without loading a model's weights:

1. **Sources and rewards**: a data source is opened (:func:`prorl_async.envs.data.check`: file, format, columns, what
   its domain's verifier needs) and its rows, columns and the prompt / answer columns it uses are printed; a reward
   function (``tasks.mix[i].reward``, ``generator.reward_function``) is imported in a child process
   (:func:`prorl_async.envs.rewards.check`). Each problem is one line, and the command exits 2 (``UserError``).
2. **Splits**: training and validation problems per spec, as the run will build them (:class:`TaskMix`).
3. **Prompts**: ``show`` training prompts (spread over the specs), rendered exactly as the model will see them: its
   chat template, the system prompt, few-shot turns, the prefill (:func:`render_prompt`; only the tokenizer loads).
4. **References**: up to ``rows`` training problems per spec with a reference answer are scored through the reward
   the run will use, in the run's scoring pool (worker processes, time limit): the reference answer written in the
   asked format (``<answer>A</answer>`` or ``\\boxed{A}``) should score 1. A spec whose references score below 1
   means the verifier, the answer column or the reward function disagrees with the data: the first reasons are
   printed, and the command exits 1.

Usage::

    code = preview(load_config("my.toml"), show=3, rows=32)   # prints; 0: ready, 1: references scored below 1
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.envs.tasks import Task, TaskMix


def preview(cfg: Config, *, show: int = 3, rows: int = 32, out: Callable[[str], None] = print) -> int:
    """Check and show ``cfg``'s tasks (module docstring); 0 when every reference scored 1, else 1. Raises UserError
    for a source or a reward function that cannot be used."""
    from prorl_async.envs.curriculum import spec_labels
    from prorl_async.envs.tasks import TaskMix

    labels = spec_labels(cfg.tasks.mix)
    check_sources(cfg, out)
    mix = TaskMix(cfg.tasks)
    out("")
    out(f"{'task':<32} {'train':>10} {'validation':>10}  reward")
    for i, (label, spec) in enumerate(zip(labels, cfg.tasks.mix, strict=True)):
        reward = spec.reward or cfg.generator.reward_function or f"built-in {spec.domain} verifier"
        out(f"{label:<32} {mix.train_size(i):>10} {len(mix.validation_tasks(i)):>10}  {reward}")
    _show_prompts(cfg, mix, labels, show, out)
    return _score_references(cfg, mix, labels, rows, out)


def check_sources(cfg: Config, out: Callable[[str], None] | None = None) -> None:
    """Open every data source and import every reward function of ``cfg`` (each in a child process); a UserError of
    one line for the first that cannot be used. ``out``: print what each source holds. The supervisor calls this
    before it starts any process."""
    from prorl_async.envs import data, rewards
    from prorl_async.envs.curriculum import spec_labels

    for label, spec in zip(spec_labels(cfg.tasks.mix), cfg.tasks.mix, strict=True):
        if spec.source is not None:
            source = data.check(spec)
            if out is not None:
                answer = source.answer or "(none)"
                out(f"{label}: {spec.source.path}: {source.num_rows} rows; prompt column {source.prompt!r}, answer "
                    f"column {answer!r}; columns: {', '.join(source.columns)}")
        if spec.reward:
            rewards.check(spec.reward)
    if cfg.generator.reward_function:
        rewards.check(cfg.generator.reward_function)


def absolute_paths(cfg: Config, base: Path | None = None) -> Config:
    """``cfg`` with its data source paths and reward function files made absolute against ``base`` (the working
    directory): the run's ``config.toml`` then names the same files whatever directory a resume or ``prorl-async
    eval`` starts from. Module specs (``package.module:function``) are left as they are."""
    base = base if base is not None else Path.cwd()

    def absolute(path: str) -> str:
        return str(base / path) if path and not Path(path).is_absolute() else path

    def reward(spec: str) -> str:
        file, sep, name = spec.rpartition(":")
        return f"{absolute(file)}{sep}{name}" if sep and file.endswith(".py") else spec

    mix = []
    for spec in cfg.tasks.mix:
        update: dict[str, Any] = {"reward": reward(spec.reward)}
        if spec.source is not None:
            paths = {"path": absolute(spec.source.path), "validation_path": absolute(spec.source.validation_path)}
            update["source"] = spec.source.model_copy(update=paths)
        mix.append(spec.model_copy(update=update))
    generator = cfg.generator.model_copy(update={"reward_function": reward(cfg.generator.reward_function)})
    return cfg.model_copy(update={"tasks": cfg.tasks.model_copy(update={"mix": mix}), "generator": generator})


def _show_prompts(cfg: Config, mix: TaskMix, labels: list[str], show: int, out: Callable[[str], None]) -> None:
    if show <= 0:
        return
    from transformers import AutoTokenizer

    from prorl_async.envs.tasks import render_prompt
    from prorl_async.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model.name))
    for n in range(show):
        spec = n % len(labels)
        j = n // len(labels)
        if j >= mix.train_size(spec):
            continue
        task = mix.train_problem(spec, j)
        out("")
        out(f"---- prompt {n + 1} of {show}: {labels[spec]}, training problem {j} ({task.id}); reference answer: "
            f"{task.answer!r} ----")
        out(render_prompt(tokenizer, task, cfg.tasks))


def reference_text(task: Task, answer_format: str) -> str:
    """The text a sample that answers ``task`` with its reference would have (the prefill included)."""
    return f"\\boxed{{{task.answer}}}" if answer_format == "boxed" else f"<answer>{task.answer}</answer>"


def _score_references(cfg: Config, mix: TaskMix, labels: list[str], rows: int, out: Callable[[str], None]) -> int:
    tasks = [(i, mix.train_problem(i, j)) for i in range(len(labels)) for j in range(min(rows, mix.train_size(i)))]
    tasks = [(i, t) for i, t in tasks if t.answer is not None]
    out("")
    if not tasks:
        out("references: no training problem has a reference answer; nothing to score")
        return 0
    results = asyncio.run(_score_all(cfg, tasks))
    failed = False
    out(f"references: up to {rows} training problems per task, their reference answers scored by the run's reward")
    for i, label in enumerate(labels):
        scored = [(t, r) for (spec, t), r in zip(tasks, results, strict=True) if spec == i]
        if not scored:
            out(f"  {label}: no reference answers")
            continue
        low = [(t, r) for t, r in scored if r.reward < 1.0]
        mean = sum(r.reward for _, r in scored) / len(scored)
        out(f"  {label}: {len(scored)} scored, mean {mean:.3f}, {len(low)} below 1")
        for t, r in low[:3]:
            out(f"    {t.id}: reward {r.reward:g} ({r.status}): {r.reason[:160]}")
        failed |= bool(low)
    if failed:
        out("some reference answers scored below 1: check the answer column, the domain's verifier or the reward "
            "function before training")
    return 1 if failed else 0


async def _score_all(cfg: Config, tasks: list[tuple[int, Task]]) -> list[Any]:
    from prorl_async.envs.scoring_pool import ScoringPool

    warm = list({spec: task.to_dict() for spec, task in reversed(tasks)}.values())
    workers = max(1, min(cfg.generator.reward_workers or 2, 4))
    pool = ScoringPool(workers, cfg.generator.reward_timeout_s, cfg.generator.reward_function, warm)
    try:
        await pool.start()
        fmt = cfg.tasks.answer_format
        return list(await asyncio.gather(*(pool.score(reference_text(t, fmt), t.to_dict()) for _, t in tasks)))
    finally:
        await pool.close()
