"""verl's policy losses, agg_loss and kl_penalty with the signatures and numbers of ``verl.trainer.ppo.core_algos``
(verl 0.9.1), computed by lvrpo_fast. Plain PyTorch: this module does not import verl.

verl.py installs them into verl (the registry of policy losses, and ppo_loss's agg_loss and kl_penalty);
they can also be called directly. Each policy loss takes verl's arguments ``(old_log_prob, log_prob,
advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`` and returns verl's
``(pg_loss, pg_metrics)``; the loss and its gradient w.r.t. log_prob come from lvrpo_fast.grpo_loss (one
pass forms both), the metrics from a few detached elementwise operations. float64 inputs are computed
in float64 throughout (lvrpo_fast's reference backend); anything else in float32.

How verl's semantics map onto lvrpo_fast's loss options:
    vanilla   the clip family with dual clip (clip_ratio_c, default 3.0), log ratio clamped to +-20.
    gspo      verl's GSPO-token: ratio value s_i = exp(mean_t log ratio) (log clamped at <= 10) for every
              token, gradient s_i * grad log p_t per token. That is lvrpo_fast's token-level ratio with
              the old log-probs replaced by log_prob - log s_i (detached), which is what is passed.
    cispo     verl clamps the ratio to [1 - clip_ratio_low, 1 + clip_ratio_high] (lvrpo_fast's cispo caps
              it above only, at epsilon_high): the clamped value is passed as the ratio in the same way,
              with the cap set above it.
    sapo      lvrpo_fast's sapo with sapo_temperature_pos/neg = config.tau_pos/tau_neg; verl always
              aggregates it with seq-mean-token-mean, and so do we.
    loss_agg_mode  Every verl mode is a weighted token sum, loss = sum_b s_b sum_t m[b,t] L[b,t], with a
              per-sequence weight s_b (:func:`sequence_weights`). lvrpo_fast runs the policy term with
              plain-sum aggregation (dapo / cispo with num_items_in_batch equal to the world size) and
              s_b folded into the rollout weights, which multiply the policy term per token exactly
              as verl's rollout_is_weights do. verl's seq-mean modes divide by the number of non-empty
              sequences (or global_batch_size), and so do these functions (lvrpo_fast's own grpo
              loss_type divides by B).

Advantages: verl passes them per token [B, T], and lvrpo_fast's loss takes them so, whatever the
estimator: one value broadcast over each response (grpo, rloo, reinforce++-baseline, ...) or a value
per token (GAE, process rewards). [B] advantages are accepted as they are.

Known differences, outside the numbers of a sane batch:
- A batch whose response_mask is all False gives loss 0 and zero gradient here (agg_loss too). verl's
  own functions give NaN there for every loss_agg_mode except token-sum (whose divisor is not a count),
  and always for sapo (which always aggregates with seq-mean-token-mean), unless
  config.global_batch_info supplies non-zero global counts, as verl's ppo_loss does; with a global
  token count of 0 (no response token in the whole mini-batch) verl's token-mean is NaN again.
- A GSPO sequence whose mean log ratio exceeds 10 has the same ratio value here and in verl (exp(10)),
  but keeps a gradient here, where verl's clamp zeroes it (for A > 0 such a ratio is clipped anyway).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import grpo_loss
from ..options import world_size

__all__ = ["agg_loss", "sequence_weights", "kl_penalty", "compute_policy_loss_vanilla", "compute_policy_loss_gspo",
           "compute_policy_loss_cispo", "compute_policy_loss_sapo", "POLICY_LOSSES"]

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
LOG_RATIO_CLAMP = 20.0
GSPO_LOG_RATIO_MAX = 10.0  # verl clamps GSPO's log ratio from above only


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------
def sequence_weights(loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1, batch_num_tokens=None,
                     global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """The weight s_b of each sequence's masked token sum in verl's agg_loss: [B, T] mask -> [B] float64.

    agg_loss(L) = sum_b s_b * sum_t mask[b, t] * L[b, t] for every loss_agg_mode:
        token-mean               dp_size / batch_num_tokens (default: the local token count)
        token-sum                dp_size
        seq-mean-token-sum       dp_size / G
        seq-mean-token-sum-norm  dp_size / (G * loss_scale_factor)  (default factor: T)
        seq-mean-token-mean      dp_size / (G * (n_b + 1e-8))       (verl's epsilon, in verl's dtype)
    G = global_batch_size, by default the number of sequences with at least one token (verl's choice;
    lvrpo_fast's grpo loss_type divides by B). Token and sequence counts (given or counted) are clamped
    at 1, so an empty batch gives 0, not NaN.
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be 2-D [B, T], got shape {tuple(loss_mask.shape)}")
    B, T = loss_mask.shape
    counts = loss_mask.sum(-1, dtype=torch.float64)  # float64: exact counts, weights rounded once at the end
    device = loss_mask.device

    def as_count(name, value, default):
        if value is None:
            if dp_size > 1:
                raise ValueError(f"{name} is required when dp_size > 1 (the global count, as in verl)")
            return default.clamp(min=1.0)
        # A given global count of 0 means no token anywhere, so every local mask is empty too: clamping
        # changes no weight that meets a token, and keeps 0 * inf from turning the empty sum into NaN.
        return torch.as_tensor(value, dtype=torch.float64, device=device).clamp(min=1.0)

    if loss_agg_mode == "token-mean":
        n = as_count("batch_num_tokens", batch_num_tokens, counts.sum())
        return (dp_size / n).expand(B).contiguous()
    if loss_agg_mode == "token-sum":
        return torch.full((B,), float(dp_size), dtype=torch.float64, device=device)
    G = as_count("global_batch_size", global_batch_size, (counts > 0).sum(dtype=torch.float64))
    if loss_agg_mode == "seq-mean-token-sum":
        return (dp_size / G).expand(B).contiguous()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        factor = T if loss_scale_factor is None else loss_scale_factor
        return (dp_size / (G * factor)).expand(B).contiguous()
    # verl adds its 1e-8 to the count in the mask's dtype (the default float dtype for a bool mask), where
    # it usually rounds away; adding it the same way keeps agg_loss bit-compatible.
    eps_dtype = loss_mask.dtype if loss_mask.is_floating_point() else torch.get_default_dtype()
    return dp_size / (G * (counts.to(eps_dtype) + 1e-8).double())


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: Optional[int] = None, global_batch_size: Optional[int] = None,
             loss_scale_factor: Optional[int] = None) -> torch.Tensor:
    """verl's agg_loss: loss_mat [B, T], loss_mask [B, T] -> 0-dim loss (see :func:`sequence_weights`)."""
    weights = sequence_weights(loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                               loss_scale_factor)
    masked = torch.where(loss_mask.bool(), loss_mat, torch.zeros_like(loss_mat))  # NaN outside the mask stays out
    return (masked.sum(-1) * weights.to(masked.dtype)).sum()


# ----------------------------------------------------------------------------------------------
# KL penalty
# ----------------------------------------------------------------------------------------------
def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's per-token KL estimate [B, T] of the policy from the reference.

    kl_penalty: "k1"/"kl" (logp - ref), "abs", "k2"/"mse" ((logp - ref)^2 / 2), "k3"/"low_var_kl"
    (exp(x) - x - 1 with x = ref - logp clamped to +-20, the result clamped to +-10), and each with a
    "+" suffix: the value of the estimator with the gradient of k2 (straight-through), which is the
    unbiased gradient of the KL. "full" needs the whole distributions and is not supported.
    """
    straight_through = kl_penalty.endswith("+")
    name = kl_penalty[:-1] if straight_through else kl_penalty
    diff = logprob - ref_logprob
    if name in ("k1", "kl"):
        value = diff
    elif name == "abs":
        value = diff.abs()
    elif name in ("k2", "mse"):
        value = 0.5 * diff.square()
    elif name in ("k3", "low_var_kl"):
        x = torch.clamp(-diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        value = torch.clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)
    elif name == "full":
        raise NotImplementedError("kl_penalty='full' needs the full distributions, which lvrpo_fast never forms")
    else:
        raise ValueError(f"kl_penalty must be one of k1, kl, abs, k2, mse, k3, low_var_kl (optionally with '+'), "
                         f"got {kl_penalty!r}")
    if not straight_through or name in ("k2", "mse"):
        return value
    k2 = 0.5 * diff.square()
    return k2 - k2.detach() + value.detach()


# ----------------------------------------------------------------------------------------------
# Policy losses
# ----------------------------------------------------------------------------------------------
def _config_value(config, name, default):
    if config is None:
        return default
    if hasattr(config, name):
        value = getattr(config, name)
    elif hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = default
    return default if value is None else value


def _clip_range(config):
    if config is None:
        raise ValueError("config (verl's ActorConfig, or any object with clip_ratio / clip_ratio_low / "
                         "clip_ratio_high) is required, as in verl")
    clip = _config_value(config, "clip_ratio", 0.2)
    return _config_value(config, "clip_ratio_low", clip), _config_value(config, "clip_ratio_high", clip)


def _checked_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """advantages [B, T] (per token, as verl passes them) or [B] (per sequence), checked against the mask."""
    B = mask.shape[0]
    if tuple(advantages.shape) not in ((B,), tuple(mask.shape)):
        raise ValueError(f"advantages must have shape {tuple(mask.shape)} (as response_mask) or ({B},), "
                         f"got {tuple(advantages.shape)}")
    return advantages


def _per_token(advantages: torch.Tensor) -> torch.Tensor:
    """[B] or [B, T] advantages as something that broadcasts against [B, T] (for the metrics)."""
    return advantages if advantages.dim() == 2 else advantages.unsqueeze(1)


def _run_policy(log_prob, logp_old, advantages, mask, weights, rollout_is_weights, **options):
    """grpo_loss with plain-sum aggregation and verl's per-sequence weights folded into the rollout weights.

    The weights are formed in the precision the loss runs in: float64 for float64 log_prob (the
    reference backend then computes in float64), float32 otherwise (what the kernels take)."""
    dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
    rollout = weights.to(dtype).unsqueeze(1).expand(mask.shape)
    if rollout_is_weights is not None:
        rollout = rollout * rollout_is_weights.to(dtype)
    loss, _ = grpo_loss(log_prob, advantages, mask, logp_old=logp_old, rollout_weights=rollout.contiguous(),
                        num_items_in_batch=float(world_size()), **options)
    return loss


def _prepare(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config):
    mask = response_mask.bool()
    info = dict(_config_value(config, "global_batch_info", {}) or {})
    weights = sequence_weights(mask, loss_agg_mode, **info)
    log_ratio = torch.clamp(log_prob.detach() - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return mask, weights, _checked_advantages(advantages, mask), log_ratio


def _masked_mean(values, mask):
    return (values * mask).sum() / (mask.sum() + 1e-8)  # verl's masked_mean, epsilon included


def _metrics(clipfrac, ppo_kl, clipfrac_lower) -> Dict[str, Any]:
    return {"actor/pg_clipfrac": float(clipfrac), "actor/ppo_kl": float(ppo_kl),
            "actor/pg_clipfrac_lower": float(clipfrac_lower)}


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean",
                                config=None, rollout_is_weights=None):
    """verl's PPO clipped objective with dual clip. log_prob / old_log_prob [B, T] float, advantages
    [B, T] (per token: GRPO's broadcast value, GAE, process rewards) or [B], response_mask [B, T],
    rollout_is_weights [B, T] or None.
    Returns (pg_loss 0-dim float32, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})."""
    clip_low, clip_high = _clip_range(config)
    clip_ratio_c = _config_value(config, "clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip lower bound), got {clip_ratio_c}")
    mask, weights, adv, log_ratio = _prepare(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                             config)
    loss = _run_policy(log_prob, old_log_prob, adv, mask, weights, rollout_is_weights, loss_type="dapo",
                       epsilon_low=clip_low, epsilon_high=clip_high, clip_ratio_c=clip_ratio_c)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        A = _per_token(adv).to(ratio.dtype)
        clipped = (((ratio > 1 + clip_high) & (A > 0)) | ((ratio < 1 - clip_low) & (A < 0))).float()
        surrogate = torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip_low, 1 + clip_high))
        lower = ((surrogate > -A * clip_ratio_c) & (A < 0)).float()
        metrics = _metrics(_masked_mean(clipped, mask), _masked_mean(-log_ratio, mask), _masked_mean(lower, mask))
    return loss, metrics


def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask,
                             loss_agg_mode: str = "seq-mean-token-mean", config=None, rollout_is_weights=None):
    """verl's GSPO (sequence-level ratio, GSPO-token gradient). Arguments and result as the vanilla loss."""
    clip_low, clip_high = _clip_range(config)
    mask, weights, adv, _ = _prepare(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config)
    with torch.no_grad():
        log_ratio = log_prob - old_log_prob  # verl does not clamp this one before the mean
        seq_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        seq_log_ratio = seq_log_ratio.clamp(max=GSPO_LOG_RATIO_MAX)
        # log_prob - logp_old == seq_log_ratio at every token: lvrpo_fast's token ratio then has verl's value
        # s_i and verl's per-token gradient s_i * d log p_t.
        logp_old = log_prob.detach() - seq_log_ratio.unsqueeze(1)
    loss = _run_policy(log_prob, logp_old, adv, mask, weights, rollout_is_weights, loss_type="dapo",
                       epsilon_low=clip_low, epsilon_high=clip_high)
    with torch.no_grad():
        ratio = torch.exp(seq_log_ratio).unsqueeze(1)
        A = _per_token(adv).to(ratio.dtype)
        clipped = (((ratio > 1 + clip_high) & (A > 0)) | ((ratio < 1 - clip_low) & (A < 0))).float()
        metrics = _metrics(_masked_mean(clipped.expand(mask.shape), mask), _masked_mean(-log_ratio, mask), 0.0)
    return loss, metrics


def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean",
                              config=None, rollout_is_weights=None):
    """verl's CISPO: -stopgrad(clamp(ratio, 1 - low, 1 + high)) * A * log_prob. Arguments as vanilla."""
    clip_low, clip_high = _clip_range(config)
    mask, weights, adv, log_ratio = _prepare(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                             config)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        clamped = ratio.clamp(1 - clip_low, 1 + clip_high)
        # lvrpo_fast's cispo caps the ratio above only; passing the clamped ratio as the ratio itself (through
        # logp_old) gives verl's two-sided clamp, and the cap above it changes nothing.
        logp_old = log_prob.detach() - torch.log(clamped)
    loss = _run_policy(log_prob, logp_old, adv, mask, weights, rollout_is_weights, loss_type="cispo",
                       epsilon_high=2.0 * (1.0 + clip_high))
    with torch.no_grad():
        metrics = _metrics(_masked_mean((ratio != clamped).float(), mask), _masked_mean(-log_ratio, mask), 0.0)
    return loss, metrics


def compute_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask,
                             loss_agg_mode: str = "seq-mean-token-mean", config=None, rollout_is_weights=None):
    """verl's SAPO (soft gate, temperatures config.tau_pos / config.tau_neg). Like verl, it always
    aggregates with seq-mean-token-mean whatever loss_agg_mode says."""
    if config is None:
        raise ValueError("config (with tau_pos and tau_neg) is required, as in verl")
    mask, weights, adv, log_ratio = _prepare(old_log_prob, log_prob, advantages, response_mask,
                                             "seq-mean-token-mean", config)
    # lvrpo_fast's sapo divides each sequence's token sum by B * n_b; multiplying it back gives a plain sum.
    n = mask.sum(-1, dtype=torch.float64).clamp(min=1.0)
    loss = _run_policy(log_prob, old_log_prob, adv, mask, weights * (n * mask.shape[0]), rollout_is_weights,
                       loss_type="sapo", sapo_temperature_pos=float(_config_value(config, "tau_pos", 1.0)),
                       sapo_temperature_neg=float(_config_value(config, "tau_neg", 1.05)))
    with torch.no_grad():
        metrics = _metrics(0.0, _masked_mean(-log_ratio, mask), 0.0)
    return loss, metrics


POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "cispo": compute_policy_loss_cispo,
    "sapo": compute_policy_loss_sapo,
}
