"""Base-model pass@1 per task of a config, with vLLM: is there a learnable signal before training?

GRPO learns only from groups whose rewards differ, so a default task must sit in the useful middle: a
base pass@1 far from 0 and 1, and many groups with mixed rewards. This script renders the config's own
prompts (chat template, few-shot turns, prefill), samples them with the config's sampling settings and
scores them with the project's reward functions — exactly what a training run's generators do.

    python bench/calibrate.py [CONFIG] [--set k=v ...] [--prompts 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, machine_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--prompts", type=int, default=32, help="validation prompts per task")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    from prorl_async.config import load_config

    cfg = load_config(args.config, args.overrides)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.generator.kv_cache_gib))
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from prorl_async.envs.score import score
    from prorl_async.envs.tasks import TaskMix, render_prompt
    from prorl_async.models import resolve_model

    model_dir = str(resolve_model(cfg.model.name))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(model=model_dir, dtype=cfg.model.dtype, enforce_eager=True, max_model_len=cfg.model.max_model_len)
    s = cfg.sampling
    params = SamplingParams(n=s.group_size, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                            max_tokens=s.max_response_tokens, stop=s.stop or None)
    mix = TaskMix(cfg.tasks)
    rows = []
    for i, spec in enumerate(cfg.tasks.mix):
        tasks = mix.validation_tasks(i)[: args.prompts]
        prompts = [render_prompt(tokenizer, t, cfg.tasks) for t in tasks]
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        per_prompt, tokens, samples = [], 0, 0
        for task, out in zip(tasks, outputs, strict=True):
            rewards = [score(cfg.tasks.prefill + c.text, task)[0] for c in out.outputs]
            per_prompt.append(sum(rewards) / len(rewards))
            tokens += sum(len(c.token_ids) for c in out.outputs)
            samples += len(out.outputs)
        rows.append({
            "task": f"{spec.domain}/{spec.name}", "params": spec.params, "prompts": len(tasks),
            "pass_at_1": sum(per_prompt) / len(per_prompt),
            "groups_with_signal": sum(0 < p < 1 for p in per_prompt) / len(per_prompt),
            "never_solved": sum(p == 0 for p in per_prompt) / len(per_prompt),
            "response_tokens_mean": tokens / samples,
            "prompt_tokens_mean": sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts),
            "tokens_per_s": tokens / seconds,
        })
    weights = [spec.weight for spec in cfg.tasks.mix]
    mean = sum(r["pass_at_1"] * w for r, w in zip(rows, weights, strict=True)) / sum(weights)
    info = machine_info()
    print(f"machine: {describe(info)}; model {cfg.model.name}; T={s.temperature}, n={s.group_size}, "
          f"few_shot={cfg.tasks.few_shot}, prefill={cfg.tasks.prefill!r}")
    print(f"{'task':28s} {'pass@1':>7s} {'mixed groups':>13s} {f'0 of {s.group_size}':>8s} {'prompt tok':>10s} "
          f"{'resp tok':>8s} {'tok/s':>7s}")
    for r in rows:
        print(f"{r['task']:28s} {r['pass_at_1']:7.3f} {r['groups_with_signal']:13.2f} {r['never_solved']:8.2f} "
              f"{r['prompt_tokens_mean']:10.0f} {r['response_tokens_mean']:8.1f} {r['tokens_per_s']:7.0f}")
    print(f"{'mix (by weight)':28s} {mean:7.3f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": info, "pass_at_1": mean, "tasks": rows}, f, indent=2)


if __name__ == "__main__":
    main()
