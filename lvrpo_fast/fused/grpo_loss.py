"""The clipped, KL-regularized GRPO loss on given per-token log-probabilities, on the kernel backends.

Design: the loss is a scalar, so its gradient w.r.t. logp is formed in the same pass as the loss (one
program per sequence, whole sequences so GSPO's sequence ratio is exact) and the backward pass only
scales it by the incoming gradient. Aggregation is folded into a per-sequence weight (:func:`row_scales`)
computed from the mask before the kernel runs, so the kernel never needs a second pass over the batch
and the metrics come back as per-sequence sums: no host sync. The entropy bonus is linear in the
entropy, so its value and gradient are formed here (:func:`entropy_bonus`), from the kernel's sums of
the kept tokens' entropy; the high-entropy mask's threshold (a quantile over the whole batch) is
computed before the kernel and passed to it as a 0-dim tensor.

One custom op, ``lvrpo_fast::grpo_loss`` (lvrpo_fast.fused.library), returning the loss, the
per-sequence statistics and the two gradients, with register_autograd scaling the latter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .. import backends, validate
from ..contract import (NSTATS, STAT_CLIP_HIGH, STAT_CLIP_LOW, STAT_CLIP_REGION, STAT_COUNT, STAT_ENTROPY,
                        STAT_ENTROPY_KEPT, STAT_KL, STAT_LOSS, STAT_RATIO, token_loss_params)
from ..options import GRPOOptions, entropy_threshold, world_size
from . import library


@dataclass(frozen=True)
class LossParams:
    """The non-tensor inputs of the GRPO loss op."""

    backend: str
    options: GRPOOptions


_CODEC = library.ParamsCodec(LossParams)
_NAMES = _CODEC.names


def row_scales(mask: torch.Tensor, options: GRPOOptions) -> torch.Tensor:
    """The weight of each sequence's token sum in the scalar loss (docs/math.md section 6).

    mask [B, T] bool -> [B] float32, so that loss = sum_b row_scale[b] * sum_t mask L. Every divisor is
    at least 1, so an empty or all-masked batch gives finite weights (and a zero loss)."""
    B = mask.shape[0]
    counts = mask.sum(1, dtype=torch.float32)
    batch = max(B, 1)
    loss_type = options.loss_type
    if loss_type in ("grpo", "sapo"):
        return 1.0 / (batch * counts.clamp(min=1.0))
    if loss_type == "bnpo":
        return (1.0 / counts.sum().clamp(min=1.0)).expand(B).contiguous()
    if loss_type == "dr_grpo":
        return torch.full((B,), 1.0 / (batch * options.max_completion_length), device=mask.device)
    if loss_type in ("dapo", "cispo", "vespo"):
        if options.num_items_in_batch is None:
            normalizer = counts.sum().clamp(min=1.0)
        else:
            normalizer = validate.num_items_value(options.num_items_in_batch, mask.device) / world_size()
        return (1.0 / normalizer).expand(B).contiguous()
    return torch.full((B,), 1.0 / batch, device=mask.device)  # luspo, seq_mean_token_sum


def metrics_from_stats(stats: torch.Tensor, options: GRPOOptions, has_entropy: bool) -> Dict[str, torch.Tensor]:
    """Per-sequence sums [B, NSTATS] -> masked means over the batch (docs/math.md section 7), detached fp32."""
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


def as_float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t as a contiguous float32 tensor (what the primitives take); None stays None."""
    return None if t is None else t.float().contiguous()


def per_token(rollout_weights: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """[B] or [B, T] weights -> [B, T] float32 contiguous (None stays None)."""
    if rollout_weights is None:
        return None
    w = rollout_weights.float()
    if w.dim() == 1:
        w = w.unsqueeze(1).expand(shape)
    return w.contiguous()


def high_entropy_threshold(entropy: Optional[torch.Tensor], mask: torch.Tensor,
                           options: GRPOOptions) -> Optional[torch.Tensor]:
    """The high-entropy mask's threshold (a 0-dim float32 tensor), None when the mask is off."""
    if not options.entropy_masked:
        return None
    return entropy_threshold(entropy.float(), mask, options.top_entropy_quantile)


def kept_tokens(entropy: Optional[torch.Tensor], mask: torch.Tensor, threshold: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, T] bool: the unmasked tokens the high-entropy mask keeps (every unmasked token without it)."""
    if threshold is None:
        return mask
    return mask & (entropy.detach().float() >= threshold)


def entropy_scales(kept: torch.Tensor, scale: torch.Tensor, options: GRPOOptions) -> torch.Tensor:
    """[B] float32: the weight of each sequence's kept-entropy sum in the bonus: its row scale
    (entropy_agg="loss_type"), or one over the batch's kept tokens ("token_mean")."""
    if options.entropy_agg == "loss_type":
        return scale
    return (1.0 / kept.sum(dtype=torch.float32).clamp(min=1.0)).expand(kept.shape[0])


def entropy_bonus(stats: torch.Tensor, entropy_scale: torch.Tensor, options: GRPOOptions, total=torch.sum) -> torch.Tensor:
    """The bonus's value, -entropy_coef * sum_b entropy_scale[b] * (kept entropy of b), 0-dim float32;
    total: the sum over b (the batch-invariant mode's is order-free)."""
    return (-options.entropy_coef) * total(entropy_scale * stats[:, STAT_ENTROPY_KEPT])


def entropy_grad(kept: torch.Tensor, entropy_scale: torch.Tensor, options: GRPOOptions) -> torch.Tensor:
    """d(loss)/d(entropy) of the bonus -entropy_coef * H over the kept tokens: [B, T] float32."""
    return (-options.entropy_coef) * kept.float() * entropy_scale.unsqueeze(1)


# ------------------------------------------------------------------------------------------------------
# The custom op
# ------------------------------------------------------------------------------------------------------
def _op(logp, entropy, advantages, mask, logp_old, logp_ref, logp_sampling, rollout_weights, num_items_tensor,
        cu_seqlens, need_grad_logp, need_grad_entropy, **scalars):
    p = _CODEC.decode(scalars, num_items_tensor)
    o = p.options
    prims = backends.primitives(p.backend)
    packing, shapes = None, (logp.shape, None if entropy is None else entropy.shape)
    if cu_seqlens is not None:  # packed inputs: laid out as the padded batch here, the gradients packed back
        packing = validate.check_cu_seqlens(cu_seqlens, logp.shape[-1], logp.device)
        mask, advantages, logp_old, logp_ref, logp_sampling, entropy, rollout_weights, logp = \
            validate.packed_grpo_inputs(packing, mask, advantages, logp_old, logp_ref, logp_sampling, entropy,
                                        rollout_weights, logp)
    B, T = mask.shape
    scale = row_scales(mask, o)
    entropy32 = as_float32(entropy)
    threshold = high_entropy_threshold(entropy32, mask, o)
    stats, grad_logp = prims.grpo_token_loss(
        as_float32(logp), as_float32(logp_old), as_float32(logp_ref), as_float32(logp_sampling),
        as_float32(advantages), mask, per_token(rollout_weights, (B, T)), entropy32, threshold, scale,
        token_loss_params(o), need_grad_logp)
    loss = stats[:, STAT_LOSS].sum()
    grad_entropy = None
    if o.entropy_coef != 0:
        kept = kept_tokens(entropy32, mask, threshold)
        ent_scale = entropy_scales(kept, scale, o)
        loss = loss + entropy_bonus(stats, ent_scale, o)
        if need_grad_entropy:
            grad_entropy = entropy_grad(kept, ent_scale, o)
    if packing is not None:
        grad_logp = None if grad_logp is None else packing.unpad(grad_logp).view(shapes[0])
        grad_entropy = None if grad_entropy is None else packing.unpad(grad_entropy).view(shapes[1])
    empty = logp.new_empty(0, dtype=torch.float32)
    return (loss, stats, empty if grad_logp is None else grad_logp, empty if grad_entropy is None else grad_entropy)


def _fake(logp, entropy, advantages, mask, logp_old, logp_ref, logp_sampling, rollout_weights, num_items_tensor,
          cu_seqlens, need_grad_logp, need_grad_entropy, **scalars):
    B = mask.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    f32 = dict(dtype=torch.float32, device=logp.device)
    grad_entropy = need_grad_entropy and scalars["entropy_coef"] != 0
    return (logp.new_empty((), **f32), logp.new_empty((B, NSTATS), **f32),
            logp.new_empty(logp.shape if need_grad_logp else (0,), **f32),
            logp.new_empty(entropy.shape if grad_entropy else (0,), **f32))


_N_TENSORS = 12  # the leading arguments of the op's schema below
library.define("grpo_loss",
               "Tensor logp, Tensor? entropy, Tensor advantages, Tensor mask, Tensor? logp_old, Tensor? logp_ref, "
               "Tensor? logp_sampling, Tensor? rollout_weights, Tensor? num_items_tensor, Tensor? cu_seqlens, "
               "bool need_grad_logp, bool need_grad_entropy", _CODEC, "(Tensor, Tensor, Tensor, Tensor)", _op, _fake)


def _setup_context(ctx, inputs, output):
    logp, entropy = inputs[0], inputs[1]
    _, stats, grad_logp, grad_entropy = output
    # The gradient was formed in the forward pass from the values logp had then, which is what the
    # reference's autograd uses too: logp changed in place afterwards does not make it stale.
    ctx.save_for_backward(grad_logp, grad_entropy)
    ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
    ctx.backend = inputs[_N_TENSORS + _NAMES.index("backend")]
    ctx.mark_non_differentiable(stats, grad_logp, grad_entropy)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_stats, grad_grad_logp, grad_grad_entropy):
    library.refuse_double_backward("grpo_loss", ctx.backend)
    grad_logp, grad_entropy = ctx.saved_tensors
    n_inputs = _N_TENSORS + len(_NAMES)
    if grad_loss is None:
        return (None,) * n_inputs
    out_logp = (grad_logp * grad_loss).to(ctx.dtypes[0]) if grad_logp.numel() else None
    out_entropy = (grad_entropy * grad_loss).to(ctx.dtypes[1]) if grad_entropy.numel() else None
    return (out_logp, out_entropy, *([None] * (n_inputs - 2)))


library.register_autograd("grpo_loss", _backward, _setup_context)


def grpo_loss_with(backend: str, logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights,
                   options: GRPOOptions, *, logp_sampling=None, return_stats=False, cu_seqlens=None):
    """Backend entry (validated inputs); returns (loss 0-dim float32, metrics), and the per-sequence
    statistics [B, NSTATS] as a third element when return_stats. cu_seqlens: the inputs packed as the
    public op takes them (logp [N], ...); the op checks cu_seqlens' values and lays them out."""
    scalars, num_items = _CODEC.encode(LossParams(backend=backend, options=options))
    grad_on = torch.is_grad_enabled()
    loss, stats, _, _ = library.op("grpo_loss")(
        logp, entropy, advantages, mask.contiguous(), logp_old, logp_ref, logp_sampling, rollout_weights, num_items,
        cu_seqlens, grad_on and logp.requires_grad, grad_on and entropy is not None and entropy.requires_grad,
        **scalars)
    metrics = metrics_from_stats(stats, options, entropy is not None)
    return (loss, metrics, stats) if return_stats else (loss, metrics)
