"""Checkpoints: exact resume, and a policy directory that transformers loads as is."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from test_learner import hf_logprobs, random_batch, tiny_config

from prorl_async.learner.trainer import Learner


def test_resume_is_exact(tiny_model_dir, tmp_path):
    cfg = tiny_config(optim={"warmup_steps": 3}, reset={"kl_share_threshold": 0.9, "kl_window_steps": 5})
    batches = [random_batch(seed=s) for s in (21, 22, 23)]
    straight = Learner(cfg)
    expected = [straight.train_step(b) for b in batches]

    first = Learner(cfg)
    first.train_step(batches[0])
    first.save_checkpoint(tmp_path / "ckpt")
    del first
    resumed = Learner.load_checkpoint(tmp_path / "ckpt", cfg)
    assert (resumed.policy_version, resumed.optimizer_step) == (1, 1)
    got = [resumed.train_step(b) for b in batches[1:]]
    # Step 2's loss needs the weights and the reference; step 3's also the optimizer moments and the lr.
    for g, e in zip(got, expected[1:], strict=True):
        assert (g.loss, g.kl, g.grad_norm, g.lr) == (e.loss, e.kl, e.grad_norm, e.lr)
    for (name, a), (_, b) in zip(resumed.weights(), straight.weights(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.reset_policy.state_dict() == straight.reset_policy.state_dict()


def test_checkpoint_layout_and_transformers_load(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = Learner(tiny_config())
    batch = random_batch(seed=24)
    learner.train_step(batch)
    ckpt = learner.save_checkpoint(tmp_path / "ckpt")
    policy = ckpt / "policy"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in policy.iterdir()
    }
    assert list(ckpt.glob("*.safetensors")) and not list(policy.glob("optimizer*"))  # vLLM globs *.safetensors
    meta = json.loads((ckpt / "learner.json").read_text())
    assert (meta["policy_version"], meta["optimizer_step"]) == (1, 1)

    # A checkpoint written before the two counters were separated ("version": optimizer steps) still resumes.
    meta["version"] = meta.pop("policy_version")
    del meta["optimizer_step"]
    meta["reset_policy"]["kl_shares"] = [0.99]  # the old kl_share (a ratio of loss values) is not carried over
    (ckpt / "learner.json").write_text(json.dumps(meta))
    old = Learner.load_checkpoint(ckpt, tiny_config())
    assert (old.policy_version, old.optimizer_step) == (1, 1)
    assert old.reset_policy.state_dict()["kl_shares"] == []

    model = AutoModelForCausalLM.from_pretrained(policy)
    for got, want in zip(hf_logprobs(model, batch, 1.2), learner.logprobs(batch), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    reference = load_file(ckpt / "reference" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert reference.keys() == initial.keys() and all(torch.equal(reference[k], initial[k]) for k in initial)
    moments = load_file(ckpt / "optimizer.safetensors")
    assert "model.norm.weight/exp_avg" in moments and "model.norm.weight/step" in moments


def test_a_bf16_checkpoint_resumes_with_float32_master_weights(tiny_model_dir, tmp_path):
    """Checkpoints of configs/prorl-1.5b.toml written before ``learner.master_dtype`` hold bf16 weights and AdamW
    state; resumed with float32 master weights, the state takes the parameters' dtype (as torch's own
    ``Optimizer.load_state_dict`` does), and the step's count where the parameter lives."""
    old = Learner(tiny_config(learner={"master_dtype": "bfloat16"}))
    old.train_step(random_batch(seed=25))
    old.save_checkpoint(tmp_path / "ckpt")
    resumed = Learner.load_checkpoint(tmp_path / "ckpt", tiny_config())
    for p in resumed.policy.parameters():
        state = resumed.optimizer.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == p.dtype == torch.float32
        assert state["step"].device == torch.device("cpu") or state["step"].device == p.device
    assert resumed.train_step(random_batch(seed=26)).grad_norm > 0


def test_the_weights_handed_to_generators_are_copies_only_where_needed(tiny_model_dir):
    learner = Learner(tiny_config())
    params = dict(learner.policy.lm.named_parameters())
    live = dict(learner.weights())
    assert all(live[n].data_ptr() == p.data_ptr() for n, p in params.items())
    copies = dict(learner.weights(copy=True))
    assert all(copies[n].data_ptr() != p.data_ptr() for n, p in params.items())
    assert copies["lm_head.weight"] is copies["model.embed_tokens.weight"]
    bf16 = Learner(tiny_config(model={"dtype": "bfloat16"}))
    cast = dict(bf16.weights(copy=True))  # the cast is the copy: no second one
    assert all(t.dtype == torch.bfloat16 for t in cast.values())
