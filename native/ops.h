// Declarations shared by the translation units of the prorl ops: the argument checks (ops.cpp, used by
// the CPU and CUDA implementations) and the CPU kernels on raw pointers (cpu_kernels.cpp).
#pragma once

#include <cstdint>

namespace at {
class Tensor;  // declared only: cpu_kernels.cpp stays free of the (slow to parse) tensor headers
}

namespace prorl {

// logp, ref_logp, mask: (B, T) on one device; logp and ref_logp float32 or bfloat16 alike; mask bool.
void check_token_tensors(const at::Tensor& logp, const at::Tensor& ref, const at::Tensor& mask);
// The incoming gradient of kl_per_seq: (B,).
void check_kl_grad(const at::Tensor& grad, const at::Tensor& logp);
// rewards: flat (G * group_size,) floating.
void check_rewards(const at::Tensor& rewards, int64_t group_size);

// Contiguous (B, T) rows; mask holds 0/1 bytes. scalar_t: float or c10::BFloat16. The forward writes the
// per-row sums and counts and their totals over the rows.
template <typename scalar_t>
void kl_forward_cpu(const scalar_t* logp, const scalar_t* ref, const uint8_t* mask, int64_t B, int64_t T,
                    float* kl_per_seq, int64_t* tokens_per_seq, float* kl_sum, int64_t* tokens);
template <typename scalar_t>
void kl_backward_cpu(const float* grad, const scalar_t* logp, const scalar_t* ref, const uint8_t* mask, int64_t B,
                     int64_t T, scalar_t* grad_logp);
// groups * n contiguous rewards; scalar_t: float, double, c10::Half or c10::BFloat16.
template <typename scalar_t>
void group_advantage_cpu(const scalar_t* rewards, int64_t groups, int64_t n, double eps, bool normalize_std,
                         float* out);

}  // namespace prorl
