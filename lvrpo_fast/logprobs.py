"""fused_linear_logprobs: per-token log-probabilities (and entropy) from hidden states and the LM head.

The public op: checks its inputs (lvrpo_fast.validate), picks a backend (lvrpo_fast.dispatch) and
calls it. The kernel backends' design, FLOPs and peak memory: lvrpo_fast/fused/logprobs.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, validate
from . import vocab_parallel as tp
from .vocab_parallel import VocabParallel


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          return_entropy: bool = False, mask: Optional[torch.Tensor] = None,
                          backend: Optional[str] = None, batch_invariant: Optional[bool] = None,
                          cu_seqlens: Optional[torch.Tensor] = None, vocab_parallel: Optional[VocabParallel] = None):
    """Per-token log-probabilities (and entropy) of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: [..., D] float16 / bfloat16 / float32 / float64 hidden states (the LM head's input).
        weight: [V, D] LM head weight, same dtype as hidden.
        targets: [...] integer token ids in [0, V) (hidden.shape[:-1]); masked positions may hold any id.
        bias: optional [V] LM head bias, same dtype as weight.
        temperature: sampling temperature T > 0 (a Python or numpy number); logits are divided by it
            (as TRL and verl do).
        return_entropy: also return the entropy of the distribution at each position.
        mask: optional [...] bool/0-1; masked positions return 0 and get zero gradient, and their
            values (even NaN) never matter. No true entry (or an empty batch) gives all zeros.
        backend: "auto" (default), "triton", "cpp" or "reference"; see lvrpo_fast.dispatch.
        batch_invariant: True: each position's logp and entropy are bitwise identical for the same
            hidden row, weight, bias, target and temperature whatever else is in the call (batch size,
            the row's place, other rows and the mask, LVRPO_CHUNK_BYTES) and equal to the ones
            fused_linear_grpo_loss computes in the same mode, on the triton and cpp backends (the
            reference is exempt). None (default): the environment variable LVRPO_BATCH_INVARIANT,
            else off. Its cost and what it needs of the BLAS: README, "Batch-invariant mode".
        cu_seqlens: [B + 1] int32 / int64 bounds of packed sequences, hidden then [N, D] (or [1, N, D]),
            N = cu_seqlens[-1]: checked only (its values inside the op, so torch.compile traces the
            call), since every row is computed on its own whatever sequence it belongs to (packed rows
            need nothing else).
        vocab_parallel: a lvrpo_fast.VocabParallel when the head is split over the vocabulary across
            the ranks of a process group (tensor parallelism): weight [V_local, D] and bias [V_local]
            are this rank's contiguous shard, hidden / targets (global ids) / mask the same on every
            rank, and every rank calls the op (it is collective, see lvrpo_fast/vocab_parallel.py).
            The outputs are the whole head's, the same bits on every rank; grad_weight / grad_bias are
            the shard's; grad_hidden is summed over the group when vocab_parallel.reduce_grad_hidden
            (default) and is this rank's partial sum otherwise. A DTensor weight sharded with
            (Shard(0),) over a 1-D mesh takes it with vocab_parallel=VocabParallel() (explicit: an
            FSDP2 shard has the same layout and is refused without it).

    Returns:
        logp [...] float32 (float64 for float64 inputs), and entropy [...] if return_entropy.
        Differentiable w.r.t. hidden, weight and bias through both outputs (first order only: a
        backward with create_graph=True raises on the kernel backends; the reference supports it).
        Under torch.autocast the head computes in autocast's dtype (lvrpo_fast.validate.head_autocast).
        The full [N, V] logits are never allocated by the kernel backends.
    """
    if vocab_parallel is not None:
        tp.leave_graph()  # its checks and the collective one run eagerly: a named break under torch.compile
    with tp.failing_together(vocab_parallel, hidden, "logprobs"):
        weight, bias, vocab_parallel = tp.head_shards(weight, bias, vocab_parallel)
        if cu_seqlens is not None:  # its layout here; its values inside the op (before the collective check
            # on a vocab-parallel head, which is eager anyway), so that torch.compile traces this
            validate.packed_rows("hidden", hidden, cu_seqlens, trailing=1, values=vocab_parallel is not None)
        hidden, weight, targets, bias, mask, temperature, return_entropy = validate.linear_logprobs_inputs(
            hidden, weight, targets, bias, mask, temperature, return_entropy)
    partition = None
    if vocab_parallel is not None:
        live = targets.numel() if mask is None else int(mask.sum())
        need_h = torch.is_grad_enabled() and hidden.requires_grad
        partition = tp.resolve(vocab_parallel, weight.shape[0], hidden.device,
                               (targets.numel(), hidden.shape[-1], live, int(need_h)))
    impl = dispatch.select(backend, hidden.device, hidden.dtype, dispatch.batch_invariant(batch_invariant))
    with validate.autocast_off(hidden.device):
        logp, entropy = impl.logprobs_impl(hidden, weight, targets, bias, temperature, return_entropy, mask,
                                           vocab_parallel=partition, cu_seqlens=cu_seqlens)
    return (logp, entropy) if return_entropy else logp
