// CUDA kernels of the prorl ops; the schemas and op contracts are in ops.cpp, the math (k3, its gradient,
// group advantages) in prorl_math.h, shared with the CPU kernels. The token kernels are memory-bound:
// 16-byte vector loads when every row is 16-byte aligned; the forward is one block per row.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers for nothing.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "ops.h"
#include "prorl_math.h"

namespace prorl {
namespace {

constexpr int kThreads = 256;
// Vector loads each thread issues before it uses any: enough bytes in flight to saturate HBM (one pack
// per step reached ~70% of the copy bandwidth on an H100; the loads of a step must all be outstanding).
constexpr int kUnroll = 4;

// V consecutive elements, loaded or stored as one vector.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// k3 summed over the unmasked tokens of one row, and their count: one block per row.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    kl_forward_kernel(const scalar_t* __restrict__ logp, const scalar_t* __restrict__ ref,
                      const uint8_t* __restrict__ mask, int64_t T, float* __restrict__ kl_out,
                      int64_t* __restrict__ tokens_out) {
  const int64_t row = blockIdx.x;
  const scalar_t* lp = logp + row * T;
  const scalar_t* rf = ref + row * T;
  const uint8_t* m = mask + row * T;
  float kl = 0.f;
  int tokens = 0;
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * V;
  for (int64_t base = static_cast<int64_t>(threadIdx.x) * V; base < T; base += kStep * kUnroll) {
    Pack<scalar_t, V> a[kUnroll], b[kUnroll];
    Pack<uint8_t, V> keep[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = base + u * kStep;
      if (t < T) {
        a[u] = load_pack<scalar_t, V>(lp + t);
        b[u] = load_pack<scalar_t, V>(rf + t);
        keep[u] = load_pack<uint8_t, V>(m + t);
      } else {
        keep[u] = Pack<uint8_t, V>{};  // zeros: masked out
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (keep[u].v[i] != 0) {
          kl += k3_f32(to_f32(b[u].v[i]) - to_f32(a[u].v[i]));
          ++tokens;
        }
      }
    }
  }
  using FloatReduce = cub::BlockReduce<float, kThreads>;
  using IntReduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename FloatReduce::TempStorage float_storage;
  __shared__ typename IntReduce::TempStorage int_storage;
  kl = FloatReduce(float_storage).Sum(kl);
  tokens = IntReduce(int_storage).Sum(tokens);
  if (threadIdx.x == 0) {
    kl_out[row] = kl;
    tokens_out[row] = tokens;
  }
}

// The batch totals of the per-row results, in one block (a fixed order: deterministic), one launch instead
// of two torch sums.
__global__ void __launch_bounds__(kThreads)
    kl_totals_kernel(const float* __restrict__ kl, const int64_t* __restrict__ tokens, int64_t rows,
                     float* __restrict__ kl_sum, int64_t* __restrict__ tokens_sum) {
  double k = 0.0;  // as the CPU kernel: the float32 total is rounded once
  int64_t n = 0;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
    k += kl[r];
    n += tokens[r];
  }
  using DoubleReduce = cub::BlockReduce<double, kThreads>;
  using LongReduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename DoubleReduce::TempStorage double_storage;
  __shared__ typename LongReduce::TempStorage long_storage;
  k = DoubleReduce(double_storage).Sum(k);
  n = LongReduce(long_storage).Sum(n);
  if (threadIdx.x == 0) {
    *kl_sum = static_cast<float>(k);
    *tokens_sum = n;
  }
}

// grad_logp = g[row] * d k3 / d logp where unmasked, 0 elsewhere, with g[row] = grad_per_seq[row] +
// *grad_sum (a null pointer: that gradient is absent, i.e. zero); V elements per thread step.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    kl_backward_kernel(const float* __restrict__ grad_per_seq, const float* __restrict__ grad_sum,
                       const scalar_t* __restrict__ logp, const scalar_t* __restrict__ ref,
                       const uint8_t* __restrict__ mask, int64_t T, int64_t packs, scalar_t* __restrict__ grad_logp) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const float g_sum = grad_sum != nullptr ? *grad_sum : 0.f;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; first < packs;
       first += stride * kUnroll) {
    Pack<scalar_t, V> a[kUnroll], b[kUnroll];
    Pack<uint8_t, V> keep[kUnroll];
    float g[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = first + u * stride;
      if (p < packs) {
        const int64_t e = p * V;  // T % V == 0, so a pack never straddles two rows
        g[u] = (grad_per_seq != nullptr ? grad_per_seq[e / T] : 0.f) + g_sum;
        a[u] = load_pack<scalar_t, V>(logp + e);
        b[u] = load_pack<scalar_t, V>(ref + e);
        keep[u] = load_pack<uint8_t, V>(mask + e);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = first + u * stride;
      if (p < packs) {
        Pack<scalar_t, V> out;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float d = to_f32(b[u].v[i]) - to_f32(a[u].v[i]);
          out.v[i] = from_f32<scalar_t>(keep[u].v[i] != 0 ? g[u] * k3_grad_logp_f32(d) : 0.f);
        }
        *reinterpret_cast<Pack<scalar_t, V>*>(grad_logp + p * V) = out;
      }
    }
  }
}

template <typename scalar_t>
__global__ void group_advantage_kernel(const scalar_t* __restrict__ rewards, int64_t groups, int64_t n, double eps,
                                       bool normalize_std, float* __restrict__ out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < groups) group_advantage_one(rewards + g * n, n, eps, normalize_std, out + g * n);
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls f(scalar_t{}, std::integral_constant<int, V>{}): V = 16 bytes of scalar_t when the rows allow
// 16-byte loads of logp and ref_logp (and V-byte loads of the mask), else 1.
template <typename F>
void dispatch_token_kernel(const at::Tensor& logp, const at::Tensor& ref, const at::Tensor& mask, F&& f) {
  const int64_t T = logp.size(1);
  auto with_width = [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vectorizable = T % V == 0 && aligned(logp.const_data_ptr(), 16) &&
                              aligned(ref.const_data_ptr(), 16) && aligned(mask.const_data_ptr(), V);
    if (vectorizable) {
      f(scalar_t{}, std::integral_constant<int, V>{});
    } else {
      f(scalar_t{}, std::integral_constant<int, 1>{});
    }
  };
  if (logp.scalar_type() == at::kFloat) {
    with_width(float{});
  } else {
    with_width(c10::BFloat16{});
  }
}

const uint8_t* mask_bytes(const at::Tensor& mask) {
  return reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_reduce_cuda(const at::Tensor& logp_in,
                                                                          const at::Tensor& ref_in,
                                                                          const at::Tensor& mask_in) {
  check_token_tensors(logp_in, ref_in, mask_in);
  const c10::cuda::CUDAGuard guard(logp_in.device());
  const at::Tensor logp = logp_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  const int64_t B = logp.size(0), T = logp.size(1);
  at::Tensor kl = logp.new_empty({B}, logp.options().dtype(at::kFloat));
  at::Tensor tokens = logp.new_empty({B}, logp.options().dtype(at::kLong));
  at::Tensor kl_sum = logp.new_empty({}, logp.options().dtype(at::kFloat));
  at::Tensor tokens_sum = logp.new_empty({}, logp.options().dtype(at::kLong));
  if (B == 0) return {kl, tokens, kl_sum.zero_(), tokens_sum.zero_()};
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), "prorl::kl_reduce: too many rows: ", B);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_token_kernel(logp, ref, mask, [&](auto tag, auto width) {
    using scalar_t = decltype(tag);
    kl_forward_kernel<scalar_t, decltype(width)::value><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        logp.const_data_ptr<scalar_t>(), ref.const_data_ptr<scalar_t>(), mask_bytes(mask), T,
        kl.mutable_data_ptr<float>(), tokens.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  kl_totals_kernel<<<1, kThreads, 0, stream>>>(kl.const_data_ptr<float>(), tokens.const_data_ptr<int64_t>(), B,
                                               kl_sum.mutable_data_ptr<float>(), tokens_sum.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {kl, tokens, kl_sum, tokens_sum};
}

at::Tensor kl_reduce_backward_cuda(const std::optional<at::Tensor>& grad_per_seq_in,
                                   const std::optional<at::Tensor>& grad_sum_in, const at::Tensor& logp_in,
                                   const at::Tensor& ref_in, const at::Tensor& mask_in) {
  check_token_tensors(logp_in, ref_in, mask_in);
  check_kl_grads(grad_per_seq_in, grad_sum_in, logp_in);
  const c10::cuda::CUDAGuard guard(logp_in.device());
  at::Tensor grad_per_seq, grad_sum;  // hold the float32 copies, if any, while the kernel runs
  const float* per_seq = float_data_or_null(grad_per_seq_in, grad_per_seq);
  const float* sum = float_data_or_null(grad_sum_in, grad_sum);  // read on the device: no host sync
  const at::Tensor logp = logp_in.contiguous(), ref = ref_in.contiguous(), mask = mask_in.contiguous();
  const int64_t T = logp.size(1);
  at::Tensor grad_logp = logp.new_empty(logp.sizes());
  if (logp.numel() == 0) return grad_logp;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, logp.get_device()));
  const int64_t max_blocks = static_cast<int64_t>(sms) * 8;  // grid-stride beyond that (kUnroll packs a step)
  dispatch_token_kernel(logp, ref, mask, [&](auto tag, auto width) {
    using scalar_t = decltype(tag);
    constexpr int V = decltype(width)::value;
    const int64_t packs = logp.numel() / V;
    const int64_t blocks = std::min<int64_t>((packs + kThreads - 1) / kThreads, max_blocks);
    kl_backward_kernel<scalar_t, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        per_seq, sum, logp.const_data_ptr<scalar_t>(), ref.const_data_ptr<scalar_t>(), mask_bytes(mask), T, packs,
        grad_logp.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logp;
}

at::Tensor group_advantage_cuda(const at::Tensor& rewards_in, int64_t group_size, double eps, bool normalize_std) {
  check_rewards(rewards_in, group_size);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const at::Tensor rewards = rewards_in.contiguous();
  const int64_t groups = rewards.numel() / group_size;
  at::Tensor out = rewards.new_empty({rewards.numel()}, rewards.options().dtype(at::kFloat));
  if (groups == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "group_advantage_cuda", [&] {
    group_advantage_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        rewards.const_data_ptr<scalar_t>(), groups, group_size, eps, normalize_std, out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace prorl

TORCH_LIBRARY_IMPL(prorl, CUDA, m) {
  m.impl("group_advantage", &prorl::group_advantage_cuda);
  m.impl("kl_reduce", &prorl::kl_reduce_cuda);
  m.impl("kl_reduce_backward", &prorl::kl_reduce_backward_cuda);
}
