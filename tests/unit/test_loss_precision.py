"""``token_logprobs`` computes in float32 whatever the inputs' dtype or an enclosing bf16 autocast.

The log-probs feed the importance ratio exp(logp - old): bf16 logits (8 mantissa bits, errors of ~1e-2 nats)
would show up as ~1% ratio noise. The learner runs the model under ``torch.autocast(dtype=bfloat16)`` on CUDA
(and on CPU with ``learner.autocast = "bfloat16"``), so the vocabulary projection must opt out of it.
"""

from __future__ import annotations

import pytest
import torch

from prorl_async.algo.loss import token_logprobs

N, H, V = 48, 64, 300


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets


def _float32_reference(hidden, weight, targets, temperature):
    """Log-probs and entropy of ``softmax(hidden @ weight.T / temperature)`` in float32, autocast off."""
    full = torch.log_softmax(hidden.float() @ weight.float().T / temperature, dim=-1)
    return full.gather(-1, targets[:, None]).squeeze(-1), -(full.exp() * full).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_float32_under_bf16_autocast(temperature):
    hidden, weight, targets = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy = token_logprobs(
            hidden, weight, targets, chunk_tokens=16, temperature=temperature, with_entropy=True
        )
    want_logp, want_entropy = _float32_reference(hidden, weight, targets, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)  # bf16 logits miss by ~1e-2
    torch.testing.assert_close(entropy, want_entropy.detach(), rtol=1e-5, atol=1e-5)
    # Backward outside the autocast region, as in the learner: the checkpointed chunks recompute in float32 too.
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    want = torch.autograd.grad((want_logp * upstream).sum(), (hidden, weight))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_grad_logprobs_are_float32_under_bf16_autocast():
    # The reference and proximal passes: no gradient, so no checkpoint; the same float32 values.
    hidden, weight, targets = _inputs(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = token_logprobs(hidden, weight, targets, chunk_tokens=16)
    torch.testing.assert_close(logp, _float32_reference(hidden, weight, targets, 1.0)[0], rtol=1e-5, atol=1e-5)


def test_bf16_weights_give_float32_logprobs_and_bf16_gradients():
    # A bf16 model without autocast: the projection still runs in float32 (no bf16 rounding of the logits),
    # and the gradients come back in the parameters' own dtype.
    hidden, weight, targets = _inputs(torch.bfloat16)
    logp, _ = token_logprobs(hidden, weight, targets, chunk_tokens=16)
    want_logp, _ = _float32_reference(hidden, weight, targets, 1.0)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    want = torch.autograd.grad((want_logp * upstream).sum(), (hidden, weight))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.bfloat16
        # bf16 rounding: the weight's gradient is a bf16 sum of the chunks' (each cast to bf16 once).
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2 * b.float().abs().max().item())
