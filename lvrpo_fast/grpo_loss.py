"""The clipped, KL-regularized GRPO loss on given per-token log-probabilities (SPEC sections 3 to 7).

Design (kernel backends): the loss is a scalar, so its gradient w.r.t. logp is formed in the same
pass as the loss (one program per sequence, whole sequences so GSPO's sequence ratio is exact) and
the backward pass only scales it by the incoming gradient. Aggregation is folded into a per-sequence
weight (:func:`row_scales`) computed from the mask before the kernel runs, so the kernel never needs
a second pass over the batch and the metrics come back as per-sequence sums: no host sync.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from . import dispatch, validate
from .backends import (NSTATS, STAT_CLIP_HIGH, STAT_CLIP_LOW, STAT_CLIP_REGION, STAT_COUNT, STAT_ENTROPY,
                       STAT_KL, STAT_LOSS, STAT_RATIO)
from .options import GRPOOptions, world_size


def row_scales(mask: torch.Tensor, options: GRPOOptions) -> torch.Tensor:
    """The weight of each sequence's token sum in the scalar loss (SPEC section 6).

    mask [B, T] bool -> [B] float32, so that loss = sum_b row_scale[b] * sum_t mask L."""
    B = mask.shape[0]
    counts = mask.sum(1, dtype=torch.float32)
    loss_type = options.loss_type
    if loss_type in ("grpo", "sapo"):
        return 1.0 / (B * counts.clamp(min=1.0))
    if loss_type == "bnpo":
        return (1.0 / counts.sum().clamp(min=1.0)).expand(B).contiguous()
    if loss_type == "dr_grpo":
        return torch.full((B,), 1.0 / (B * options.max_completion_length), device=mask.device)
    if loss_type in ("dapo", "cispo"):
        if options.num_items_in_batch is None:
            normalizer = counts.sum().clamp(min=1.0)
        else:
            normalizer = torch.as_tensor(options.num_items_in_batch, dtype=torch.float32,
                                         device=mask.device) / world_size()
        return (1.0 / normalizer).expand(B).contiguous()
    return torch.full((B,), 1.0 / B, device=mask.device)  # luspo, seq_mean_token_sum


def metrics_from_stats(stats: torch.Tensor, options: GRPOOptions, has_entropy: bool) -> Dict[str, torch.Tensor]:
    """Per-sequence sums [B, NSTATS] -> masked means over the batch (SPEC section 7), detached fp32."""
    totals = stats.detach().sum(0)
    denom = totals[STAT_COUNT].clamp(min=1.0)
    metrics = {
        "clip_ratio_low": totals[STAT_CLIP_LOW] / denom,
        "clip_ratio_high": totals[STAT_CLIP_HIGH] / denom,
        "clip_ratio_region": totals[STAT_CLIP_REGION] / denom,
        "ratio": totals[STAT_RATIO] / denom,
    }
    if options.beta > 0:
        metrics["kl"] = totals[STAT_KL] / denom
    if has_entropy:
        metrics["entropy"] = totals[STAT_ENTROPY] / denom
    return metrics


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float().contiguous()


def prepare_rollout_weights(rollout_weights, shape):
    """[B] or [B, T] weights -> [B, T] float32 contiguous (None stays None)."""
    if rollout_weights is None:
        return None
    w = rollout_weights.float()
    if w.dim() == 1:
        w = w.unsqueeze(1).expand(shape)
    return w.contiguous()


def entropy_grad(mask: torch.Tensor, scale: torch.Tensor, options: GRPOOptions) -> torch.Tensor:
    """d(loss)/d(entropy) of the bonus -entropy_coef * H: [B, T] float32."""
    return (-options.entropy_coef) * mask.float() * scale.unsqueeze(1)


class GRPOLossFunction(torch.autograd.Function):
    """logp [B, T], entropy [B, T]|None -> (loss 0-dim float32, stats [B, NSTATS]); gradient formed in forward."""

    @staticmethod
    def forward(ctx, logp, entropy, advantages, mask, logp_old, logp_ref, rollout_weights, options, prims):
        scale = row_scales(mask, options)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        stats, grad_logp = prims.grpo_token_loss(_f32(logp), logp_old, logp_ref, advantages, mask, rollout_weights,
                                                 _f32(entropy), scale, options, need_grad)
        loss = stats[:, STAT_LOSS].sum()
        grad_entropy = None
        if entropy is not None and options.entropy_coef != 0 and ctx.needs_input_grad[1]:
            grad_entropy = entropy_grad(mask, scale, options)
        ctx.save_for_backward(grad_logp if ctx.needs_input_grad[0] else None, grad_entropy)
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        grad_logp, grad_entropy = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 9
        out_logp = None if grad_logp is None else (grad_logp * grad_loss).to(ctx.dtypes[0])
        out_entropy = None if grad_entropy is None else (grad_entropy * grad_loss).to(ctx.dtypes[1])
        return out_logp, out_entropy, None, None, None, None, None, None, None


def grpo_loss_with(prims, logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights, options):
    """Backend entry (validated inputs); returns (loss, metrics)."""
    loss, stats = GRPOLossFunction.apply(
        logp, entropy, _f32(advantages), mask.contiguous(), _f32(logp_old), _f32(logp_ref),
        prepare_rollout_weights(rollout_weights, logp.shape), options, prims)
    return loss, metrics_from_stats(stats, options, entropy is not None)


def grpo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              logp_old: Optional[torch.Tensor] = None, logp_ref: Optional[torch.Tensor] = None,
              entropy: Optional[torch.Tensor] = None, rollout_weights: Optional[torch.Tensor] = None,
              backend: Optional[str] = None, **options):
    """The GRPO loss on given per-token log-probabilities.

    Args:
        logp: [B, T] float log-probabilities of the sampled tokens under the policy (differentiable).
        advantages: [B] float, one per sequence (see group_advantages).
        mask: [B, T] bool / 0-1, 1 for completion tokens.
        logp_old: [B, T] log-probabilities under the sampling policy; default logp.detach() (ratio 1).
        logp_ref: [B, T] log-probabilities under the reference model; needed when beta > 0.
        entropy: [B, T] per-token entropy (differentiable); needed when entropy_coef != 0.
        rollout_weights: [B, T] or [B] rollout correction weights multiplying the policy term.
        backend: "auto", "triton", "cpp" or "reference".
        **options: loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, beta, kl_estimator,
            use_bias_correction_kl, importance_sampling_level, entropy_coef, max_completion_length,
            num_items_in_batch, sapo_temperature_pos, sapo_temperature_neg (lvrpo_fast.GRPOOptions).

    Returns:
        (loss, metrics): loss a 0-dim float32 tensor (float64 for float64 logp); metrics a dict of
        detached 0-dim float32 tensors: clip_ratio_low, clip_ratio_high, clip_ratio_region, ratio,
        kl (beta > 0), entropy (when given).
    """
    opts = GRPOOptions.from_kwargs(**options)
    mask = validate.check_grpo_inputs(logp, advantages, mask, logp_old=logp_old, logp_ref=logp_ref,
                                      entropy=entropy, rollout_weights=rollout_weights, options=opts)
    if opts.entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={opts.entropy_coef} needs entropy [B, T]")
    impl = dispatch.select(backend, logp.device, logp.dtype)
    return impl.grpo_loss_impl(logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights, opts)


__all__ = ["grpo_loss", "row_scales", "NSTATS"]
