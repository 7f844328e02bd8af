// Scalar math shared by the CPU kernels (cpu_kernels.cpp) and the CUDA kernels (ops_cuda.cu), so that both
// compute the same formulas (only exp and expm1 differ, by an ulp or two). Everything is branch-free (selects,
// no ifs) so that the CPU loops over it vectorize; the bit tricks work the same on the host and the device.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define PRORL_HD __host__ __device__ __forceinline__
#else
#define PRORL_HD inline __attribute__((always_inline))
#endif

namespace prorl {

PRORL_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

PRORL_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// Loads as float32: bfloat16 is the upper half of a float32, so the conversion is exact.
PRORL_HD float to_f32(float x) { return x; }
PRORL_HD float to_f32(c10::BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.x) << 16); }

// Stores a float32 as T; bfloat16 rounds to nearest even (and keeps NaN a NaN), like c10's conversion.
template <typename T>
PRORL_HD T from_f32(float x);
template <>
PRORL_HD float from_f32<float>(float x) { return x; }
template <>
PRORL_HD c10::BFloat16 from_f32<c10::BFloat16>(float x) {
  const uint32_t bits = float_to_bits(x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// exp(x) in float32 within ~2 ulp. On the GPU that is CUDA's expf (a hardware exp2 inside). On the CPU it
// is Cephes' expf, branch-free so that loops over it vectorize: x = n ln2 + r with |r| <= ln2/2, exp(r) by a
// degree-6 polynomial, 2^n built in the exponent bits. NaN in gives NaN out, x > 88.72 gives inf, results
// below FLT_MIN (x < -87.3) come out as ~1e-38 instead of a denormal.
PRORL_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);  // fewer instructions than the polynomial: the kernels stay memory-bound in bfloat16
#else
  constexpr float kLo = -87.3365447f, kHi = 88.7228391f;
  float xc = x > kLo ? x : kLo;  // NaN -> kLo here; restored below
  xc = xc < kHi ? xc : kHi;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (no rint, which baseline x86-64 lacks).
  const float n = (xc * 1.44269504f + 12582912.f) - 12582912.f;
  // ln2 split in two so that n * 0.693359375 is exact.
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  // 2^n as two factors: n reaches 128, which one exponent field cannot hold.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;
  const float y = p * bits_to_float(static_cast<uint32_t>(half + 127) << 23) *
                  bits_to_float(static_cast<uint32_t>(ni - half + 127) << 23);
  return x != x ? x : (x > kHi ? INFINITY : y);
#endif
}

// The k3 KL estimator as a function of d = ref_logp - logp: k3(d) = exp(d) - 1 - d >= 0.
// For |d| < 1/2 the direct formula cancels (k3 ~ d^2/2), so a Taylor series to d^9 is used there
// (truncation error < 3e-9 relative); outside, the direct formula loses at most a few ulp of exp(d).
// Its derivative is expm1(d) = d + k3(d), also free of cancellation.
PRORL_HD float k3_f32(float d) {
  float p = 1.f / 362880.f;
  p = p * d + 1.f / 40320.f;
  p = p * d + 1.f / 5040.f;
  p = p * d + 1.f / 720.f;
  p = p * d + 1.f / 120.f;
  p = p * d + 1.f / 24.f;
  p = p * d + 1.f / 6.f;
  p = p * d + 0.5f;
  const float series = p * d * d;
  const float direct = exp_f32(d) - 1.f - d;
  return fabsf(d) < 0.5f ? series : direct;
}

// expm1(d) = exp(d) - 1 within a few ulp. On the GPU that is CUDA's expm1f. On the CPU one range reduction
// and one polynomial, branch-free: d = n ln2 + r with |r| <= ln2/2, expm1(r) = r + r^2 P(r) (Taylor to r^8,
// truncation < 4e-9 relative), and expm1(d) = 2^n expm1(r) + (2^n - 1). For n = 0, r = d exactly and there is
// no cancellation; for n != 0 the parts are of order one or the result is. Half the work of d + k3(d), which
// evaluates both the series and exp (the backward kernel ran 20% faster with this).
PRORL_HD float expm1_f32(float d) {
#if defined(__CUDA_ARCH__)
  return expm1f(d);
#else
  constexpr float kLo = -87.3365447f, kHi = 88.7228391f;
  float dc = d > kLo ? d : kLo;  // NaN -> kLo here; restored below
  dc = dc < kHi ? dc : kHi;
  const float n = (dc * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest, as in exp_f32
  float r = dc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.f / 40320.f;
  p = p * r + 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  const float expm1_r = r + (r * r) * p;
  // 2^n as two factors, as in exp_f32.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;
  const float s1 = bits_to_float(static_cast<uint32_t>(half + 127) << 23);
  const float s2 = bits_to_float(static_cast<uint32_t>(ni - half + 127) << 23);
  const float y = (expm1_r * s1) * s2 + (s1 * s2 - 1.f);
  return d != d ? d : (d > kHi ? INFINITY : y);
#endif
}

// d k3(ref - logp) / d logp = -expm1(d), with d = ref - logp.
PRORL_HD float k3_grad_logp_f32(float d) { return -expm1_f32(d); }

// Advantages of one group of n rewards: (r - mean) / (std + eps), population std (or r - mean when
// !normalize_std). float64 inside: in float32 the mean of n equal rewards can miss them by an ulp, and
// that ulp divided by (std ~ ulp) + eps would give a zero-variance group advantages of ~0.05.
template <typename scalar_t>
PRORL_HD void group_advantage_one(const scalar_t* r, int64_t n, double eps, bool normalize_std, float* out) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(r[j]);
  const double mean = sum / static_cast<double>(n);
  double squares = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double c = static_cast<double>(r[j]) - mean;
    squares += c * c;
  }
  const double denom = normalize_std ? sqrt(squares / static_cast<double>(n)) + eps : 1.0;
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>((static_cast<double>(r[j]) - mean) / denom);
}

}  // namespace prorl
