"""Wall-clock to the same held-out pass@1: TRL's GRPOTrainer against this trainer, each for the same time.

    python bench/peers_learning.py --budget-s 1800 --json bench/results/peers-learning-DATE.json \\
        --plot bench/results/peers-learning-DATE.png
    python bench/peers_learning.py --quick          # tiny-random model, a few minutes: checks the pipeline only

What it measures: how long each trainer takes, from its process start, to reach the best held-out pass@1 TRL
reaches within its run. Both train the config's model (the embedded default: SmolLM2-135M on chain_sum and
letter_counting) for ``--budget-s`` seconds with the same sampling, group size, samples per step, learning rate and
clip range (TRL's settings are ``peers.py``'s; the TRL run stops at the first step past the budget), on the same
rendered prompts, scored by the same verifiers. Both sides run with ``sampling.stop=[]`` (TRL's ``generate`` cannot
stop on a string), and this side without in-run validation (TRL has none either). ``--ours-set`` changes this side
only: ``--ours-set 'sampling.stop=["</answer>"]'`` lets it stop at its answer tag as the default does, the measure
unchanged (every policy is evaluated with the shared config); with ``--trl-from EARLIER.json`` TRL's side, the base
and the evaluation config come from an earlier run of this script, so only this side trains again; with
``--ours-from EARLIER.json`` as well this side's checkpoints and their times come from it too, and only the
evaluations run again (after they failed, or to measure them otherwise).

Along the way TRL saves its policy every ``--trl-save-every-s`` of training (the seconds spent saving are left out
of its clock) and this side writes a checkpoint every ``--checkpoint-every`` steps (the time spent writing counts
against it). Afterwards one ``prorl-async eval`` per saved policy, the base model included, measures pass@1 on the
same held-out prompts (``--prompts`` per task of the validation split, ``--samples`` per prompt, at
``eval.temperature``): the same measure for every point of both curves, each on one weight version.

The figure: ``trl_best`` (the highest pass@1 among TRL's saves), the first save of each side at or above it, and
``speedup`` = TRL's seconds to it / this side's. A side is only seen where it saved, so each time is an upper bound
(the true crossing lies between the save before and this one): the JSON has both. With 64 prompts x 4 samples per
task, pass@1 moves by about +-0.03 between evaluations of the same weights: read a crossing within that as a tie.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FULL = {"config": None, "budget_s": 1800.0, "trl_save_every_s": 300.0, "checkpoint_every": 4, "prompts": 64,
        "samples": 4}
TRL_KEYS = ("points", "trl_steps", "trl_settings", "trl_install_s", "trl_versions", "trl_raw")
"""TRL's side; the JSON holds ``points`` as ``sides.trl`` (``--trl-from`` reads it back)."""
QUICK = {"config": "configs/tiny.toml", "budget_s": 120.0, "trl_save_every_s": 40.0, "checkpoint_every": 100,
         "prompts": 8, "samples": 2}


def first_reaching(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The earliest point (by ``seconds``) whose ``pass_at_1`` is at least ``target``; None when none is."""
    for point in sorted(points, key=lambda p: p["seconds"]):
        if point["pass_at_1"] is not None and point["pass_at_1"] >= target:
            return point
    return None


def crossing(points: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """When a side reached ``target``: its first point at or above it (``seconds``, an upper bound) and the point
    before it (``after_s``, a lower bound)."""
    hit = first_reaching(points, target)
    if hit is None:
        return {"seconds": None, "after_s": None, "label": None}
    earlier = [p["seconds"] for p in points if p["seconds"] < hit["seconds"]]
    return {"seconds": hit["seconds"], "after_s": max(earlier) if earlier else 0.0, "label": hit["label"]}


def compare(base: float, trl: list[dict[str, Any]], ours: list[dict[str, Any]]) -> dict[str, Any]:
    """TRL's best pass@1 and when each side first reached it; ``speedup`` = TRL's seconds / ours."""
    scored = [p for p in trl if p["pass_at_1"] is not None]
    if not scored:
        return {"trl_best": None, "base": base, "trl": None, "ours": None, "speedup": None}
    best = max(p["pass_at_1"] for p in scored)
    trl_at, ours_at = crossing(trl, best), crossing(ours, best)
    speedup = trl_at["seconds"] / ours_at["seconds"] if trl_at["seconds"] and ours_at["seconds"] else None
    return {"trl_best": best, "base": base, "trl": trl_at, "ours": ours_at, "speedup": speedup,
            "ours_best": max((p["pass_at_1"] for p in ours if p["pass_at_1"] is not None), default=None)}


def pass_at_1(eval_json: Path) -> tuple[float | None, dict[str, float]]:
    """Overall and per-task pass@1 of a one-model ``eval.json``."""
    data = json.loads(eval_json.read_text())
    [results] = data["results"].values()
    tasks = {t["label"] for t in data["tasks"]}
    return (results["all"]["pass_at_k"].get("1"),
            {k: v["pass_at_k"].get("1") for k, v in results.items() if k in tasks})


def evaluate(model: str, config: Path, out: Path, plan: dict[str, Any], **point: Any) -> dict[str, Any]:
    """``point`` (label, seconds, step) with the overall and per-task pass@1 of one ``prorl-async eval`` of
    ``model`` on ``config``'s held-out prompts (None and {} when the evaluation failed)."""
    import _runs

    argv = [sys.executable, "-c", _runs._ENTRY, "eval", model, "--config", str(config), "--prompts",
            str(plan["prompts"]), "--samples", str(plan["samples"]), "--k", f"1,{plan['samples']}", "--out", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    with log.open("wb") as sink:
        code = subprocess.run(argv, cwd=HERE.parent, stdout=sink, stderr=subprocess.STDOUT).returncode
    score, tasks = None, {}
    if code != 0 or not (out / "eval.json").exists():
        print(f"  eval of {model} failed (exit {code}); see {log}", flush=True)
    else:
        score, tasks = pass_at_1(out / "eval.json")
    return {**point, "pass_at_1": score, "by_task": tasks}


def eval_config_text(earlier: dict[str, Any]) -> str:
    """The config an earlier run of this script (``--trl-from``) evaluated every policy with: its JSON's copy
    (``eval_config_toml``) or, in a JSON without one, rebuilt as that run built it, from its config and shared
    overrides (the file it names may be gone with the run's directory)."""
    if earlier.get("eval_config_toml"):
        return str(earlier["eval_config_toml"])
    from prorl_async.config import config_to_toml, load_config

    return config_to_toml(load_config(earlier["config"], list(earlier["overrides"])))


def earlier_checkpoints(earlier: dict[str, Any]) -> list[dict[str, Any]]:
    """This side's checkpoints in an earlier run of this script (``--ours-from``) with their seconds since its
    launch; each must still exist."""
    run_dir = Path(earlier["run_dir"])
    out = []
    for p in earlier["sides"]["prorl-async"][1:]:  # the base first
        path = p.get("path") or str(run_dir / "checkpoints" / f"step-{int(p['step']):06d}")
        if not Path(path).is_dir():
            raise SystemExit(f"peers_learning: --ours-from: the checkpoint of step {p['step']} ({path}) is gone; "
                             "train this side again (without --ours-from)")
        out.append({"path": path, "step": p["step"], "seconds": p["seconds"]})
    return out


def our_checkpoints(records: list[dict[str, Any]], launched_epoch: float) -> list[dict[str, Any]]:
    """This side's checkpoints with their seconds since the run was launched."""
    return [{"path": r["path"], "step": r.get("version"), "seconds": r["time_s"] - launched_epoch}
            for r in records if r.get("kind") == "event" and r.get("event") == "checkpoint" and r.get("path")]


def main() -> int:
    import _runs

    from prorl_async.config import config_to_toml, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-random model (configs/tiny.toml), minutes")
    parser.add_argument("--config", help="TOML config (default: the embedded default; --quick: configs/tiny.toml)")
    parser.add_argument("--budget-s", type=float, help="training seconds per side (default 1800)")
    parser.add_argument("--trl-save-every-s", type=float, help="TRL saves its policy this often (default 300)")
    parser.add_argument("--checkpoint-every", type=int, help="this side's checkpoint interval in steps (default 4)")
    parser.add_argument("--prompts", type=int, help="held-out prompts per task (default 64)")
    parser.add_argument("--samples", type=int, help="samples per prompt (default 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides (both sides)")
    parser.add_argument("--ours-set", dest="ours_overrides", action="append", default=[],
                        help="overrides for this side only, e.g. 'sampling.stop=[\"</answer>\"]' (its own stop)")
    parser.add_argument("--trl-from", metavar="JSON", help="take TRL's side, the base and the evaluation config "
                        "from an earlier run of this script (its --json) instead of training TRL again")
    parser.add_argument("--ours-from", metavar="JSON", help="take this side's run (its checkpoints and their "
                        "times) from an earlier run of this script and only evaluate them again, e.g. after its "
                        "evaluations failed; needs --trl-from (it may name the same file)")
    parser.add_argument("--venv", default=str(Path.home() / ".cache" / "prorl-async" / "bench" / "trl-venv"),
                        help="TRL's own virtual environment (created when missing)")
    parser.add_argument("--out-dir", default="/tmp/prorl-bench/peers-learning", help="runs and evaluations go here")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PNG", help="pass@1 against wall-clock, both sides")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    for key in ("config", "budget_s", "trl_save_every_s", "checkpoint_every", "prompts", "samples"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.ours_from and not args.trl_from:
        parser.error("--ours-from needs --trl-from (the same file will do)")
    earlier = json.loads(Path(args.trl_from).read_text()) if args.trl_from else None
    ours_from = json.loads(Path(args.ours_from).read_text()) if args.ours_from else None
    if earlier is not None:  # the same measure as the earlier run, or the two sides do not compare
        plan.update({k: earlier["plan"][k] for k in ("config", "budget_s", "prompts", "samples")})
    config, budget = plan["config"], float(plan["budget_s"])
    # Both sides without a stop string unless --ours-set gives this side one: TRL's generate() cannot stop on one.
    overrides = ["sampling.stop=[]", *args.overrides, "run.max_steps=0", f"run.time_budget_s={budget}",
                 f"run.checkpoint_every_steps={plan['checkpoint_every']}", "eval.every_steps=0",
                 "eval.every_minutes=0", "eval.at_start=false"]
    cfg = load_config(config, overrides)
    machine = _runs.machine_header("bench/peers_learning.py: wall-clock to the same held-out pass@1, TRL vs this")
    work = Path(args.out_dir) / time.strftime("%Y%m%d-%H%M%S")
    samples_per_step = cfg.learner.batch_groups * cfg.sampling.group_size
    print(f"model {cfg.model.name}; {budget:.0f} s per side; {samples_per_step} samples per step (group "
          f"{cfg.sampling.group_size}), <= {cfg.sampling.max_response_tokens} response tokens", flush=True)
    # Every policy of both sides is evaluated with this: the shared config (without --ours-set), or the earlier
    # run's. Written and loaded before any training: a config that does not load fails here, not in 30 minutes.
    eval_config = work / "eval-config.toml"
    eval_config.parent.mkdir(parents=True, exist_ok=True)
    eval_config.write_text(config_to_toml(cfg) if earlier is None else eval_config_text(earlier))
    load_config(str(eval_config))
    if earlier is None:
        trl = trl_side(cfg, plan, Path(args.venv), work, eval_config)
    else:
        trl = {k: earlier[k] for k in TRL_KEYS if k != "points"}
        trl.update(points=earlier["sides"]["trl"], returncode=earlier["trl_raw"].get("returncode", 0))
        print(f"TRL's side from {args.trl_from}: {trl['trl_steps']} steps, {len(trl['points']) - 1} saves", flush=True)

    if ours_from is None:
        print("prorl-async run...", flush=True)
        launched = time.time()
        ours_overrides = list(args.ours_overrides)
        run = _runs.launch(config, [*overrides, *ours_overrides], work / "prorl-async", timeout_s=budget + 900.0,
                           quiet=False)
        checkpoints = our_checkpoints(run.records, launched)
        steps = sum(r.get("kind") == "step" for r in run.records)
        run_dir, run_code = work / "prorl-async", run.returncode
        print(f"  prorl-async: exit {run_code} in {run.seconds:.0f} s, {steps} steps, {len(checkpoints)} "
              "checkpoints", flush=True)
    else:
        checkpoints, steps = earlier_checkpoints(ours_from), ours_from["ours_steps"]
        run_dir, run_code = Path(ours_from["run_dir"]), ours_from.get("ours_returncode", 0)
        ours_overrides = list(ours_from.get("ours_overrides") or [])
        print(f"this side's run from {args.ours_from}: {steps} steps, {len(checkpoints)} checkpoints in {run_dir}",
              flush=True)
    print(f"evaluating {len(checkpoints)} checkpoints on the held-out prompts...", flush=True)
    ours = [evaluate(c["path"], eval_config, work / "evals" / f"ours-step-{c['step']}", plan,
                     label=f"step {c['step']}", seconds=c["seconds"], step=c["step"], path=c["path"])
            for c in checkpoints]
    sides: dict[str, list[dict[str, Any]]] = {"trl": trl["points"], "prorl-async": [dict(trl["points"][0]), *ours]}
    base = trl["points"][0]["pass_at_1"]
    for name, points in sides.items():
        print(f"{name}: " + ", ".join(f"{p['seconds']:.0f} s {_runs.fmt(p['pass_at_1'])}" for p in points))
    result = compare(base if base is not None else float("nan"), sides["trl"], sides["prorl-async"])
    ours_at, trl_at = result["ours"] or {}, result["trl"] or {}
    print(_runs.table(["side", "best pass@1", "first at TRL's best (s)", "previous save (s)"], [
        ["trl", result["trl_best"], trl_at.get("seconds"), trl_at.get("after_s")],
        ["prorl-async", result.get("ours_best"), ours_at.get("seconds"), ours_at.get("after_s")]], digits=3))
    print(f"base pass@1 {_runs.fmt(base)}; TRL's best {_runs.fmt(result['trl_best'])}; wall-clock speedup to it "
          f"{_runs.fmt(result['speedup'], 2)}x (goal >= 10)")
    if args.plot:
        _runs.plot_lines(Path(args.plot), [{
            "title": "held-out pass@1 against wall-clock", "xlabel": "minutes since the process started",
            "ylabel": "pass@1 (prorl-async eval)", "legend": ["TRL GRPOTrainer", "prorl-async"],
            "series": [[(p["seconds"] / 60, _nan(p["pass_at_1"])) for p in sides[name]]
                       for name in ("trl", "prorl-async")]}])
    _runs.write_json(args.json, {
        **result, "sides": sides, "budget_s": budget, "plan": plan, "machine": machine, "config": config,
        "overrides": overrides, "ours_overrides": ours_overrides, "trl_from": args.trl_from,
        "ours_from": args.ours_from, "eval_config": str(eval_config), "eval_config_toml": eval_config.read_text(),
        "model": cfg.model.name,
        "samples_per_step": samples_per_step, "ours_steps": steps, "ours_returncode": run_code, "run_dir": str(run_dir),
        **{k: trl[k] for k in TRL_KEYS if k != "points"}})
    return 0 if trl["returncode"] == 0 and run_code == 0 and base is not None else 1


def trl_side(cfg: Any, plan: dict[str, Any], venv: Path, work: Path, eval_config: Path) -> dict[str, Any]:
    """TRL's time-boxed run (installing its environment when missing), then the evaluation of the base and of each
    save on ``eval_config``: ``points`` (the base first) and the ``TRL_KEYS`` written to the JSON, which
    ``--trl-from`` reads back."""
    import peers

    python, install_s = peers.ensure_trl_venv(venv)
    dataset = work / "prompts.jsonl"
    # Prompts enough for the budget at any pace TRL reaches here (one step takes batch_groups of them).
    model_dir = peers.write_dataset(cfg, 4096 * cfg.learner.batch_groups // 8, dataset)
    print("TRL GRPOTrainer...", flush=True)
    settings = peers.trl_settings(cfg)
    trl = peers.run_trl(python, settings, cfg.tasks.prefill, model_dir, dataset, 100_000, work,
                        time_budget_s=float(plan["budget_s"]), save_every_s=float(plan["trl_save_every_s"]),
                        save_dir=str(work / "trl-saves"))
    saves = trl.get("saves", [])
    print(f"  TRL: exit {trl['returncode']} in {trl['wall_s']:.0f} s, {len(trl.get('step_ends', []))} steps, "
          f"{len(saves)} saves; evaluating them and the base on the held-out prompts...", flush=True)
    evals = work / "evals"
    points = [evaluate(str(model_dir), eval_config, evals / "base", plan, label="base", seconds=0.0)]
    points += [evaluate(s["path"], eval_config, evals / f"trl-step-{s['step']}", plan, label=f"trl step {s['step']}",
                        seconds=s["process_s"], step=s["step"]) for s in saves]
    return {"points": points, "trl_steps": len(trl.get("step_ends", [])),
            "trl_settings": settings, "trl_install_s": install_s,
            "trl_versions": {k: trl.get(k) for k in ("trl", "transformers", "torch")},
            "trl_raw": {k: v for k, v in trl.items() if k != "settings"}, "returncode": trl["returncode"]}


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
