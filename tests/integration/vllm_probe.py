"""Run as a script by test_models_vllm.py: serve a model with vLLM (CPU) and compare log-probs.

vLLM is run in its own process because an in-process engine replaces torch.set_num_threads with a
no-op and keeps threads alive for the rest of the interpreter. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

RESULT_PREFIX = "PROBE_RESULT "  # vLLM logs to stdout too: the result is the line with this prefix


def main() -> None:
    model_dir, n_prompts = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = [f"What is {i} + {i + 3}? Reply in the form <answer>NUMBER</answer>." for i in range(n_prompts)]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=24, logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    max_diff, tokens, texts = 0.0, 0, []
    for out in outputs:
        for comp in out.outputs:
            ids = list(out.prompt_token_ids) + list(comp.token_ids)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, len(out.prompt_token_ids) - 1 : -1]
            ref = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
            got = torch.tensor([lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids, strict=True)])
            max_diff = max(max_diff, (ref - got).abs().max().item())
            tokens += len(comp.token_ids)
            texts.append(comp.text)
    print(RESULT_PREFIX + json.dumps({"max_abs_diff": max_diff, "tokens": tokens, "texts": texts[:4]}), flush=True)


if __name__ == "__main__":
    main()
