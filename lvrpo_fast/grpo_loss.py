"""grpo_loss: the clipped, KL-regularized GRPO loss on given per-token log-probabilities (docs/math.md
sections 3 to 7). The public op: checks, dispatch, call; the kernel backends' design is in
lvrpo_fast/fused/grpo_loss.py."""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, validate
from .contract import SequenceStats
from .options import GRPOOptions


def grpo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              logp_old: Optional[torch.Tensor] = None, logp_ref: Optional[torch.Tensor] = None,
              logp_sampling: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
              rollout_weights: Optional[torch.Tensor] = None, backend: Optional[str] = None,
              return_sequence_stats: bool = False, cu_seqlens: Optional[torch.Tensor] = None, **options):
    """The GRPO loss on given per-token log-probabilities.

    Args:
        logp: [B, T] float log-probabilities of the sampled tokens under the policy (differentiable).
        advantages: [B] float, one per sequence (see group_advantages), or [B, T], one per token
            (step-wise process rewards; docs/math.md section 4).
        mask: [B, T] bool / 0-1, 1 for completion tokens. Values of every input at masked tokens
            never matter (NaN included); a NaN or inf at an unmasked token reaches the loss.
        logp_old: [B, T] log-probabilities under the sampling policy; default logp.detach() (ratio 1).
        logp_ref: [B, T] log-probabilities under the reference model; needed when beta > 0.
        logp_sampling: [B, T] log-probabilities of the sampler (e.g. vLLM's), read by the off-policy
            mask only; default logp_old.
        entropy: [B, T] per-token entropy (differentiable); needed when entropy_coef != 0 or
            top_entropy_quantile < 1.
        rollout_weights: [B, T] or [B] rollout correction weights multiplying the policy term (for
            vespo: entering its sequence weight instead).
        backend: "auto", "triton", "cpp" or "reference".
        return_sequence_stats: also return the per-sequence statistics (lvrpo_fast.SequenceStats).
        cu_seqlens: [B + 1] int32 / int64 bounds of packed sequences: logp, mask and the per-token
            inputs are then [N] (or [1, N]), advantages and rollout_weights [B] or [N], N =
            cu_seqlens[-1] (see lvrpo_fast.fused_linear_grpo_loss); the result equals the op's on the
            batch padded to the longest sequence, and logp's gradient is [N] like logp.
        **options: loss_type, epsilon_low, epsilon_high, delta, clip_ratio_c, beta, kl_estimator,
            use_bias_correction_kl, importance_sampling_level, entropy_coef, entropy_agg,
            max_completion_length, num_items_in_batch (a number or a one-element tensor),
            sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
            vespo_lambda_neg, off_policy_mask_threshold, top_entropy_quantile (lvrpo_fast.GRPOOptions).

    Returns:
        (loss, metrics): loss a 0-dim float32 tensor (float64 for float64 logp); metrics a dict of
        detached 0-dim float32 tensors: clip_ratio_low, clip_ratio_high, clip_ratio_region, ratio,
        kl (beta > 0), entropy (when given); with return_sequence_stats, (loss, metrics, stats). An
        empty or all-masked batch gives loss 0, zero gradients. First-order gradients only on the
        kernel backends (create_graph=True raises).
    """
    opts = GRPOOptions.from_kwargs(**options)
    sequences = None
    if cu_seqlens is not None:  # shapes only: cu_seqlens' values are read inside the op (torch.compile traces this)
        validate.packed_rows("logp", logp, cu_seqlens, values=False)
        sequences = cu_seqlens.shape[0] - 1
        if mask is None:
            mask = torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
    mask = validate.check_grpo_inputs(logp, advantages, mask, logp_old=logp_old, logp_ref=logp_ref,
                                      logp_sampling=logp_sampling, entropy=entropy, rollout_weights=rollout_weights,
                                      options=opts, sequences=sequences)
    impl = dispatch.select(backend, logp.device, logp.dtype)
    out = impl.grpo_loss_impl(logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights, opts,
                              logp_sampling=logp_sampling, return_stats=return_sequence_stats, cu_seqlens=cu_seqlens)
    return out if not return_sequence_stats else (out[0], out[1], SequenceStats.from_columns(out[2]))
