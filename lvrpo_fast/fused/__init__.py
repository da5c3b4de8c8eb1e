"""The fused ops of the kernel backends: each op's chunk loop and gradient, written once against the
primitives of lvrpo_fast.contract and registered as a torch.library custom op (fused/library.py).

    logprobs.py          hidden states + LM head -> log-probabilities (and entropy), 2 / 8 N V D
    grpo_loss.py         per-token log-probabilities -> GRPO loss, metrics, gradient formed in the forward
    linear_grpo_loss.py  hidden states + LM head -> GRPO loss, gradients formed in the forward, 6 N V D
    advantages.py        rewards -> group advantages
    process_advantages.py  packed step rewards -> per-token advantages (process supervision)

:class:`KernelBackend` gives lvrpo_fast.dispatch the same *_impl interface the reference module has.
This package depends on the contract, the options, the chunking and the backend registry only: never
on the public op modules or the dispatch above it, nor on the reference (the independent oracle).
"""
from __future__ import annotations

from .advantages import group_advantages_with
from .grpo_loss import grpo_loss_with
from .linear_grpo_loss import linear_grpo_loss_with
from .logprobs import linear_logprobs
from .process_advantages import process_advantages_with


class KernelBackend:
    """The backend interface of lvrpo_fast.dispatch for a kernel backend: the fused ops on its primitives.
    batch_invariant: the log-prob ops' batch-invariant mode (fused/logprobs.py, fused/linear_grpo_loss.py)."""

    def __init__(self, name: str, batch_invariant: bool = False):
        self.name = name
        self.batch_invariant = batch_invariant

    def logprobs_impl(self, hidden, weight, targets, bias, temperature, return_entropy, mask, *, vocab_parallel=None,
                      cu_seqlens=None):
        return linear_logprobs(self.name, hidden, weight, targets, bias, temperature, return_entropy, mask,
                               self.batch_invariant, vocab_parallel, cu_seqlens)

    def advantages_impl(self, rewards, group_size, scale, eps, leave_one_out):
        return group_advantages_with(self.name, rewards, group_size, scale, eps, leave_one_out)

    def process_advantages_impl(self, step_rewards, step_ends, step_offsets, group_size, seq_len, scale, eps,
                                leave_one_out, outcome_advantages, outcome_weight):
        return process_advantages_with(self.name, step_rewards, step_ends, step_offsets, group_size, seq_len, scale,
                                       eps, leave_one_out, outcome_advantages, outcome_weight)

    def grpo_loss_impl(self, logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights, options, *,
                       logp_sampling=None, return_stats=False, cu_seqlens=None):
        return grpo_loss_with(self.name, logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights,
                              options, logp_sampling=logp_sampling, return_stats=return_stats, cu_seqlens=cu_seqlens)

    def linear_grpo_loss_impl(self, hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                              rollout_weights, temperature, return_entropy, options, *, logp_sampling=None,
                              head_dtype=None, return_stats=False, cu_seqlens=None,
                              vocab_parallel=None):
        return linear_grpo_loss_with(self.name, hidden, weight, targets, mask, advantages, bias, logp_old,
                                     logp_ref, rollout_weights, temperature, return_entropy, options,
                                     logp_sampling=logp_sampling, head_dtype=head_dtype, return_stats=return_stats,
                                     batch_invariant=self.batch_invariant, cu_seqlens=cu_seqlens,
                                     vocab_parallel=vocab_parallel)

    def __repr__(self):
        return f"KernelBackend({self.name}{', batch_invariant' if self.batch_invariant else ''})"


KERNEL_BACKENDS = {"triton": KernelBackend("triton"), "cpp": KernelBackend("cpp")}
INVARIANT_KERNEL_BACKENDS = {name: KernelBackend(name, batch_invariant=True) for name in KERNEL_BACKENDS}

__all__ = ["KernelBackend", "KERNEL_BACKENDS", "INVARIANT_KERNEL_BACKENDS"]
