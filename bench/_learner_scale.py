"""The learner at GPU scale (``python bench/learner.py --scale``): real architectures, long sequences, MFU.

A model with the architecture of Qwen3-0.6B or DeepSeek-R1-Distill-Qwen-1.5B (their published ``config.json``
values, written here) is initialised at random and saved once: timing needs the shapes, not the weights. One
process per case (its peak memory is its own) builds a batch of random token ids in one of two layouts,

- ``sequence``: every sample is one row of ``seq`` tokens (a 512-token prompt and its response), one row per
  micro-batch, the plain causal path (``learner.share_prompt`` off): the shape of prime-rl's trainer bench;
- ``packed``: a group's prompt once and its responses after it in one row of ``seq`` tokens (prefix sharing,
  a block attention mask),

and times ``Learner.train_step`` on it under one of two loss setups,

- ``bare``: one mini-batch, no reference (``kl_beta = 0``): a forward and a backward per token, what a plain
  RL trainer step does;
- ``prorl``: what ProRL's config implies: ``mini_batches = 2`` (so a no-grad proximal pass first) and a KL term
  (a no-grad reference forward), i.e. two forwards more per token.

Counting (:func:`step_flops`): the model FLOPs a step needs, matrix products only, 2 per multiply-add:

- per layer and token, the q/k/v/o and MLP projections, ``2 * linear_params`` forward;
- attention, ``4 * heads * head_dim`` forward per (query, key) pair the mask allows: QK^T and AV. Causal
  attention over a row of ``s`` tokens has ``s (s + 1) / 2`` pairs, not ``s^2``; in a packed row, a response
  sees the prompt and its own earlier tokens only. Work a kernel spends on masked pairs is not counted;
- the vocabulary projection only for the hidden states that predict a response token (the learner never
  projects the others), ``2 * vocab * hidden`` forward each;
- a backward is twice its forward. MFU counts one forward and one backward per token (``train``); the
  no-grad proximal and reference forwards are counted apart (``all passes``), and recomputation under
  activation checkpointing is not counted at all (it is hardware FLOPs, not model FLOPs).

``6N`` is the same time under prime-rl's count (:func:`six_n_flops`: 6 x the matrix weights per token, the head on
every token, plus their attention term), which reproduces their published figures (Qwen3-0.6B on an H100: 11.9k
tokens/s at 16k -> 11.1%, 10.15k at 64k -> 26.8%): the column to set beside their table. For Qwen3-0.6B it is a
little higher than ours for the same step (the learner projects only response tokens onto the vocabulary); for
R1-Distill it counts attention twice. Their tokens/s also divided by a whole loop iteration (weight broadcast
included, ~0.76 s of a 2.75 s step at 16k), ours by ``train_step`` alone: at equal kernels ours reads higher.

Norms, rotary embeddings, softmax and the loss are left out (well under 1% here). MFU divides by the card's
dense bf16 peak (989 TFLOP/s for H100 and H200 SXM, from NVIDIA's data sheets; ``--peak-tflops`` elsewhere).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import grouped_batch

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-0.6B config.json: 0.60B parameters (0.44B outside the tied embedding).
    "qwen3-0.6b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "attention_bias": False,
    },
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json (a Qwen2.5-Math-1.5B): 1.78B parameters, untied head.
    "r1-distill-qwen-1.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "use_sliding_window": False,
    },
}
SHRUNK = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 4096}
"""``--shrink``: the same model family this small, so that every path of the bench runs on a CPU in seconds."""
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
"""Dense bf16 tensor-core peak per card family (NVIDIA data sheets, SXM parts; no sparsity)."""
PROMPT_TOKENS = 512
LOSS_SETUPS: dict[str, list[str]] = {
    "bare": ["learner.mini_batches=1", "loss.kl_beta=0"],
    "prorl": ["learner.mini_batches=2", "loss.kl_beta=1e-4"],
}
LAYOUTS = ("sequence", "packed")


def model_config(arch: str, shrink: bool = False):
    """The transformers config of ``arch`` (random weights will do), shrunk to :data:`SHRUNK` sizes on request."""
    from transformers import AutoConfig

    values = dict(ARCHITECTURES[arch])
    if shrink:
        values.update(SHRUNK)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def write_random_model(arch: str, out: Path, shrink: bool = False) -> Path:
    """``out`` holding a randomly initialised ``arch`` (bf16 safetensors and config.json); kept once written."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    config = model_config(arch, shrink)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = out.with_name(out.name + ".partial")  # a killed write leaves no directory that looks complete
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    partial.rename(out)
    return out


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of an architecture."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size)

    @property
    def linear_params(self) -> int:
        """Weights of one layer's projections: q, k, v, o and the gated MLP (gate, up, down)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate


def causal_pairs(prompt: int, responses: list[int]) -> int:
    """(query, key) pairs the attention mask of one row allows: its prompt causally, each response over the prompt
    and its own earlier tokens (one response: a plain causal row)."""
    return prompt * (prompt + 1) // 2 + sum(r * prompt + r * (r + 1) // 2 for r in responses)


def forward_flops(shape: Shape, tokens: int, head_tokens: int, pairs: int) -> int:
    """FLOPs of one forward over ``tokens`` tokens of which ``head_tokens`` go through the vocabulary projection,
    with ``pairs`` attended (query, key) pairs per layer (see the module doc)."""
    layers = shape.layers * (2 * shape.linear_params * tokens + 4 * shape.heads * shape.head_dim * pairs)
    return layers + 2 * shape.vocab * shape.hidden * head_tokens


def step_flops(shape: Shape, rows: list[tuple[int, list[int]]], extra_forwards: int) -> dict[str, int]:
    """Model FLOPs of a step over the learner's ``rows`` (a prompt, then the responses that attend to it):
    ``train`` (forward + backward, 3x a forward) and ``all_passes`` (plus ``extra_forwards`` no-grad forwards:
    reference, proximal)."""
    forward = 0
    for prompt, responses in rows:
        forward += forward_flops(shape, prompt + sum(responses), sum(responses), causal_pairs(prompt, responses))
    return {"forward": forward, "train": 3 * forward, "all_passes": (3 + extra_forwards) * forward}


def six_n_flops(shape: Shape, row_lengths: list[int]) -> int:
    """The FLOPs of a forward and backward as prime-rl's trainer counted them for its published bench
    (``prime_rl/trainer/perf.py`` at the commit that holds the baselines): per token ``6 N + 12 l h q t`` with N the
    matrix weights (every layer's projections and the head once, no embedding), t the row length, and q taken as
    ``hidden / heads`` rather than the model's head_dim. No causal halving, but for Qwen3-0.6B (head_dim 128, hidden /
    heads 64) the two slips cancel and the attention term equals causal attention's; for R1-Distill (128 = 1536 / 12)
    it is twice it. It counts the head on every token; :func:`step_flops` counts what the learner runs."""
    matrices = shape.layers * shape.linear_params + shape.vocab * shape.hidden
    attention = 12 * shape.layers * shape.heads * (shape.hidden // shape.heads)
    return sum(length * (6 * matrices + attention * length) for length in row_lengths)


def peak_tflops(device_name: str | None, override: float | None) -> float | None:
    """The bf16 dense peak to divide by: ``override``, else the card family's, else None (no MFU printed)."""
    if override:
        return override
    for family, tflops in PEAK_BF16_TFLOPS.items():
        if device_name and family in device_name:
            return tflops
    return None


def batch_rows(layout: str, seq: int, groups: int, group_size: int) -> list[tuple[int, list[int]]]:
    """(prompt, responses) per group so that every row the learner forms holds ``seq`` tokens."""
    if layout == "sequence":
        return [(PROMPT_TOKENS, [seq - PROMPT_TOKENS] * group_size) for _ in range(groups)]
    response = (seq - PROMPT_TOKENS) // group_size
    return [(PROMPT_TOKENS, [response] * group_size) for _ in range(groups)]


@dataclass(frozen=True)
class Case:
    """One measurement: an architecture, a layout, a loss setup, a row length and the batch (groups x samples)."""

    arch: str
    layout: str
    setup: str
    seq: int
    groups: int
    group_size: int

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.layout}/{self.setup}/{self.seq}"


CASES = (
    # What prime-rl's bench times (one plain causal row per micro-batch), then what ProRL's loss adds to it.
    Case("qwen3-0.6b", "sequence", "bare", 16384, 1, 4),
    Case("qwen3-0.6b", "sequence", "prorl", 16384, 2, 2),
    Case("qwen3-0.6b", "packed", "prorl", 16384, 2, 8),  # 8 responses of 1,984 tokens after one prompt per row
    Case("qwen3-0.6b", "sequence", "bare", 65536, 1, 2),
    Case("r1-distill-qwen-1.5b", "sequence", "prorl", 16384, 2, 2),
    Case("r1-distill-qwen-1.5b", "sequence", "bare", 65536, 1, 2),
)
"""The default matrix: four rows of 16k tokens or two of 64k a step (a ``prorl`` step takes two groups, one per
mini-batch). On an H100 the whole matrix should take about five minutes (loads included)."""
PAPER_CONFIG = "configs/prorl-1.5b.toml"
PAPER_FIT_RESPONSES = (8192, 16384)
SHRINK_FACTOR = 16
"""``--shrink`` divides every row length and token budget by this."""


def run_case(model_dir: Path, case: Case, steps: int, overrides: list[str], peak_override: float | None,
             shrink: bool) -> dict[str, Any]:
    """Time ``steps`` train steps (after one warm-up) of ``case`` in this process; everything as a dict."""
    from prorl_async.config import load_config

    rows = batch_rows(case.layout, case.seq, case.groups, case.group_size)
    base = [f"model.name={model_dir}", "learner.gradient_checkpointing=true", f"learner.micro_batch_tokens={case.seq}",
            f"learner.share_prompt={'true' if case.layout == 'packed' else 'false'}",
            f"learner.batch_groups={case.groups}", f"sampling.group_size={case.group_size}",
            f"sampling.max_response_tokens={max(rows[0][1])}", f"model.max_model_len={case.seq}", "optim.lr=1e-6",
            *LOSS_SETUPS[case.setup]]
    cfg = load_config(overrides=base + overrides)
    out = {"case": case.name, "arch": case.arch + (" (shrunk)" if shrink else ""), "layout": case.layout,
           "setup": case.setup, "seq": case.seq, "groups": case.groups, "group_size": case.group_size,
           "overrides": overrides}
    return out | measure(cfg, rows, steps, peak_override)


def run_paper_fit(model_dir: Path, response_tokens: int, steps: int, overrides: list[str],
                  peak_override: float | None, shrink: bool) -> dict[str, Any]:
    """``configs/prorl-1.5b.toml``'s learner (its micro-batch budget, checkpointing, prefix sharing, mini-batches,
    KL) on R1-Distill-Qwen-1.5B's architecture, with every response ``response_tokens`` long.

    The batch is 2 groups of 4 samples (2 mini-batches, so the proximal pass runs), not 256 x 16: peak memory is
    set by the largest micro-batch (``micro_batch_tokens`` of rows), the parameters and AdamW's state, which
    the full batch does not change; it only takes more micro-batches.
    """
    from prorl_async.config import load_config

    budget = load_config(PAPER_CONFIG).learner.micro_batch_tokens // (SHRINK_FACTOR if shrink else 1)
    rows = [(PROMPT_TOKENS, [response_tokens] * 4) for _ in range(2)]
    base = [f"model.name={model_dir}", "learner.batch_groups=2", "learner.mini_batches=2", "sampling.group_size=4",
            f"sampling.max_response_tokens={response_tokens}", f"model.max_model_len={PROMPT_TOKENS + response_tokens}",
            f"learner.micro_batch_tokens={budget}", "learner.device=auto"]
    cfg = load_config(PAPER_CONFIG, overrides=base + overrides)
    out = {"case": f"paper-fit/{response_tokens}", "arch": "r1-distill-qwen-1.5b" + (" (shrunk)" if shrink else ""),
           "layout": "paper", "setup": "prorl", "seq": PROMPT_TOKENS + response_tokens, "groups": 2, "group_size": 4,
           "response_tokens": response_tokens, "overrides": overrides}
    return out | measure(cfg, rows, steps, peak_override)


def measure(cfg: Any, rows: list[tuple[int, list[int]]], steps: int, peak_override: float | None) -> dict[str, Any]:
    """Load a learner for ``cfg``, take one warm-up step and ``steps`` timed ones on a random batch of ``rows``."""
    import torch

    from prorl_async.learner.trainer import Learner

    started = time.perf_counter()
    learner = Learner(cfg)
    load_s = time.perf_counter() - started
    cuda = learner.device.type == "cuda"
    groups, group_size, response = len(rows), len(rows[0][1]), rows[0][1][0]
    batch = grouped_batch(groups, group_size, rows[0][0], (response, response), learner.vocab_size)
    if cuda:
        torch.cuda.reset_peak_memory_stats(learner.device)
    learner.train_step(batch)  # warm-up: allocator, optimizer state, kernels
    learner.phases.enabled = True
    learner.phases.take()
    metrics, phases = [], []
    for _ in range(steps):
        metrics.append(learner.train_step(batch))
        phases.append(learner.phases.take())
    step_s = sum(m.step_time_s for m in metrics) / steps
    tokens = sum(m.total_tokens for m in metrics) / steps  # prompt + response of every sample, per step
    shape = Shape.of(learner.policy.lm.config)
    shared_rows = _shared_rows(rows, learner.share_prompt, cfg.learner.micro_batch_tokens)
    extra = int(cfg.loss.kl_beta > 0) + int(min(cfg.learner.mini_batches, groups) > 1)
    flops = step_flops(shape, shared_rows, extra)
    forward_tokens = sum(p + sum(r) for p, r in shared_rows)
    if forward_tokens != metrics[0].forward_tokens:  # the FLOP count must describe the rows the learner ran
        raise RuntimeError(f"rows of {forward_tokens} tokens counted, the learner ran {metrics[0].forward_tokens}")
    device_name = torch.cuda.get_device_name(learner.device) if cuda else None
    peak = peak_tflops(device_name, peak_override)
    params = sum(p.numel() for p in learner.policy.parameters())
    flops_6n = six_n_flops(shape, [p + sum(r) for p, r in shared_rows])
    split = {k: sum(p.get(k, 0.0) for p in phases) / steps for k in {k for p in phases for k in p}}
    head = head_probe(learner, min(sum(shared_rows[0][1]), 16384))
    return {
        "device": device_name or "cpu",
        "params_m": params / 1e6,
        "steps": steps,
        "tokens_per_step": forward_tokens,
        "sample_tokens_per_step": tokens,
        "step_time_s": step_s,
        "tokens_per_s": forward_tokens / step_s,
        "sample_tokens_per_s": tokens / step_s,
        "train_tflops_per_step": flops["train"] / 1e12,
        "all_passes_tflops_per_step": flops["all_passes"] / 1e12,
        "achieved_tflops": flops["train"] / step_s / 1e12,
        "peak_tflops": peak,
        "mfu": flops["train"] / step_s / 1e12 / peak if peak else None,
        "mfu_all_passes": flops["all_passes"] / step_s / 1e12 / peak if peak else None,
        "mfu_6n": flops_6n / step_s / 1e12 / peak if peak else None,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(learner.device) if cuda
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "phases_s": split,
        "head_s_per_1k_tokens": head,
        "load_s": load_s,
        "loss": metrics[-1].loss,
        "config": {"gradient_checkpointing": cfg.learner.gradient_checkpointing,
                   "mini_batches": cfg.learner.mini_batches, "kl_beta": cfg.loss.kl_beta,
                   "micro_batch_tokens": cfg.learner.micro_batch_tokens, "master_dtype": cfg.learner.master_dtype,
                   "autocast": learner.autocast, "share_prompt": learner.share_prompt,
                   "attention": learner.policy.lm.config._attn_implementation},
    }


def head_probe(learner: Any, tokens: int, repeats: int = 3) -> dict[str, float]:
    """Seconds per 1,000 response tokens of the log-probs' vocabulary projection alone, forward and backward (with
    its checkpointed recompute), as the learner runs it: float32 products, and on CUDA also TF32 (``learner.tf32``).

    The step's split cannot show it: the projection is inside the policy forward and the backward."""
    import torch

    from prorl_async.algo.loss import token_logprobs

    weight = learner.policy.lm.get_output_embeddings().weight
    cuda = weight.device.type == "cuda"
    gen = torch.Generator(device=weight.device).manual_seed(0)
    hidden = torch.randn(tokens, weight.shape[1], device=weight.device, generator=gen, requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (tokens,), device=weight.device, generator=gen)
    chunk = learner.cfg.learner.logprob_chunk_tokens
    matmul = torch.backends.cuda.matmul
    modern = hasattr(matmul, "fp32_precision")  # torch >= 2.9; before it, allow_tf32
    before = (matmul.fp32_precision if modern else matmul.allow_tf32) if cuda else None
    out: dict[str, float] = {}
    for precision in ("ieee", "tf32") if cuda else ("ieee",):
        if cuda and modern:
            matmul.fp32_precision = precision
        elif cuda:
            matmul.allow_tf32 = precision == "tf32"
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            logp, _ = token_logprobs(hidden, weight, targets, chunk_tokens=chunk, with_entropy=True)
            logp.sum().backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out["float32" if precision == "ieee" else "tf32"] = min(times[1:]) / tokens * 1000
    if cuda and modern:
        matmul.fp32_precision = before
    elif cuda:
        matmul.allow_tf32 = before
    learner.optimizer.zero_grad(set_to_none=True)
    return out


def _shared_rows(rows: list[tuple[int, list[int]]], share: bool, budget: int) -> list[tuple[int, list[int]]]:
    """The learner's rows for ``rows``' groups, each as (prompt, the responses after it): the units
    :func:`prorl_async.learner.packing.plan_units` forms, so that a prompt counts once per row it heads."""
    from prorl_async.learner.packing import plan_units

    lens = [r for _, responses in rows for r in responses]
    units = plan_units([p for p, _ in rows], lens, share=share, budget_tokens=budget)
    n = len(rows[0][1])
    return [(rows[u.samples[0] // n][0], [lens[i] for i in u.samples]) for u in units]


def format_row(r: dict[str, Any]) -> str:
    mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "    -"
    mfu_all = f"{100 * r['mfu_all_passes']:5.1f}%" if r["mfu_all_passes"] is not None else "    -"
    mfu_6n = f"{100 * r['mfu_6n']:5.1f}%" if r.get("mfu_6n") is not None else "    -"
    return (f"{r['arch']:30s} {r['layout']:8s} {r['setup']:5s} {r['seq']:6d} {r['tokens_per_step']:8.0f} "
            f"{r['step_time_s']:7.2f} {r['tokens_per_s']:9.0f} {r['achieved_tflops']:7.2f} {mfu} {mfu_all} {mfu_6n} "
            f"{r['peak_memory_gib']:7.1f}")


HEADER = (f"{'architecture':30s} {'layout':8s} {'loss':5s} {'seq':>6s} {'tok/step':>8s} {'step s':>7s} "
          f"{'tok/s':>9s} {'TFLOP/s':>7s} {'MFU':>6s} {'all':>6s} {'6N':>6s} {'peak GiB':>7s}")


def format_phases(r: dict[str, Any]) -> str:
    from prorl_async.learner.phases import PHASES

    split = r["phases_s"]
    parts = [f"{k} {split[k]:.2f}" for k in PHASES if k in split]
    other = r["step_time_s"] - sum(v for k, v in split.items() if k != "advantage")  # advantage is inside prepare
    head = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in r.get("head_s_per_1k_tokens", {}).items())
    return "    split (s): " + ", ".join(parts) + f", other {other:.2f}; head per 1k tokens fwd+bwd: {head}"


def dump(path: str, doc: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
