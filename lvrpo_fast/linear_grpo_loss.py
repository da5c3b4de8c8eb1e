"""fused_linear_grpo_loss: the GRPO loss straight from hidden states and the LM head. The public op:
checks, dispatch, call; the kernel backends' design (6 N V D FLOPs, peak memory) is in
lvrpo_fast/fused/linear_grpo_loss.py."""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, validate
from . import vocab_parallel as tp
from .contract import SequenceStats
from .options import GRPOOptions
from .vocab_parallel import VocabParallel


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           mask: Optional[torch.Tensor], advantages: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None, logp_old: Optional[torch.Tensor] = None,
                           logp_ref: Optional[torch.Tensor] = None, logp_sampling: Optional[torch.Tensor] = None,
                           rollout_weights: Optional[torch.Tensor] = None, temperature: float = 1.0,
                           return_entropy: bool = False, head_dtype: Optional[torch.dtype] = None,
                           backend: Optional[str] = None, return_sequence_stats: bool = False,
                           batch_invariant: Optional[bool] = None, cu_seqlens: Optional[torch.Tensor] = None,
                           vocab_parallel: Optional[VocabParallel] = None,
                           **options):
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
        logp_sampling: [B, T] sampler log-probabilities for the off-policy mask (default logp_old).
        rollout_weights: [B, T] or [B] rollout correction weights.
        temperature: the sampling temperature, dividing the logits.
        return_entropy: compute the entropy metric even when the loss does not need it.
        head_dtype: the dtype the LM head's product is formed in, when narrower than hidden's and
            weight's (TRL's chunked head under autocast: float32 inputs, bfloat16 head). The operands
            and the [C, V] logits tile (and its in-place gradient) are rounded to head_dtype, the
            statistics run in float32 and the gradients' GEMMs in the inputs' dtype, on the rounded
            operands. Costs a head_dtype copy and an inputs'-dtype copy of the rounded weight (V D
            bytes times their two element sizes). None: the inputs' dtype, or autocast's under
            torch.autocast (validate.head_autocast); given, autocast is ignored.
        backend: "auto", "triton", "cpp" or "reference".
        return_sequence_stats: also return the per-sequence statistics (lvrpo_fast.SequenceStats).
        batch_invariant: True: every token's logp and entropy are those fused_linear_logprobs gives in
            the same mode, bit for bit, whatever else is in the batch (so the ratio of an on-policy
            step is exactly 1); each sequence's share of the loss depends on that sequence and the
            batch's normalizers alone (the loss's, and the high-entropy mask's threshold), and the loss
            does not depend on the sequences' order. None (default): LVRPO_BATCH_INVARIANT, else off.
            See README, "Batch-invariant mode".
        cu_seqlens: [B + 1] int32 / int64 sequence bounds for packed sequences (flash-attn's and verl's
            layout): hidden is then [N, D], targets, mask and the per-token inputs [N], advantages
            and rollout_weights [B] or [N] ([1, N] too), N = cu_seqlens[-1]; sequence b is rows
            [cu_seqlens[b], cu_seqlens[b + 1]), a repeated bound an empty sequence. The result (loss,
            metrics, sequence statistics; the gradient w.r.t. hidden is [N, D]) equals the op's on the
            same batch padded to the longest sequence: no normalizer reads the padded length
            (dr_grpo divides by max_completion_length). The head reads hidden's rows in place, gathering
            only the unmasked rows of chunks with masked tokens (lvrpo_fast.packing).
        vocab_parallel: a lvrpo_fast.VocabParallel when the head is split over the vocabulary across the
            ranks of a process group (tensor parallelism): weight / bias are this rank's contiguous shard
            [V_local, D] / [V_local], every other input is the same on every rank, and every rank calls
            the op (collective). Loss, metrics and statistics are the whole head's, the same bits on
            every rank, and the gradients are still formed in the forward (6 N V_local D per rank);
            grad_weight / grad_bias are the shard's, grad_hidden is summed over the group when
            vocab_parallel.reduce_grad_hidden (default) and this rank's partial sum otherwise. A DTensor weight sharded with
            (Shard(0),) over a 1-D mesh takes it with vocab_parallel=VocabParallel() (explicit: an
            FSDP2 shard has the same layout and is refused without it).
            lvrpo_fast/vocab_parallel.py has the design.
        **options: the GRPO options (lvrpo_fast.GRPOOptions). With top_entropy_quantile < 1 the
            high-entropy mask needs every token's entropy before any gradient can be formed: see
            lvrpo_fast/fused/linear_grpo_loss.py for the extra forward pass it costs.

    Returns:
        (loss, metrics): 0-dim float32 loss, differentiable w.r.t. hidden, weight and bias; metrics
        as in lvrpo_fast.grpo_loss; with return_sequence_stats, (loss, metrics, stats). An empty
        (B = 0 or T = 0) or all-masked batch gives loss 0 and zero gradients. Under torch.autocast the
        head computes in autocast's dtype (validate.head_autocast) unless head_dtype is given.
        First-order gradients only on the kernel backends (create_graph=True raises); an input changed
        in place between forward and backward raises autograd's error.
    """
    if vocab_parallel is not None:
        tp.leave_graph()  # its checks and the collective one run eagerly: a named break under torch.compile
    with tp.failing_together(vocab_parallel, hidden, "linear_grpo_loss"):
        opts = GRPOOptions.from_kwargs(**options)
        weight, bias, vocab_parallel = tp.head_shards(weight, bias, vocab_parallel)
        if cu_seqlens is None:
            hidden, weight, bias, mask, temperature, head_dtype = validate.linear_grpo_loss_inputs(
                hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref, rollout_weights, temperature,
                opts, logp_sampling=logp_sampling, head_dtype=head_dtype)
            rows = tuple(targets.shape)
        else:  # shapes only; cu_seqlens' values are read inside the op (torch.compile traces this)
            hidden, weight, bias, mask, temperature, head_dtype = validate.packed_linear_grpo_loss_inputs(
                hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref, rollout_weights, temperature,
                opts, cu_seqlens, logp_sampling=logp_sampling, head_dtype=head_dtype)
            if vocab_parallel is not None:  # eager anyway (resolve reads the mask): check the values before it
                rows = validate.check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device).padded_shape
    partition = None
    if vocab_parallel is not None:
        grad_on = torch.is_grad_enabled()
        needs = tuple(int(grad_on and t is not None and t.requires_grad) for t in (hidden, weight, bias))
        partition = tp.resolve(vocab_parallel, weight.shape[0], hidden.device,
                               (*rows, hidden.shape[-1], int(mask.sum()), *needs))
    impl = dispatch.select(backend, hidden.device, hidden.dtype, dispatch.batch_invariant(batch_invariant))
    with validate.autocast_off(hidden.device):
        out = impl.linear_grpo_loss_impl(hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                                         rollout_weights, temperature, bool(return_entropy), opts,
                                         logp_sampling=logp_sampling, head_dtype=head_dtype,
                                         return_stats=return_sequence_stats, cu_seqlens=cu_seqlens,
                                         vocab_parallel=partition)
    return out if not return_sequence_stats else (out[0], out[1], SequenceStats.from_columns(out[2]))
