"""fused_linear_grpo_loss: the GRPO loss straight from hidden states and the LM head. The public op:
checks, dispatch, call; the kernel backends' design (6 N V D FLOPs, peak memory) is in
lvrpo_fast/fused/linear_grpo_loss.py."""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, validate
from .options import GRPOOptions


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           mask: Optional[torch.Tensor], advantages: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None, logp_old: Optional[torch.Tensor] = None,
                           logp_ref: Optional[torch.Tensor] = None, rollout_weights: Optional[torch.Tensor] = None,
                           temperature: float = 1.0, return_entropy: bool = False, backend: Optional[str] = None,
                           batch_invariant: Optional[bool] = None, **options):
    """The GRPO loss straight from hidden states and the LM head, never building the [B*T, V] logits.

    Args:
        hidden: [B, T, D] float16 / bfloat16 / float32 / float64 hidden states predicting `targets`.
        weight: [V, D] LM head weight (same dtype as hidden); bias: optional [V].
        targets: [B, T] integer ids of the sampled completion tokens (shifted by the caller).
        mask: [B, T] bool / 0-1 completion mask (None: every token counts). Values at masked tokens
            never matter (NaN included).
        advantages: [B] float, one per sequence, or [B, T], one per token (docs/math.md section 4).
        logp_old: [B, T] sampling-policy log-probabilities (default: the current ones, detached).
        logp_ref: [B, T] reference-model log-probabilities (needed when beta > 0).
        rollout_weights: [B, T] or [B] rollout correction weights.
        temperature: the sampling temperature, dividing the logits.
        return_entropy: compute the entropy metric even when entropy_coef == 0.
        backend: "auto", "triton", "cpp" or "reference".
        batch_invariant: True: every token's logp and entropy are those fused_linear_logprobs gives in
            the same mode, bit for bit, whatever else is in the batch (so the ratio of an on-policy
            step is exactly 1); each sequence's share of the loss depends on that sequence and the
            loss's normalizer alone, and the loss does not depend on the sequences' order. None
            (default): LVRPO_BATCH_INVARIANT, else off. See README, "Batch-invariant mode".
        **options: the GRPO options (lvrpo_fast.GRPOOptions).

    Returns:
        (loss, metrics): 0-dim float32 loss, differentiable w.r.t. hidden, weight and bias; metrics
        as in lvrpo_fast.grpo_loss. An empty (B = 0 or T = 0) or all-masked batch gives loss 0 and zero
        gradients. Under torch.autocast the head computes in autocast's dtype (validate.head_autocast).
        First-order gradients only on the kernel backends (create_graph=True raises); an input changed
        in place between forward and backward raises autograd's error.
    """
    opts = GRPOOptions.from_kwargs(**options)
    hidden, weight, bias, mask, temperature = validate.linear_grpo_loss_inputs(
        hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref, rollout_weights, temperature, opts)
    impl = dispatch.select(backend, hidden.device, hidden.dtype, dispatch.batch_invariant(batch_invariant))
    with validate.autocast_off(hidden.device):
        return impl.linear_grpo_loss_impl(hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                                          rollout_weights, temperature, bool(return_entropy), opts)
