"""prorl::kl_reduce (CPU kernel, its backward, the autograd glue) against kl_reduce_reference, and the dispatcher.

The kernel computes k3 = exp(d) - 1 - d without the float32 cancellation at small |d| (a series there), so
it is compared with the reference evaluated in float64: the float32 reference itself is off by up to
~1e-7 absolute per token where k3 ~ d^2 / 2 is tiny.
"""

from __future__ import annotations

import pytest
import torch

from prorl_async.algo.kl import KLReduction, kl_reduce, kl_reduce_reference


def _batch(rows: int, T: int, dtype: torch.dtype = torch.float32, seed: int = 0, spread: float = 0.3):
    """(logp, ref_logp, mask): log-probs <= 0, ref = logp + noise, right-padded responses with a few holes."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, T, generator=gen) * 4
    ref = (logp + torch.randn(rows, T, generator=gen) * spread).clamp(max=0)
    lengths = torch.randint(0, T + 1, (rows,), generator=gen)
    mask = torch.arange(T) < lengths[:, None]
    mask &= torch.rand(rows, T, generator=gen) > 0.05
    return logp.to(dtype), ref.to(dtype), mask


def _exact(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> KLReduction:
    return kl_reduce_reference(logp.double(), ref.double(), mask)


def _native(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> KLReduction:
    return KLReduction(*torch.ops.prorl.kl_reduce(logp, ref, mask))


def _assert_matches(got: KLReduction, want: KLReduction) -> None:
    assert got.kl_per_seq.dtype == torch.float32 and got.tokens_per_seq.dtype == torch.int64
    assert got.kl_sum.shape == () and got.tokens.dtype == torch.int64
    assert torch.equal(got.tokens_per_seq, want.tokens_per_seq) and torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.kl_per_seq.double(), want.kl_per_seq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.kl_sum.double(), want.kl_sum, rtol=1e-5, atol=1e-6)


SHAPES = [(1, 1), (1, 5), (3, 7), (8, 129), (17, 1000), (4, 3000), (2, 5000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "T"), SHAPES)
def test_values_match_reference(native_ops, rows: int, T: int, dtype: torch.dtype) -> None:
    logp, ref, mask = _batch(rows, T, dtype, seed=rows * 7 + T)
    _assert_matches(_native(logp, ref, mask), _exact(logp, ref, mask))
    # The float32 reference agrees too, within its own cancellation error.
    loose = kl_reduce_reference(logp, ref, mask)
    torch.testing.assert_close(_native(logp, ref, mask).kl_per_seq, loose.kl_per_seq, rtol=1e-4, atol=1e-6 * T)


def test_random_shapes_values_and_gradients(native_ops) -> None:
    rng = torch.Generator().manual_seed(1234)
    for case in range(25):
        rows, T = (int(x) for x in torch.randint(1, 70, (2,), generator=rng))
        T *= int(torch.randint(1, 40, (), generator=rng))  # up to ~2.7k tokens, any residue mod the vector width
        dtype = (torch.float32, torch.bfloat16)[case % 2]
        logp, ref, mask = _batch(rows, T, dtype, seed=case, spread=float(torch.rand((), generator=rng)) * 2)
        lp, lp_exact = logp.clone().requires_grad_(), logp.clone().double().requires_grad_()
        got, want = _native(lp, ref, mask), kl_reduce_reference(lp_exact, ref.double(), mask)
        _assert_matches(got, want)
        got.kl_sum.backward()
        want.kl_sum.backward()
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
        torch.testing.assert_close(lp.grad.double(), lp_exact.grad, **tol)


@pytest.mark.parametrize("spread", [1e-4, 1e-2, 0.5, 3.0, 20.0])
def test_accuracy_across_magnitudes(native_ops, spread: float) -> None:
    # Tiny |d| (series branch), around the branch point 0.5, and large |d| (exp far from 1).
    logp, ref, mask = _batch(6, 512, seed=11, spread=spread)
    lp = logp.clone().requires_grad_()
    out = _native(lp, ref, mask)
    _assert_matches(out, _exact(logp, ref, mask))
    out.kl_sum.backward()
    # d kl_sum / d logp = -expm1(ref - logp) on unmasked tokens, within a few float32 ulp.
    want = torch.where(mask, -torch.expm1(ref.double() - logp.double()), 0.0)
    torch.testing.assert_close(lp.grad.double(), want, rtol=1e-6, atol=1e-9)


# Which outputs the gradient reaches: the backward op gets the per-row gradient, the total's, or both.
LOSSES = {
    "per_seq": lambda out, weights: (out.kl_per_seq * weights).sum(),
    "sum": lambda out, weights: 0.5 * out.kl_sum,
    "both": lambda out, weights: (out.kl_per_seq * weights).sum() + 0.5 * out.kl_sum,
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "T"), [(1, 1), (3, 7), (8, 129), (5, 2100)])
def test_gradients_match_reference(native_ops, rows: int, T: int, dtype: torch.dtype, loss: str) -> None:
    logp, ref, mask = _batch(rows, T, dtype, seed=rows + T)
    weights = torch.randn(rows, generator=torch.Generator().manual_seed(T))
    grads = []
    for fn in (_native, _exact):
        lp = logp.clone().requires_grad_()
        rf = ref.clone().requires_grad_()
        LOSSES[loss](fn(lp, rf, mask), weights).backward()
        grads.append((lp.grad, rf.grad))
    (lp_native, rf_native), (lp_exact, rf_exact) = grads
    assert lp_native.dtype == dtype and rf_native.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
    torch.testing.assert_close(lp_native.double(), lp_exact.double(), **tol)
    torch.testing.assert_close(rf_native.double(), rf_exact.double(), **tol)
    assert torch.equal(lp_native[~mask], torch.zeros_like(lp_native[~mask]))


def test_fully_masked_rows_and_batch(native_ops) -> None:
    logp, ref, mask = _batch(4, 64, seed=5)
    mask[1] = False
    mask[3] = False
    lp = logp.clone().requires_grad_()
    out = _native(lp, ref, mask)
    assert out.kl_per_seq[1].item() == 0.0 and out.tokens_per_seq[3].item() == 0
    out.kl_sum.backward()
    assert lp.grad[1].abs().sum().item() == 0.0 and lp.grad[3].abs().sum().item() == 0.0
    _assert_matches(out, _exact(logp, ref, mask))
    empty = _native(logp, ref, torch.zeros_like(mask))
    assert empty.token_mean().item() == 0.0 and empty.seq_mean().item() == 0.0


def test_masked_garbage_never_leaks(native_ops) -> None:
    # Padding may hold -inf or NaN log-probs: masked tokens must add nothing and get a zero gradient.
    logp, ref, mask = _batch(3, 40, seed=6)
    logp[~mask] = float("-inf")
    ref[~mask] = float("nan")
    for fn in (_native, kl_reduce_reference):
        lp = logp.clone().requires_grad_()
        out = fn(lp, ref, mask)
        out.kl_sum.backward()
        assert torch.isfinite(out.kl_per_seq).all()
        assert torch.isfinite(lp.grad).all() and lp.grad[~mask].abs().sum().item() == 0.0
    _assert_matches(_native(logp, ref, mask), _exact(logp.nan_to_num(), ref.nan_to_num(), mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(native_ops, dtype: torch.dtype) -> None:
    logp, ref, mask = _batch(6, 50, dtype, seed=7)
    # Transposed storage, a column slice (row stride > T) and a strided mask.
    logp_t = logp.t().contiguous().t()
    ref_wide = torch.cat([ref, torch.zeros(6, 3, dtype=dtype)], dim=1)[:, :50]
    mask_strided = torch.stack([mask, mask], dim=2)[..., 0]
    assert not (logp_t.is_contiguous() or ref_wide.is_contiguous() or mask_strided.is_contiguous())
    lp = logp_t.clone().requires_grad_()  # clone keeps the strides
    out = _native(lp, ref_wide, mask_strided)
    out.kl_sum.backward()
    _assert_matches(out, _exact(logp, ref, mask))
    lp_contiguous = logp.clone().requires_grad_()
    _native(lp_contiguous, ref, mask).kl_sum.backward()
    assert torch.equal(lp.grad, lp_contiguous.grad)  # the same kernel on the same values, whatever the strides
    lp_exact = logp.double().requires_grad_()
    kl_reduce_reference(lp_exact, ref.double(), mask).kl_sum.backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
    torch.testing.assert_close(lp.grad.double(), lp_exact.grad, **tol)


@pytest.mark.parametrize("mode", ["native", "reference"])
def test_dispatcher(native_ops, ops_mode, mode: str) -> None:
    ops_mode(mode)
    logp, ref, mask = _batch(5, 33, seed=8)
    # A bfloat16 policy against a float32 reference, and a 0/1 float mask.
    lp = logp.bfloat16().requires_grad_()
    out = kl_reduce(lp, ref, mask.float())
    out.token_mean().backward()
    assert lp.grad.dtype == torch.bfloat16
    want = _exact(logp.bfloat16().float(), ref, mask)
    torch.testing.assert_close(out.kl_sum.double(), want.kl_sum, rtol=1e-4, atol=1e-6)
    assert out.tokens.item() == mask.sum().item()
    torch.testing.assert_close(out.token_mean().double(), want.kl_sum / want.tokens, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"must all be \(B, T\)"):
        kl_reduce(logp, ref[:, :-1], mask)


def test_op_rejects_bad_arguments(native_ops) -> None:
    logp, ref, mask = _batch(2, 8)
    with pytest.raises(RuntimeError, match="logp's dtype"):
        torch.ops.prorl.kl_reduce(logp, ref.bfloat16(), mask)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.prorl.kl_reduce(logp, ref, mask.float())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.prorl.kl_reduce(logp.double(), ref.double(), mask)
    with pytest.raises(RuntimeError, match=r"\(B, T\)"):
        torch.ops.prorl.kl_reduce(logp[0], ref[0], mask[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(native_ops, dtype: torch.dtype) -> None:
    logp, ref, mask = _batch(4, 19, dtype, seed=9)
    torch.library.opcheck(torch.ops.prorl.kl_reduce.default, (logp.requires_grad_(), ref, mask))
    per_seq, total = torch.randn(4), torch.randn(())
    for grads in ((per_seq, None), (None, total), (per_seq, total)):
        torch.library.opcheck(torch.ops.prorl.kl_reduce_backward.default, (*grads, logp.detach(), ref, mask))
