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

The high-entropy mask (top_entropy_quantile < 1, TRL's) keeps a token's policy term only when its
entropy reaches a quantile of *every* token's entropy (every process's, too), so no chunk's gradient
can be formed before the last chunk's entropies are known. The op then walks the chunks twice: a
first pass forms each chunk's logits and keeps its per-row statistics (logp, lse, entropy: O(N)
floats), the threshold is taken, and the second pass forms the gradients, starting with the chunk
whose logits are still in the tile and recomputing the others' logits. That is 2 (N - C_last) V D
extra FLOPs, 8 N V D - 2 C_last V D in all instead of 6 N V D, nothing extra when the batch fits one
chunk, and no extra memory beyond the O(N) vectors. Storing every chunk's logits instead would cost
the N V logits the op exists to avoid; a backward-time recompute design would pay the same 2 N V D.
(benchmarks/test_bench_linear_grpo_loss.py measures it: the "entropy mask" case.)

Peak extra memory beyond inputs, outputs and input gradients:
    C * V * s  +  2 C * D * s (gathered hidden rows and their gradient, when padded)
               +  O(N) float32 per-token vectors  (+ 4 V bytes for a float32 bias accumulator)
with s the element size and C = the unmasked tokens of whole sequences filling LVRPO_CHUNK_BYTES
(512 MiB on CUDA, 64 MiB on the CPU; at least one sequence). grad_weight is accumulated in weight's
dtype, one rounding per chunk. Under torch.no_grad (or when nothing requires grad) only the 2 N V D
forward runs.

Mixed-precision head (head_dtype narrower than the inputs, as TRL's chunked head under autocast):
the tile is in head_dtype (half the bytes of a float32 one), formed from operands rounded to it, and
its in-place gradient is rounded to it too; the gradient GEMMs then run in the inputs' dtype on a copy
of the tile and the rounded operands, so the gradients accumulate in float32 as TRL's do.

Batch-invariant mode (batch_invariant=True): the logits come from fixed-shape GEMMs of R rows carried
across chunk boundaries (chunking.Logits), so each token's logp and entropy are those of
fused_linear_logprobs in the same mode, bit for bit (the first on-policy ratio is exactly 1). Each
sequence's statistics then depend on that sequence alone (the loss kernels handle one sequence per
program, with a block that does not follow T in this mode), and the loss is their sum in an order that
does not depend on the sequences' (order_free_sum). Extra memory: up to 2 R rows of logits (2 R V s
bytes), the gathered hidden rows ((C + 2 R) D s) and 8 N bytes of row indices. With the high-entropy
mask the second pass recomputes every chunk's tiles (the tiles are cut from the plan in order), not
all but the last. With a mixed-precision head the tiles read a copy of hidden rounded to head_dtype
(N D bytes of it more).

Vocab-parallel heads (lvrpo_fast/vocab_parallel.py): the same loop on this rank's shard with the
shard's primitives; the per-token statistics, hence the loss, the metrics and d(loss)/d(logp), are the
whole head's on every rank, and each rank forms its shard's dlogits in the forward as above (6 N
V_local D), so the design is unchanged. Chunks are sized by the widest shard (one plan on every rank).

One custom op, ``lvrpo_fast::linear_grpo_loss`` (lvrpo_fast.fused.library), returning the loss, the
statistics and the three gradients; its registered backward scales them with ``lvrpo_fast::scale_``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import backends, validate
from .. import vocab_parallel as tp
from ..chunking import HeadGrads, Logits, rows_per_chunk, sequence_chunks
from ..contract import NSTATS, STAT_LOSS, token_loss_params
from ..options import GRPOOptions, replicated
from . import library
from .grpo_loss import (as_float32, entropy_bonus, entropy_grad, entropy_scales, high_entropy_threshold, kept_tokens,
                        metrics_from_stats, per_token, row_scales)


@dataclass(frozen=True)
class LinearLossParams:
    """The non-tensor inputs of the fused linear GRPO loss op (head_dtype: a torch dtype's name, "" for
    the inputs' own)."""

    backend: str
    temperature: float
    need_entropy: bool
    head_dtype: str
    options: GRPOOptions
    batch_invariant: bool = False
    vocab_parallel: int = 0  # the key of a lvrpo_fast.vocab_parallel.Partition, 0: the whole head


_CODEC = library.ParamsCodec(LinearLossParams)
_NAMES = _CODEC.names


def _slice(t, start, end):
    return None if t is None else t[start:end]


def order_free_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of values [B] float32 as a 0-dim float32 that does not depend on their order: sorted,
    accumulated in float64, rounded once. (A plain sum's rounding follows the order, so shuffling a
    batch's sequences would move the loss's last bits even with every sequence's terms unchanged.)"""
    return values.sort().values.sum(dtype=torch.float64).float()


class _Head:
    """The LM head's operands: the inputs themselves, or (head_dtype) their rounded copies, with the
    gradient GEMMs run in the inputs' dtype on the rounded values (see the module docstring)."""

    def __init__(self, weight, bias, head_dtype):
        self.mixed = head_dtype is not None
        self.wide = weight.dtype
        self.weight = weight.to(head_dtype) if self.mixed else weight
        self.bias = None if bias is None else (bias.to(head_dtype) if self.mixed else bias)
        self._grad_weight = None if self.mixed else weight

    @property
    def dtype(self):
        return self.weight.dtype

    def bytes_per_row_element(self) -> int:
        """Bytes per element of a chunk row: the tile, and its wide copy in the mixed head."""
        return self.weight.element_size() + (torch.empty(0, dtype=self.wide).element_size() if self.mixed else 0)

    def rows(self, hidden_rows):
        return hidden_rows.to(self.dtype) if self.mixed else hidden_rows

    def backward_(self, grads: HeadGrads, chunk, dlogits, rows) -> None:
        if not self.mixed:
            grads.add_(chunk, dlogits, rows, self.weight)
            return
        if self._grad_weight is None and grads.hidden is not None:
            self._grad_weight = self.weight.to(self.wide)
        grads.add_(chunk, dlogits.to(self.wide), rows.to(self.wide), self._grad_weight)


def forward(prims, hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref, logp_sampling,
            rollout_weights, temperature, need_entropy, options, need_h, need_w, need_b, head_dtype=None,
            batch_invariant=False, packing=None, partition=None):
    """(loss, per-sequence stats [B, NSTATS], (grad_hidden, grad_weight, grad_bias)), chunk by chunk.

    hidden [B, T, D], targets [B, T] int64 (masked ids replaced), mask [B, T] bool, advantages [B] or
    [B, T] and the per-token [B, T] inputs in float32; the gradients are None where not needed.
    packing (lvrpo_fast.packing.Packing): hidden (and its gradient) is packed [N, D], every other input
    the padded [B, T] batch; each chunk of the padded batch's sequences reads its packed rows.
    batch_invariant: the log-probabilities and entropies are those of the forward-only op in the same
    mode, bit for bit (the same chunking.Logits tiles and statistics launch), each sequence's statistics
    depend on that sequence and the batch's normalizers alone, and the loss sums them in an order that
    does not depend on theirs. partition: a vocab-parallel shard's (vocab_parallel.Partition): the
    chunks are sized by the widest shard, so every rank runs the same plan, and its vocab_block sets the
    logits' column blocks in batch-invariant mode."""
    (B, T), D = mask.shape, hidden.shape[-1]
    V = weight.shape[0]
    need_grad = need_h or need_w or need_b
    params = token_loss_params(options)
    scale = row_scales(mask, options)
    head = _Head(weight, bias, head_dtype)
    # An empty batch (B = 0 or T = 0) has no token: no chunk, loss 0, zero gradients.
    budget = rows_per_chunk(V if partition is None else partition.max_local_size, head.bytes_per_row_element(),
                            hidden.device, D)
    chunks = sequence_chunks(mask, budget) if B * T else []
    # Each chunk's rows of hidden: those of the padded batch, or of the packed one (the same rows in order).
    hidden_chunks = chunks if packing is None else [packing.rows(c) for c in chunks]
    flat_hidden = hidden.view(-1, D)
    flat_targets = targets.view(B * T)
    grads = HeadGrads(hidden, weight, need_h, need_w, need_b, hidden_chunks)
    stats = torch.zeros((B, NSTATS), dtype=torch.float32, device=hidden.device)  # B = 0: no chunk at all
    # The batch-invariant tiles read hidden's rows themselves, so they need them in the head's dtype.
    tile_hidden = head.rows(flat_hidden) if batch_invariant and head.mixed else flat_hidden
    columns = tp.column_block(partition)
    tiles = [Logits(hidden_chunks, tile_hidden, head.weight, head.bias, batch_invariant, columns)]  # one per pass over the plan
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp = torch.zeros(B * T, **f32)  # masked rows: 0, never computed
    entropy = torch.zeros(B * T, **f32) if need_entropy else None

    def chunk_stats(c, h):
        """The chunk's logits (left in the tile) and its rows' (logp, lse, entropy), written into the batch's;
        h: the chunk's rows of hidden."""
        rows = head.rows(h.take(flat_hidden))
        logits = tiles[0].of(h, rows)
        lp, lse, ent = prims.logits_stats(logits, c.take(flat_targets), temperature, need_entropy, batch_invariant)
        c.put_(logp, lp)
        if need_entropy:
            c.put_(entropy, ent)
        return logits, rows, lse, ent

    threshold, order, first_pass, resident = None, range(len(chunks)), {}, None
    if options.entropy_masked:
        # Pass 1: every row's statistics before any gradient; the tile keeps the last computed chunk's logits.
        for i, c in enumerate(chunks):
            if c.size:
                logits, rows, lse, ent = chunk_stats(c, hidden_chunks[i])
                first_pass[i] = (lse, ent)
                resident = (i, logits, rows)
        threshold = high_entropy_threshold(entropy.view(B, T), mask, options)
        if batch_invariant:
            # Tiles are cut from the plan in order, once per Logits: the second pass recomputes them all.
            logits = rows = resident = tiles[0] = None
            if need_grad:
                tiles[0] = Logits(hidden_chunks, tile_hidden, head.weight, head.bias, batch_invariant, columns)
        elif resident is not None:
            order = [resident[0]] + [i for i in range(len(chunks)) if i != resident[0]]
    ent_scale = None
    if options.entropy_coef != 0:
        ent_scale = entropy_scales(kept_tokens(None if entropy is None else entropy.view(B, T), mask, threshold),
                                   scale, options)
    for i in order:
        c, h = chunks[i], hidden_chunks[i]
        s0, s1 = c.start // T, c.end // T
        logits = rows = lse = ent = None
        if c.size:
            if i in first_pass:
                lse, ent = first_pass[i]
                if need_grad:
                    if resident is not None and i == resident[0]:
                        logits, rows = resident[1], resident[2]
                    else:
                        rows = head.rows(h.take(flat_hidden))
                        logits = tiles[0].of(h, rows)
            else:
                logits, rows, lse, ent = chunk_stats(c, h)
        chunk_entropy = None if entropy is None else entropy[c.start:c.end].view(s1 - s0, T)
        chunk_stats_, grad_logp = prims.grpo_token_loss(
            logp[c.start:c.end].view(s1 - s0, T), _slice(logp_old, s0, s1), _slice(logp_ref, s0, s1),
            _slice(logp_sampling, s0, s1), advantages[s0:s1], mask[s0:s1], _slice(rollout_weights, s0, s1),
            chunk_entropy, threshold, scale[s0:s1], params, need_grad, batch_invariant)
        stats[s0:s1] = chunk_stats_
        if need_grad and c.size:
            rel = c.relative()  # the chunk's rows within its own [k * T] vectors
            grad_ent = None
            if ent_scale is not None:
                kept = kept_tokens(chunk_entropy, mask[s0:s1], threshold)
                grad_ent = rel.take(entropy_grad(kept, ent_scale[s0:s1], options).reshape(-1))
            prims.logits_grad_(logits, c.take(flat_targets), lse, None if grad_ent is None else ent,
                               rel.take(grad_logp.reshape(-1)), grad_ent, temperature)
            head.backward_(grads, h, logits, rows)
    total = order_free_sum if batch_invariant else torch.sum
    loss = total(stats[:, STAT_LOSS])
    if ent_scale is not None:
        loss = loss + entropy_bonus(stats, ent_scale, options, total)
    return loss, stats, grads.result(bias)


# ------------------------------------------------------------------------------------------------------
# The custom ops
# ------------------------------------------------------------------------------------------------------
def _op(hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref, logp_sampling, rollout_weights,
        num_items_tensor, cu_seqlens, need_h, need_w, need_b, **scalars):
    p = _CODEC.decode(scalars, num_items_tensor)
    prims, partition = library.primitives(p.backend, p.vocab_parallel)
    packing = None
    if cu_seqlens is not None:  # the per-token inputs come packed: laid out as the padded batch here
        packing, targets, mask, advantages, logp_old, logp_ref, logp_sampling, rollout_weights = validate.unpack(
            cu_seqlens, hidden.shape[0], targets, mask, advantages, logp_old, logp_ref, logp_sampling, rollout_weights)
    validate.check_target_range(targets, weight.shape[0] if partition is None else partition.vocab_size, mask)
    # The ranks of a tensor-parallel group hold the same tokens: one data-parallel replica.
    replicas = contextlib.nullcontext() if partition is None else replicated(partition.rank, partition.world)
    with validate.autocast_off(hidden.device), replicas:
        loss, stats, (gh, gw, gb) = forward(
            prims, hidden, weight, bias, targets, mask, as_float32(advantages),
            as_float32(logp_old), as_float32(logp_ref), as_float32(logp_sampling),
            per_token(rollout_weights, mask.shape), p.temperature, p.need_entropy, p.options, need_h, need_w, need_b,
            head_dtype=getattr(torch, p.head_dtype) if p.head_dtype else None, batch_invariant=p.batch_invariant,
            packing=packing,
            partition=partition)
    tp.reduce_grad_hidden_(partition, gh)
    return (loss, stats, hidden.new_empty(0) if gh is None else gh, weight.new_empty(0) if gw is None else gw,
            weight.new_empty(0) if gb is None else gb)


def _fake(hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref, logp_sampling, rollout_weights,
          num_items_tensor, cu_seqlens, need_h, need_w, need_b, **scalars):
    B = mask.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
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


_N_TENSORS = 15  # the leading arguments of the op's schema below
library.define("linear_grpo_loss",
               "Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor mask, Tensor advantages, "
               "Tensor? logp_old, Tensor? logp_ref, Tensor? logp_sampling, Tensor? rollout_weights, "
               "Tensor? num_items_tensor, Tensor? cu_seqlens, bool need_h, bool need_w, bool need_b", _CODEC,
               "(Tensor, Tensor, Tensor, Tensor, Tensor)", _op, _fake)
library.define("scale_", "Tensor(a!)[] tensors, Tensor factor", library.ParamsCodec(ScaleParams), "()", _scale,
               _scale_fake)

_N_INPUTS = _N_TENSORS + len(_NAMES)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    _, stats, gh, gw, gb = output
    # hidden, weight and bias are saved (no copy) only for autograd's version check: the gradients
    # were formed in the forward pass, so a head changed in place before the backward would make
    # them stale without a word.
    ctx.save_for_backward(hidden, weight, bias, gh, gw, gb)
    ctx.needs = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
    ctx.backend = inputs[_N_TENSORS + _NAMES.index("backend")]
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
                          rollout_weights, temperature, return_entropy, options: GRPOOptions, *, logp_sampling=None,
                          head_dtype=None, return_stats=False, batch_invariant: bool = False, cu_seqlens=None,
                          vocab_parallel=None):
    """Backend entry (validated inputs): hidden [B, T, D], targets / mask [B, T], advantages [B] or [B, T];
    with cu_seqlens [B + 1] every input is packed as the public op takes it (hidden [N, D], targets / mask
    [N], ...): the op checks cu_seqlens' values and lays the per-token inputs out as the padded batch.
    Returns (loss 0-dim float32, metrics), and the per-sequence statistics [B, NSTATS] when return_stats.
    vocab_parallel: a resolved lvrpo_fast.vocab_parallel.Partition (weight and bias are then this
    rank's shards; loss, metrics and statistics are the whole head's, the same on every rank) or None."""
    need_entropy = bool(return_entropy) or options.needs_entropy
    params = LinearLossParams(backend=backend, temperature=float(temperature), need_entropy=need_entropy,
                              head_dtype="" if head_dtype is None else str(head_dtype).replace("torch.", ""),
                              options=options, batch_invariant=bool(batch_invariant),
                              vocab_parallel=0 if vocab_parallel is None else tp.register(vocab_parallel))
    scalars, num_items = _CODEC.encode(params)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    mask = mask.contiguous()
    loss, stats, _, _, _ = library.op("linear_grpo_loss")(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        validate.safe_targets(targets, mask).contiguous(), mask, advantages, logp_old, logp_ref, logp_sampling,
        rollout_weights, num_items, cu_seqlens, *need, **scalars)
    metrics = metrics_from_stats(stats, options, need_entropy)
    return (loss, metrics, stats) if return_stats else (loss, metrics)
