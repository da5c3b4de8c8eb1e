// Group-relative advantages (docs/math.md section 2): one task per group of G contiguous rewards,
// statistics in double.
#include "common.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <string>

namespace lvrpo {
namespace {

enum class Scale { kGroup, kBatch, kNone };

Scale parse_scale(const std::string& scale) {
  if (scale == "group") return Scale::kGroup;
  if (scale == "batch") return Scale::kBatch;
  if (scale == "none") return Scale::kNone;
  TORCH_CHECK(false, "scale must be 'group', 'batch' or 'none', got '", scale, "'");
}

// Unbiased (Bessel) standard deviation of x[0:n), n >= 2, as torch.std.
double std_dev(const float* x, int64_t n) {
  double mean = 0.0;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= static_cast<double>(n);
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
  return std::sqrt(ss / static_cast<double>(n - 1));
}

}  // namespace

at::Tensor group_advantages(const at::Tensor& rewards, int64_t group_size, const std::string& scale, double eps,
                            bool leave_one_out) {
  TORCH_CHECK(rewards.dim() == 1, "rewards must be [B], got shape ", rewards.sizes());
  const int64_t B = rewards.size(0);
  check_tensor(rewards, "rewards", {B}, at::kFloat);
  TORCH_CHECK(group_size >= 2 && B % group_size == 0, "group_size must be >= 2 and divide B = ", B, ", got ",
              group_size);
  const Scale mode = parse_scale(scale);
  const float* r = rewards.const_data_ptr<float>();
  at::Tensor out = at::empty({B}, rewards.options());
  float* adv = out.mutable_data_ptr<float>();
  const double batch_std = mode == Scale::kBatch ? std_dev(r, B) : 0.0;
  const int64_t G = group_size;
  // RLOO: r - mean(others) = r - (G mu - r) / (G - 1) = G / (G - 1) (r - mu).
  const double centering = leave_one_out ? static_cast<double>(G) / static_cast<double>(G - 1) : 1.0;
  at::parallel_for(0, B / G, std::max<int64_t>(1, 4096 / G), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const float* x = r + g * G;
      float* a = adv + g * G;
      bool equal = true;  // a NaN makes the group unequal, so it reaches the output
      for (int64_t i = 1; i < G; ++i) equal = equal && x[i] == x[0];
      if (equal && x[0] == x[0]) {  // no signal: exactly 0, never 0 / 0
        for (int64_t i = 0; i < G; ++i) a[i] = 0.0f;
        continue;
      }
      double mean = 0.0;
      for (int64_t i = 0; i < G; ++i) mean += x[i];
      mean /= static_cast<double>(G);
      double denom = 1.0;
      if (mode == Scale::kGroup) denom = std_dev(x, G) + eps;
      if (mode == Scale::kBatch) denom = batch_std + eps;
      for (int64_t i = 0; i < G; ++i) a[i] = static_cast<float>((x[i] - mean) * centering / denom);
    }
  });
  return out;
}

}  // namespace lvrpo
