"""Does prolonged RL expand the reasoning boundary here? The ProRL paper's five claims, measured at small scale.

    python bench/boundary.py                                  # configs/boundary.toml: 2 arms x 24 steps, 5 evals
    python bench/boundary.py --work /tmp/prorl-bench/boundary/DIR            # continue an interrupted job
    python bench/boundary.py --work /tmp/prorl-bench/boundary/DIR --stage report   # analysis and figures only
    python bench/boundary.py --arms resets,no-resets,no-kl                  # the third arm as well
    python bench/boundary.py --quick --work /tmp/prorl-bench/boundary-quick  # tiny-random: checks every stage only

Arms (``--arms``): the same config, seed and ``run.max_steps`` (``--steps``), checkpoints every
``--checkpoint-every`` steps and in-run validation every ``--val-every`` steps (and at start); they differ only in

- ``resets``: ``reset.interval_steps = --reset-every`` (reference policy and optimizer hard-reset, the ProRL recipe);
- ``no-resets``: ``reset.interval_steps = 0``;
- ``no-kl``: ``reset.interval_steps = 0`` and ``loss.kl_beta = 0``.

Every arm has the other reset triggers off (``reset.kl_share_threshold = 0``, ``reset.val_patience_steps = 0``) and
no time budget (``run.time_budget_s = 0``): the arms are compared at equal steps.

Stages (``--stage``, default ``all``), all in one work directory (``--work``), so a job of several hours survives
an interruption and can span sessions: rerunning with the same ``--work`` continues it, with the plan stored in
``WORK/plan.json`` (a flag that would change it is refused; ``--eval-every`` and ``--arms`` may change).

- ``runs``: one ``prorl-async run`` per arm in ``WORK/runs/ARM``, one after the other. A run whose newest checkpoint
  is at ``--steps`` is not run again; one with an earlier checkpoint is continued (``prorl-async run --resume``);
  one without any is moved aside (``ARM.abandoned-TIME``) and started afresh.
- ``eval``: ``prorl-async eval`` of the base model and of each arm's checkpoints at multiples of ``--eval-every``
  (and the last, at ``--steps``), each on the same held-out prompts (``--prompts`` per task of the validation
  split) with ``--samples`` samples per prompt at ``eval.temperature`` (0.6) / ``eval.top_p`` (0.95), pass@k for
  ``--k``, into ``WORK/evals/base`` and ``WORK/evals/ARM/step-N``. Every evaluation uses ``WORK/eval-config.toml``
  (the arms' shared config), so prompt ids match across models. An evaluation whose ``eval.json`` exists is kept.
- ``report``: reads the runs' ``metrics.jsonl`` and the evaluations, and writes the JSON (``--json``) and five
  figures (``--plot-prefix``): ``-pass-at-k`` (base vs each arm's last checkpoint, per task), ``-pass1-hist``
  (the paper's Fig. 7: per-prompt pass@1 of the base and of the main arm's checkpoints), ``-training`` (entropy, KL,
  KL share of the update, response length and validation pass@1 against steps, per arm, resets as dotted lines),
  ``-solved`` (prompts newly solved and lost at k = n against the base, per checkpoint) and ``-regimes`` (pass@1 and
  pass@k_max per task against steps). It prints the verdict table, then how far each model narrowed: different
  completions per prompt among its samples and the share of prompts answered the same way every time
  (``diversity`` in the JSON). Default paths:
  ``bench/results/boundary-DATE.json`` and ``bench/results/boundary-DATE-NAME.png`` (``--quick``: under
  ``WORK/results/``).

The claims and how each is tested (``verdicts`` in the JSON: ``held`` / ``did not hold`` / ``inconclusive``, the
numbers it rests on, and why). The main arm is ``resets``; "end" is its checkpoint at ``--steps``. A difference
counts only beyond ``Z`` = 2 standard errors: for pass@k between two evaluations, the paired standard error over the
shared prompts (std of the per-prompt differences / sqrt(prompts): it holds both the prompts' spread and the
sampling noise); for a validation round, the binomial one of its samples with a +1/+2 correction (never 0).

1. ``1a`` pass@1 and pass@k_max (k_max = the largest ``--k``) both rise, base -> end, over all prompts pooled.
   ``1b`` the gain is largest where the base is weakest: Spearman correlation over prompts between the base's
   pass@h and the gain in pass@1, h = n/2. The base's n samples are split in halves: the first half gives the
   base's pass@h, the second the baseline of the gain, so that the same sampling noise is not on both sides (which
   would make the correlation negative by regression to the mean alone); p from 2,000 permutations (one-sided).
   Across tasks (too few for a test) the same correlation of the base's pass@k_max with the pass@1 and pass@k_max
   gains is reported as numbers.
2. the pass@1 distribution over prompts shifts right: mean per-prompt pass@1 up beyond noise and neither more
   prompts at 0 nor fewer at 1 (base -> end); the fractions at each evaluated checkpoint are in the JSON.
3. prompts the base never solved (0 of n samples) become solvable: newly solved (base 0, end > 0) against lost
   (base > 0, end 0). With no change both are equally likely (a prompt's two evaluations are exchangeable), so
   ``held`` needs a one-sided sign test (McNemar, exact binomial) p < 0.05.
4. resets keep entropy up and progress going: in the last third of the steps, ``resets`` has higher mean entropy
   (standard error from means of 4-step blocks) and a steeper validation pass@1 slope (least squares over the rounds
   in the last third, its error propagated from the rounds' binomial errors; the last round's pass@1 when there are
   fewer than 2 rounds there) than ``no-resets``. The KL term's share of the update (``kl_share``) per arm is
   reported with it (the paper: without resets it comes to dominate).
5. each task falls into a regime, read from pass@k_max (base -> end): ``diminish`` (pass@1 up, pass@k_max down
   beyond noise), ``sustained`` (pass@1 not down, pass@k_max up, and still rising between the last two evaluated
   checkpoints), ``plateau`` (pass@k_max within noise and pass@1 not down; or both up, then flat or falling between
   the last two checkpoints); ``regressed`` (pass@k_max down, pass@1 not up; or pass@k_max flat, pass@1 down) and
   ``other`` (pass@k_max up, pass@1 down) are none of the three. ``held`` when every task has one of the three and
   at least one task moved beyond noise (all flat cannot tell a plateau from no training); a task in none of them:
   did not hold.

With 135M parameters and a few dozen prompts per task most differences are small: they read as inconclusive.

How long (measured 2026-12-04 on 2 cores, nothing else running; bench/README.md has the run): one arm of 24 steps
took 43-45 min (engine start-up, 24 steps of 8 groups x 8 samples with <= 40 tokens, 7 in-run validation rounds,
4 checkpoints); an evaluation of 3 tasks x 32 prompts x 64 samples (6,144 completions of ~8 tokens) took 10.6-11.4
min including start-up, so the five evaluations (the base, steps 12 and 24 of each arm) take ~55 min. In all about
2.5 h. Checkpoints take about 2 GB each (policy, reference, optimizer): 8 with the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from _boundary_stats import (
    Z,
    analyse,
    distinct_from_rows,
    diversity_table,
    outcomes_from_rows,
    training_series,
    verdict_table,
)

HERE = Path(__file__).resolve().parent
ARMS = ("resets", "no-resets", "no-kl")
FULL: dict[str, Any] = {"config": "configs/boundary.toml", "overrides": [], "quick": False, "steps": 24,
                        "reset_every": 6, "checkpoint_every": 6, "eval_every": 12, "val_every": 4, "prompts": 32,
                        "samples": 64, "ks": [1, 2, 4, 8, 16, 32, 64]}
QUICK: dict[str, Any] = {"config": "configs/tiny.toml", "overrides": [], "quick": True, "steps": 4, "reset_every": 2,
                         "checkpoint_every": 2, "eval_every": 4, "val_every": 2, "prompts": 4, "samples": 4,
                         "ks": [1, 2, 4]}
PLAN_KEYS = ("config", "overrides", "quick", "steps", "reset_every", "checkpoint_every", "val_every", "prompts",
             "samples", "ks")  # fixed once a work directory has a plan; eval_every may change

# ----------------------------------------------------------------------------------------------- plan


def derived(steps: int) -> dict[str, int]:
    """Intervals that follow ``--steps`` when not given: 4 resets and 4 checkpoints, evaluations at half and end,
    6 validation rounds (plus the one at start)."""
    every = max(1, steps // 4)
    return {"reset_every": every, "checkpoint_every": every, "eval_every": 2 * every, "val_every": max(1, steps // 6)}


def make_plan(given: Mapping[str, Any]) -> dict[str, Any]:
    """The plan from the flags given (``quick`` picks the defaults; ``steps`` re-derives the intervals)."""
    plan = dict(QUICK if given.get("quick") else FULL)
    if "steps" in given:
        plan.update(derived(int(given["steps"])))
    plan.update(given)
    if max(plan["ks"]) > plan["samples"]:
        raise SystemExit(f"boundary: --samples {plan['samples']} is below the largest --k {max(plan['ks'])}")
    if plan["eval_every"] % plan["checkpoint_every"]:
        raise SystemExit(f"boundary: --eval-every {plan['eval_every']} must be a multiple of --checkpoint-every "
                         f"{plan['checkpoint_every']} (only checkpoints can be evaluated)")
    return plan


def settle_plan(stored: Mapping[str, Any] | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """A new work directory's plan, or the stored one: flags that would change it are refused (the arms and their
    evaluations must stay comparable); ``eval_every`` may change (more or fewer checkpoints evaluated)."""
    if stored is None:
        return make_plan(given)
    def same(key: str) -> bool:
        if key == "config":  # a path: relative to the repository as stored by default, absolute when given
            return config_path(given).resolve() == config_path(stored).resolve()
        return given[key] == stored.get(key)

    clash = [k for k in PLAN_KEYS if k in given and not same(k)]
    if clash:
        held = ", ".join(f"{k}={stored.get(k)!r}" for k in clash)
        raise SystemExit(f"boundary: the work directory's plan.json has {held}; this job cannot change it (start "
                         "another --work)")
    plan = dict(stored)
    if "eval_every" in given:
        plan["eval_every"] = given["eval_every"]
    return make_plan(plan)


def common_overrides(plan: Mapping[str, Any]) -> list[str]:
    """What every arm sets over the config (the user's ``--set`` first: the bench's knobs win)."""
    return [*plan["overrides"], f"run.max_steps={plan['steps']}", "run.time_budget_s=0",
            f"run.checkpoint_every_steps={plan['checkpoint_every']}", f"eval.every_steps={plan['val_every']}",
            "eval.every_minutes=0", "eval.at_start=true", "reset.kl_share_threshold=0", "reset.val_patience_steps=0"]


def run_overrides(plan: Mapping[str, Any], arm: str) -> list[str]:
    """The config overrides of one arm: the common ones, then the arm's reset interval and KL weight."""
    own = {"resets": [f"reset.interval_steps={plan['reset_every']}"],
           "no-resets": ["reset.interval_steps=0"],
           "no-kl": ["reset.interval_steps=0", "loss.kl_beta=0"]}
    if arm not in own:
        raise SystemExit(f"boundary: unknown arm {arm!r} (known: {', '.join(ARMS)})")
    return [*common_overrides(plan), *own[arm]]


def eval_steps(available: Sequence[int], eval_every: int, final: int) -> list[int]:
    """The checkpoint steps to evaluate: multiples of ``eval_every`` up to ``final``, and ``final`` itself."""
    return sorted(s for s in set(available) if 0 < s <= final and (s % eval_every == 0 or s == final))


# ----------------------------------------------------------------------------------------------- processes and files


def config_path(plan: Mapping[str, Any]) -> Path:
    path = Path(plan["config"])
    return path if path.is_absolute() else HERE.parent / path


def eval_config(plan: Mapping[str, Any], work: Path) -> Path:
    """``WORK/eval-config.toml``: the arms' shared config (written once), used by every evaluation."""
    from prorl_async.config import config_to_toml, load_config

    path = work / "eval-config.toml"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_to_toml(load_config(config_path(plan), common_overrides(plan))))
    return path


def run_state(run_dir: Path, steps: int) -> tuple[str, int | None]:
    """``new`` (no directory), ``finished`` (a checkpoint at ``steps`` or later), ``resumable`` (an earlier one and
    the run's config.toml) or ``restart`` (a directory without a usable checkpoint); and that checkpoint's step."""
    from prorl_async.utils.run_dir import checkpoint_step, latest_checkpoint

    if not run_dir.exists():
        return "new", None
    latest = latest_checkpoint(run_dir, holding="policy/config.json")
    step = checkpoint_step(latest) if latest is not None else None
    if step is not None and step >= steps:
        return "finished", step
    if step is not None and (run_dir / "config.toml").is_file():
        return "resumable", step
    return "restart", step


def ensure_run(plan: Mapping[str, Any], arm: str, work: Path, timeout_s: float) -> bool:
    """Run, continue or skip one arm (:func:`run_state`); True when it has reached ``steps``."""
    import _runs

    run_dir = work / "runs" / arm
    state, step = run_state(run_dir, plan["steps"])
    print(f"{arm}: {state}" + (f" (checkpoint at step {step})" if step is not None else ""), flush=True)
    if state == "finished":
        return True
    overrides = run_overrides(plan, arm)
    if state == "resumable":  # from its newest checkpoint, with its own config.toml and these (unchanged) overrides
        run = _runs.launch(None, overrides, run_dir, resume=run_dir, timeout_s=timeout_s, quiet=False)
    else:
        if state == "restart":
            aside = run_dir.with_name(f"{arm}.abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            print(f"  {run_dir} had no usable checkpoint: moved to {aside}", flush=True)
        run = _runs.launch(str(config_path(plan)), overrides, run_dir, timeout_s=timeout_s, quiet=False)
    versions = [r.get("version", 0) for r in run.records if r.get("kind") == "step"]
    done = run_state(run_dir, plan["steps"])[0] == "finished"
    print(f"  {arm}: exit {run.returncode} in {run.seconds / 60:.1f} min, last step {max(versions, default=0)}"
          f"{'' if done else ' (not finished: rerun with the same --work to continue)'}", flush=True)
    return done


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the process group this script started (the eval cleans up its vLLM child), then SIGKILL to what
    is left of the group after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_eval(model: str, config: Path, out: Path, plan: Mapping[str, Any], timeout_s: float) -> bool:
    """One ``prorl-async eval`` of ``model`` into ``out`` (log beside it); True when ``eval.json`` is there."""
    if (out / "eval.json").is_file():
        return True
    import _runs

    argv = [sys.executable, "-c", _runs._ENTRY, "eval", model, "--config", str(config), "--prompts",
            str(plan["prompts"]), "--samples", str(plan["samples"]), "--k", ",".join(str(k) for k in plan["ks"]),
            "--out", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, cwd=HERE.parent, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"  eval past {timeout_s:.0f} s: stopped", flush=True)
        _stop_group(proc)
        code = 124
    except BaseException:
        _stop_group(proc)
        raise
    ok = code == 0 and (out / "eval.json").is_file()
    print(f"  {out.relative_to(out.parents[1])}: {'done' if ok else f'failed (exit {code}), see {log}'} in "
          f"{(time.monotonic() - started) / 60:.1f} min", flush=True)
    return ok


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Complete checkpoints of a run (a loadable policy) by step."""
    from prorl_async.utils.run_dir import checkpoint_step

    root = run_dir / "checkpoints"
    found = {checkpoint_step(p): p for p in root.iterdir()} if root.is_dir() else {}
    return {s: p for s, p in found.items() if s is not None and (p / "policy" / "config.json").is_file()}


def ensure_evals(plan: Mapping[str, Any], arms: Sequence[str], work: Path, timeout_s: float) -> bool:
    """Evaluate the base and each arm's checkpoints due (:func:`eval_steps`); True when none failed."""
    from prorl_async.config import load_config

    config = eval_config(plan, work)
    jobs = [(load_config(config).model.name, work / "evals" / "base")]
    for arm in arms:
        found = checkpoints(work / "runs" / arm)
        jobs += [(str(found[s]), work / "evals" / arm / f"step-{s:06d}")
                 for s in eval_steps(list(found), plan["eval_every"], plan["steps"])]
    todo = [(m, out) for m, out in jobs if not (out / "eval.json").is_file()]
    print(f"evaluations: {len(jobs)} due, {len(todo)} to do ({plan['prompts']} prompts per task x {plan['samples']} "
          "samples)", flush=True)
    return all([run_eval(model, config, out, plan, timeout_s) for model, out in todo])


def load_eval(out: Path) -> dict[str, Any] | None:
    """An evaluation's per-prompt outcomes (``samples-LABEL.jsonl``) and its time; None before its eval.json."""
    path = out / "eval.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    label = data["model"]
    rows = [json.loads(line) for line in (out / data["models"][label]["samples_file"]).read_text().splitlines()
            if line.strip()]
    return {"dir": str(out), "seconds": data.get("seconds"),
            "outcomes": outcomes_from_rows(rows, float(data["settings"]["correct_threshold"])),
            "distinct": distinct_from_rows(rows)}


def load_work(arms: Sequence[str], work: Path) -> tuple[dict[str, Any] | None, dict[str, dict[int, Any]],
                                                          dict[str, dict[str, Any]]]:
    """The base evaluation, each arm's evaluations by step, and each arm's training series, from ``work``."""
    import _runs

    base = load_eval(work / "evals" / "base")
    evals: dict[str, dict[int, Any]] = {}
    for arm in arms:
        for d in sorted((work / "evals" / arm).glob("step-*")):  # step-N.log beside each: not a directory
            if d.is_dir() and (ev := load_eval(d)) is not None:
                evals.setdefault(arm, {})[int(d.name.removeprefix("step-"))] = ev
    training = {arm: training_series(_runs.read_records(work / "runs" / arm)) for arm in arms
                if (work / "runs" / arm / "metrics.jsonl").is_file()}
    return base, evals, training


# ----------------------------------------------------------------------------------------------- command line


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every k must be at least 1")
    return ks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Stages, arms and the tests of each claim: see the module docstring.")
    p.add_argument("--stage", choices=("runs", "eval", "report", "all"), default="all")
    p.add_argument("--work", help="work directory (default /tmp/prorl-bench/boundary/TIMESTAMP); an existing one "
                                  "is continued with its plan.json")
    p.add_argument("--arms", default="resets,no-resets", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--quick", action="store_true", help="configs/tiny.toml, 4 steps, 4 prompts x 4 samples")
    p.add_argument("--config", help="TOML config shared by the arms (default configs/boundary.toml)")
    p.add_argument("--set", dest="overrides", action="append", help="config override for every arm (repeatable)")
    p.add_argument("--steps", type=int, help="run.max_steps of each arm (default 24)")
    p.add_argument("--reset-every", type=int, help="reset.interval_steps of the resets arm (default steps / 4)")
    p.add_argument("--checkpoint-every", type=int, help="run.checkpoint_every_steps (default steps / 4)")
    p.add_argument("--eval-every", type=int, help="evaluate checkpoints at multiples of this (default steps / 2)")
    p.add_argument("--val-every", type=int, help="in-run validation every this many steps (default steps / 6)")
    p.add_argument("--prompts", type=int, help="held-out prompts per task per evaluation (default 32)")
    p.add_argument("--samples", type=int, help="samples per prompt per evaluation (default 64)")
    p.add_argument("--k", type=_ks, dest="ks", help="pass@k values (default 1,2,4,8,16,32,64)")
    p.add_argument("--run-timeout-s", type=float, help="per arm and invocation (default steps x 180 s + 30 min); "
                                                       "past it the run is stopped with a checkpoint")
    p.add_argument("--eval-timeout-s", type=float, default=4 * 3600.0, help="per evaluation (default 4 h)")
    p.add_argument("--json", metavar="PATH", help="results (default PREFIX.json)")
    p.add_argument("--plot-prefix", metavar="PREFIX", help="figures PREFIX-NAME.png (default "
                                                           "bench/results/boundary-DATE; --quick: WORK/results/quick)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise SystemExit(f"boundary: --arms {args.arms!r}: known arms are {', '.join(ARMS)}")
    given = {k: getattr(args, k) for k in ("config", "overrides", "steps", "reset_every", "checkpoint_every",
                                           "eval_every", "val_every", "prompts", "samples", "ks")
             if getattr(args, k) is not None}
    if args.quick:
        given["quick"] = True
    if "config" in given:
        given["config"] = str(Path(given["config"]).resolve())
    work = Path(args.work or f"/tmp/prorl-bench/boundary/{time.strftime('%Y%m%d-%H%M%S')}")
    plan_file = work / "plan.json"
    plan = settle_plan(json.loads(plan_file.read_text()) if plan_file.is_file() else None, given)

    import _runs
    from _boundary_plots import write_figures

    from prorl_async.config import load_config

    cfg = load_config(config_path(plan), common_overrides(plan))
    if plan["prompts"] > cfg.tasks.validation_size:
        raise SystemExit(f"boundary: --prompts {plan['prompts']} exceeds the config's tasks.validation_size "
                         f"({cfg.tasks.validation_size})")
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(plan, indent=2) + "\n")
    machine = _runs.machine_header("bench/boundary.py: does prolonged RL expand the reasoning boundary here?")
    print(f"work {work}; arms {', '.join(arms)}; {plan['steps']} steps each, resets every {plan['reset_every']} "
          f"(resets arm), checkpoints every {plan['checkpoint_every']}, validation every {plan['val_every']}; evals "
          f"at multiples of {plan['eval_every']}: {plan['prompts']} prompts per task x {plan['samples']} samples, k "
          f"{','.join(map(str, plan['ks']))}; model {cfg.model.name}, {len(cfg.tasks.mix)} task(s)", flush=True)
    ok = True
    if args.stage in ("runs", "all"):
        timeout = args.run_timeout_s or plan["steps"] * 180.0 + 1800.0
        ok = all([ensure_run(plan, arm, work, timeout) for arm in arms])
    if args.stage in ("eval", "all"):
        ok = ensure_evals(plan, arms, work, args.eval_timeout_s) and ok
    if args.stage in ("report", "all"):
        prefix = args.plot_prefix or (work / "results" / "quick" if plan["quick"]
                                      else HERE / "results" / f"boundary-{time.strftime('%Y%m%d')}")
        base, evals, training = load_work(arms, work)
        analysis = analyse(base, evals, training, plan)
        figures = write_figures(analysis, plan, prefix)
        _runs.write_json(args.json or f"{prefix}.json", {
            "plan": plan, "arms": arms, "work": str(work), "machine": machine, "model": cfg.model.name,
            "tasks": [f"{s.domain}/{s.name}" for s in cfg.tasks.mix], "figures": figures,
            "evals": {"base": base and {k: base[k] for k in ("dir", "seconds")},
                      **{f"{arm} step {s}": {k: ev[k] for k in ("dir", "seconds")} for arm, by_step in evals.items()
                         for s, ev in sorted(by_step.items())}},
            **analysis})
        print(f"end = the {analysis['main_arm']} arm at step {plan['steps']}; a difference counts beyond {Z:g} SE")
        print(verdict_table(analysis["verdicts"], figures))
        if analysis["diversity"]:
            print(diversity_table(analysis["diversity"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
