"""The learner's checkpoint loads in vLLM as is, and ``Learner.weights()`` reloads into a running vLLM.

The test trains the tiny model one step and checkpoints it; then this file runs as a script in its own
process (vLLM in-process there, which also replaces ``torch.set_num_threads``: kept out of pytest):

1. ``LLM(model=CKPT/policy)`` samples groups with ``logprobs_mode="processed_logprobs"`` at temperature 1.2;
2. a learner resumed from the checkpoint trains one step on those groups (vLLM's log-probs as behaviour);
3. ``reload_weights(weights_iterator=learner.weights())`` puts the new weights into vLLM, which samples again.

The test then checks vLLM's log-probs against a transformers forward of the checkpoint (1) and against
the updated learner (3), and that the learner saw vLLM's samples as on-policy (2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TEMPERATURE = 1.2


def _samples(outputs) -> list[dict]:
    rows = []
    for out in outputs:
        for c in out.outputs:
            logprobs = [
                next(iter(step.values())).logprob if False else step[t].logprob
                for step, t in zip(c.logprobs, c.token_ids, strict=True)
            ]
            rows.append(
                {"prompt_ids": list(out.prompt_token_ids), "response_ids": list(c.token_ids), "logprobs": logprobs}
            )
    return rows


def _batch(rows: list[dict], rewards: list[float], group_size: int = 4):
    """The learner's batch of ``rows`` (``group_size`` consecutive rows share a prompt, as vLLM returns them)."""
    import numpy as np

    from prorl_async.learner.batch import build_batch
    from prorl_async.transport.messages import Sample, TrajectoryGroup

    groups = []
    for k in range(0, len(rows), group_size):
        part = rows[k : k + group_size]
        samples = [Sample(np.asarray(r["response_ids"]), np.asarray(r["logprobs"]), np.zeros(len(r["response_ids"])),
                          "stop", w) for r, w in zip(part, rewards[k : k + group_size], strict=True)]
        groups.append(TrajectoryGroup(prompt_id=f"p{k}", task="test", domain="test",
                                      prompt_token_ids=np.asarray(part[0]["prompt_ids"]), samples=samples,
                                      generator_id=0, seq=k))
    return build_batch(groups)


def _script(ckpt: Path, config_path: Path, out: Path) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: weights() tensors pass as is
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from prorl_async.config import load_config
    from prorl_async.learner.trainer import Learner

    cfg = load_config(config_path)
    llm = LLM(
        model=str(ckpt / "policy"),
        enforce_eager=True,
        dtype="float32",
        seed=0,
        max_model_len=256,
        logprobs_mode="processed_logprobs",
    )
    tokenizer = llm.get_tokenizer()
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ("What is 3 + 4?", "Reply in the form <answer>NUMBER</answer>: 12 - 5")
    ]
    prompts = [TokensPrompt(prompt_token_ids=tokenizer.encode(c, add_special_tokens=False)) for c in chats]
    params = SamplingParams(n=4, temperature=TEMPERATURE, max_tokens=12, logprobs=0, seed=1)
    before = _samples(llm.generate(prompts, params, use_tqdm=False))

    learner = Learner.load_checkpoint(ckpt, cfg)
    batch = _batch(before, [float(i % 2) for i in range(len(before))])
    metrics = learner.train_step(batch)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(learner.weights())})
    llm.reset_prefix_cache()
    after = _samples(
        llm.generate(
            prompts, SamplingParams(n=4, temperature=TEMPERATURE, max_tokens=12, logprobs=0, seed=2), use_tqdm=False
        )
    )
    learner_after = [
        lp.tolist()
        for lp in learner.logprobs(_batch(after, [0.0] * len(after)))
    ]
    out.write_text(
        json.dumps({"before": before, "metrics": metrics.as_dict(), "after": after, "learner_after": learner_after})
    )


def test_checkpoint_serves_in_vllm_and_weights_reload(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from prorl_async.config import write_resolved
    from prorl_async.learner.trainer import Learner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_learner import hf_logprobs, random_batch, tiny_config

    cfg = tiny_config(sampling={"temperature": TEMPERATURE})
    learner = Learner(cfg)
    learner.train_step(random_batch(seed=31))  # weights differ from the built-in model's
    ckpt = learner.save_checkpoint(tmp_path / "ckpt")
    config_path = write_resolved(cfg, tmp_path)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, str(ckpt), str(config_path), str(tmp_path / "out.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())

    before = result["before"]
    batch = _batch(before, [0.0] * len(before))
    model = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    for s, want in zip(before, hf_logprobs(model, batch, TEMPERATURE), strict=True):
        torch.testing.assert_close(torch.tensor(s["logprobs"]), want, rtol=0, atol=1e-4)
    m = result["metrics"]
    assert m["is_truncated_frac"] == 0.0 and m["ess"] > 0.999  # vLLM's behaviour = the learner's proximal
    for s, lp in zip(result["after"], result["learner_after"], strict=True):
        torch.testing.assert_close(torch.tensor(s["logprobs"]), torch.tensor(lp), rtol=0, atol=1e-4)


if __name__ == "__main__":
    _script(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
