"""Hidden states to the scalar GRPO loss and its gradients, in one op, without the [N, V] logits.

Design: gradient formed in the forward pass (6 N V D FLOPs), not recomputed in the backward (8 N V D).
The loss is a scalar whose gradient w.r.t. each token's log-probability depends only on that token's
sequence (and on batch-level normalizers known from the mask alone, lvrpo_fast.grpo_loss.row_scales).
So the op walks the batch in chunks of whole sequences (C = k * T rows, so GSPO's sequence-level
ratio is exact) and, for each chunk:

    hidden_c = the chunk's unmasked rows of hidden   (a view, or a [C, D] gather when padded)
    logits  = hidden_c @ W^T + b                    [C, V] tile, input dtype     2 C V D FLOPs
    logp, lse, entropy = logits_stats(logits)        online log-sum-exp, fp32
    stats, dloss/dlogp = grpo_token_loss(...)        one program per sequence
    logits <- dloss/dlogits  (in place)              logits_grad_
    grad_hidden_c = dlogits @ W                                                   2 C V D FLOPs
    grad_W       += dlogits^T @ hidden_c                                          2 C V D FLOPs

The backward pass then only multiplies the stored gradients by the incoming scalar (in place, so a
second backward through the same graph raises). A recompute design would save lse and redo the
logits in the backward (8 N V D); storing the gradients instead costs nothing extra because they
are exactly the input gradients autograd would allocate anyway.

Masked tokens (padding, prompt) never reach the LM head: a chunk holds whole sequences whose
*unmasked* tokens fill the tile, so N in the FLOP counts is the number of unmasked tokens, and a batch
with a quarter of padding costs three quarters of the work (lvrpo_fast.chunking.sequence_chunks).

Peak extra memory beyond inputs, outputs and input gradients:
    C * V * s  +  2 C * D * s (gathered hidden rows and their gradient, when padded)
               +  O(N) float32 per-token vectors  (+ 4 V bytes for a float32 bias accumulator)
with s the element size and C = the unmasked tokens of whole sequences filling LVRPO_CHUNK_BYTES
(512 MiB on CUDA, 64 MiB on the CPU; at least one sequence). grad_weight is accumulated in weight's dtype, one rounding per chunk.
Under torch.no_grad (or when nothing requires grad) only the 2 N V D forward runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, validate
from .backends import STAT_LOSS
from .chunking import head_backward_, head_grad_buffers, head_into, logits_tile, rows_per_chunk, sequence_chunks
from .grpo_loss import entropy_grad, metrics_from_stats, prepare_rollout_weights, row_scales
from .options import GRPOOptions


def _slice(t, start, end):
    return None if t is None else t[start:end]


def _forward(prims, hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref, rollout_weights,
             temperature, need_entropy, options, need_h, need_w, need_b):
    """Loss, per-sequence stats and (for the inputs that need them) the input gradients, chunk by chunk."""
    B, T, D = hidden.shape
    V = weight.shape[0]
    need_grad = need_h or need_w or need_b
    scale = row_scales(mask, options)
    chunks = sequence_chunks(mask, rows_per_chunk(V, hidden.element_size(), hidden.device))
    flat_hidden = hidden.view(B * T, D)
    flat_targets = targets.view(B * T)
    grad_hidden, grad_weight, grad_bias = head_grad_buffers(hidden, weight, need_h, need_w, need_b, chunks)
    flat_grad_hidden = None if grad_hidden is None else grad_hidden.view(B * T, D)
    stats_parts = []
    tile = logits_tile(max(c.size for c in chunks), V, hidden)
    for c in chunks:
        s0, s1 = c.start // T, c.end // T
        m = mask[s0:s1]
        rel = c.relative()  # the chunk's rows within its own [k * T] vectors
        logp = torch.zeros(c.end - c.start, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp) if need_entropy else None
        if c.size:
            h = c.take(flat_hidden)
            tgt = c.take(flat_targets)
            logits = head_into(tile, h, weight, bias)
            lp, lse, ent = prims.logits_stats(logits, tgt, temperature, need_entropy)
            rel.put_(logp, lp)
            if need_entropy:
                rel.put_(entropy, ent)
        logp = logp.view(s1 - s0, T)  # masked rows: 0, never computed (a chunk without padding has none)
        stats, grad_logp = prims.grpo_token_loss(
            logp, _slice(logp_old, s0, s1), _slice(logp_ref, s0, s1), advantages[s0:s1], m,
            _slice(rollout_weights, s0, s1), None if entropy is None else entropy.view(s1 - s0, T),
            scale[s0:s1], options, need_grad)
        stats_parts.append(stats)
        if need_grad and c.size:
            grad_ent = None
            if options.entropy_coef != 0:
                grad_ent = rel.take(entropy_grad(m, scale[s0:s1], options).reshape(-1))
            prims.logits_grad_(logits, tgt, lse, None if grad_ent is None else ent,
                               rel.take(grad_logp.reshape(-1)), grad_ent, temperature)
            head_backward_(c, logits, h, weight, flat_grad_hidden, grad_weight, grad_bias)
    stats = torch.cat(stats_parts)
    loss = stats[:, STAT_LOSS].sum()
    if need_b:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, stats, (grad_hidden, grad_weight, grad_bias)


class LinearGRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref, rollout_weights,
                temperature, need_entropy, options, prims):
        loss, stats, grads = _forward(prims, hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref,
                                      rollout_weights, temperature, need_entropy, options,
                                      *ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.used = False
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if ctx.used:
            raise RuntimeError("fused_linear_grpo_loss: the gradients were formed in the forward pass and "
                               "scaled in place; backward through the same graph twice is not supported")
        ctx.used = True
        grads = list(ctx.saved_tensors)
        if grad_loss is None:
            return (None,) * 13
        for g in grads:
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        return grads[0], grads[1], grads[2], *([None] * 10)


def linear_grpo_loss_with(prims, hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                          rollout_weights, temperature, return_entropy, options):
    """Backend entry (validated inputs): hidden [B, T, D], targets / mask [B, T], advantages [B]."""
    need_entropy = bool(return_entropy) or options.entropy_coef != 0
    mask = mask.contiguous()
    safe_targets = torch.where(mask, targets.long(), torch.zeros_like(targets, dtype=torch.long)).contiguous()
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    args = (hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), safe_targets,
            mask, f32(advantages), f32(logp_old), f32(logp_ref),
            prepare_rollout_weights(rollout_weights, mask.shape), temperature, need_entropy, options, prims)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:3])
    if needs_grad:
        loss, stats = LinearGRPOLossFunction.apply(*args)
    else:  # old-policy / evaluation pass: 2 N V D FLOPs, no gradient formed, nothing saved
        loss, stats, _ = _forward(prims, *args[:-1], False, False, False)
    return loss, metrics_from_stats(stats, options, need_entropy)


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                           advantages: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                           logp_old: Optional[torch.Tensor] = None, logp_ref: Optional[torch.Tensor] = None,
                           rollout_weights: Optional[torch.Tensor] = None, temperature: float = 1.0,
                           return_entropy: bool = False, backend: Optional[str] = None, **options):
    """The GRPO loss straight from hidden states and the LM head, never building the [B*T, V] logits.

    Args:
        hidden: [B, T, D] float16 / bfloat16 / float32 / float64 hidden states predicting `targets`.
        weight: [V, D] LM head weight (same dtype as hidden); bias: optional [V].
        targets: [B, T] integer ids of the sampled completion tokens (shifted by the caller).
        mask: [B, T] bool / 0-1 completion mask.
        advantages: [B] float, one per sequence.
        logp_old: [B, T] sampling-policy log-probabilities (default: the current ones, detached).
        logp_ref: [B, T] reference-model log-probabilities (needed when beta > 0).
        rollout_weights: [B, T] or [B] rollout correction weights.
        temperature: the sampling temperature, dividing the logits.
        return_entropy: compute the entropy metric even when entropy_coef == 0.
        backend: "auto", "triton", "cpp" or "reference".
        **options: the GRPO options (lvrpo_fast.GRPOOptions).

    Returns:
        (loss, metrics): 0-dim float32 loss, differentiable w.r.t. hidden, weight and bias; metrics
        as in lvrpo_fast.grpo_loss. Design and peak memory: see this module's docstring.
    """
    opts = GRPOOptions.from_kwargs(**options)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a 3-D tensor [B, T, D], got {got}")
    mask_b, temperature = validate.check_linear_inputs(hidden, weight, targets, bias=bias, mask=mask,
                                                       temperature=temperature)
    mask_b = validate.check_grpo_inputs(targets, advantages, mask_b, logp_old=logp_old, logp_ref=logp_ref,
                                        rollout_weights=rollout_weights, options=opts, need_logp=False)
    impl = dispatch.select(backend, hidden.device, hidden.dtype)
    return impl.linear_grpo_loss_impl(hidden, weight, targets, mask_b, advantages, bias, logp_old, logp_ref,
                                      rollout_weights, temperature, bool(return_entropy), opts)
