// Process-reward advantages (docs/math.md section 11): packed step rewards -> per-token advantages [B, T].
// One task per group: its steps are contiguous in the packed arrays, normalized in double, then each of
// its sequences is written from its last token backwards with a running sum of the steps ending at or
// after the token (O(T + K) per sequence).
#include "common.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace lvrpo {
namespace {

enum class StepScale { kGroup, kBatch, kNone };

StepScale parse_step_scale(const std::string& scale) {
  if (scale == "group") return StepScale::kGroup;
  if (scale == "batch") return StepScale::kBatch;
  if (scale == "none") return StepScale::kNone;
  TORCH_CHECK(false, "scale must be 'group', 'batch' or 'none', got '", scale, "'");
}

double mean_of(const float* x, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return sum / static_cast<double>(n);
}

// Unbiased (Bessel) standard deviation of x[0:n), n >= 2, as torch.std.
double unbiased_std(const float* x, int64_t n) {
  const double mean = mean_of(x, n);
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
  return std::sqrt(ss / static_cast<double>(n - 1));
}

}  // namespace

at::Tensor process_advantages(const at::Tensor& step_rewards, const at::Tensor& step_ends,
                              const at::Tensor& step_offsets, int64_t group_size, int64_t seq_len,
                              const std::string& scale, double eps, bool leave_one_out,
                              const std::optional<at::Tensor>& outcome_advantages, double outcome_weight) {
  TORCH_CHECK(step_rewards.dim() == 1, "step_rewards must be [S], got shape ", step_rewards.sizes());
  TORCH_CHECK(step_offsets.dim() == 1 && step_offsets.size(0) >= 1, "step_offsets must be [B + 1], got shape ",
              step_offsets.sizes());
  const int64_t S = step_rewards.size(0);
  const int64_t B = step_offsets.size(0) - 1;
  const int64_t T = seq_len;
  check_tensor(step_rewards, "step_rewards", {S}, at::kFloat);
  check_tensor(step_ends, "step_ends", {S}, at::kLong);
  check_tensor(step_offsets, "step_offsets", {B + 1}, at::kLong);
  TORCH_CHECK(group_size >= 2 && B % group_size == 0, "group_size must be >= 2 and divide B = ", B, ", got ",
              group_size);
  TORCH_CHECK(T >= 0, "seq_len must be >= 0, got ", T);
  const StepScale mode = parse_step_scale(scale);
  const float* r = step_rewards.const_data_ptr<float>();
  const int64_t* ends = step_ends.const_data_ptr<int64_t>();
  const int64_t* offsets = step_offsets.const_data_ptr<int64_t>();
  const float* outcome = nullptr;
  if (outcome_advantages.has_value()) {
    check_tensor(*outcome_advantages, "outcome_advantages", {B}, at::kFloat);
    outcome = outcome_advantages->const_data_ptr<float>();
  }
  // The Python side validated the packing (lvrpo_fast.validate.check_process_values); checked again
  // here, O(B + S), because a wrong offset would be a read out of bounds, not merely a wrong number.
  TORCH_CHECK(offsets[0] == 0 && offsets[B] == S, "step_offsets must start at 0 and end at S = ", S);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(offsets[b] <= offsets[b + 1], "step_offsets must be non-decreasing at ", b);
    for (int64_t s = offsets[b]; s < offsets[b + 1]; ++s) {
      TORCH_CHECK(ends[s] >= 0 && ends[s] < T && (s == offsets[b] || ends[s] > ends[s - 1]),
                  "step_ends must increase strictly within each sequence and lie in [0, ", T, "), step ", s);
    }
  }
  for (int64_t g = 0; g < B / group_size; ++g) {
    TORCH_CHECK(offsets[(g + 1) * group_size] > offsets[g * group_size], "group ", g, " has no step");
  }
  at::Tensor out = at::empty({B, T}, step_rewards.options());
  float* adv = out.mutable_data_ptr<float>();
  const double batch_std = mode == StepScale::kBatch && S > 1 ? unbiased_std(r, S) : 1.0;
  const int64_t G = group_size;
  at::parallel_for(0, B / G, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> normalized;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = offsets[g * G];
      const int64_t n = offsets[(g + 1) * G] - first;  // >= 1, checked above
      const float* x = r + first;
      normalized.assign(n, 0.0);
      bool equal = true;  // a NaN makes the group unequal, so it reaches its steps
      for (int64_t i = 1; i < n; ++i) equal = equal && x[i] == x[0];
      if (!(equal && x[0] == x[0])) {
        const double mean = mean_of(x, n);
        // leave-one-out: r - mean(the other n - 1 steps) = n / (n - 1) (r - mu); n >= 2 here.
        const double centering = leave_one_out ? static_cast<double>(n) / static_cast<double>(n - 1) : 1.0;
        double denom = 1.0;
        if (mode == StepScale::kGroup) denom = unbiased_std(x, n) + eps;
        if (mode == StepScale::kBatch) denom = batch_std + eps;
        for (int64_t i = 0; i < n; ++i) normalized[i] = (x[i] - mean) * centering / denom;
      }
      const double w = outcome != nullptr ? outcome_weight : 0.0;
      for (int64_t b = g * G; b < (g + 1) * G; ++b) {
        const double mixed_outcome = outcome != nullptr ? w * outcome[b] : 0.0;
        float* row = adv + b * T;
        int64_t s = offsets[b + 1] - 1;  // the last step not yet added, walking backwards
        double running = 0.0;
        for (int64_t t = T - 1; t >= 0; --t) {
          for (; s >= offsets[b] && ends[s] >= t; --s) running += normalized[s - first];
          row[t] = static_cast<float>((1.0 - w) * running + mixed_outcome);
        }
      }
    }
  });
  return out;
}

}  // namespace lvrpo
