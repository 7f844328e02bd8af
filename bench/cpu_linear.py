"""vLLM's CPU build: packed linear layers (its default) against unpacked ones, for generation and weight updates.

vLLM on CPU repacks every linear layer's weight into its kernels' format when the weights are loaded (oneDNN or
sgl-kernel; the plain weight is dropped), so every weight update goes through ``reload_weights``, which
rebuilds each layer and repacks it. Its own fallback, ``torch.nn.functional.linear`` on the plain weight,
keeps the weights where ``model.load_weights`` can copy new ones in place. This bench measures the trade on
this machine, in one child process per (model, mode), the modes alternating over ``--rounds``:

- generation tokens/s: ``LLM.generate`` of ``--prompts`` prompts of 64 tokens, ``--tokens`` sampled tokens
  each (fp32, ``enforce_eager``), median of 3 after a warm-up;
- weight update: the model's checkpoint from memory (no network) loaded into the engine, median of 3 after a
  warm-up: ``reload_weights`` (packed; the only correct way there) or ``model.load_weights`` (unpacked).

    python bench/cpu_linear.py                                   # tiny-random and smollm2-135m-instruct
    python bench/cpu_linear.py --models smollm2-135m-instruct --json out.json

``--json``: per model ``generation_ratio`` (unpacked / packed tokens/s) and ``update_speedup`` (packed /
unpacked update time), medians over rounds. Both modes are vLLM's own code paths; prorl-async uses the
packed default (see bench/README.md for why).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("tiny-random", "smollm2-135m-instruct")
PREFIX = "@@cpu-linear "


def child(mode: str, model_name: str, prompts: int, tokens: int) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: the patch below reaches it
    import torch
    from common import checkpoint_weights, median_seconds

    if mode == "unpacked":
        from vllm.model_executor.layers import utils as layer_utils

        def keep_plain_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
            layer.cpu_linear = torch.nn.functional.linear  # vLLM's own fallback; the weight stays

        layer_utils.dispatch_cpu_unquantized_gemm = keep_plain_weight

    from vllm import LLM, SamplingParams

    from prorl_async.models import resolve_model

    path = resolve_model(model_name)
    llm = LLM(model=str(path), dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    weights = checkpoint_weights(path, torch.float32)
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    model = runner.get_model()
    batch = [{"prompt_token_ids": [100 + (i + j) % 200 for j in range(64)]} for i in range(prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0)

    generate_s = median_seconds(lambda: llm.generate(batch, params, use_tqdm=False), 3)
    if mode == "packed":
        update_s = median_seconds(lambda: runner.reload_weights(weights_iterator=iter(list(weights.items()))), 3)
    else:
        with torch.no_grad():
            update_s = median_seconds(lambda: model.load_weights(iter(list(weights.items()))), 3)
    return {"mode": mode, "tokens_per_s": prompts * tokens / generate_s, "update_s": update_s,
            "weight_bytes": sum(t.numel() * t.element_size() for t in weights.values())}


def run_child(mode: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, model, str(args.prompts), str(args.tokens)],
                          capture_output=True, text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    raise RuntimeError(f"{mode} {model} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated built-in model names")
    parser.add_argument("--rounds", type=int, default=2, help="packed/unpacked pairs per model (alternating)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="sampled tokens per prompt")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model, prompts, tokens = args.child
        print(PREFIX + json.dumps(child(mode, model, int(prompts), int(tokens))), flush=True)
        return 0

    from common import describe, machine_info

    info = machine_info()
    rows = []
    for model in args.models.split(","):
        runs: dict[str, list[dict[str, Any]]] = {"packed": [], "unpacked": []}
        for r in range(args.rounds):
            for mode in ("packed", "unpacked") if r % 2 == 0 else ("unpacked", "packed"):
                runs[mode].append(run_child(mode, model, args))
        med = statistics.median
        row = {"model": model, "weight_bytes": runs["packed"][0]["weight_bytes"], "runs": runs,
               **{f"{m}_tokens_per_s": med(x["tokens_per_s"] for x in runs[m]) for m in runs},
               **{f"{m}_update_s": med(x["update_s"] for x in runs[m]) for m in runs}}
        row["generation_ratio"] = row["unpacked_tokens_per_s"] / row["packed_tokens_per_s"]
        row["update_speedup"] = row["packed_update_s"] / row["unpacked_update_s"]
        rows.append(row)
    print(f"vLLM CPU linear layers, packed (default) vs unpacked, medians over {args.rounds} rounds; {describe(info)}")
    print(f"{'model':<22} {'MB':>6} {'packed tok/s':>12} {'unpacked':>9} {'ratio':>6} "
          f"{'packed update ms':>16} {'unpacked':>9} {'speedup':>7}")
    for r in rows:
        print(f"{r['model']:<22} {r['weight_bytes'] / 1e6:>6.1f} {r['packed_tokens_per_s']:>12.1f} "
              f"{r['unpacked_tokens_per_s']:>9.1f} {r['generation_ratio']:>6.2f} {r['packed_update_s'] * 1e3:>16.1f} "
              f"{r['unpacked_update_s'] * 1e3:>9.1f} {r['update_speedup']:>7.1f}")
    print(f"(generation: {args.prompts} prompts x {args.tokens} tokens; update: the checkpoint from memory, "
          "reload_weights packed, model.load_weights unpacked)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "prompts": args.prompts, "tokens": args.tokens,
                                               "rounds": args.rounds, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
