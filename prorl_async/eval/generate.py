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
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prorl_async.config import Config
    from prorl_async.envs.tasks import Task


def max_tokens(cfg: Config) -> int:
    return cfg.eval.max_response_tokens or cfg.sampling.max_response_tokens


def generate(cfg: Config, model_dir: str, tasks: list[Task]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample ``cfg.eval.samples`` completions for each task; returns (records in task order, timings).

    Rendered and sampled by the generator's own rollout functions (:mod:`prorl_async.generator.rollout`,
    :mod:`prorl_async.generator.engine`): a prompt is measured here exactly as training and validation sample it.
    """
    from transformers import AutoTokenizer

    from prorl_async.generator import rollout
    from prorl_async.generator.engine import Sampling, generate_offline

    sampling = Sampling.evaluation(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records: list[dict[str, Any]] = []
    prompts, slots = [], []
    for task in tasks:
        ids = rollout.render(tokenizer, task, cfg, sampling.max_tokens)
        if ids is None:
            records.append({"id": task.id, "skipped": f"prompt + {sampling.max_tokens} response tokens exceeds "
                                                      f"model.max_model_len {cfg.model.max_model_len}"})
            continue
        slots.append(len(records))
        records.append({"id": task.id, "prompt_tokens": len(ids)})
        prompts.append(ids)
    groups, meta = generate_offline(cfg, model_dir, prompts, sampling)
    tokens = 0
    for slot, completions in zip(slots, groups, strict=True):
        records[slot]["completions"] = [{"text": c.text, "tokens": len(c.token_ids), "finish_reason": c.finish_reason}
                                        for c in completions]
        tokens += sum(len(c.token_ids) for c in completions)
    generate_s = meta["generate_s"]
    meta.update(tokens=tokens, prompt_tokens=sum(records[slot]["prompt_tokens"] for slot in slots) * sampling.n,
                tokens_per_s=tokens / generate_s if generate_s > 0 else 0.0, prompts=len(prompts),
                skipped=len(tasks) - len(prompts))
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
    from prorl_async.utils.fs import write_atomic

    cfg = load_config(args.config)
    tasks = [Task.from_dict(t) for t in json.loads(Path(args.tasks).read_text())]
    records, meta = generate(cfg, args.model, tasks)
    lines = [json.dumps(record) for record in [*records, {"meta": meta}]]
    write_atomic(Path(args.out), "\n".join(lines) + "\n")  # the file exists only once it is complete
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
