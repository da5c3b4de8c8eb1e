"""Per-token log-probabilities and entropy from hidden states, without the [N, V] logits.

Design (kernel backends): rows are processed in chunks of C rows (lvrpo_fast.chunking). For each
chunk the LM head runs as one BLAS/cuBLAS matmul into a [C, V] tile in the input dtype, and a
row-wise kernel (Triton or C++) reduces the tile with an online log-sum-exp in float32. Only the
per-row lse (and entropy) are saved; the backward pass recomputes each tile, turns it in place into
the gradient of the logits, and multiplies it back through the head:

    forward          2 N V D FLOPs   (under torch.no_grad: this and nothing saved)
    backward         2 N V D (recompute) + 4 N V D (grad hidden, grad weight)  -> 8 N V D in all

With a mask, N counts only its true rows: masked rows are never computed (their log-probability and
entropy are 0, their gradient is 0), the chunks gather the live rows of hidden instead
(lvrpo_fast.chunking.row_chunks).

Peak extra memory, beyond inputs, outputs and input gradients:
    forward   C * V * s  +  4 N * (2 + entropy)          bytes  (+ C * D * s gathered rows with a mask)
    backward  C * V * s  +  4 N * 2  (+ 4 V for a bias accumulated in float32; + 2 C * D * s with a mask)
with s the element size of the input dtype and C = LVRPO_CHUNK_BYTES / (V * s) rows (512 MiB on
CUDA by default, 64 MiB on the CPU). The term that grows with N is only the O(N) per-row vectors.
grad_weight is accumulated across chunks in weight's dtype (one rounding per chunk for bf16/fp16).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, validate
from .chunking import (head_backward_, head_grad_buffers, head_into, logits_tile, row_chunks, rows_per_chunk,
                       skips_rows)


def _plan(hidden, weight, mask):
    """The chunks of rows to compute (only mask's true rows) and the one [C, V] tile they share."""
    rows = rows_per_chunk(weight.shape[0], hidden.element_size(), hidden.device)
    chunks = row_chunks(hidden.shape[0], rows, mask)
    return chunks, logits_tile(max((c.size for c in chunks), default=0), weight.shape[0], hidden)


def _forward(prims, hidden, weight, bias, targets, mask, temperature, return_entropy):
    """The forward pass alone: 2 N V D FLOPs (N: the unmasked rows), one [C, V] tile alive at a time."""
    N = hidden.shape[0]
    chunks, tile = _plan(hidden, weight, mask)
    new = torch.zeros if skips_rows(chunks) else torch.empty  # masked rows are never computed and stay 0
    logp = new(N, dtype=torch.float32, device=hidden.device)
    lse = new(N, dtype=torch.float32, device=hidden.device)
    entropy = new(N, dtype=torch.float32, device=hidden.device) if return_entropy else None
    for c in chunks:
        logits = head_into(tile, c.take(hidden), weight, bias)
        lp, ls, ent = prims.logits_stats(logits, c.take(targets), temperature, return_entropy)
        c.put_(logp, lp)
        c.put_(lse, ls)
        if return_entropy:
            c.put_(entropy, ent)
    return logp, lse, entropy


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V]|None, targets [N] int64 (masked ids replaced by 0),
    mask [N] bool|None -> logp [N] float32 (, entropy [N] float32)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, temperature, return_entropy, prims):
        logp, lse, entropy = _forward(prims, hidden, weight, bias, targets, mask, temperature, return_entropy)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden, weight, bias, targets, mask, lse, entropy)
        ctx.temperature = temperature
        ctx.prims = prims
        ctx.return_entropy = return_entropy
        ctx.set_materialize_grads(False)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, mask, lse, entropy = ctx.saved_tensors
        prims = ctx.prims
        if grad_logp is None and grad_entropy is None:
            return (None,) * 8
        grad_logp = (torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous())
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunks, tile = _plan(hidden, weight, mask)
        grad_hidden, grad_weight, grad_bias = head_grad_buffers(hidden, weight, need_h, need_w, need_b, chunks)
        for c in chunks:
            h = c.take(hidden)
            logits = head_into(tile, h, weight, bias)
            prims.logits_grad_(logits, c.take(targets), c.take(lse),
                               None if grad_entropy is None else c.take(entropy), c.take(grad_logp),
                               None if grad_entropy is None else c.take(grad_entropy), ctx.temperature)
            head_backward_(c, logits, h, weight, grad_hidden, grad_weight, grad_bias)
        if need_b:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def linear_logprobs(prims, hidden, weight, targets, bias, temperature, return_entropy, mask):
    """Backend entry (validated inputs): hidden [N, D], targets [N], mask [N] bool | None."""
    if return_entropy is None:
        return_entropy = False
    safe_targets = targets.long()
    if mask is not None:
        safe_targets = torch.where(mask, safe_targets, torch.zeros_like(safe_targets))
    args = (hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            safe_targets.contiguous(), mask, temperature, return_entropy)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:3])
    if not needs_grad:  # old-policy / reference log-probs: forward FLOPs only, nothing saved
        logp, _, entropy = _forward(prims, *args)
        return logp, entropy
    out = LinearLogprobsFunction.apply(*args, prims)
    if return_entropy:
        return out
    return out, None

def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          return_entropy: bool = False, mask: Optional[torch.Tensor] = None,
                          backend: Optional[str] = None):
    """Per-token log-probabilities (and entropy) of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: [..., D] float16 / bfloat16 / float32 / float64 hidden states (the LM head's input).
        weight: [V, D] LM head weight, same dtype as hidden.
        targets: [...] integer token ids in [0, V) (hidden.shape[:-1]); masked positions may hold any id.
        bias: optional [V] LM head bias.
        temperature: sampling temperature T > 0; logits are divided by it (as TRL and verl do).
        return_entropy: also return the entropy of the distribution at each position.
        mask: optional [...] bool/0-1; masked positions return 0 and get zero gradient.
        backend: "auto" (default), "triton", "cpp" or "reference"; see lvrpo_fast.dispatch.

    Returns:
        logp [...] float32 (float64 for float64 inputs), and entropy [...] if return_entropy.
        Differentiable w.r.t. hidden, weight and bias through both outputs. The full [N, V] logits
        are never allocated by the kernel backends; peak memory is given in this module's docstring.
    """
    mask, temperature = validate.check_linear_inputs(hidden, weight, targets, bias=bias, mask=mask,
                                                     temperature=temperature)
    impl = dispatch.select(backend, hidden.device, hidden.dtype)
    shape = targets.shape
    D = hidden.shape[-1]
    logp, entropy = impl.logprobs_impl(hidden.reshape(-1, D), weight, targets.reshape(-1), bias, temperature,
                                       bool(return_entropy), None if mask is None else mask.reshape(-1))
    if return_entropy:
        return logp.reshape(shape), entropy.reshape(shape)
    return logp.reshape(shape)
