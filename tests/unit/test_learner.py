"""The learner on the tiny model: log-probs, learning direction, batching invariances, weights, metrics.

The helpers at the top (configs, batches) serve the other learner test modules too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from prorl_async.config import Config
from prorl_async.learner.batch import GroupBatch, build_batch
from prorl_async.learner.trainer import Learner, plan_micro_batches
from prorl_async.transport.messages import Sample, TrajectoryGroup


def tiny_config(**sections: dict[str, Any]) -> Config:
    """A CPU config on the tiny model; ``sections`` override whole sections' fields, e.g. loss={"kl_beta": 0}."""
    data: dict[str, Any] = {
        "model": {"name": "tiny-random"},
        "sampling": {"group_size": 4, "max_response_tokens": 64, "temperature": 1.2},
        "optim": {"lr": 1e-3},
        "learner": {"batch_groups": 2, "micro_batch_tokens": 128, "logprob_chunk_tokens": 32, "device": "cpu",
                    "num_threads": 1},
        "loss": {"kl_beta": 1e-2},
    }
    for name, fields in sections.items():
        data.setdefault(name, {}).update(fields)
    return Config.model_validate(data)


def group_of(prompt: Sequence[int], responses: Sequence[Sequence[int]], behaviours: Sequence[Sequence[float]],
             rewards: Sequence[float], version: int = 0, seq: int = 0) -> TrajectoryGroup:
    """A wire group (what the learner receives) from plain values; every token has policy version ``version``."""
    samples = [Sample(np.asarray(r), np.asarray(b), np.full(len(r), version), "stop", float(w))
               for r, b, w in zip(responses, behaviours, rewards, strict=True)]
    return TrajectoryGroup(prompt_id=f"p{seq}", task="test", domain="test", prompt_token_ids=np.asarray(prompt),
                           samples=samples, generator_id=0, seq=seq)


def random_groups(seed: int = 0, groups: int = 2, group_size: int = 4,
                  behaviour_noise: float = 0.2) -> list[TrajectoryGroup]:
    """Groups of a random prompt and responses of varied lengths, rewards alternating 1/0 within each group.

    Behaviour log-probs are placeholders; :func:`on_policy` replaces them with the learner's own.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(groups):
        prompt = torch.randint(4, 1024, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g)
        responses = [torch.randint(4, 1024, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
                     for _ in range(group_size)]
        behaviours = [-6.9 + behaviour_noise * torch.randn(len(r), generator=g) for r in responses]
        out.append(group_of(prompt, responses, behaviours, [float(j % 2) for j in range(group_size)], seq=k))
    return out


def random_batch(seed: int = 0, groups: int = 2, group_size: int = 4, behaviour_noise: float = 0.2) -> GroupBatch:
    """:func:`random_groups` as the learner's batch."""
    return build_batch(random_groups(seed, groups, group_size, behaviour_noise))


def on_policy(learner: Learner, batch: GroupBatch, noise: float = 0.0, seed: int = 0) -> GroupBatch:
    """``batch`` with behaviour log-probs from the learner's current policy (plus optional noise)."""
    g = torch.Generator().manual_seed(seed)
    behav = [lp + noise * torch.randn(lp.shape, generator=g) for lp in learner.logprobs(batch)]
    return dataclasses.replace(batch, behaviour_logprobs=torch.cat(behav).float())


def hf_logprobs(model: torch.nn.Module, batch: GroupBatch, temperature: float) -> list[torch.Tensor]:
    """Per-sample response log-probs from a plain transformers forward, one unpadded sample at a time."""
    out = []
    prompts, n = batch.prompts(), batch.group_size
    with torch.no_grad():
        for i, response in enumerate(batch.responses()):
            prompt = prompts[i // n]
            ids = torch.cat([prompt, response])[None]
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
            out.append(torch.log_softmax(logits, -1).gather(-1, response[:, None]).squeeze(-1))
    return out


@pytest.fixture(scope="module")
def learner(tiny_model_dir) -> Learner:
    return Learner(tiny_config())


def test_logprobs_match_a_plain_transformers_forward(learner, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    batch = random_batch(seed=1)  # lengths vary: micro-batches of 128 tokens have padded rows
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = hf_logprobs(model, batch, temperature=1.2)  # the sampling temperature, as vLLM's processed logprobs
    for got, want in zip(learner.logprobs(batch), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_few_steps_raise_positive_and_lower_negative_samples(tiny_model_dir):
    learner = Learner(tiny_config(optim={"lr": 3e-3}, loss={"kl_beta": 0.0}))
    batch = on_policy(learner, random_batch(seed=2))
    positive = [i for i, r in enumerate(batch.rewards.reshape(-1).tolist()) if r > 0]
    before = [float(lp.sum()) for lp in learner.logprobs(batch)]
    for _ in range(3):
        metrics = learner.train_step(batch)
        assert math.isfinite(metrics.loss) and metrics.grad_norm > 0
    after = [float(lp.sum()) for lp in learner.logprobs(batch)]
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        assert (a > b) == (i in positive), (i, b, a)
    assert learner.policy_version == 3 and learner.reference is None


def _grads(learner: Learner) -> dict[str, torch.Tensor]:
    """The accumulated gradient of the last step (optimizer.zero_grad runs at the start of a step)."""
    return {name: p.grad.clone() for name, p in learner.policy.lm.named_parameters()}


def test_micro_batching_does_not_change_the_update(tiny_model_dir):
    batch = random_batch(seed=3)
    results = []
    for budget in (16, 4096):  # one sample per micro-batch vs the whole batch in one
        learner = Learner(tiny_config(learner={"micro_batch_tokens": budget}))
        batch_on = on_policy(learner, batch, noise=0.3)
        metrics = learner.train_step(batch_on)
        results.append((metrics, _grads(learner)))
    (m_small, g_small), (m_big, g_big) = results
    assert m_small.loss == pytest.approx(m_big.loss, rel=1e-5, abs=1e-7)
    assert m_small.grad_norm == pytest.approx(m_big.grad_norm, rel=1e-5)
    for name in g_small:  # gradients, not weights: Adam's first step is ~lr * sign(g) even for g ~ 1e-9
        torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-4, atol=1e-7)


def test_mini_batches_step_the_optimizer_against_one_proximal_policy(tiny_model_dir):
    one = Learner(tiny_config())
    batch = on_policy(one, random_batch(seed=4), noise=0.1)
    m_one = one.train_step(batch)
    assert one.policy_version == 1 and m_one.approx_kl == 0.0  # proximal = current weights: ratio exactly 1
    two = Learner(tiny_config(learner={"mini_batches": 2}))
    m_two = two.train_step(batch)
    assert two.optimizer_step == 2 and m_two.optimizer_step == 2
    assert m_two.approx_kl > 0  # the second mini-batch is scored against the pre-step (proximal) policy
    assert m_two.tokens == m_one.tokens and math.isfinite(m_two.loss)


def test_a_batch_is_one_policy_version_however_many_mini_batches(tiny_model_dir):
    """Staleness and every *_every_steps setting count batches: mini-batches advance only the optimizer step."""
    learner = Learner(tiny_config(learner={"mini_batches": 2}, optim={"warmup_steps": 4}))
    batch = on_policy(learner, random_batch(seed=4), noise=0.1)
    lrs = []
    for expected in (1, 2):
        m = learner.train_step(batch)
        assert (learner.policy_version, m.version) == (expected, expected)
        assert (learner.optimizer_step, m.optimizer_step) == (2 * expected, 2 * expected)
        lrs.append(m.lr)
    lr = learner.cfg.optim.lr
    assert lrs == pytest.approx([lr * 2 / 4, lr * 4 / 4])  # warm-up counts optimizer steps


def test_metrics_describe_the_step(learner):
    batch = random_batch(seed=5)
    batch = dataclasses.replace(batch, policy_versions=torch.full_like(batch.policy_versions,
                                                                        learner.policy_version - 1))
    m = learner.train_step(batch)
    assert m.tokens == int(batch.response_lens.sum())
    assert m.total_tokens == m.tokens + int(batch.prompt_lens.sum()) * batch.group_size
    assert m.samples == 8 and m.reward_mean == 0.5 and m.lr == pytest.approx(1e-3)
    assert m.staleness_mean == 1.0 and m.staleness_max == 1.0
    assert 0 < m.ess <= 1 and 0 <= m.is_truncated_frac <= 1 and m.entropy > 0
    assert m.step_time_s > 0 and m.tokens_per_s > 0 and m.reset == 0.0 and m.reset_reason == ""
    assert set(m.as_dict()) >= {"loss", "kl", "clip_frac_low", "clip_frac_high", "grad_norm", "reset_reason"}


def test_weights_are_the_hf_checkpoint_names(learner, tiny_model_dir):
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    weights = dict(learner.weights())
    # The file has the tied head once, under the embedding; weights() names it twice (vLLM CPU needs both).
    assert set(weights) == names | {"lm_head.weight"}
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    params = dict(learner.policy.lm.named_parameters())
    assert all(weights[n].data_ptr() == params[n].data_ptr() for n in names)  # no copies


def test_bf16_models_train_fp32_master_weights_so_small_updates_land(tiny_model_dir):
    """configs/prorl-1.5b.toml samples in bfloat16 at lr 2e-6. An AdamW update of ~lr is far below bf16's resolution
    for weights of ~0.02 (spacing ~1e-4): bf16 parameters never moved. The learner trains float32 master weights
    (``learner.master_dtype``) and sends the generators ``model.dtype`` copies."""
    learner = Learner(tiny_config(model={"dtype": "bfloat16"}, optim={"lr": 2e-6}))
    batch = on_policy(learner, random_batch(seed=4))
    before = [p.detach().clone() for p in learner.policy.parameters()]
    assert learner.train_step(batch).grad_norm > 0
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(learner.policy.parameters(), before, strict=True))
    assert changed / sum(b.numel() for b in before) > 0.5
    weights = dict(learner.weights())
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]  # a tied head is still one tensor
    if learner.reference is not None:
        assert {p.dtype for p in learner.reference.parameters()} == {torch.float32}  # a reset copies exactly


def test_master_dtype_bfloat16_is_the_old_memory_saving_choice(tiny_model_dir):
    learner = Learner(tiny_config(learner={"master_dtype": "bfloat16"}))
    assert {p.dtype for p in learner.policy.parameters()} == {torch.bfloat16}


def test_phase_times_split_a_step_when_asked(tiny_model_dir):
    from prorl_async.learner.phases import PHASES

    learner = Learner(tiny_config(learner={"mini_batches": 2}))
    batch = random_batch(seed=5)
    learner.train_step(batch)
    assert learner.phases.take() == {}  # off by default: no syncs, nothing recorded
    learner.phases.enabled = True
    step = learner.train_step(batch).step_time_s
    seconds = learner.phases.take()
    assert set(seconds) == set(PHASES)  # two mini-batches: the proximal pass runs; kl_beta > 0: the reference
    assert all(t > 0 for t in seconds.values())
    assert sum(t for k, t in seconds.items() if k != "advantage") <= step  # advantage is inside prepare
    assert learner.phases.take() == {}


def test_fused_adamw_makes_the_same_update(tiny_model_dir):
    batch = random_batch(seed=6)
    plain, fused = (Learner(tiny_config(optim={"fused": f})) for f in ("off", "on"))
    assert not plain.optimizer.defaults["fused"] and fused.optimizer.defaults["fused"]
    for learner in (plain, fused):
        learner.train_step(batch)
        learner.train_step(batch)  # the second step reads AdamW's moments
    for a, b in zip(plain.policy.parameters(), fused.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_warmup_then_constant_learning_rate(tiny_model_dir):
    learner = Learner(tiny_config(optim={"lr": 1e-3, "warmup_steps": 2}))
    batch = random_batch(seed=6)
    lrs = [learner.train_step(batch).lr for _ in range(3)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda gs: gs[1].samples.pop(), "do not split into groups"),
        (lambda gs: setattr(gs[0].samples[0], "logprobs", gs[0].samples[0].logprobs[:-1]), "per-token fields"),
        (lambda gs: setattr(gs[0].samples[1], "token_ids", gs[0].samples[1].token_ids[:0]),
         "empty prompt or response"),
        (lambda gs: setattr(gs[0].samples[2], "reward", float("nan")), "not finite"),
    ],
)
def test_malformed_batches_are_rejected(mutate, message):
    groups = random_groups(seed=7)
    mutate(groups)
    with pytest.raises(ValueError, match=message):
        build_batch(groups)


def test_plan_micro_batches_respects_the_budget():
    lengths = [5, 40, 7, 7, 12, 3, 100, 9]
    plans = plan_micro_batches(lengths, budget_tokens=30)
    assert sorted(i for p in plans for i in p) == list(range(len(lengths)))
    for plan in plans:
        padded = max(lengths[i] for i in plan) * len(plan)
        assert padded <= 30 or len(plan) == 1  # a sample over the budget goes alone
    assert [6] in plans and [1] in plans


@pytest.mark.gpu
@pytest.mark.parametrize("ops", ["reference", "native"])
def test_a_cuda_step_matches_the_cpu_step(tiny_model_dir, ops):
    """The same fp32 step on CUDA (autocast off) and on the CPU: loss, gradient norm and gradients agree; the
    weights for the broadcast keep their names and stay on the GPU (NCCL sends them from there)."""
    cpu = Learner(tiny_config(learner={"ops": ops}))
    batch = on_policy(cpu, random_batch(seed=5), noise=0.3)
    cuda = Learner(tiny_config(learner={"device": "cuda", "ops": ops, "autocast": "off"}))  # bf16 by default
    assert cuda.device.type == "cuda"
    for got, want in zip(cuda.logprobs(batch), cpu.logprobs(batch), strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    m_cpu, m_cuda = cpu.train_step(batch), cuda.train_step(batch)
    assert m_cuda.loss == pytest.approx(m_cpu.loss, rel=1e-4, abs=1e-6)
    assert m_cuda.grad_norm == pytest.approx(m_cpu.grad_norm, rel=1e-4)
    g_cpu, g_cuda = _grads(cpu), _grads(cuda)
    for name, g in g_cpu.items():
        torch.testing.assert_close(g_cuda[name].cpu(), g, rtol=1e-3, atol=1e-6)
    assert [n for n, _ in cuda.weights()] == [n for n, _ in cpu.weights()]
    assert all(t.is_cuda for _, t in cuda.weights())


@pytest.mark.gpu
def test_tf32_log_probs_stay_close_to_float32(tiny_model_dir):
    """``learner.tf32``: the head's products on TF32 cores move log-probs by far less than bf16 would."""
    batch = random_batch(seed=7)
    fp32 = Learner(tiny_config(learner={"device": "cuda", "autocast": "off"})).logprobs(batch)
    tf32 = Learner(tiny_config(learner={"device": "cuda", "autocast": "off", "tf32": True})).logprobs(batch)
    try:
        for a, b in zip(tf32, fp32, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-2)
    finally:  # process-wide: leave the other tests their float32
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "ieee"
        else:
            torch.backends.cuda.matmul.allow_tf32 = False

