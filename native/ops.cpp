// prorl native ops: the schemas (TORCH_LIBRARY), the argument checks and the CPU implementations, which
// hand contiguous tensors to the loops in cpu_kernels.cpp; CUDA: ops_cuda.cu; shared math: prorl_math.h.
// The Python side (prorl_async/algo/native.py) builds these files and registers the fake kernels and the autograd
// formula; prorl_async/{advantage,kl}.py hold the plain-PyTorch references the kernels must match.
//
//   group_advantage(rewards (G*n,), n, eps, normalize_std) -> (G*n,) float32
//       (r - mean_g) / (std_g + eps) per group of n contiguous rewards; population std, float64 inside.
//   kl_reduce(logp (B,T), ref_logp (B,T), mask (B,T) bool)
//       -> (kl_per_seq (B,) float32, tokens_per_seq (B,) int64, kl_sum () float32, tokens () int64)
//       sums over the unmasked t of k3(ref_logp - logp) = exp(d) - 1 - d, and the unmasked counts; one pass
//       over the tokens, then the sums over rows (computed here: one op call from Python instead of three).
//   kl_reduce_backward(grad_kl_per_seq (B,)?, grad_kl_sum ()?, logp, ref_logp, mask) -> grad_logp (B,T), dtype
//       of logp: g[b] * d k3 / d logp = -g[b] * expm1(ref - logp) with g[b] = grad_kl_per_seq[b] + grad_kl_sum
//       (a missing gradient counts as 0: autograd.cpp passes what reached the outputs, without materializing
//       zeros), zero where masked (whatever the inputs hold there).
//
// The CPU implementations allocate their outputs with at::detail::empty_cpu (no dispatcher round trip) and
// copy an input only when it is not contiguous: at a few thousand tokens the fixed cost of an op call is
// most of its time.
//
// logp and ref_logp are float32 or bfloat16 (the same dtype); the math and the sums are float32.
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ops.h"

namespace prorl {

void check_token_tensors(const at::Tensor& logp, const at::Tensor& ref, const at::Tensor& mask) {
  TORCH_CHECK(logp.dim() == 2, "prorl::kl_reduce: logp must be (B, T), got ", logp.sizes());
  TORCH_CHECK(ref.sizes() == logp.sizes() && mask.sizes() == logp.sizes(),
              "prorl::kl_reduce: logp, ref_logp and mask must have the same shape, got ", logp.sizes(), ", ",
              ref.sizes(), ", ", mask.sizes());
  TORCH_CHECK(logp.scalar_type() == at::kFloat || logp.scalar_type() == at::kBFloat16,
              "prorl::kl_reduce: logp must be float32 or bfloat16, got ", logp.scalar_type());
  TORCH_CHECK(ref.scalar_type() == logp.scalar_type(), "prorl::kl_reduce: ref_logp must have logp's dtype ",
              logp.scalar_type(), ", got ", ref.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "prorl::kl_reduce: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(ref.device() == logp.device() && mask.device() == logp.device(),
              "prorl::kl_reduce: all tensors must be on one device");
}

void check_kl_grads(const std::optional<at::Tensor>& grad_per_seq, const std::optional<at::Tensor>& grad_sum,
                    const at::Tensor& logp) {
  if (grad_per_seq.has_value()) {
    TORCH_CHECK(grad_per_seq->dim() == 1 && grad_per_seq->size(0) == logp.size(0),
                "prorl::kl_reduce_backward: grad_kl_per_seq must be (", logp.size(0), ",), got ",
                grad_per_seq->sizes());
    TORCH_CHECK(grad_per_seq->device() == logp.device(),
                "prorl::kl_reduce_backward: grad_kl_per_seq must be on logp's device");
  }
  if (grad_sum.has_value()) {
    TORCH_CHECK(grad_sum->numel() == 1, "prorl::kl_reduce_backward: grad_kl_sum must be a scalar, got ",
                grad_sum->sizes());
    TORCH_CHECK(grad_sum->device() == logp.device(), "prorl::kl_reduce_backward: grad_kl_sum must be on logp's device");
  }
}

const float* float_data_or_null(const std::optional<at::Tensor>& grad, at::Tensor& holder) {
  if (!grad.has_value()) return nullptr;
  holder = grad->scalar_type() == at::kFloat ? grad->contiguous() : grad->to(at::kFloat).contiguous();
  return holder.const_data_ptr<float>();
}

void check_rewards(const at::Tensor& rewards, int64_t group_size) {
  TORCH_CHECK(rewards.dim() == 1 && group_size >= 1 && rewards.numel() % group_size == 0,
              "prorl::group_advantage: rewards of shape ", rewards.sizes(), " do not split into groups of ",
              group_size);
  TORCH_CHECK(at::isFloatingType(rewards.scalar_type()), "prorl::group_advantage: rewards must be floating, got ",
              rewards.scalar_type());
}

namespace {

const uint8_t* mask_bytes(const at::Tensor& mask) {
  return reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
}

// Calls f(scalar_t{}) for the two token dtypes (checked before).
template <typename F>
void dispatch_token_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else {
    f(c10::BFloat16{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_reduce_cpu(const at::Tensor& logp_in,
                                                                         const at::Tensor& ref_in,
                                                                         const at::Tensor& mask_in) {
  check_token_tensors(logp_in, ref_in, mask_in);
  const at::Tensor logp = logp_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  const int64_t B = logp.size(0), T = logp.size(1);
  at::Tensor kl = at::detail::empty_cpu({B}, at::kFloat);
  at::Tensor tokens = at::detail::empty_cpu({B}, at::kLong);
  at::Tensor kl_sum = at::detail::empty_cpu({}, at::kFloat);
  at::Tensor tokens_sum = at::detail::empty_cpu({}, at::kLong);
  dispatch_token_dtype(logp.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    kl_forward_cpu(logp.const_data_ptr<scalar_t>(), ref.const_data_ptr<scalar_t>(), mask_bytes(mask), B, T,
                   kl.mutable_data_ptr<float>(), tokens.mutable_data_ptr<int64_t>(),
                   kl_sum.mutable_data_ptr<float>(), tokens_sum.mutable_data_ptr<int64_t>());
  });
  return {kl, tokens, kl_sum, tokens_sum};
}

at::Tensor kl_reduce_backward_cpu(const std::optional<at::Tensor>& grad_per_seq_in,
                                  const std::optional<at::Tensor>& grad_sum_in, const at::Tensor& logp_in,
                                  const at::Tensor& ref_in, const at::Tensor& mask_in) {
  check_token_tensors(logp_in, ref_in, mask_in);
  check_kl_grads(grad_per_seq_in, grad_sum_in, logp_in);
  at::Tensor grad_per_seq, grad_sum;  // hold the float32 copies, if any, while the kernel runs
  const float* per_seq = float_data_or_null(grad_per_seq_in, grad_per_seq);
  const float* sum = float_data_or_null(grad_sum_in, grad_sum);
  const at::Tensor logp = logp_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor grad_logp = at::detail::empty_cpu(logp.sizes(), logp.scalar_type());
  dispatch_token_dtype(logp.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    kl_backward_cpu(per_seq, sum, logp.const_data_ptr<scalar_t>(), ref.const_data_ptr<scalar_t>(), mask_bytes(mask),
                    logp.size(0), logp.size(1), grad_logp.mutable_data_ptr<scalar_t>());
  });
  return grad_logp;
}

at::Tensor group_advantage_cpu_op(const at::Tensor& rewards_in, int64_t group_size, double eps, bool normalize_std) {
  check_rewards(rewards_in, group_size);
  const at::Tensor rewards = rewards_in.contiguous();
  at::Tensor out = at::detail::empty_cpu({rewards.numel()}, at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "group_advantage_cpu", [&] {
    group_advantage_cpu(rewards.const_data_ptr<scalar_t>(), rewards.numel() / group_size, group_size, eps,
                        normalize_std, out.mutable_data_ptr<float>());
  });
  return out;
}

}  // namespace
}  // namespace prorl

TORCH_LIBRARY(prorl, m) {
  m.def("group_advantage(Tensor rewards, int group_size, float eps, bool normalize_std) -> Tensor");
  m.def("kl_reduce(Tensor logp, Tensor ref_logp, Tensor mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "kl_reduce_backward(Tensor? grad_kl_per_seq, Tensor? grad_kl_sum, Tensor logp, Tensor ref_logp, Tensor mask) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(prorl, CPU, m) {
  m.impl("group_advantage", &prorl::group_advantage_cpu_op);
  m.impl("kl_reduce", &prorl::kl_reduce_cpu);
  m.impl("kl_reduce_backward", &prorl::kl_reduce_backward_cpu);
}
