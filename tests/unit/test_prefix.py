"""Prefix sharing: a group's prompt computed once gives the log-probs, gradients and steps of n separate rows."""

from __future__ import annotations

import pytest
import torch
from test_learner import group_of, hf_logprobs, on_policy, tiny_config

from prorl_async.learner.batch import GroupBatch, build_batch
from prorl_async.learner.packing import Unit, block_attention_mask, collate, plan_units
from prorl_async.learner.trainer import Learner


def grouped_batch(prompt_lens: list[int], group_size: int, seed: int = 0, max_response: int = 20) -> GroupBatch:
    """One group per prompt length, its prompt shared by its samples.

    Response lengths vary from 1 token up, rewards alternate within a group (mixed advantages).
    """
    g = torch.Generator().manual_seed(seed)
    groups = []
    for k, p in enumerate(prompt_lens):
        prompt = torch.randint(4, 1024, (p,), generator=g)
        responses, behaviours = [], []
        for j in range(group_size):
            n = 1 if (j + k) % 3 == 0 else int(torch.randint(1, max_response + 1, (1,), generator=g))
            responses.append(torch.randint(4, 1024, (n,), generator=g))
            behaviours.append(-6.9 + 0.2 * torch.randn(n, generator=g))
        groups.append(group_of(prompt, responses, behaviours, [float((j + k) % 2) for j in range(group_size)], seq=k))
    return build_batch(groups)


def learners(**learner_fields) -> tuple[Learner, Learner]:
    """(shared, unshared) learners with the same weights; ``learner_fields`` go to both configs."""
    fields = {"micro_batch_tokens": 256, **learner_fields}
    shared = Learner(tiny_config(learner={**fields, "share_prompt": True}))
    unshared = Learner(tiny_config(learner={**fields, "share_prompt": False}))
    return shared, unshared


@pytest.fixture(scope="module")
def pair(tiny_model_dir) -> tuple[Learner, Learner]:
    return learners()


@pytest.mark.parametrize(
    ("prompt_lens", "group_size"),
    [([3, 17, 9], 4), ([5, 30, 1, 12], 1), ([40], 8)],
    ids=["mixed-prompts", "group-of-one", "one-long-group"],
)
def test_shared_logprobs_equal_unshared_and_plain_transformers(pair, tiny_model_dir, prompt_lens, group_size):
    from transformers import AutoModelForCausalLM

    shared, unshared = pair
    batch = grouped_batch(prompt_lens, group_size, seed=len(prompt_lens))
    got, want = shared.logprobs(batch), unshared.logprobs(batch)
    plain = hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch, temperature=1.2)
    assert [len(x) for x in got] == batch.response_lens.reshape(-1).tolist()
    for a, b, c in zip(got, want, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def _logprob_grads(learner: Learner, batch: GroupBatch, budget: int) -> dict[str, torch.Tensor]:
    """Gradients of a weighted sum of all response log-probs (a weight per token), micro-batch by micro-batch."""
    from prorl_async.learner.trainer import _Prepared

    learner.policy.zero_grad(set_to_none=True)
    data = _Prepared(batch, learner.cfg, learner.device, learner.share_prompt)
    weights = torch.Generator().manual_seed(9)
    per_sample = [torch.randn(n, generator=weights) for n in data.resp_lens]
    units = plan_units(batch.prompt_lens.tolist(), data.resp_lens, share=learner.share_prompt, budget_tokens=budget)
    for start in range(0, len(units), 3):  # three units per micro-batch: rows of several groups together
        mb = data.collate(units[start : start + 3])
        logp, _ = learner.policy(mb.input_ids, mb.attention_mask, mb.gather, mb.targets, False, mb.position_ids)
        (logp * torch.cat([per_sample[i] for i in mb.rows])).sum().backward()
    return {name: p.grad.clone() for name, p in learner.policy.lm.named_parameters()}


@pytest.mark.parametrize("budget", [4096, 40], ids=["whole-groups", "groups-split-by-budget"])
def test_shared_gradients_equal_unshared(pair, budget):
    shared, unshared = pair
    batch = grouped_batch([3, 17, 9, 25], 5, seed=11)
    got = _logprob_grads(shared, batch, budget)
    want = _logprob_grads(unshared, batch, budget)
    assert any(float(g.abs().max()) > 0 for g in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "learner_fields",
    [{}, {"mini_batches": 2, "micro_batch_tokens": 64}],
    ids=["one-mini-batch", "proximal-pass-and-small-budget"],
)
def test_train_step_is_the_same_with_and_without_sharing(tiny_model_dir, learner_fields):

    shared, unshared = learners(**learner_fields)
    m_shared, m_unshared = _same_step(shared, unshared)
    assert m_shared.total_tokens == m_unshared.total_tokens == m_unshared.forward_tokens
    assert m_shared.forward_tokens < m_unshared.forward_tokens  # the groups' prompts ran fewer times


@pytest.mark.parametrize("share", [True, False], ids=["shared-prompts", "one-sample-per-unit"])
def test_packed_rows_make_the_same_step(tiny_model_dir, share):
    """Packed rows (``learner.attention = "flex_attention"``): a micro-batch is one row of whole units back to back,
    no padding, under one mask; log-probs, loss, gradients and the proximal pass are those of padded rows."""
    from prorl_async.learner.trainer import _Prepared

    fields = {"micro_batch_tokens": 64, "mini_batches": 2}
    packed = Learner(tiny_config(learner={**fields, "share_prompt": share}))
    packed.pack_rows = "dense"  # FlexAttention has no backward on a CPU: its mask, dense (the GPU test: the kernel)
    plain = Learner(tiny_config(learner={**fields, "share_prompt": False}))
    m_packed, m_plain = _same_step(packed, plain)
    assert (m_packed.forward_tokens < m_plain.forward_tokens) == share
    data = _Prepared(_batch(plain), packed.cfg, packed.device, packed.share_prompt, pack_rows="dense")
    micro = packed._micro_batches(data, list(range(16)))
    assert all(mb.input_ids.shape[0] == 1 for mb in micro)  # one row each
    assert sum(mb.input_ids.shape[1] for mb in micro) == m_packed.forward_tokens  # not a token of padding
    assert all(mb.input_ids.shape[1] <= 64 for mb in micro) and len(micro) < len(data.units)


def _batch(learner: Learner) -> GroupBatch:
    return on_policy(learner, grouped_batch([6, 14, 3, 21], 4, seed=5), noise=0.3)


def _same_step(learner: Learner, baseline: Learner):
    """Both learners take one step on the same batch, from the same weights and reference: the metrics, the
    proximal log-probs and (after one optimizer step) the gradients agree. Returns both steps' metrics."""
    from prorl_async.learner.trainer import _Prepared

    batch = _batch(baseline)
    steps = []
    for one in (learner, baseline):
        _perturb_reference(one)
        data = _Prepared(batch, one.cfg, one.device, one.share_prompt)
        proximal = one._proximal_logprobs(data, [list(range(batch.num_samples))])
        metrics = one.train_step(batch)
        steps.append((metrics, proximal, {n: p.grad.clone() for n, p in one.policy.lm.named_parameters()}))
    (m_got, old_got, g_got), (m_want, old_want, g_want) = steps
    for key in ("loss", "pg_loss", "kl", "entropy", "approx_kl", "ess", "clip_frac_low", "clip_frac_high"):
        assert getattr(m_got, key) == pytest.approx(getattr(m_want, key), rel=1e-4, abs=1e-7), key
    assert m_got.kl > 0 and m_got.grad_norm == pytest.approx(m_want.grad_norm, rel=1e-4)
    assert old_got.keys() == old_want.keys() == set(range(batch.num_samples))
    for i in old_want:
        torch.testing.assert_close(old_got[i], old_want[i], rtol=1e-5, atol=1e-5)
    if learner.optimizer_step == 1:
        # The last mini-batch's gradients. After an optimizer step the two paths' weights differ, by up to 2 lr:
        # Adam's first step is ~lr * sign(g) even where g ~ 1e-9 and rounding decides the sign.
        for name in g_want:
            torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-4, atol=1e-7, msg=name)
    return m_got, m_want


def _perturb_reference(learner: Learner) -> None:
    """Move the reference off the policy (the same way in every learner), so the KL term has a gradient."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in learner.reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.device))


def test_eager_attention_takes_the_block_mask_as_an_additive_mask(pair):
    shared, unshared = pair
    batch = grouped_batch([7, 2], 3, seed=3)
    want = unshared.logprobs(batch)
    config = shared.policy.lm.config
    impl = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        got = shared.logprobs(batch)
    finally:
        config._attn_implementation = impl
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_plan_units_packs_groups_within_the_budget():
    prompt_lens = [3, 3, 2, 1]  # groups of two samples
    resp = [4, 4, 4, 4, 1, 2, 3, 3]
    units = plan_units(prompt_lens, resp, share=True, budget_tokens=11)
    assert units == [Unit((0, 1), 11), Unit((2, 3), 11), Unit((4, 5), 5), Unit((6, 7), 7)]
    units = plan_units([3], resp[:4], share=True, budget_tokens=2)  # over budget: one response each
    assert [u.samples for u in units] == [(0,), (1,), (2,), (3,)] and all(u.length == 7 for u in units)
    assert plan_units(prompt_lens, resp, share=False, budget_tokens=100) == [
        Unit((i,), prompt_lens[i // 2] + n) for i, n in enumerate(resp)
    ]
    assert plan_units([5, 6], [1, 2], share=True, budget_tokens=100) == [Unit((0,), 6), Unit((1,), 8)]  # groups of 1
    with pytest.raises(ValueError, match="do not split"):
        plan_units([3, 3], [1, 2, 3], share=True, budget_tokens=100)


def test_collate_rows_positions_and_mask():
    prompts = [torch.tensor([10, 11, 12])] * 2 + [torch.tensor([20])]
    responses = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6])]
    mb = collate([Unit((0, 1), 8), Unit((2,), 2)], prompts, responses, torch.device("cpu"))
    assert mb.rows == [0, 1, 2] and mb.units == 2
    assert mb.input_ids.tolist() == [[10, 11, 12, 1, 2, 3, 4, 5], [20, 6, 0, 0, 0, 0, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4], [0, 1, 0, 0, 0, 0, 0, 0]]
    # Token 0 of each response from the prompt's last position (2, and 8 + 0 in row 1), then its own positions.
    assert mb.gather.tolist() == [2, 3, 4, 2, 6, 8] and mb.targets.tolist() == [1, 2, 3, 4, 5, 6]
    assert mb.resp_mask.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    mask = mb.attention_mask[0, 0].int()
    assert mask[7].tolist() == [1, 1, 1, 0, 0, 0, 1, 1]  # response 2 sees the prompt and itself, not response 1
    assert mask[5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert mask[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    pad = mb.attention_mask[1, 0].int()
    assert pad[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0] and pad[4].tolist() == [1, 0, 1, 1, 1, 0, 0, 0]
    single = collate([Unit((2,), 2), Unit((0,), 6)], prompts, responses, torch.device("cpu"))
    assert single.position_ids is None and single.attention_mask.shape == (2, 6)  # the plain unshared rows


def test_block_mask_never_leaves_a_row_empty():
    segment = torch.tensor([[0, 0, 1, 2, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1]])
    mask = block_attention_mask(segment)
    assert mask.shape == (2, 1, 7, 7) and bool(mask.diagonal(dim1=-2, dim2=-1).all())
    assert not bool(mask[0, 0, 3, 2])  # response 2 does not see response 1
    assert not bool(mask[0, 0, :5, 5:].any())  # nothing but padding attends to padding


def test_flex_attention_block_mask_gives_the_dense_masks_logprobs(pair):
    """The FlexAttention kernel under the block mask (forward only: PyTorch has none backward on a CPU; the GPU
    test trains through it) gives the log-probs of the padded, dense-mask rows."""
    shared, unshared = pair
    batch = grouped_batch([7, 2, 12], 3, seed=3)
    want = unshared.logprobs(batch)
    config = shared.policy.lm.config
    impl, rows = config._attn_implementation, shared.pack_rows
    config._attn_implementation, shared.pack_rows = "flex_attention", "block"
    try:
        got = shared.logprobs(batch)
    finally:
        config._attn_implementation, shared.pack_rows = impl, rows
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_flex_attention_on_a_cpu_is_refused_with_a_clear_error(tiny_model_dir):
    from prorl_async.errors import UserError

    with pytest.raises(UserError, match="CUDA only"):
        Learner(tiny_config(learner={"attention": "flex_attention"}))


@pytest.mark.gpu
@pytest.mark.parametrize("share", [True, False], ids=["shared-prompts", "one-sample-per-unit"])
def test_flex_attention_trains_packed_rows_on_cuda_as_padded_rows(tiny_model_dir, share):
    """The FlexAttention kernel, forward and backward, on packed rows: the step of padded sdpa rows (fp32)."""
    fields = {"micro_batch_tokens": 64, "mini_batches": 2, "device": "cuda", "autocast": "off"}
    flex = Learner(tiny_config(learner={**fields, "share_prompt": share, "attention": "flex_attention"}))
    plain = Learner(tiny_config(learner={**fields, "share_prompt": False}))
    assert flex.pack_rows == "block"
    _same_step(flex, plain)

