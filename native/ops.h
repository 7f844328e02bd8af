// Declarations shared by the translation units of the prorl ops: the argument checks (ops.cpp, used by
// the CPU and CUDA implementations) and the CPU kernels on raw pointers (cpu_kernels.cpp).
#pragma once

#include <cstdint>
#include <optional>

namespace at {
class Tensor;  // declared only: cpu_kernels.cpp stays free of the (slow to parse) tensor headers
}

namespace prorl {

// logp, ref_logp, mask: (B, T) on one device; logp and ref_logp float32 or bfloat16 alike; mask bool.
void check_token_tensors(const at::Tensor& logp, const at::Tensor& ref, const at::Tensor& mask);
// The incoming gradients, each optional: of kl_per_seq (B,) and of kl_sum (a scalar).
void check_kl_grads(const std::optional<at::Tensor>& grad_per_seq, const std::optional<at::Tensor>& grad_sum,
                    const at::Tensor& logp);
// A float32 contiguous view or copy of an optional gradient (kept alive in holder): its data, or null if absent.
const float* float_data_or_null(const std::optional<at::Tensor>& grad, at::Tensor& holder);
// rewards: flat (G * group_size,) floating.
void check_rewards(const at::Tensor& rewards, int64_t group_size);

// Contiguous (B, T) rows; mask holds 0/1 bytes. scalar_t: float or c10::BFloat16. The forward writes the
// per-row sums and counts and their totals over the rows. The backward's gradient of row b is
// grad_per_seq[b] + *grad_sum, either pointer null for a gradient that is absent (zero).
template <typename scalar_t>
void kl_forward_cpu(const scalar_t* logp, const scalar_t* ref, const uint8_t* mask, int64_t B, int64_t T,
                    float* kl_per_seq, int64_t* tokens_per_seq, float* kl_sum, int64_t* tokens);
template <typename scalar_t>
void kl_backward_cpu(const float* grad_per_seq, const float* grad_sum, const scalar_t* logp, const scalar_t* ref,
                     const uint8_t* mask, int64_t B, int64_t T, scalar_t* grad_logp);
// groups * n contiguous rewards; scalar_t: float, double, c10::Half or c10::BFloat16.
template <typename scalar_t>
void group_advantage_cpu(const scalar_t* rewards, int64_t groups, int64_t n, double eps, bool normalize_std,
                         float* out);

}  // namespace prorl
