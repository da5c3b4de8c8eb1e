// Row statistics of a logits tile (log-prob of the target, log-sum-exp, entropy) and their in-place
// gradient: the row-wise half of the fused linear log-probabilities. The LM-head matmuls that make
// and consume the tile run in ATen's BLAS (lvrpo_fast/logprobs.py, linear_grpo_loss.py).
#include "common.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

namespace lvrpo {
namespace {

// Elements of a row handled at a time: 8 KiB of float, so a block read for its maximum is still in
// L1 when it is read again for the exponentials; the row itself is read from memory once.
constexpr int64_t kBlock = 2048;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Largest element of x[0:n), -inf when empty; sets *has_nan if an element is NaN (a comparison-based
// maximum skips it, and an all-NaN block would then look like an all -inf one and be dropped).
LVRPO_MULTIVERSION float block_max(const float* x, int64_t n, bool* has_nan) {
  vfloat m = splat(kNegInf);
  vint nan = vint{};
  auto visit = [&](vfloat v) {
    m = select(v > m, v, m);
    nan |= v != v;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) visit(load(x + i));
  if (i < n) visit(load_partial(x + i, n - i, kNegInf));
  float result = kNegInf;
  int32_t any_nan = 0;
  for (int j = 0; j < kLanes; ++j) {
    result = m[j] > result ? m[j] : result;
    any_nan |= nan[j];
  }
  if (any_nan) *has_nan = true;
  return result;
}

// With d = (x - m) / T (m >= every x, a raw logit): sum exp(d) and, with_entropy, sum exp(d) * d
// over x[0:n). Subtracting before scaling makes d exact near the maximum (0 for the maximum itself),
// so a row whose mass sits on one logit of 1e4 gets S = 1, U = 0 and entropy exactly 0. The second
// sum is relative to the running maximum so that entropy = log S - U / S does not cancel either; a
// -inf logit (and the -inf padding of a partial vector) contributes 0 to both, not 0 * -inf.
template <bool kWithEntropy>
LVRPO_INLINE void exp_moments_lanes(const float* x, int64_t n, float inv_t, float m, float* sum_exp,
                                    float* sum_exp_d) {
  vfloat s = vfloat{}, u = vfloat{};
  const vfloat running_max = splat(m), scale = splat(inv_t), zero = splat(0.0f);
  auto visit = [&](vfloat v) {
    const vfloat d = (v - running_max) * scale;
    const vfloat e = exp_lanes(d);
    s += e;
    if constexpr (kWithEntropy) u += select(e > zero, e * d, zero);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) visit(load(x + i));
  if (i < n) visit(load_partial(x + i, n - i, kNegInf));
  float total_s = 0.0f, total_u = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    total_s += s[j];
    total_u += u[j];
  }
  *sum_exp = total_s;
  *sum_exp_d = total_u;
}

LVRPO_MULTIVERSION void exp_moments(const float* x, int64_t n, float inv_t, float m, bool with_entropy,
                                    float* sum_exp, float* sum_exp_d) {
  if (with_entropy) {
    exp_moments_lanes<true>(x, n, inv_t, m, sum_exp, sum_exp_d);
  } else {
    exp_moments_lanes<false>(x, n, inv_t, m, sum_exp, sum_exp_d);
  }
}

// In place: x <- (-grad_logp * p - grad_entropy * p * (log p + entropy)) / T with log p = x / T - lse,
// the gradient of every non-target logit (the caller fixes the target's). One read and one write.
// x / T is rounded before lse is subtracted, as logits_stats rounded it: fused, a logit of 1e4 with
// p = 1 would get log p = the product's rounding error (~5e-4) instead of 0.
template <bool kWithEntropy>
LVRPO_INLINE void grad_lanes(float* x, int64_t n, float inv_t, float lse, float grad_logp, float grad_entropy,
                             float entropy) {
  const vfloat zero = splat(0.0f);
  auto grad = [&](vfloat v) {
    const vfloat log_p = rounded(v * inv_t) - lse;
    const vfloat p = exp_lanes(log_p);
    vfloat g = -grad_logp * p;
    // p log p -> 0 as p -> 0: a -inf logit gets 0, not 0 * -inf.
    if constexpr (kWithEntropy) g -= grad_entropy * select(p > zero, p * (log_p + entropy), zero);
    return g * inv_t;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(x + i, grad(load(x + i)));
  if (i < n) {
    float lanes[kLanes];
    store(lanes, grad(load_partial(x + i, n - i, 0.0f)));
    std::memcpy(x + i, lanes, sizeof(float) * (n - i));
  }
}

LVRPO_MULTIVERSION void grad_block(float* x, int64_t n, float inv_t, float lse, float grad_logp, bool with_entropy,
                                   float grad_entropy, float entropy) {
  if (with_entropy) {
    grad_lanes<true>(x, n, inv_t, lse, grad_logp, grad_entropy, entropy);
  } else {
    grad_lanes<false>(x, n, inv_t, lse, grad_logp, grad_entropy, entropy);
  }
}

// Reduced-precision tiles go through a float block buffer; float tiles are used in place.
LVRPO_MULTIVERSION void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(src[i].x) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

LVRPO_MULTIVERSION void widen(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename scalar_t>
void narrow(const float* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);  // round to nearest even
}

template <typename scalar_t>
LVRPO_INLINE const float* as_float(const scalar_t* src, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    widen(src, buffer, n);
    return buffer;
  }
}

// Rows of the same tile run on different threads; a row is never split, so the result of a row
// does not depend on the number of threads. Grain: enough elements per task to pay for a task.
int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(vocab, 1)); }

template <typename scalar_t>
void stats_rows(const scalar_t* logits, const int64_t* targets, int64_t begin, int64_t end, int64_t V,
                int64_t row_stride, float inv_t, float* logp, float* lse, float* entropy) {
  float buffer[kBlock];
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* row = logits + r * row_stride;
    // Online log-sum-exp: running maximum m of the raw logits x, with d = (x - m) / T,
    // S = sum exp(d) and U = sum exp(d) d, in double across blocks. -inf is the identity of the maximum.
    // lse = m / T + log S, entropy = log S - U / S (two terms >= 0: nothing of size m / T cancels).
    float m = kNegInf;
    double s = 0.0, u = 0.0;
    bool has_nan = false;
    for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
      const int64_t n = std::min(kBlock, V - b0);
      const float* x = as_float(row + b0, n, buffer);
      const float block_m = block_max(x, n, &has_nan);
      if (block_m > m) {
        if (s > 0.0) {  // move S and U to the new maximum: exp(d') = a exp(d), a = exp(shift) <= 1
          const double shift = (static_cast<double>(m) - block_m) * inv_t;
          const double a = std::exp(shift);
          u = a * (u + shift * s);
          s = a * s;
        }
        m = block_m;
      }
      if (m == kNegInf) continue;  // everything so far is -inf: nothing to add
      float block_s, block_u;
      exp_moments(x, n, inv_t, m, entropy != nullptr, &block_s, &block_u);
      s += block_s;
      u += block_u;
    }
    // -1: the target is not in this tile (a vocab-parallel shard that does not hold it); its logp is
    // undefined, NaN, so that a caller who reads it anyway cannot get a finite wrong number.
    const int64_t t = targets[r];
    TORCH_CHECK(t >= -1 && t < V, "targets[", r, "] = ", t, " is outside [0, ", V, ") and is not -1");
    if (has_nan) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      lse[r] = logp[r] = nan;
      if (entropy != nullptr) entropy[r] = nan;
      continue;
    }
    const double log_s = std::log(s);
    const double lp = t < 0 ? std::numeric_limits<double>::quiet_NaN()
                            : (static_cast<double>(static_cast<float>(row[t])) - m) * inv_t - log_s;
    lse[r] = static_cast<float>(static_cast<double>(m) * inv_t + log_s);
    // logp <= 0 and entropy >= 0 hold exactly; the comparisons (not std::min / max) keep a NaN.
    logp[r] = static_cast<float>(lp > 0.0 ? 0.0 : lp);
    if (entropy != nullptr) {
      const double h = log_s - u / s;
      entropy[r] = static_cast<float>(h < 0.0 ? 0.0 : h);
    }
  }
}

template <typename scalar_t>
void grad_rows(scalar_t* logits, const int64_t* targets, const float* lse, const float* entropy,
               const float* grad_logp, const float* grad_entropy, int64_t begin, int64_t end, int64_t V,
               float inv_t) {
  float buffer[kBlock];
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* row = logits + r * V;
    const int64_t t = targets[r];  // -1: not in this tile, no one-hot term (see stats_rows)
    TORCH_CHECK(t >= -1 && t < V, "targets[", r, "] = ", t, " is outside [0, ", V, ") and is not -1");
    const float g_logp = grad_logp[r];
    const float g_ent = grad_entropy == nullptr ? 0.0f : grad_entropy[r];
    if (g_logp == 0.0f && g_ent == 0.0f) {  // masked rows: exactly zero, whatever the logits hold
      std::memset(static_cast<void*>(row), 0, sizeof(scalar_t) * V);  // +0 is all zero bits in each dtype
      continue;
    }
    const float H = entropy == nullptr ? 0.0f : entropy[r];
    const bool with_entropy = grad_entropy != nullptr;
    const float z_target = t < 0 ? 0.0f : rounded(static_cast<float>(row[t]) * inv_t);
    for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
      const int64_t n = std::min(kBlock, V - b0);
      if constexpr (std::is_same_v<scalar_t, float>) {
        grad_block(row + b0, n, inv_t, lse[r], g_logp, with_entropy, g_ent, H);
      } else {
        widen(row + b0, buffer, n);
        grad_block(buffer, n, inv_t, lse[r], g_logp, with_entropy, g_ent, H);
        narrow(buffer, row + b0, n);
      }
    }
    if (t < 0) continue;
    // The target's own term, from its logit read before the row was overwritten, in double:
    // g_logp (1 - p) cancels when p -> 1.
    const double log_p = static_cast<double>(z_target) - lse[r];
    const double p = std::exp(log_p);
    const double entropy_term = p > 0.0 ? p * (log_p + H) : 0.0;
    row[t] = static_cast<scalar_t>((g_logp * (1.0 - p) - g_ent * entropy_term) * inv_t);
  }
}

// strided_rows: the rows may lie further apart than V (a block of a wider tile's columns), V contiguous.
void check_tile(const at::Tensor& logits, const at::Tensor& targets, double temperature, bool strided_rows = false) {
  TORCH_CHECK(logits.dim() == 2, "logits must be a 2-D [C, V] tile, got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "logits must be float32, float16 or bfloat16, got ", dtype);
  if (strided_rows) {
    TORCH_CHECK(logits.device().is_cpu(), "logits must be a CPU tensor, got one on ", logits.device());
    TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, "logits must be contiguous along V, got strides ",
                logits.strides());
    TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), "logits' rows must not overlap, got strides ",
                logits.strides());
  } else {
    check_tensor(logits, "logits", logits.sizes());
  }
  TORCH_CHECK(logits.size(1) > 0, "logits must have at least one column (V >= 1)");
  check_tensor(targets, "targets", {logits.size(0)}, at::kLong);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be > 0, got ", temperature);
}

#define LVRPO_DISPATCH_TILE_TYPES(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> logits_stats(const at::Tensor& logits,
                                                                           const at::Tensor& targets,
                                                                           double temperature, bool with_entropy) {
  check_tile(logits, targets, temperature, /*strided_rows=*/true);
  const int64_t C = logits.size(0), V = logits.size(1), row_stride = C > 1 ? logits.stride(0) : V;
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({C}, f32);
  at::Tensor lse = at::empty({C}, f32);
  std::optional<at::Tensor> entropy;
  if (with_entropy) entropy = at::empty({C}, f32);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  float* logp_ptr = logp.mutable_data_ptr<float>();
  float* lse_ptr = lse.mutable_data_ptr<float>();
  float* ent_ptr = with_entropy ? entropy->mutable_data_ptr<float>() : nullptr;
  LVRPO_DISPATCH_TILE_TYPES(logits.scalar_type(), "logits_stats", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, C, row_grain(V), [&](int64_t begin, int64_t end) {
      stats_rows<scalar_t>(x, tgt, begin, end, V, row_stride, inv_t, logp_ptr, lse_ptr, ent_ptr);
    });
  });
  return {logp, lse, entropy};
}

void logits_grad_(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                  const std::optional<at::Tensor>& grad_entropy, double temperature) {
  check_tile(logits, targets, temperature);
  const int64_t C = logits.size(0), V = logits.size(1);
  check_tensor(lse, "lse", {C}, at::kFloat);
  check_tensor(grad_logp, "grad_logp", {C}, at::kFloat);
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(),
              "entropy and grad_entropy must be given together (or both None)");
  if (entropy.has_value()) {
    check_tensor(*entropy, "entropy", {C}, at::kFloat);
    check_tensor(*grad_entropy, "grad_entropy", {C}, at::kFloat);
  }
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const float* lse_ptr = lse.const_data_ptr<float>();
  const float* gl_ptr = grad_logp.const_data_ptr<float>();
  const float* ent_ptr = entropy.has_value() ? entropy->const_data_ptr<float>() : nullptr;
  const float* ge_ptr = grad_entropy.has_value() ? grad_entropy->const_data_ptr<float>() : nullptr;
  LVRPO_DISPATCH_TILE_TYPES(logits.scalar_type(), "logits_grad_", [&] {
    scalar_t* x = logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, row_grain(V), [&](int64_t begin, int64_t end) {
      grad_rows<scalar_t>(x, tgt, lse_ptr, ent_ptr, gl_ptr, ge_ptr, begin, end, V, inv_t);
    });
  });
}

}  // namespace lvrpo
