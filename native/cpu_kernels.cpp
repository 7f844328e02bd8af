// The CPU hot loops of the prorl ops, on raw pointers (the tensor glue is in ops.cpp). A translation unit of
// its own with light headers, so that it compiles in parallel with ops.cpp and quickly.
//
// The build passes -fno-math-errno -fno-trapping-math -ffp-contract=fast: without them gcc keeps the
// selects and the exp polynomial scalar. Masks are read as bytes: gcc vectorizes selects on uint8_t loads,
// not on bool loads.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "ops.h"
#include "prorl_math.h"

namespace prorl {
namespace {

// One copy of each hot loop per x86-64 level (AVX-512, AVX2+FMA, baseline SSE2), chosen when the
// library loads: the build cache may be shared by machines with different CPUs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PRORL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PRORL_CPU_CLONES
#endif

constexpr int64_t kChunk = 1024;  // a power of two

// Rows per parallel task: enough tokens (~32k) that a task outweighs the cost of waking a thread.
constexpr int64_t kTaskTokens = 32768;
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, kTaskTokens / std::max<int64_t>(T, 1)); }

// f(0, B) inline when the batch is one task's worth, else at::parallel_for over rows: small batches skip
// the thread pool's bookkeeping entirely (it costs about as much as the kernel below ~10k tokens).
template <typename F>
void for_rows(int64_t B, int64_t T, const F& f) {
  if (B * T <= kTaskTokens || B == 1) {
    f(int64_t{0}, B);
  } else {
    at::parallel_for(0, B, row_grain(T), f);
  }
}

// k3 over a row goes through a chunk buffer summed as a tree: loops without a reduction clause, because
// "omp simd reduction" sizes its lanes for the baseline ISA, which would keep the AVX clones at 4 lanes.
// The tree (pairwise) sum is also more accurate than a running one.
template <typename scalar_t>
PRORL_CPU_CLONES void kl_forward_rows(const scalar_t* logp, const scalar_t* ref, const uint8_t* mask, int64_t T,
                                      int64_t row_begin, int64_t row_end, float* kl_out, int64_t* tokens_out) {
  alignas(64) float buf[kChunk];
  for (int64_t b = row_begin; b < row_end; ++b) {
    float kl = 0.f;
    int64_t tokens = 0;
    for (int64_t c = b * T, row_end_t = (b + 1) * T; c < row_end_t; c += kChunk) {
      const int64_t n = std::min(kChunk, row_end_t - c);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float k = k3_f32(to_f32(ref[c + i]) - to_f32(logp[c + i]));
        buf[i] = mask[c + i] != 0 ? k : 0.f;  // a select, not a product: masked NaN/inf never reaches the sum
      }
      // The tree spans the smallest power of two >= n (at least 16 lanes, two AVX vectors), not the whole
      // buffer: a short row must not pay for summing 1024 zeros.
      int64_t span = 16;
      while (span < n) span *= 2;
      std::fill(buf + n, buf + span, 0.f);
      for (int64_t width = span / 2; width > 0; width /= 2) {
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) buf[i] += buf[i + width];
      }
      kl += buf[0];
      int32_t chunk_tokens = 0;
      for (int64_t i = 0; i < n; ++i) chunk_tokens += mask[c + i] != 0;
      tokens += chunk_tokens;
    }
    kl_out[b] = kl;
    tokens_out[b] = tokens;
  }
}

// grad_per_seq may be null (no gradient reached kl_per_seq), grad_sum too (none reached kl_sum).
// Two loops per chunk: the gradient in float32 into a buffer, then the mask select and the store. One loop
// doing both mixes byte, float and (bfloat16) half-word lanes, and gcc's version of it spills registers:
// it ran 1.7x slower (135 vs 80 us for 128 x 512 tokens, one thread).
template <typename scalar_t>
PRORL_CPU_CLONES void kl_backward_rows(const float* grad_per_seq, const float* grad_sum, const scalar_t* logp,
                                       const scalar_t* ref, const uint8_t* mask, int64_t T, int64_t row_begin,
                                       int64_t row_end, scalar_t* grad_logp) {
  const float g_sum = grad_sum != nullptr ? *grad_sum : 0.f;
  for (int64_t b = row_begin; b < row_end; ++b) {
    const scalar_t* lp = logp + b * T;
    const scalar_t* rf = ref + b * T;
    const uint8_t* m = mask + b * T;
    scalar_t* out = grad_logp + b * T;
    const float g = (grad_per_seq != nullptr ? grad_per_seq[b] : 0.f) + g_sum;
    alignas(64) float buf[kChunk];
    for (int64_t c = 0; c < T; c += kChunk) {
      const int64_t n = std::min(kChunk, T - c);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = g * k3_grad_logp_f32(to_f32(rf[c + i]) - to_f32(lp[c + i]));
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[c + i] = from_f32<scalar_t>(m[c + i] != 0 ? buf[i] : 0.f);
    }
  }
}

}  // namespace

template <typename scalar_t>
void kl_forward_cpu(const scalar_t* logp, const scalar_t* ref, const uint8_t* mask, int64_t B, int64_t T,
                    float* kl_per_seq, int64_t* tokens_per_seq, float* kl_sum, int64_t* tokens) {
  for_rows(B, T, [&](int64_t begin, int64_t end) {
    kl_forward_rows(logp, ref, mask, T, begin, end, kl_per_seq, tokens_per_seq);
  });
  double kl_total = 0.0;  // B is at most a few thousand: a serial double sum is exact enough and cheap
  int64_t token_total = 0;
  for (int64_t b = 0; b < B; ++b) {
    kl_total += kl_per_seq[b];
    token_total += tokens_per_seq[b];
  }
  *kl_sum = static_cast<float>(kl_total);
  *tokens = token_total;
}

template <typename scalar_t>
void kl_backward_cpu(const float* grad_per_seq, const float* grad_sum, const scalar_t* logp, const scalar_t* ref,
                     const uint8_t* mask, int64_t B, int64_t T, scalar_t* grad_logp) {
  for_rows(B, T, [&](int64_t begin, int64_t end) {
    kl_backward_rows(grad_per_seq, grad_sum, logp, ref, mask, T, begin, end, grad_logp);
  });
}

template <typename scalar_t>
void group_advantage_cpu(const scalar_t* rewards, int64_t groups, int64_t n, double eps, bool normalize_std,
                         float* out) {
  const auto run = [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) group_advantage_one(rewards + g * n, n, eps, normalize_std, out + g * n);
  };
  constexpr int64_t kTaskRewards = 4096;  // rewards per parallel task; a paper-size batch (4096) is one task
  if (groups * n <= kTaskRewards) {
    run(0, groups);
  } else {
    at::parallel_for(0, groups, std::max<int64_t>(1, kTaskRewards / n), run);
  }
}

#define PRORL_INSTANTIATE_TOKEN_KERNELS(T)                                                                   \
  template void kl_forward_cpu<T>(const T*, const T*, const uint8_t*, int64_t, int64_t, float*, int64_t*, float*, \
                                  int64_t*);                                                                  \
  template void kl_backward_cpu<T>(const float*, const float*, const T*, const T*, const uint8_t*, int64_t,   \
                                   int64_t, T*);
PRORL_INSTANTIATE_TOKEN_KERNELS(float)
PRORL_INSTANTIATE_TOKEN_KERNELS(c10::BFloat16)

#define PRORL_INSTANTIATE_GROUP_KERNEL(T) \
  template void group_advantage_cpu<T>(const T*, int64_t, int64_t, double, bool, float*);
PRORL_INSTANTIATE_GROUP_KERNEL(float)
PRORL_INSTANTIATE_GROUP_KERNEL(double)
PRORL_INSTANTIATE_GROUP_KERNEL(c10::Half)
PRORL_INSTANTIATE_GROUP_KERNEL(c10::BFloat16)

}  // namespace prorl
