"""Per-token log-probabilities and entropy from hidden states, without the [N, V] logits: the chunk loop
of the kernel backends, written once against the primitives (lvrpo_fast.contract.Primitives).

Design: rows are processed in chunks of C rows (lvrpo_fast.chunking). For each chunk the LM head runs
as one BLAS/cuBLAS matmul into a [C, V] tile in the input dtype, and a row-wise kernel (Triton or C++)
reduces the tile with an online log-sum-exp in float32. Only the per-row lse (and entropy) are saved;
the backward pass recomputes each tile, turns it in place into the gradient of the logits, and
multiplies it back through the head:

    forward          2 N V D FLOPs   (under torch.no_grad: this and nothing saved)
    backward         2 N V D (recompute) + 4 N V D (grad hidden, grad weight)  -> 8 N V D in all

With a mask, N counts only its true rows: masked rows are never computed (their log-probability and
entropy are 0, their gradient is 0), the chunks gather the live rows of hidden instead
(lvrpo_fast.chunking.row_chunks). A mask with no true row (or N = 0) gives zeros and zero gradients.

Peak extra memory, beyond inputs, outputs and input gradients:
    forward   C * V * s  +  4 N * (2 + entropy)          bytes  (+ C * D * s gathered rows with a mask)
    backward  C * V * s  +  4 N * 2  (+ 4 V for a bias accumulated in float32; + 2 C * D * s with a mask)
with s the element size of the input dtype and C = LVRPO_CHUNK_BYTES / (V * s) rows (512 MiB on
CUDA by default, 64 MiB on the CPU). The term that grows with N is only the O(N) per-row vectors.
grad_weight is accumulated across chunks in weight's dtype (one rounding per chunk for bf16/fp16).

Batch-invariant mode (batch_invariant=True): the head runs as GEMMs of a fixed R rows (chunking.Logits,
R = 128 on the CPU, 256 on CUDA), so a row's logp and entropy have the same bits whatever the batch,
the mask, the row's position and LVRPO_CHUNK_BYTES; the statistics kernels are row-local and run the
fixed launch configuration. Chunks are whole tiles (C rounded down to a multiple of R, at least R:
a budget under R rows of logits is exceeded), so it adds the gathered hidden rows (C D s), 8 N bytes
of row indices and at most R - 1 padded rows of GEMM per call.

Vocab-parallel heads (lvrpo_fast/vocab_parallel.py): weight is this rank's shard, the primitives are
the shard's (vocab_parallel.ShardPrimitives: one all-gather of the row statistics per chunk, the
backward's tile turned into this shard's columns of the gradient), chunks are sized by the widest
shard so every rank runs the same plan, and grad_hidden is summed over the group unless the caller
reduces it. The Partition reaches the ops as an integer key (LogprobsParams.vocab_parallel).

Two custom ops (lvrpo_fast.fused.library): ``lvrpo_fast::linear_logprobs`` (forward) and
``lvrpo_fast::linear_logprobs_backward``, tied together by torch.library.register_autograd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import validate
from .. import vocab_parallel as tp
from ..chunking import HeadGrads, Logits, invariant_chunk_rows, row_chunks, rows_per_chunk, skips_rows
from . import library


@dataclass(frozen=True)
class LogprobsParams:
    """The non-tensor inputs of the fused log-prob op."""

    backend: str
    temperature: float
    return_entropy: bool
    batch_invariant: bool = False
    vocab_parallel: int = 0  # the key of a lvrpo_fast.vocab_parallel.Partition, 0: the whole head


_CODEC = library.ParamsCodec(LogprobsParams)


def _plan(hidden, weight, bias, mask, batch_invariant, partition=None):
    """The chunks of rows to compute (only mask's true rows) and their logits (chunking.Logits).
    partition: a vocab-parallel shard's (vocab_parallel.Partition): the chunk rows are sized by the
    widest shard, so that every rank runs the same plan, and its vocab_block sets the logits' column
    blocks in batch-invariant mode."""
    plan_vocab = weight.shape[0] if partition is None else partition.max_local_size
    rows = rows_per_chunk(plan_vocab, hidden.element_size(), hidden.device, weight.shape[1])
    if batch_invariant:
        rows = invariant_chunk_rows(rows, hidden.device)
    chunks = row_chunks(hidden.shape[0], rows, mask)
    return chunks, Logits(chunks, hidden, weight, bias, batch_invariant, tp.column_block(partition))


def forward(prims, hidden, weight, bias, targets, mask, temperature, return_entropy, batch_invariant=False,
            partition=None):
    """logp, lse [N] float32 and entropy [N] float32 or None: 2 N V D FLOPs (N: the unmasked rows),
    one [C, V] tile alive at a time. Masked rows are 0 in all three."""
    N = hidden.shape[0]
    chunks, head = _plan(hidden, weight, bias, mask, batch_invariant, partition)
    new = torch.zeros if skips_rows(chunks, N) else torch.empty  # rows never computed stay 0
    logp = new(N, dtype=torch.float32, device=hidden.device)
    lse = new(N, dtype=torch.float32, device=hidden.device)
    entropy = new(N, dtype=torch.float32, device=hidden.device) if return_entropy else None
    for c in chunks:
        logits = head.of(c)
        lp, ls, ent = prims.logits_stats(logits, c.take(targets), temperature, return_entropy, batch_invariant)
        c.put_(logp, lp)
        c.put_(lse, ls)
        if return_entropy:
            c.put_(entropy, ent)
    return logp, lse, entropy


def backward(prims, hidden, weight, bias, targets, mask, lse, entropy, grad_logp, grad_entropy, temperature,
             need_h, need_w, need_b, batch_invariant=False, partition=None):
    """(grad_hidden, grad_weight, grad_bias), None where not needed: the tile of each chunk recomputed
    (2 C V D, the forward's bits in either mode), turned into d(loss)/d(logits) in place, and taken back
    through the head (4 C V D)."""
    chunks, head = _plan(hidden, weight, bias, mask, batch_invariant, partition)
    grads = HeadGrads(hidden, weight, need_h, need_w, need_b, chunks)
    for c in chunks:
        h = c.take(hidden)
        logits = head.of(c, h)
        prims.logits_grad_(logits, c.take(targets), c.take(lse),
                           None if grad_entropy is None else c.take(entropy), c.take(grad_logp),
                           None if grad_entropy is None else c.take(grad_entropy), temperature)
        grads.add_(c, logits, h, weight)
    return grads.result(bias)


# ------------------------------------------------------------------------------------------------------
# The custom ops
# ------------------------------------------------------------------------------------------------------
def _flat(hidden, targets, mask):
    """hidden [..., D], targets [...], mask [...] | None as [N, D], [N], [N] | None."""
    return (hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), None if mask is None else mask.reshape(-1))


def _forward_op(hidden, weight, bias, targets, mask, cu_seqlens, **scalars):
    """hidden [..., D], targets [...], mask [...] -> logp, lse, entropy [...] (entropy [0] when not asked).
    cu_seqlens: packed rows' bounds, checked here only (every row is computed on its own)."""
    p = _CODEC.decode(scalars)
    prims, partition = library.primitives(p.backend, p.vocab_parallel)
    if cu_seqlens is not None:
        validate.check_cu_seqlens(cu_seqlens, targets.shape[-1], hidden.device)
    vocab = weight.shape[0] if partition is None else partition.vocab_size
    validate.check_target_range(targets, vocab, mask)  # reported at the caller's indices
    shape = targets.shape
    flat_hidden, flat_targets, flat_mask = _flat(hidden, targets, mask)
    with validate.autocast_off(hidden.device):
        logp, lse, entropy = forward(prims, flat_hidden, weight, bias, flat_targets, flat_mask, p.temperature,
                                     p.return_entropy, p.batch_invariant, partition)
    return (logp.view(shape), lse.view(shape),
            entropy.view(shape) if entropy is not None else hidden.new_empty(0, dtype=torch.float32))


def _forward_fake(hidden, weight, bias, targets, mask, cu_seqlens, **scalars):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    shape = targets.shape
    return (hidden.new_empty(shape, **f32), hidden.new_empty(shape, **f32),
            hidden.new_empty(shape if scalars["return_entropy"] else (0,), **f32))


def _backward_op(hidden, weight, bias, targets, mask, lse, entropy, grad_logp, grad_entropy, need_h, need_w, need_b,
                 **scalars):
    p = _CODEC.decode(scalars)
    prims, partition = library.primitives(p.backend, p.vocab_parallel)
    flat_hidden, flat_targets, flat_mask = _flat(hidden, targets, mask)
    has_entropy = grad_entropy is not None
    with validate.autocast_off(hidden.device):
        gh, gw, gb = backward(prims, flat_hidden, weight, bias, flat_targets, flat_mask,
                              lse.reshape(-1), entropy.reshape(-1) if has_entropy else None, grad_logp.reshape(-1),
                              grad_entropy.reshape(-1) if has_entropy else None, p.temperature, need_h, need_w,
                              need_b, p.batch_invariant, partition)
    tp.reduce_grad_hidden_(partition, gh)
    return (hidden.new_empty(0) if gh is None else gh.view(hidden.shape), weight.new_empty(0) if gw is None else gw,
            weight.new_empty(0) if gb is None else gb)


def _backward_fake(hidden, weight, bias, targets, mask, lse, entropy, grad_logp, grad_entropy, need_h, need_w, need_b,
                   **scalars):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            bias.new_empty(bias.shape) if need_b else weight.new_empty(0))


library.define("linear_logprobs",
               "Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? mask, Tensor? cu_seqlens", _CODEC,
               "(Tensor, Tensor, Tensor)", _forward_op, _forward_fake)
_N_TENSORS = 6  # the leading arguments of linear_logprobs's schema
library.define("linear_logprobs_backward",
               "Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? mask, Tensor lse, Tensor entropy, "
               "Tensor grad_logp, Tensor? grad_entropy, bool need_h, bool need_w, bool need_b", _CODEC,
               "(Tensor, Tensor, Tensor)", _backward_op, _backward_fake)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, mask = inputs[:5]
    _, lse, entropy = output
    # The inputs are saved (no copy) so that autograd's version counters catch one of them changed in
    # place between the forward and the backward pass: the recomputed tile would silently use it.
    ctx.save_for_backward(hidden, weight, bias, targets, mask, lse, entropy)
    ctx.scalars = dict(zip(_CODEC.names, inputs[_N_TENSORS:]))
    ctx.needs = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an output the loss does not use gets None, not a tensor of zeros


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    library.refuse_double_backward("fused_linear_logprobs", ctx.scalars["backend"])
    hidden, weight, bias, targets, mask, lse, entropy = ctx.saved_tensors
    if not ctx.scalars["return_entropy"]:
        grad_entropy = None  # the placeholder output
    if grad_logp is None and grad_entropy is None:
        return (None,) * (_N_TENSORS + len(_CODEC.names))
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.float().contiguous()
    need_h, need_w, need_b = ctx.needs
    gh, gw, gb = library.op("linear_logprobs_backward")(
        hidden, weight, bias, targets, mask, lse, entropy, grad_logp, grad_entropy, need_h, need_w, need_b,
        **ctx.scalars)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None,
            *([None] * (_N_TENSORS - 3 + len(_CODEC.names))))


library.register_autograd("linear_logprobs", _backward, _setup_context)


def linear_logprobs(backend: str, hidden, weight, targets, bias, temperature, return_entropy, mask,
                    batch_invariant: bool = False, vocab_parallel=None, cu_seqlens=None):
    """Backend entry (validated inputs): hidden [..., D], weight [V, D], targets [...], bias [V] | None,
    mask [...] bool | None -> (logp [...] float32, entropy [...] float32 or None). batch_invariant: a
    row's results do not depend on the other rows (chunking.Logits). vocab_parallel: a resolved
    lvrpo_fast.vocab_parallel.Partition (weight and bias are then this rank's shards) or None.
    cu_seqlens: bounds of packed rows, checked inside the op (torch.compile traces this) or None."""
    params = LogprobsParams(backend=backend, temperature=float(temperature), return_entropy=bool(return_entropy),
                            batch_invariant=bool(batch_invariant),
                            vocab_parallel=0 if vocab_parallel is None else tp.register(vocab_parallel))
    scalars, _ = _CODEC.encode(params)
    logp, _, entropy = library.op("linear_logprobs")(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        validate.safe_targets(targets, mask).contiguous(), None if mask is None else mask.contiguous(), cu_seqlens,
        **scalars)
    return logp, (entropy if return_entropy else None)
