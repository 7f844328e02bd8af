"""The generation step of ``prorl-async eval``: one model, every prompt, n samples each, with vLLM's offline ``LLM``.

Run by :mod:`prorl_async.eval.run` in a process of its own (one per model, so that two models never
share an interpreter and the CLI process never imports torch or vllm)::

    python -m prorl_async.eval.generate --config OUT/config.toml --model MODEL_DIR \\
        --tasks OUT/tasks.json --out OUT/generations-LABEL.jsonl

Prompts are rendered exactly as a training run's generators render them (chat template, few-shot turns,
prefill); sampling uses ``eval.temperature``/``eval.top_p``/``eval.top_k``, ``eval.samples`` completions per
prompt, ``eval.max_response_tokens`` (0: ``sampling.max_response_tokens``) and ``sampling.stop``. The
engine is seeded with ``run.seed`` (per-request seeds crash vLLM's CPU build: "CPU Generator does not use
offset"). Output: one JSON line per task, in the order of ``tasks.json``: ``{"id", "prompt_tokens",
"completions": [{"text", "tokens", "finish_reason"}]}`` or ``{"id", "skipped": reason}``; then a last line
``{"meta": {...}}`` with timings. Exit code 0, or 1 with the error on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.envs.tasks import Task


def max_tokens(cfg: Config) -> int:
    return cfg.eval.max_response_tokens or cfg.sampling.max_response_tokens


def generate(cfg: Config, model_dir: str, tasks: list[Task]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample ``cfg.eval.samples`` completions for each task; returns (records in task order, timings)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.generator.kv_cache_gib)))  # int GiB only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        # On CPU, the engine in this process: no engine-core and worker processes that import torch and vllm
        # again (on a loaded 2-core machine they took a minute to start, in-process seconds). With a GPU, vLLM's
        # default engine process overlaps scheduling with the device. An explicit setting in the environment wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from prorl_async.envs.tasks import render_prompt

    e, limit = cfg.eval, max_tokens(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records: list[dict[str, Any]] = []
    prompts, slots = [], []
    for task in tasks:
        ids = tokenizer.encode(render_prompt(tokenizer, task, cfg.tasks), add_special_tokens=False)
        if len(ids) + limit > cfg.model.max_model_len:
            records.append({"id": task.id, "skipped": f"prompt of {len(ids)} tokens + {limit} response tokens "
                                                      f"exceeds model.max_model_len {cfg.model.max_model_len}"})
            continue
        slots.append(len(records))
        records.append({"id": task.id, "prompt_tokens": len(ids)})
        prompts.append(TokensPrompt(prompt_token_ids=ids))
    start = time.perf_counter()
    executor = {"distributed_executor_backend": "uni"} if in_process else {}
    llm = LLM(model=model_dir, dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len,
              enforce_eager=cfg.generator.enforce_eager, gpu_memory_utilization=cfg.generator.gpu_memory_utilization,
              seed=cfg.run.seed, disable_log_stats=True, **executor)
    engine_s = time.perf_counter() - start
    params = SamplingParams(n=e.samples, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, max_tokens=limit,
                            stop=list(cfg.sampling.stop) or None)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
    generate_s = time.perf_counter() - start
    tokens = 0
    for slot, out in zip(slots, outputs, strict=True):
        if len(out.outputs) != e.samples:
            raise RuntimeError(f"vLLM returned {len(out.outputs)} of {e.samples} samples for {records[slot]['id']}")
        records[slot]["completions"] = [
            {"text": c.text, "tokens": len(c.token_ids), "finish_reason": str(c.finish_reason or "abort")}
            for c in out.outputs]
        tokens += sum(len(c.token_ids) for c in out.outputs)
    meta = {"engine_start_s": engine_s, "generate_s": generate_s, "tokens": tokens, "engine_in_process": in_process,
            "prompt_tokens": sum(records[slot]["prompt_tokens"] for slot in slots) * e.samples,
            "tokens_per_s": tokens / generate_s if generate_s > 0 else 0.0,
            "prompts": len(prompts), "skipped": len(tasks) - len(prompts)}
    return records, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prorl_async.eval.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="resolved config.toml")
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--tasks", required=True, help="JSON list of Task dicts")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    args = parser.parse_args(argv)

    from prorl_async.config import load_config
    from prorl_async.envs.tasks import Task

    cfg = load_config(args.config)
    tasks = [Task.from_dict(t) for t in json.loads(Path(args.tasks).read_text())]
    records, meta = generate(cfg, args.model, tasks)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.write(json.dumps({"meta": meta}) + "\n")
    tmp.replace(out)  # the file exists only once it is complete
    return 0


if __name__ == "__main__":
    code = main()
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        # The output is complete and the engine ran in this process (no children): skip the interpreter's slow
        # teardown of vLLM's threads (seconds). An engine process, when there is one, is shut down normally.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
