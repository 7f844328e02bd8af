"""The CUDA kernels against the references; these run on a GPU machine (gpu marker, skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from prorl_async.algo.advantage import group_advantage_reference
from prorl_async.algo.kl import KLReduction, kl_reduce_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_ops(native_ops) -> None:
    if "cuda" not in native_ops:
        pytest.fail("the native ops were built without CUDA although a GPU is present (nvcc / CUDA_HOME missing?)")


def _batch(rows: int, T: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, T, generator=gen) * 4
    ref = (logp + torch.randn(rows, T, generator=gen) * 0.3).clamp(max=0)
    mask = (torch.arange(T) < torch.randint(0, T + 1, (rows,), generator=gen)[:, None]) & (
        torch.rand(rows, T, generator=gen) > 0.05
    )
    return logp.to(dtype).cuda(), ref.to(dtype).cuda(), mask.cuda()


# T = 8 * k takes the 16-byte vector path; odd T and an offset view take the scalar path.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "T", "offset"), [(1, 1, 0), (3, 7, 0), (16, 1024, 0), (16, 1024, 1), (64, 4099, 0)])
def test_kl_values_and_gradients(cuda_ops, rows: int, T: int, offset: int, dtype: torch.dtype) -> None:
    logp, ref, mask = _batch(rows, T + offset, dtype, seed=rows + T)
    logp, ref, mask = logp[:, offset:], ref[:, offset:], mask[:, offset:]
    weights = torch.randn(rows, device="cuda")
    grads, outs = [], []
    for native in (True, False):
        lp = logp.clone().requires_grad_()
        if native:
            out = KLReduction(*torch.ops.prorl.kl_reduce(lp, ref, mask))
        else:
            out = kl_reduce_reference(lp.double(), ref.double(), mask)
        ((out.kl_per_seq * weights).sum() + out.kl_sum).backward()
        grads.append(lp.grad)
        outs.append(out)
    assert torch.equal(outs[0].tokens_per_seq, outs[1].tokens_per_seq)
    torch.testing.assert_close(outs[0].kl_per_seq.double(), outs[1].kl_per_seq, rtol=1e-5, atol=1e-6)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
    torch.testing.assert_close(grads[0].double(), grads[1].double(), **tol)


def test_kl_matches_cpu_kernel(cuda_ops) -> None:
    logp, ref, mask = _batch(32, 2048, torch.float32, seed=1)
    gpu = torch.ops.prorl.kl_reduce(logp, ref, mask)
    cpu = torch.ops.prorl.kl_reduce(logp.cpu(), ref.cpu(), mask.cpu())
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-6, atol=1e-6)
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[3].cpu(), cpu[3])


@pytest.mark.parametrize(("groups", "n"), [(1, 1), (7, 3), (256, 16)])
def test_group_advantage(cuda_ops, groups: int, n: int) -> None:
    rewards = (torch.rand(groups * n) < 0.5).float().cuda()
    rewards[:n] = 0.7  # a zero-variance group
    got = torch.ops.prorl.group_advantage(rewards, n, 1e-6, True)
    torch.testing.assert_close(got, group_advantage_reference(rewards, n), rtol=1e-6, atol=1e-6)


def test_opcheck_cuda(cuda_ops) -> None:
    logp, ref, mask = _batch(4, 24, torch.float32, seed=2)
    torch.library.opcheck(torch.ops.prorl.kl_reduce.default, (logp.requires_grad_(), ref, mask))
    per_seq, total = torch.randn(4, device="cuda"), torch.randn((), device="cuda")
    for grads in ((per_seq, None), (None, total), (per_seq, total)):
        torch.library.opcheck(torch.ops.prorl.kl_reduce_backward.default, (*grads, logp.detach(), ref, mask))
    torch.library.opcheck(torch.ops.prorl.group_advantage.default, (torch.rand(12, device="cuda"), 4, 1e-6, True))
