"""bench/learner.py --scale: the architectures are the published ones, the FLOP count is torch's own for what it
counts, and the whole path runs on the shrunk models (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import _learner_scale as scale  # noqa: E402


@pytest.mark.parametrize(("arch", "params_m", "non_embedding_m"),
                         [("qwen3-0.6b", 596.0, 440.4), ("r1-distill-qwen-1.5b", 1777.1, 1310.2)])
def test_architectures_have_their_published_sizes(arch: str, params_m: float, non_embedding_m: float) -> None:
    from transformers import AutoModelForCausalLM

    config = scale.model_config(arch)
    with torch.device("meta"):  # the full size, no memory
        model = AutoModelForCausalLM.from_config(config)
    shape = scale.Shape.of(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)
    assert shape.layers * shape.linear_params / 1e6 == pytest.approx(non_embedding_m, abs=0.1)


def test_causal_pairs_count_what_a_mask_allows() -> None:
    assert scale.causal_pairs(4, [1]) == 15  # one causal row of 5 tokens: 5 * 6 / 2
    # A prompt of 2 and responses of 1 and 2 in one row: prompt 3 pairs, response a 3, response b 3 + 4.
    assert scale.causal_pairs(2, [1, 2]) == 3 + 3 + (3 + 4)


@pytest.mark.parametrize("arch", sorted(scale.ARCHITECTURES))
def test_forward_flops_match_torchs_flop_counter(arch: str, tmp_path: Path) -> None:
    """torch's counter sees every matrix product of the learner's forward. Eager attention computes the full square
    of scores (s^2 pairs) and masks half (causal attention needs s (s + 1) / 2), so the formula is given s^2 here;
    on the CPU the counter does not see SDPA's kernel at all, hence eager."""
    from torch.utils.flop_counter import FlopCounterMode

    from prorl_async.learner.trainer import LogprobModel

    model_dir = scale.write_random_model(arch, tmp_path / arch, shrink=True)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = LogprobModel(lm, chunk_tokens=64, temperature=1.0)
    prompt, response = 24, 40
    tokens = prompt + response
    ids = torch.randint(4, 1000, (1, tokens))
    gather = torch.arange(prompt - 1, tokens - 1)  # the hidden states predicting the response
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, None, gather, ids[0, prompt:])
    shape = scale.Shape.of(lm.config)
    assert counter.get_total_flops() == scale.forward_flops(shape, tokens, response, pairs=tokens * tokens)


def test_a_step_counts_three_forwards_and_the_extra_passes() -> None:
    shape = scale.Shape.of(scale.model_config("qwen3-0.6b"))
    rows = [(512, [1024, 1024]), (512, [2048])]
    flops = scale.step_flops(shape, rows, extra_forwards=2)
    forward = sum(scale.forward_flops(shape, p + sum(r), sum(r), scale.causal_pairs(p, r)) for p, r in rows)
    assert flops == {"forward": forward, "train": 3 * forward, "all_passes": 5 * forward}


def test_the_6n_count_reproduces_prime_rls_published_mfu() -> None:
    """prime-rl's trainer bench, Qwen3-0.6B on one H100 (989.4 TFLOP/s): 11.90k tokens/s at 16,384 -> 11.1% MFU,
    10.15k at 65,536 -> 26.8%. Their count is :func:`six_n_flops`; ours, with the bench's 512-token prompt left out of
    the vocabulary projection, would call their 16k run 11.05%."""
    shape = scale.Shape.of(scale.model_config("qwen3-0.6b"))
    for seq, tokens_per_s, mfu in ((16384, 11_900, 0.111), (65536, 10_150, 0.268)):
        per_token = scale.six_n_flops(shape, [seq]) / seq
        assert per_token * tokens_per_s / 989.4e12 == pytest.approx(mfu, abs=0.0006)
    ours = scale.step_flops(shape, [(512, [16384 - 512])], extra_forwards=0)["train"] / 16384
    assert ours * 11_900 / 989.4e12 == pytest.approx(0.1105, abs=0.0002)


def test_the_scale_bench_runs_end_to_end_on_shrunk_models(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "learner.py"), "--scale", "--shrink", "--archs", "qwen3-0.6b", "--seqs", "16384",
         "--setups", "prorl", "--paper-fit", "", "--models-dir", str(tmp_path / "models"), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["layout"], r["seq"]) for r in results] == [("sequence", 1024), ("packed", 1024)]
    for r in results:
        assert r["mfu"] is None and r["device"] == "cpu"  # no peak to divide by on a CPU
        assert set(r["phases_s"]) >= {"proximal", "reference", "policy_forward", "backward", "optimizer"}
        assert r["config"]["share_prompt"] == (r["layout"] == "packed")
        assert r["train_tflops_per_step"] > 0 and r["all_passes_tflops_per_step"] == pytest.approx(
            r["train_tflops_per_step"] * 5 / 3)
