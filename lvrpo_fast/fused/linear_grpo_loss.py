"""Hidden states to the scalar GRPO loss and its gradients, in one op, without the [N, V] logits: the
chunk loop of the kernel backends, written once against the primitives.

Design: gradient formed in the forward pass (6 N V D FLOPs), not recomputed in the backward (8 N V D).
The loss is a scalar whose gradient w.r.t. each token's log-probability depends only on that token's
sequence (and on batch-level normalizers known from the mask alone, fused.grpo_loss.row_scales).
So the op walks the batch in chunks of whole sequences (C = k * T rows, so GSPO's sequence-level
ratio is exact) and, for each chunk:

    hidden_c = the chunk's unmasked rows of hidden   (a view, or a [C, D] gather when padded)
    logits  = hidden_c @ W^T + b                    [C, V] tile, input dtype     2 C V D FLOPs
    logp, lse, entropy = logits_stats(logits)        online log-sum-exp, fp32
    stats, dloss/dlogp = grpo_token_loss(...)        one program per sequence
    logits <- dloss/dlogits  (in place)              logits_grad_
    grad_hidden_c = dlogits @ W                                                   2 C V D FLOPs
    grad_W       += dlogits^T @ hidden_c  (the first chunk writes it: no zero-fill) 2 C V D FLOPs

The backward pass then only multiplies the stored gradients by the incoming scalar, in place, and not
at all when it is exactly 1 (the usual loss.backward(); the check runs on the device, primitive
scale_). A recompute design would save lse and redo the logits in the backward (8 N V D); storing the
gradients instead costs nothing extra because they are exactly the input gradients autograd would
allocate anyway.

Masked tokens (padding, prompt) never reach the LM head: a chunk holds whole sequences whose
*unmasked* tokens fill the tile, so N in the FLOP counts is the number of unmasked tokens, and a batch
with a quarter of padding costs three quarters of the work (lvrpo_fast.chunking.sequence_chunks).

Peak extra memory beyond inputs, outputs and input gradients:
    C * V * s  +  2 C * D * s (gathered hidden rows and their gradient, when padded)
               +  O(N) float32 per-token vectors  (+ 4 V bytes for a float32 bias accumulator)
with s the element size and C = the unmasked tokens of whole sequences filling LVRPO_CHUNK_BYTES
(512 MiB on CUDA, 64 MiB on the CPU; at least one sequence). grad_weight is accumulated in weight's
dtype, one rounding per chunk. Under torch.no_grad (or when nothing requires grad) only the 2 N V D
forward runs.

Batch-invariant mode (batch_invariant=True): the logits come from fixed-shape GEMMs of R rows carried
across chunk boundaries (chunking.Logits), so each token's logp and entropy are those of
fused_linear_logprobs in the same mode, bit for bit (the first on-policy ratio is exactly 1). Each
sequence's statistics then depend on that sequence alone (the loss kernels handle one sequence per
program, with a block that does not follow T in this mode), and the loss is their sum in an order that
does not depend on the sequences' (order_free_sum). Extra memory: up to 2 R rows of logits (2 R V s
bytes), the gathered hidden rows ((C + 2 R) D s) and 8 N bytes of row indices.

One custom op, ``lvrpo_fast::linear_grpo_loss`` (lvrpo_fast.fused.library), returning the loss, the
statistics and the three gradients; its registered backward scales them with ``lvrpo_fast::scale_``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends, validate
from ..chunking import HeadGrads, Logits, rows_per_chunk, sequence_chunks
from ..contract import NSTATS, STAT_LOSS, token_loss_params
from ..options import GRPOOptions
from . import library
from .grpo_loss import as_float32, entropy_grad, metrics_from_stats, per_token, row_scales


@dataclass(frozen=True)
class LinearLossParams:
    """The non-tensor inputs of the fused linear GRPO loss op."""

    backend: str
    temperature: float
    need_entropy: bool
    options: GRPOOptions
    batch_invariant: bool = False


_CODEC = library.ParamsCodec(LinearLossParams)
_NAMES = _CODEC.names


def _slice(t, start, end):
    return None if t is None else t[start:end]


def order_free_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of values [B] float32 as a 0-dim float32 that does not depend on their order: sorted,
    accumulated in float64, rounded once. (A plain sum's rounding follows the order, so shuffling a
    batch's sequences would move the loss's last bits even with every sequence's terms unchanged.)"""
    return values.sort().values.sum(dtype=torch.float64).float()


def forward(prims, hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref, rollout_weights,
            temperature, need_entropy, options, need_h, need_w, need_b, batch_invariant=False):
    """(loss, per-sequence stats [B, NSTATS], (grad_hidden, grad_weight, grad_bias)), chunk by chunk.

    hidden [B, T, D], targets [B, T] int64 (masked ids replaced), mask [B, T] bool, advantages [B] and
    the per-token [B, T] inputs in float32; the gradients are None where not needed. batch_invariant:
    the log-probabilities and entropies are those of the forward-only op in the same mode, bit for bit
    (the same chunking.Logits tiles and statistics launch), each sequence's statistics depend on that
    sequence alone, and the loss sums them in an order that does not depend on theirs."""
    B, T, D = hidden.shape
    V = weight.shape[0]
    need_grad = need_h or need_w or need_b
    params = token_loss_params(options)
    scale = row_scales(mask, options)
    # An empty batch (B = 0 or T = 0) has no token: no chunk, loss 0, zero gradients.
    chunks = sequence_chunks(mask, rows_per_chunk(V, hidden.element_size(), hidden.device, D)) if B * T else []
    flat_hidden = hidden.view(B * T, D)
    flat_targets = targets.view(B * T)
    grads = HeadGrads(hidden, weight, need_h, need_w, need_b, chunks)
    stats = torch.zeros((B, NSTATS), dtype=torch.float32, device=hidden.device)  # B = 0: no chunk at all
    head = Logits(chunks, flat_hidden, weight, bias, batch_invariant)
    for c in chunks:
        s0, s1 = c.start // T, c.end // T
        m = mask[s0:s1]
        rel = c.relative()  # the chunk's rows within its own [k * T] vectors
        logp = torch.zeros(c.end - c.start, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logp) if need_entropy else None
        if c.size:
            h = c.take(flat_hidden)
            tgt = c.take(flat_targets)
            logits = head.of(c, h)
            lp, lse, ent = prims.logits_stats(logits, tgt, temperature, need_entropy, batch_invariant)
            rel.put_(logp, lp)
            if need_entropy:
                rel.put_(entropy, ent)
        logp = logp.view(s1 - s0, T)  # masked rows: 0, never computed (a chunk without padding has none)
        chunk_stats, grad_logp = prims.grpo_token_loss(
            logp, _slice(logp_old, s0, s1), _slice(logp_ref, s0, s1), advantages[s0:s1], m,
            _slice(rollout_weights, s0, s1), None if entropy is None else entropy.view(s1 - s0, T),
            scale[s0:s1], params, need_grad, batch_invariant)
        stats[s0:s1] = chunk_stats
        if need_grad and c.size:
            grad_ent = None
            if options.entropy_coef != 0:
                grad_ent = rel.take(entropy_grad(m, scale[s0:s1], options).reshape(-1))
            prims.logits_grad_(logits, tgt, lse, None if grad_ent is None else ent,
                               rel.take(grad_logp.reshape(-1)), grad_ent, temperature)
            grads.add_(c, logits, h, weight)
    loss = order_free_sum(stats[:, STAT_LOSS]) if batch_invariant else stats[:, STAT_LOSS].sum()
    return loss, stats, grads.result(bias)


# ------------------------------------------------------------------------------------------------------
# The custom ops
# ------------------------------------------------------------------------------------------------------
def _op(hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref, rollout_weights, num_items_tensor,
        need_h, need_w, need_b, **scalars):
    p = _CODEC.decode(scalars, num_items_tensor)
    validate.check_target_range(targets, weight.shape[0], mask)
    with validate.autocast_off(hidden.device):
        loss, stats, (gh, gw, gb) = forward(
            backends.primitives(p.backend), hidden, weight, bias, targets, mask, as_float32(advantages),
            as_float32(logp_old), as_float32(logp_ref), per_token(rollout_weights, mask.shape), p.temperature,
            p.need_entropy, p.options, need_h, need_w, need_b, p.batch_invariant)
    return (loss, stats, hidden.new_empty(0) if gh is None else gh, weight.new_empty(0) if gw is None else gw,
            weight.new_empty(0) if gb is None else gb)


def _fake(hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref, rollout_weights, num_items_tensor,
          need_h, need_w, need_b, **scalars):
    B = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (hidden.new_empty((), **f32), hidden.new_empty((B, NSTATS), **f32),
            torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            bias.new_empty(bias.shape) if need_b else weight.new_empty(0))


def _scale(tensors, factor, backend):
    backends.primitives(backend).scale_([t for t in tensors if t.numel()], factor.float())


def _scale_fake(tensors, factor, backend):
    return None


@dataclass(frozen=True)
class ScaleParams:
    """The non-tensor input of the in-place scaling of the stored gradients."""

    backend: str


library.define("linear_grpo_loss",
               "Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor mask, Tensor advantages, "
               "Tensor? logp_old, Tensor? logp_ref, Tensor? rollout_weights, Tensor? num_items_tensor, bool need_h, "
               "bool need_w, bool need_b", _CODEC, "(Tensor, Tensor, Tensor, Tensor, Tensor)", _op, _fake)
library.define("scale_", "Tensor(a!)[] tensors, Tensor factor", library.ParamsCodec(ScaleParams), "()", _scale,
               _scale_fake)

_N_INPUTS = 13 + len(_NAMES)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    _, stats, gh, gw, gb = output
    # hidden, weight and bias are saved (no copy) only for autograd's version check: the gradients
    # were formed in the forward pass, so a head changed in place before the backward would make
    # them stale without a word.
    ctx.save_for_backward(hidden, weight, bias, gh, gw, gb)
    ctx.needs = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
    ctx.backend = inputs[13 + _NAMES.index("backend")]
    ctx.used = False
    ctx.mark_non_differentiable(stats, gh, gw, gb)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_stats, grad_gh, grad_gw, grad_gb):
    library.refuse_double_backward("fused_linear_grpo_loss", ctx.backend)
    if ctx.used:
        raise RuntimeError("fused_linear_grpo_loss: the gradients were formed in the forward pass and are "
                           "scaled in place by the backward; backward through the same graph twice is not supported")
    ctx.used = True
    _, _, _, gh, gw, gb = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * _N_INPUTS
    grads = [g if need else None for g, need in zip((gh, gw, gb), ctx.needs)]
    library.op("scale_")([g for g in grads if g is not None], grad_loss, ctx.backend)
    return (*grads, *([None] * (_N_INPUTS - 3)))


library.register_autograd("linear_grpo_loss", _backward, _setup_context)


def linear_grpo_loss_with(backend: str, hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                          rollout_weights, temperature, return_entropy, options: GRPOOptions,
                          batch_invariant: bool = False):
    """Backend entry (validated inputs): hidden [B, T, D], targets / mask [B, T], advantages [B].
    Returns (loss 0-dim float32, metrics)."""
    need_entropy = bool(return_entropy) or options.entropy_coef != 0
    params = LinearLossParams(backend=backend, temperature=float(temperature), need_entropy=need_entropy,
                              batch_invariant=bool(batch_invariant), options=options)
    scalars, num_items = _CODEC.encode(params)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    mask = mask.contiguous()
    loss, stats, _, _, _ = library.op("linear_grpo_loss")(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        validate.safe_targets(targets, mask).contiguous(), mask, advantages, logp_old, logp_ref, rollout_weights,
        num_items, *need, **scalars)
    return loss, metrics_from_stats(stats, options, need_entropy)
