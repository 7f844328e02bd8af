"""Tokens/s of the generator process (engine + scoring + sending) against raw vLLM offline generation.

Both sides use the same model, prompts (the run's chain_sum prompts), sampling (n, temperature, max tokens)
and engine settings, in the same run:

- raw: ``vllm.LLM.generate`` on ``--prompts`` prompts x n in one call, in a child process (vLLM's offline API);
  tokens/s = generated tokens / wall time of the ``generate`` call;
- generator: ``python -m prorl_async.generator`` against a learner played by this process (PULL + XPUB): once
  the generator says Ready, ``--warmup`` groups are requested and awaited; then every measured group is requested
  at once (``GroupRequest`` for the next problems; no weights change, so nothing waits on admission), like the raw
  side's one call; tokens/s = response tokens of the measured groups / time from their requests to the last one
  received. (Timing from the first measured group *received* instead, as this bench did between the learner taking
  over the requests and 2026-12-03, leaves out most of the generation when all groups run at once: it read 6.9x.)

The tiny model generates ~6k tokens/s here, so its default is 128 prompts/groups (~15 s a side); 32 made the
measurement 3 s long and noisy. SmolLM2 keeps 32 (~75 s a side).

    python bench/generator.py                        # tiny-random and smollm2-135m-instruct
    python bench/generator.py --models tiny-random --json out.json

``--json`` writes every row and, top level, ``ratio_to_raw_vllm``: the lowest generator/raw ratio over the
models (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, machine_info

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prorl_async.config import Config, write_resolved  # noqa: E402


def bench_config(model: str, run_dir: Path, n: int, max_tokens: int, inflight: int, batches: int) -> Config:
    """The run config of one model; ``batches``: how many batches of ``inflight`` groups the bench will take."""
    return Config.model_validate({
        "run": {"run_dir": str(run_dir), "seed": 0},
        "model": {"name": model, "max_model_len": 512},
        "tasks": {"mix": [{"name": "chain_sum", "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                           "max_digits": 1}}],
                  "train_size": 2000, "validation_size": 4, "prefill": "<answer>"},
        "sampling": {"group_size": n, "temperature": 1.0, "max_response_tokens": max_tokens},
        "generator": {"max_inflight_groups": inflight, "reward_workers": 1, "heartbeat_s": 1.0},
        # the bench never sends weights: a bound above the batches measured keeps admission out of the way
        "buffer": {"max_staleness": batches + 1},
        "learner": {"batch_groups": inflight},
    })


RAW = r"""
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
args = json.loads(sys.argv[1])
llm = LLM(model=args["model"], dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
          logprobs_mode="processed_logprobs", disable_log_stats=True)
params = SamplingParams(n=args["n"], temperature=1.0, max_tokens=args["max_tokens"], logprobs=0)
prompts = [TokensPrompt(prompt_token_ids=p) for p in args["prompts"]]
llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
t = time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
dt = time.perf_counter() - t
tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
print("@@raw " + json.dumps({"tokens": tokens, "seconds": dt}), flush=True)
"""


def prompts_of(cfg: Config, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from prorl_async.envs.tasks import TaskMix, render_prompt
    from prorl_async.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model.name))
    mix = TaskMix(cfg.tasks)
    return [tok.encode(render_prompt(tok, mix.train_task(i), cfg.tasks), add_special_tokens=False)
            for i in range(count)]


def run_raw(cfg: Config, prompts: list[list[int]]) -> dict:
    from prorl_async.models import resolve_model

    args = {"model": str(resolve_model(cfg.model.name)), "n": cfg.sampling.group_size,
            "max_tokens": cfg.sampling.max_response_tokens, "prompts": prompts}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = subprocess.run([sys.executable, "-c", RAW, json.dumps(args)], capture_output=True, text=True, env=env,
                         check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("@@raw ")), None)
    if line is None:
        raise RuntimeError(f"raw vLLM run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    r = json.loads(line[6:])
    return {**r, "tokens_per_s": r["tokens"] / r["seconds"]}


def run_generator(cfg: Config, config_path: Path, groups: int, warmup: int) -> dict:
    import zmq

    from prorl_async.transport.messages import (
        GroupRequest,
        Ready,
        Status,
        Stop,
        TrajectoryGroup,
        WeightsReady,
        decode,
        encode,
    )
    from prorl_async.transport.sockets import Transport, bound_endpoint

    with Transport(cfg.transport) as transport:
        pull = transport.socket(zmq.PULL, transport.endpoint("groups"), bind=True, groups=True)
        xpub = transport.socket(zmq.XPUB, transport.endpoint("control"), bind=True)
        latest = encode(WeightsReady(0))
        proc = subprocess.Popen(
            [sys.executable, "-m", "prorl_async.generator", "--config", str(config_path), "--generator-id", "0",
             "--groups", bound_endpoint(pull), "--control", bound_endpoint(xpub)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        received, tokens, t_first, t_last, last_metrics = 0, 0, 0.0, 0.0, {}

        def request(indices: range) -> None:
            for i in indices:
                xpub.send_multipart(encode(GroupRequest(generator_id=0, request_id=i, spec=0, index=i, epoch=0,
                                                        min_version=0)))

        try:
            deadline = time.monotonic() + 900
            while received < warmup + groups and time.monotonic() < deadline and proc.poll() is None:
                for sock, _ in poller.poll(100):
                    if sock is xpub:
                        if xpub.recv()[:1] == b"\x01":
                            xpub.send_multipart(latest)
                        continue
                    msg = decode(pull.recv_multipart())
                    if isinstance(msg, Ready):
                        request(range(warmup) if warmup else range(warmup + groups))
                        t_first = time.perf_counter()
                    if isinstance(msg, Status):
                        last_metrics = msg.values
                    if not isinstance(msg, TrajectoryGroup):
                        continue
                    received += 1
                    if received == warmup:  # the warm-up is in: the measured groups start now, all at once
                        request(range(warmup, warmup + groups))
                        t_first = time.perf_counter()
                    elif received > warmup:
                        tokens += msg.num_tokens
                        t_last = time.perf_counter()
            xpub.send_multipart(encode(Stop("bench done")))
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()  # only the process this bench started
    if received < warmup + groups:
        raise RuntimeError(f"the generator sent {received} groups of {warmup + groups}")
    seconds = t_last - t_first
    return {"groups": groups, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "score_seconds": last_metrics.get("score_seconds"), "score_ok": last_metrics.get("score_ok")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny-random,smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, help="raw: prompts in the one generate call (default: tiny 128, else 32)")
    p.add_argument("--groups", type=int, help="generator: groups measured after the warm-up (default as --prompts)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            default = 128 if model == "tiny-random" else 32
            prompts, groups = args.prompts or default, args.groups or default
            batches = -(-(groups + args.warmup) // args.inflight)
            cfg = bench_config(model, Path(tmp) / "run", args.n, args.max_tokens, args.inflight, batches)
            config_path = write_resolved(cfg, Path(tmp) / "run")
            raw = run_raw(cfg, prompts_of(cfg, prompts))
            gen = run_generator(cfg, config_path, groups, args.warmup)
        row = {"model": model, "n": args.n, "max_tokens": args.max_tokens, "raw_tokens_per_s": raw["tokens_per_s"],
               "generator_tokens_per_s": gen["tokens_per_s"], "ratio": gen["tokens_per_s"] / raw["tokens_per_s"],
               "raw": raw, "generator": gen}
        rows.append(row)
        print(f"{model:24s} raw {raw['tokens_per_s']:9.0f} tok/s   generator {gen['tokens_per_s']:9.0f} tok/s   "
              f"ratio {row['ratio']:.2f}", flush=True)
    machine = machine_info()
    print(f"machine: {describe(machine)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ratio_to_raw_vllm": min(r["ratio"] for r in rows), "machine": machine,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
