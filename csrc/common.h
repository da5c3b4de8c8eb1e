// Shared pieces of the C++ CPU backend of lvrpo_fast: declarations of the primitives (the contract is
// in lvrpo_fast/contract.py), the loss parameters, runtime ISA selection and a vectorizable exp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

namespace lvrpo {

// Columns of the per-sequence statistics, mirrored from lvrpo_fast/contract.py (the Python side checks
// the two agree when the extension loads).
enum Stat : int64_t {
  kStatLoss = 0,
  kStatCount = 1,
  kStatKl = 2,
  kStatClipLow = 3,
  kStatClipHigh = 4,
  kStatClipRegion = 5,
  kStatRatio = 6,
  kStatEntropy = 7,
  kStatKept = 8,
  kStatEntropyKept = 9,
  kStatSeqClipLow = 10,
  kStatSeqClipHigh = 11,
  kStatSeqWeight = 12,
  kStatWeight = 13,
  kNumStats = 14,
};

// docs/math.md section 3: the log-ratio is clamped to [-20, 20] before exp (verl's guard against exp
// overflow times a zero mask); lvrpo_fast.contract.LOG_RATIO_CLAMP, checked equal when the extension loads.
constexpr double kLogRatioClamp = 20.0;
// vespo's log-weight floor, log(1e-8) (lvrpo_fast.contract.VESPO_LOG_W_MIN, checked when the extension loads).
constexpr double kVespoLogWMin = -18.420680743952367;

enum PolicyKind : int64_t { kPolicyClip = 0, kPolicyCispo = 1, kPolicySapo = 2, kPolicyVespo = 3 };
enum KlEstimator : int64_t { kKlNone = 0, kKlK1 = 1, kKlK2 = 2, kKlK3 = 3 };

// The scalar parameters of the per-token math: exactly the keys of lvrpo_fast.contract.token_loss_params
// (the Python side fills the struct field by field from that dict and checks, when the extension
// loads, that the two lists agree). Aggregation is not here: it arrives folded into the per-sequence
// row scale. One list (type, name) written once, expanded into the struct and into its bindings.
#define LVRPO_LOSS_PARAMS(X)          \
  X(int64_t, policy)                  \
  X(double, epsilon_low)              \
  X(double, epsilon_high)             \
  X(bool, has_delta)                  \
  X(double, delta)                    \
  X(bool, has_clip_ratio_c)           \
  X(double, clip_ratio_c)             \
  X(double, beta)                     \
  X(int64_t, kl_estimator)            \
  X(bool, use_bias_correction_kl)     \
  X(bool, sequence_level)             \
  X(double, sapo_temperature_pos)     \
  X(double, sapo_temperature_neg)     \
  X(double, vespo_k_pos)              \
  X(double, vespo_lambda_pos)         \
  X(double, vespo_k_neg)              \
  X(double, vespo_lambda_neg)         \
  X(bool, has_off_policy_mask)        \
  X(double, off_policy_mask_threshold)

struct LossParams {
#define LVRPO_FIELD(type, name) type name{};
  LVRPO_LOSS_PARAMS(LVRPO_FIELD)
#undef LVRPO_FIELD
};

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> logits_stats(const at::Tensor& logits,
                                                                           const at::Tensor& targets,
                                                                           double temperature, bool with_entropy);

void logits_grad_(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                  const std::optional<at::Tensor>& grad_entropy, double temperature);

std::tuple<at::Tensor, std::optional<at::Tensor>> grpo_token_loss(
    const at::Tensor& logp, const std::optional<at::Tensor>& logp_old, const std::optional<at::Tensor>& logp_ref,
    const std::optional<at::Tensor>& logp_sampling, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& rollout_weights, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& entropy_threshold, const at::Tensor& row_scale, const LossParams& params,
    bool need_grad);

at::Tensor group_advantages(const at::Tensor& rewards, int64_t group_size, const std::string& scale, double eps,
                            bool leave_one_out);

at::Tensor process_advantages(const at::Tensor& step_rewards, const at::Tensor& step_ends,
                              const at::Tensor& step_offsets, int64_t group_size, int64_t seq_len,
                              const std::string& scale, double eps, bool leave_one_out,
                              const std::optional<at::Tensor>& outcome_advantages, double outcome_weight);

// Checks shared by the primitives: a clear message naming the argument instead of a wild read.
inline void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  check_tensor(t, name, shape);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// GCC or clang: the hot loops use their vector extensions and an empty asm (a compiler without them
// fails to build, and the package falls back to the reference with that reason).
// The compiled library may be reused on another CPU (the build cache is shared), so no -march flag:
// hot leaf loops are compiled once per ISA level and the loader's ifunc resolver picks the best one
// for the running CPU (GCC on x86-64 Linux; other compilers and CPUs get the baseline build).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LVRPO_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LVRPO_MULTIVERSION
#endif

#define LVRPO_INLINE inline __attribute__((always_inline))

// The hot loops are written on GCC vector-extension types of 16 floats rather than left to the
// auto-vectorizer (which keeps a float reduction scalar unless allowed to reorder it, i.e. -ffast-math,
// which would also break the inf/NaN handling). Each ISA clone lowers a 16-lane operation to one
// AVX-512, two AVX2 or four SSE instructions, so the summation order is fixed; rows never span
// threads, so results do not depend on the thread count.
constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(kLanes * sizeof(uint32_t))));

LVRPO_INLINE vfloat splat(float x) { return vfloat{} + x; }

LVRPO_INLINE vfloat load(const float* p) {  // unaligned
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LVRPO_INLINE void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// The first n < kLanes elements of p, the other lanes set to `fill`.
LVRPO_INLINE vfloat load_partial(const float* p, int64_t n, float fill) {
  float lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = j < n ? p[j] : fill;
  return load(lanes);
}

LVRPO_INLINE vfloat select(vint condition, vfloat a, vfloat b) { return condition ? a : b; }

// x, rounded to its type here. The build lets the compiler fuse a product into a following addition
// (FMA, ~1.5x faster exponentials), which skips the product's rounding; where a value must round
// exactly as it did elsewhere (x / T in the gradient, as in the statistics), an empty asm on a memory
// operand hides it from the optimizer. Costs one store and one load.
template <typename T>
LVRPO_INLINE T rounded(T x) {
  asm("" : "+m"(x));
  return x;
}

// exp(x) lane-wise, without a library call. Range reduction x = n ln2 + r, |r| <= ln2/2, with ln2
// split in two so n*ln2_hi is exact; degree-7 Taylor polynomial (truncation < 1e-8 relative); 2^n
// built in the exponent bits. Max error 1.6 ulp on [-87, 88] (without FMA; less with it). Exactly 0 below -87.3 (where the true
// value leaves the normal range; callers rely on exp(-inf) == 0), +inf above 88 (the callers'
// arguments are <= ~0; this only keeps the bit trick in range), NaN stays NaN.
LVRPO_INLINE vfloat exp_lanes(vfloat x) {
  const vfloat lowest = splat(-87.3365f), highest = splat(88.0f);
  const vfloat round = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  vfloat xc = select(x < lowest, lowest, x);  // comparisons are false for NaN: it passes through
  xc = select(xc > highest, highest, xc);
  const vfloat shifted = xc * 1.44269504088896341f + round;
  const vfloat n = shifted - round;
  vfloat r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // The low mantissa bits of `shifted` hold n (offset by 0x400000); move n + 127 into the exponent.
  const vuint exponent = ((vuint)shifted - 0x4B400000u + 127u) << 23;
  const vfloat y = p * (vfloat)exponent;
  return select(x < lowest, splat(0.0f), select(x > highest, splat(std::numeric_limits<float>::infinity()), y));
}

}  // namespace lvrpo
