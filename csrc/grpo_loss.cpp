// The per-token GRPO loss of whole sequences, its gradient w.r.t. logp and the per-sequence statistics
// (docs/math.md sections 3 to 7), written to match autograd through lvrpo_fast.reference. vespo's
// weight and the off-policy and high-entropy masks are constants of the loss: they scale the gradient.
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

// vespo's gamma weight exp(lam + k log w - lam w); 0 where it overflows the float32 range (TRL computes
// it in float32 and maps +inf to 0; the float32 reference does the same).
double vespo_phi(const LossParams& p, double A, double log_w, double w) {
  const bool positive = A >= 0.0;
  const double k = positive ? p.vespo_k_pos : p.vespo_k_neg;
  const double lam = positive ? p.vespo_lambda_pos : p.vespo_lambda_neg;
  const double phi = std::exp(lam + k * log_w - lam * w);
  return phi > static_cast<double>(std::numeric_limits<float>::max()) ? 0.0 : phi;
}

// L = keep * w * policy(rho, A) + beta * KL for one unmasked token (vespo: keep * policy, its rollout
// weight being inside phi). keep is the product of the off-policy and high-entropy masks (1 or 0).
TokenTerms token_terms(const LossParams& p, double rho, double A, double logp, double ref, double weight,
                       double phi, double keep) {
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
  } else if (p.policy == kPolicyVespo) {
    // -stopgrad(phi) A logp
    policy = -phi * A * logp;
    d_policy_logp = -phi * A;
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
  const double factor = p.policy == kPolicyVespo ? keep : keep * weight;
  TokenTerms out{policy * factor, d_policy_rho * factor, d_policy_logp * factor, 0.0};
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
  return out;
}

// The ratio the clip metrics test: min(rho, delta) for the clip family with delta (TRL's), else rho.
double clip_coef(const LossParams& p, double rho) {
  return (p.policy == kPolicyClip && p.has_delta && rho > p.delta) ? p.delta : rho;
}

struct SequenceInputs {
  const float* logp;
  const float* logp_old;  // nullptr: logp.detach() (ratio 1, gradient still flowing)
  const float* logp_ref;
  const float* logp_sampling;  // nullptr: logp_old (the off-policy mask's reference)
  const float* advantages;  // [B], or [B, T] when advantages_per_token
  const bool* mask;
  const float* weights;
  const float* entropy;
  const float* entropy_threshold;  // nullptr: no high-entropy mask
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

  // Pass 1: the row's sums (sequence ratio, vespo's weight, the off-policy mask's mean drift).
  double sum_d = 0.0, sum_log_is = 0.0, sum_drift = 0.0;
  const bool vespo = p.policy == kPolicyVespo;
  if (p.sequence_level || vespo || p.has_off_policy_mask) {
    const float* sampled = in.logp_sampling != nullptr ? in.logp_sampling : in.logp_old;
    const double flt_max = static_cast<double>(std::numeric_limits<float>::max());
    for (int64_t t = 0; t < T; ++t) {
      if (!m[t]) continue;
      sum_d += clamp(log_ratio_raw(t), -kLogRatioClamp, kLogRatioClamp);
      if (vespo && in.weights != nullptr)
        sum_log_is += clamp(std::log(static_cast<double>(in.weights[o + t])), kVespoLogWMin, kLogRatioClamp);
      if (p.has_off_policy_mask) {
        const double lp = in.logp[o + t];
        double drift = (sampled == nullptr ? lp : static_cast<double>(sampled[o + t])) - lp;
        drift = std::isnan(drift) ? 0.0 : clamp(drift, -flt_max, flt_max);  // torch.nan_to_num
        sum_drift += drift;
      }
    }
  }
  const double seq_rho = std::exp(sum_d / denom);  // GSPO: shared by every token of the sequence
  const double log_w = clamp(sum_d + sum_log_is, kVespoLogWMin, kLogRatioClamp);
  const double w = std::exp(log_w);
  const bool low_drift = sum_drift / denom <= p.off_policy_mask_threshold;
  const bool entropy_masked = in.entropy_threshold != nullptr;
  const float threshold = entropy_masked ? *in.entropy_threshold : 0.0f;
  // keep factor of token t (off-policy and high-entropy masks) and whether the entropy mask keeps it
  auto entropy_keeps = [&](int64_t t) { return !entropy_masked || in.entropy[o + t] >= threshold; };
  auto keep = [&](int64_t t, double A) {
    if (!entropy_keeps(t)) return 0.0;
    return (!p.has_off_policy_mask || A >= 0.0 || low_drift) ? 1.0 : 0.0;
  };
  auto terms_of = [&](int64_t t, double rho, double A) {
    return token_terms(p, rho, A, in.logp[o + t], in.logp_ref == nullptr ? 0.0 : in.logp_ref[o + t],
                       in.weights == nullptr ? 1.0 : in.weights[o + t], vespo ? vespo_phi(p, A, log_w, w) : 0.0,
                       keep(t, A));
  };

  const double high_bound = p.policy == kPolicyCispo ? p.epsilon_high : 1.0 + p.epsilon_high;
  double loss = 0.0, kl = 0.0, clip_low = 0.0, clip_high = 0.0, clip_region = 0.0, ratio = 0.0, ent = 0.0;
  double kept = 0.0, ent_kept = 0.0, phi_sum = 0.0;
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
    const TokenTerms terms = terms_of(t, rho, A);
    loss += terms.value;
    kl += terms.kl;
    const double coef = clip_coef(p, rho);
    const bool low = coef < 1.0 - p.epsilon_low && A < 0.0;
    const bool high = coef > high_bound && A > 0.0;
    clip_low += low;
    clip_high += high;
    clip_region += low || high;
    ratio += rho;
    const bool entropy_kept = entropy_keeps(t);
    kept += entropy_kept;
    if (in.entropy != nullptr) {
      ent += in.entropy[o + t];
      if (entropy_kept) ent_kept += in.entropy[o + t];
    }
    if (vespo) phi_sum += vespo_phi(p, A, log_w, w);
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
  // The sequence's own values, for per-sequence advantages (an empty sequence: ratio exp(0) = 1).
  double seq_low = 0.0, seq_high = 0.0, seq_weight = 0.0;
  if (!in.advantages_per_token) {
    const double A = in.advantages[b];
    if (p.sequence_level) {
      const double coef = clip_coef(p, seq_rho);
      seq_low = coef < 1.0 - p.epsilon_low && A < 0.0;
      seq_high = coef > high_bound && A > 0.0;
    }
    if (vespo) seq_weight = vespo_phi(p, A, log_w, w);
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
  row[kStatKept] = static_cast<float>(kept);
  row[kStatEntropyKept] = static_cast<float>(ent_kept);
  row[kStatSeqClipLow] = static_cast<float>(seq_low);
  row[kStatSeqClipHigh] = static_cast<float>(seq_high);
  row[kStatSeqWeight] = static_cast<float>(seq_weight);
  row[kStatWeight] = static_cast<float>(phi_sum);
}

const float* optional_tokens(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape) {
  if (!t.has_value()) return nullptr;
  check_tensor(*t, name, shape, at::kFloat);
  return t->const_data_ptr<float>();
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>> grpo_token_loss(
    const at::Tensor& logp, const std::optional<at::Tensor>& logp_old, const std::optional<at::Tensor>& logp_ref,
    const std::optional<at::Tensor>& logp_sampling, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& rollout_weights, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& entropy_threshold, const at::Tensor& row_scale, const LossParams& params,
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
  TORCH_CHECK(params.policy >= kPolicyClip && params.policy <= kPolicyVespo, "unknown policy kind ", params.policy);
  TORCH_CHECK(params.kl_estimator >= kKlNone && params.kl_estimator <= kKlK3, "unknown kl_estimator ",
              params.kl_estimator);
  TORCH_CHECK((params.beta > 0.0) == (params.kl_estimator != kKlNone), "kl_estimator must be set exactly when beta > 0");
  TORCH_CHECK(params.beta == 0.0 || logp_ref.has_value(), "beta > 0 needs logp_ref");
  TORCH_CHECK(!entropy_threshold.has_value() || entropy.has_value(),
              "the high-entropy mask (entropy_threshold) needs entropy");
  const float* threshold = nullptr;
  if (entropy_threshold.has_value()) {
    check_tensor(*entropy_threshold, "entropy_threshold", {}, at::kFloat);
    threshold = entropy_threshold->const_data_ptr<float>();
  }
  SequenceInputs in{logp.const_data_ptr<float>(),
                    optional_tokens(logp_old, "logp_old", {B, T}),
                    optional_tokens(logp_ref, "logp_ref", {B, T}),
                    optional_tokens(logp_sampling, "logp_sampling", {B, T}),
                    advantages.const_data_ptr<float>(),
                    mask.const_data_ptr<bool>(),
                    optional_tokens(rollout_weights, "rollout_weights", {B, T}),
                    optional_tokens(entropy, "entropy", {B, T}),
                    threshold,
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
