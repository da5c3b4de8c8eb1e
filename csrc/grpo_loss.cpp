// The per-token GRPO loss of whole sequences, its gradient w.r.t. logp and the metric sums
// (docs/math.md sections 3 to 7), written to match autograd through lvrpo_fast.reference.
// One task per sequence, so GSPO's sequence-level ratio is exact. The token math runs in double:
// it is O(B T) work next to the O(B T V) of the log-probabilities, and it keeps the clip tests and
// the sums at least as accurate as the float32 reference.
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>

namespace lvrpo {
namespace {


// torch.clamp, NaN passing through (a NaN log-ratio must not become a finite ratio).
inline double clamp(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }

// d/dx of torch.clamp(x, lo, hi): 1 on the closed interval (autograd passes the bounds), else 0.
inline double clamp_grad(double x, double lo, double hi) { return (x >= lo && x <= hi) ? 1.0 : 0.0; }

// torch.minimum(a, b) and the share of the incoming gradient each argument receives: autograd splits
// it in half at a tie. Returns the minimum; *da, *db are the shares.
inline double minimum(double a, double b, double* da, double* db) {
  if (a < b) {
    *da = 1.0, *db = 0.0;
    return a;
  }
  if (b < a) {
    *da = 0.0, *db = 1.0;
    return b;
  }
  *da = *db = 0.5;
  return a;  // equal, or a NaN involved (propagated)
}

struct TokenTerms {
  double value;        // the per-token loss L (before the mask and row scale)
  double grad_rho;     // dL/drho (for the sequence-level ratio it is summed over the sequence)
  double grad_direct;  // dL/dlogp through every path other than rho
  double kl;           // the KL value added (after bias correction); 0 when beta == 0
};

// L = w * policy(rho, A) + beta * KL - entropy_coef * H for one unmasked token.
TokenTerms token_terms(const LossParams& p, double rho, double A, double logp, double ref, double weight,
                       double entropy) {
  double policy, d_policy_rho = 0.0, d_policy_logp = 0.0;
  if (p.policy == kPolicyCispo) {
    // -stopgrad(min(rho, eps_high)) A logp: the capped weight is a constant, logp carries the gradient.
    const double capped = rho > p.epsilon_high ? p.epsilon_high : rho;
    policy = -capped * A * logp;
    d_policy_logp = -capped * A;
  } else if (p.policy == kPolicySapo) {
    // -g(rho) A, g = sigmoid(k (rho - 1)) 4 / k  =>  dL/drho = -4 A sigmoid (1 - sigmoid).
    const double k = A > 0.0 ? p.sapo_temperature_pos : p.sapo_temperature_neg;
    const double sig = 1.0 / (1.0 + std::exp(-k * (rho - 1.0)));
    policy = -sig * (4.0 / k) * A;
    d_policy_rho = -4.0 * A * sig * (1.0 - sig);
  } else {
    const double lo = 1.0 - p.epsilon_low, hi = 1.0 + p.epsilon_high;
    const double rho_clipped = clamp(rho, lo, hi);
    const double g_clipped = clamp_grad(rho, lo, hi);
    double rho_1 = rho, g_1 = 1.0;
    if (p.has_delta) {  // torch.clamp(rho, max=delta)
      rho_1 = rho > p.delta ? p.delta : rho;
      g_1 = rho <= p.delta ? 1.0 : 0.0;
    }
    // L = -min(rho_1 A, rho_c A). At a tie (rho = 1 inside the clip range) autograd gives each branch
    // half of -A and both pass the gradient, so the total is -A drho, the unclipped surrogate's.
    double share_1, share_c;
    policy = -minimum(rho_1 * A, rho_clipped * A, &share_1, &share_c);
    d_policy_rho = -A * (share_1 * g_1 + share_c * g_clipped);
    if (p.has_clip_ratio_c && A < 0.0) {  // dual clip: where(A < 0, minimum(L, -c A), L)
      double share_policy, share_bound;
      policy = minimum(policy, -p.clip_ratio_c * A, &share_policy, &share_bound);
      d_policy_rho *= share_policy;
    }
  }
  TokenTerms out{policy * weight, d_policy_rho * weight, d_policy_logp * weight, 0.0};
  if (p.beta > 0.0) {
    const double x = ref - logp;  // KL estimators of x = logp_ref - logp, differentiated w.r.t. logp
    double kl, d_kl;
    if (p.kl_estimator == kKlK1) {
      kl = -x, d_kl = 1.0;
    } else if (p.kl_estimator == kKlK2) {
      kl = 0.5 * x * x, d_kl = -x;
    } else {
      const double ex = std::exp(x);
      kl = ex - x - 1.0, d_kl = 1.0 - ex;
    }
    if (p.use_bias_correction_kl) {  // KL * rho, the gradient flowing through both factors
      out.grad_rho += p.beta * kl;
      out.grad_direct += p.beta * d_kl * rho;
      kl *= rho;
    } else {
      out.grad_direct += p.beta * d_kl;
    }
    out.kl = kl;
    out.value += p.beta * kl;
  }
  if (p.entropy_coef != 0.0) out.value -= p.entropy_coef * entropy;
  return out;
}

struct SequenceInputs {
  const float* logp;
  const float* logp_old;  // nullptr: logp.detach() (ratio 1, gradient still flowing)
  const float* logp_ref;
  const float* advantages;  // [B], or [B, T] when advantages_per_token
  const bool* mask;
  const float* weights;
  const float* entropy;
  const float* row_scale;
  int64_t T;
  bool advantages_per_token;
};

void sequence_loss(const SequenceInputs& in, const LossParams& p, int64_t b, float* stats, float* grad) {
  const int64_t T = in.T;
  const int64_t o = b * T;
  const bool* m = in.mask + o;
  // The advantage of token t: the sequence's, or the token's own (process rewards).
  auto advantage = [&](int64_t t) {
    return static_cast<double>(in.advantages_per_token ? in.advantages[o + t] : in.advantages[b]);
  };
  const double scale = in.row_scale[b];
  auto log_ratio_raw = [&](int64_t t) {
    const double lp = in.logp[o + t];
    return lp - (in.logp_old == nullptr ? lp : static_cast<double>(in.logp_old[o + t]));
  };
  int64_t count = 0;
  for (int64_t t = 0; t < T; ++t) count += m[t];
  const double denom = std::max<double>(static_cast<double>(count), 1.0);

  double seq_rho = 0.0;
  if (p.sequence_level) {  // GSPO: s = exp(sum_t m d / max(sum_t m, 1)), shared by every token
    double sum_d = 0.0;
    for (int64_t t = 0; t < T; ++t)
      if (m[t]) sum_d += clamp(log_ratio_raw(t), -kLogRatioClamp, kLogRatioClamp);
    seq_rho = std::exp(sum_d / denom);
  }
  const double high_bound = p.policy == kPolicyCispo ? p.epsilon_high : 1.0 + p.epsilon_high;
  double loss = 0.0, kl = 0.0, clip_low = 0.0, clip_high = 0.0, clip_region = 0.0, ratio = 0.0, ent = 0.0;
  double seq_grad_rho = 0.0;  // sum_t m scale dL_t/drho, spread back over the tokens below
  for (int64_t t = 0; t < T; ++t) {
    if (!m[t]) {
      if (grad != nullptr) grad[o + t] = 0.0f;
      continue;
    }
    const double raw = log_ratio_raw(t);
    const double d_log_ratio = clamp_grad(raw, -kLogRatioClamp, kLogRatioClamp);
    const double rho = p.sequence_level ? seq_rho : std::exp(clamp(raw, -kLogRatioClamp, kLogRatioClamp));
    const double A = advantage(t);
    const TokenTerms terms = token_terms(p, rho, A, in.logp[o + t], in.logp_ref == nullptr ? 0.0 : in.logp_ref[o + t],
                                         in.weights == nullptr ? 1.0 : in.weights[o + t],
                                         in.entropy == nullptr ? 0.0 : in.entropy[o + t]);
    loss += terms.value;
    kl += terms.kl;
    const bool low = rho < 1.0 - p.epsilon_low && A < 0.0;
    const bool high = rho > high_bound && A > 0.0;
    clip_low += low;
    clip_high += high;
    clip_region += low || high;
    ratio += rho;
    if (in.entropy != nullptr) ent += in.entropy[o + t];
    if (grad != nullptr) {
      if (p.sequence_level) {
        seq_grad_rho += scale * terms.grad_rho;
        grad[o + t] = static_cast<float>(scale * terms.grad_direct);
      } else {  // drho/dlogp = rho where the log-ratio clamp passes the gradient
        grad[o + t] = static_cast<float>(scale * (terms.grad_rho * rho * d_log_ratio + terms.grad_direct));
      }
    }
  }
  if (grad != nullptr && p.sequence_level) {
    // ds/dlogp_t = s m_t dclamp(d_t) / max(sum m, 1): the sequence ratio's gradient reaches every
    // unmasked token whose log-ratio is inside the clamp.
    const double per_token = seq_grad_rho * seq_rho / denom;
    for (int64_t t = 0; t < T; ++t)
      if (m[t]) grad[o + t] += static_cast<float>(per_token * clamp_grad(log_ratio_raw(t), -kLogRatioClamp, kLogRatioClamp));
  }
  float* row = stats + b * kNumStats;
  row[kStatLoss] = static_cast<float>(loss * scale);
  row[kStatCount] = static_cast<float>(count);
  row[kStatKl] = static_cast<float>(kl);
  row[kStatClipLow] = static_cast<float>(clip_low);
  row[kStatClipHigh] = static_cast<float>(clip_high);
  row[kStatClipRegion] = static_cast<float>(clip_region);
  row[kStatRatio] = static_cast<float>(ratio);
  row[kStatEntropy] = static_cast<float>(ent);
}

const float* optional_tokens(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape) {
  if (!t.has_value()) return nullptr;
  check_tensor(*t, name, shape, at::kFloat);
  return t->const_data_ptr<float>();
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>> grpo_token_loss(
    const at::Tensor& logp, const std::optional<at::Tensor>& logp_old, const std::optional<at::Tensor>& logp_ref,
    const at::Tensor& advantages, const at::Tensor& mask, const std::optional<at::Tensor>& rollout_weights,
    const std::optional<at::Tensor>& entropy, const at::Tensor& row_scale, const LossParams& params,
    bool need_grad) {
  TORCH_CHECK(logp.dim() == 2, "logp must be [B, T], got shape ", logp.sizes());
  const int64_t B = logp.size(0), T = logp.size(1);
  check_tensor(logp, "logp", {B, T}, at::kFloat);
  const bool advantages_per_token = advantages.dim() == 2;
  if (advantages_per_token) {
    check_tensor(advantages, "advantages", {B, T}, at::kFloat);
  } else {
    check_tensor(advantages, "advantages", {B}, at::kFloat);
  }
  check_tensor(mask, "mask", {B, T}, at::kBool);
  check_tensor(row_scale, "row_scale", {B}, at::kFloat);
  TORCH_CHECK(params.policy == kPolicyClip || params.policy == kPolicyCispo || params.policy == kPolicySapo,
              "unknown policy kind ", params.policy);
  TORCH_CHECK(params.kl_estimator >= kKlNone && params.kl_estimator <= kKlK3, "unknown kl_estimator ",
              params.kl_estimator);
  TORCH_CHECK((params.beta > 0.0) == (params.kl_estimator != kKlNone), "kl_estimator must be set exactly when beta > 0");
  TORCH_CHECK(params.beta == 0.0 || logp_ref.has_value(), "beta > 0 needs logp_ref");
  TORCH_CHECK(params.entropy_coef == 0.0 || entropy.has_value(), "entropy_coef != 0 needs entropy");
  SequenceInputs in{logp.const_data_ptr<float>(),
                    optional_tokens(logp_old, "logp_old", {B, T}),
                    optional_tokens(logp_ref, "logp_ref", {B, T}),
                    advantages.const_data_ptr<float>(),
                    mask.const_data_ptr<bool>(),
                    optional_tokens(rollout_weights, "rollout_weights", {B, T}),
                    optional_tokens(entropy, "entropy", {B, T}),
                    row_scale.const_data_ptr<float>(),
                    T,
                    advantages_per_token};
  const auto f32 = logp.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({B, kNumStats}, f32);
  std::optional<at::Tensor> grad;
  if (need_grad) grad = at::empty({B, T}, f32);
  float* stats_ptr = stats.mutable_data_ptr<float>();
  float* grad_ptr = need_grad ? grad->mutable_data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1));  // small batches stay on one thread
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) sequence_loss(in, params, b, stats_ptr, grad_ptr);
  });
  return {stats, grad};
}

}  // namespace lvrpo
