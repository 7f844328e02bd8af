"""``prorl-async eval``: held-out prompts, vLLM samples, the project's rewards, pass@k and the pass@1 distribution.

Steps, for ``MODEL`` and optionally ``--compare OTHER``:

1. the tasks: ``eval.tasks`` selects entries of ``tasks.mix`` (all by default) and each contributes the first
   ``eval.prompts`` problems of its **held-out validation split** (the same split a training run with this
   config never draws from: it depends on ``tasks.seed``, ``tasks.validation_size`` and the task's
   domain/name/params only);
2. generation, one process per model (:mod:`prorl_async.eval.generate`): ``eval.samples`` completions per
   prompt at ``eval.temperature`` / ``eval.top_p``;
3. scoring in a :class:`~prorl_async.envs.scoring_pool.ScoringPool` with the run's reward function and timeout
   (``generator.reward_function``, ``generator.reward_timeout_s``): what training would have rewarded;
4. statistics (:mod:`prorl_async.eval.stats`) and the output directory (:mod:`prorl_async.eval.report`):
   ``eval.json``, ``report.md``, ``pass1_hist.png``, ``pass_at_k.png``, ``samples-LABEL.jsonl`` (every
   completion with its reward and reason), ``config.toml``, ``tasks.json`` and ``logs/``.

A model is a built-in name, a Hugging Face directory, a checkpoint (``RUN_DIR/checkpoints/step-N`` or its
``policy``) or a run directory (its latest checkpoint). For a checkpoint or a run directory without
``--config``, the run's own ``config.toml`` supplies tasks, seeds and prompt format, so the held-out split
is the one that run held out.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prorl_async.errors import UserError

if TYPE_CHECKING:
    from prorl_async.config import Config, TaskSpec
    from prorl_async.envs.tasks import Task
    from prorl_async.eval.stats import PromptResult

FORMAT = 1


class EvalError(UserError, RuntimeError):
    """Evaluation could not finish (a generation process failed); ``str()`` names its log."""


# --------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class EvalModel:
    spec: str  # as given on the command line
    label: str  # short, unique in one evaluation
    path: Path  # a Hugging Face directory
    run_dir: Path | None = None  # the training run it comes from, if any


def resolve_eval_model(spec: str) -> EvalModel:
    """A model to evaluate: built-in name, HF directory, checkpoint (step dir or its policy) or run directory."""
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "policy" / "config.json").is_file():
            path = path / "policy"
        elif (path / "checkpoints").is_dir():
            from prorl_async.utils.run_dir import latest_checkpoint

            latest = latest_checkpoint(path, holding="policy/config.json")
            if latest is None:
                raise UserError(f"model {spec!r}: a run directory without a complete checkpoint")
            path = latest / "policy"
    if path.is_dir() and (path / "config.json").is_file():
        path = path.resolve()
        if path.name == "policy" and path.parent.parent.name == "checkpoints":
            step, run = path.parent, path.parent.parent.parent
            return EvalModel(spec, f"{run.name}-{step.name}", path, run)
        return EvalModel(spec, path.name, path)
    from prorl_async.models import resolve_model

    return EvalModel(spec, spec, resolve_model(spec))


def find_run_config(spec: str) -> Path | None:
    """``RUN_DIR/config.toml`` when ``spec`` is a run directory or one of its checkpoints (standard library only)."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    path = path.resolve()
    for candidate in (path, path.parent.parent, path.parent.parent.parent):  # RUN, RUN/checkpoints/step-N[/policy]
        if (candidate / "config.toml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate / "config.toml"
    return None


# ---------------------------------------------------------------------------------------------- tasks


def select_specs(cfg: Config) -> list[tuple[str, TaskSpec]]:
    """``(label, spec)`` for each task ``eval.tasks`` selects (module docstring); labels are ``domain/name``."""
    from pydantic import ValidationError

    from prorl_async.config import TaskSpec

    mix = list(cfg.tasks.mix)
    chosen: list[TaskSpec] = []
    for selector in cfg.eval.tasks or [f"{s.domain}/{s.name}" for s in mix]:
        sel = selector.strip()
        matches = [s for s in mix if sel in (s.name, f"{s.domain}/{s.name}", s.domain)]
        if not matches:
            domain, slash, name = sel.partition("/")
            if not slash or not domain or not name:
                known = ", ".join(f"{s.domain}/{s.name}" for s in mix)
                raise UserError(f"eval task {sel!r} is not in tasks.mix ({known}); name a task outside the mix as "
                                "domain/name")
            try:
                matches = [TaskSpec(domain=domain, name=name)]
            except ValidationError as err:
                raise UserError(f"eval task {sel!r}: {err.errors()[0]['msg']}") from None
        chosen += [s for s in matches if not any(s is c for c in chosen)]
    labels = [f"{s.domain}/{s.name}" for s in chosen]
    return [(f"{label}#{i}" if labels.count(label) > 1 else label, spec)
            for i, (label, spec) in enumerate(zip(labels, chosen, strict=True))]


def eval_tasks(cfg: Config, specs: list[tuple[str, TaskSpec]]) -> list[tuple[str, Task]]:
    """``(task label, task)``: the first ``eval.prompts`` held-out problems of each spec."""
    from prorl_async.envs.tasks import TaskMix

    size = cfg.tasks.validation_size
    wanted = cfg.eval.prompts or size
    if size == 0:
        raise UserError("tasks.validation_size is 0: there is no held-out split to evaluate on")
    if wanted > size:
        raise UserError(f"eval.prompts ({wanted}) exceeds tasks.validation_size ({size}): raising the split size "
                        "would move prompts a run with this config trained on into it; lower eval.prompts")
    mix = TaskMix(cfg.tasks.model_copy(update={"mix": [spec for _, spec in specs]}))
    return [(label, task) for i, (label, _) in enumerate(specs) for task in mix.validation_tasks(i)[:wanted]]


# ------------------------------------------------------------------------------------------------ run


def expand_out_dir(template: str, label: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "model"
    return Path(template.replace("{model}", safe).replace("{timestamp}", time.strftime("%Y%m%d-%H%M%S")))


def run_eval(cfg: Config, model: str, *, compare: str | None = None, out_dir: str | Path | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``model`` (and ``compare``) as the module docstring says; returns what ``eval.json`` holds."""
    from prorl_async.config import write_resolved

    models = [resolve_eval_model(model)]
    if compare is not None:
        other = resolve_eval_model(compare)
        if other.label == models[0].label:
            other = EvalModel(other.spec, f"{other.label}-other", other.path, other.run_dir)
        models.append(other)
    specs = select_specs(cfg)
    tasks = eval_tasks(cfg, specs)
    out = Path(out_dir) if out_dir is not None else expand_out_dir(cfg.eval.out_dir, models[0].label)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    config_path = write_resolved(cfg, out)
    tasks_path = out / "tasks.json"
    tasks_path.write_text(json.dumps([t.to_dict() for _, t in tasks]) + "\n")
    log(f"eval: {len(tasks)} held-out prompts from {len(specs)} task(s) x {cfg.eval.samples} samples, "
        f"T={cfg.eval.temperature:g} top_p={cfg.eval.top_p:g}; output in {out}")
    started = time.time()
    per_model = asyncio.run(_generate_and_score(cfg, models, tasks, config_path, tasks_path, out, log))
    data = assemble(cfg, models, specs, tasks, per_model, started)

    from prorl_async.eval import report as evaluation_report

    data["files"] = evaluation_report.write_all(data, per_model, out)
    log(f"eval: done in {data['seconds']:.0f} s: {out / data['files']['report']}")
    return data


def assemble(cfg: Config, models: list[EvalModel], specs: list[tuple[str, TaskSpec]], tasks: list[tuple[str, Task]],
             per_model: dict[str, dict[str, Any]], started: float) -> dict[str, Any]:
    """What ``eval.json`` holds (without ``files``), from each model's scored prompts (``per_model[label]``:
    ``prompts`` (PromptResult list in task order), ``meta`` (generation), ``scoring`` (counters), ``file``)."""
    from prorl_async.eval.generate import max_tokens
    from prorl_async.eval.stats import compare, summarize_all

    ks, e = sorted(set(cfg.eval.k)), cfg.eval
    first = models[0].label
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "model": first,
        "other": models[1].label if len(models) == 2 else None,
        "models": {m.label: {"spec": m.spec, "path": str(m.path), "run_dir": str(m.run_dir) if m.run_dir else None,
                             "generation": per_model[m.label]["meta"], "scoring": per_model[m.label]["scoring"],
                             "samples_file": per_model[m.label]["file"]} for m in models},
        "settings": {
            "temperature": e.temperature, "top_p": e.top_p, "top_k": e.top_k, "max_response_tokens": max_tokens(cfg),
            "stop": list(cfg.sampling.stop), "samples": e.samples, "k": ks, "correct_threshold": e.correct_threshold,
            "prompts_per_task": e.prompts or cfg.tasks.validation_size, "split": "validation",
            "tasks_seed": cfg.tasks.seed, "validation_size": cfg.tasks.validation_size, "seed": cfg.run.seed,
            "answer_format": cfg.tasks.answer_format, "prefill": cfg.tasks.prefill, "few_shot": cfg.tasks.few_shot,
            "dtype": cfg.model.dtype,
            "reward_function": cfg.generator.reward_function or "prorl_async.envs.score.score",
        },
        "tasks": [{"label": label, "domain": spec.domain, "name": spec.name, "params": spec.params,
                   "source": spec.source.path if spec.source is not None else None,
                   "reward": spec.reward or cfg.generator.reward_function or f"built-in {spec.domain} verifier",
                   "prompts": sum(t_label == label for t_label, _ in tasks)} for label, spec in specs],
        "results": {m.label: summarize_all(per_model[m.label]["prompts"], ks) for m in models},
        "comparison": (compare(per_model[first]["prompts"], per_model[models[1].label]["prompts"], ks)
                       if len(models) == 2 else None),
    }


def _workers(cfg: Config) -> int:
    return cfg.eval.reward_workers or max(1, min(os.cpu_count() or 1, 8))


async def _generate_and_score(cfg: Config, models: list[EvalModel], tasks: list[tuple[str, Task]], config_path: Path,
                              tasks_path: Path, out: Path, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    from prorl_async.envs.scoring_pool import ScoringPool

    warm = list({label: task.to_dict() for label, task in reversed(tasks)}.values())
    pool = ScoringPool(_workers(cfg), cfg.generator.reward_timeout_s, cfg.generator.reward_function, warm)
    done: dict[str, dict[str, Any]] = {}
    try:
        await pool.launch()  # scoring workers import while the first engine starts
        for n, m in enumerate(models):
            records, meta = await _generate(m, config_path, tasks_path, out, log)
            if n == 0:
                await pool.start()
            before = dict(pool.counters)
            start = time.perf_counter()
            prompts, rows = await _score(cfg, pool, tasks, records)
            scoring = {k: v - before.get(k, 0) for k, v in pool.counters.items()}
            scoring["seconds"] = round(time.perf_counter() - start, 2)
            file = f"samples-{re.sub(r'[^A-Za-z0-9._-]+', '-', m.label)}.jsonl"
            with (out / file).open("w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            bad = scoring.get("error", 0) + scoring.get("timeout", 0) + scoring.get("crash", 0)
            log(f"eval: {m.label}: scored {sum(p.n for p in prompts)} samples in {scoring['seconds']:.1f} s"
                + (f" ({bad} scored 0 by an error, timeout or crash: see {file})" if bad else ""))
            done[m.label] = {"prompts": prompts, "meta": meta, "scoring": scoring, "file": file}
    finally:
        await pool.close()
    return done


async def _generate(m: EvalModel, config_path: Path, tasks_path: Path, out: Path,
                    log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", m.label)
    target, log_path = out / f"generations-{safe}.jsonl", out / "logs" / f"generate-{safe}.log"
    target.unlink(missing_ok=True)
    # VLLM_CACHE_ROOT stays vLLM's default (or the user's): its model-inspection cache saves a subprocess that
    # imports torch and vllm again (about a minute on a loaded 2-core machine) on every evaluation.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "prorl_async.eval.generate", "--config", str(config_path), "--model", str(m.path),
            "--tasks", str(tasks_path), "--out", str(target)]
    log(f"eval: generating with {m.label} ({m.path}); vLLM log: {log_path}")
    start = time.perf_counter()
    with log_path.open("wb") as f:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=f, stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            code = await proc.wait()
        except BaseException:  # interrupted: do not leave the engine running
            if proc.returncode is None:
                proc.kill()  # the process this function started
                await proc.wait()
            raise
    if code != 0 or not target.is_file():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        raise EvalError(f"generation with {m.label} failed (exit {code}): {lines[-1] if lines else 'no output'} "
                        f"(full log: {log_path})")
    records = [json.loads(line) for line in target.read_text().splitlines()]
    meta = records.pop()["meta"]
    target.unlink()  # samples-LABEL.jsonl holds the completions with their rewards
    meta["process_s"] = round(time.perf_counter() - start, 2)
    skipped = f"; {meta['skipped']} prompts too long, skipped" if meta["skipped"] else ""
    log(f"eval: {m.label}: {meta['tokens']} tokens generated in {meta['generate_s']:.1f} s "
        f"({meta['tokens_per_s']:.0f} tok/s; {meta['prompt_tokens']} prompt tokens over all samples; engine start "
        f"{meta['engine_start_s']:.1f} s){skipped}")
    return records, meta


async def _score(cfg: Config, pool: Any, tasks: list[tuple[str, Task]], records: list[dict[str, Any]]
                 ) -> tuple[list[PromptResult], list[dict[str, Any]]]:
    from prorl_async.eval.stats import PromptResult

    jobs = [(i, j, cfg.tasks.prefill + c["text"], task.to_dict())
            for i, ((_, task), record) in enumerate(zip(tasks, records, strict=True))
            for j, c in enumerate(record.get("completions", []))]
    scores: dict[tuple[int, int], Any] = {}
    queue = iter(jobs)

    async def consume() -> None:
        for i, j, text, task in queue:  # a shared iterator: each job is taken once
            scores[i, j] = await pool.score(text, task)

    await asyncio.gather(*(consume() for _ in range(2 * pool.workers)))
    prompts, rows = [], []
    for i, ((label, task), record) in enumerate(zip(tasks, records, strict=True)):
        if record["id"] != task.id:
            raise RuntimeError(f"generation out of order: {record['id']} where {task.id} was expected")
        completions = record.get("completions", [])
        results = [scores[i, j] for j in range(len(completions))]
        prompts.append(PromptResult(task.id, label, task.domain, tuple(r.reward for r in results),
                                    cfg.eval.correct_threshold))
        row: dict[str, Any] = {"id": task.id, "task": label, "question": task.question, "answer": task.answer}
        if "skipped" in record:
            row["skipped"] = record["skipped"]
        else:
            row["prompt_tokens"] = record["prompt_tokens"]
            row["samples"] = [{**c, "reward": r.reward, "reason": r.reason, "status": r.status}
                              for c, r in zip(completions, results, strict=True)]
        rows.append(row)
    return prompts, rows
