"""Triton kernels of lvrpo_fast, installed as ``lvrpo_fast.kernels``.

Only @triton.jit functions and thin launchers that allocate and launch live here; autograd and
dispatch live in the ``lvrpo_fast`` package. One file per operation:
    logprobs.py     row statistics (log-prob, lse, entropy) of a logits tile and its in-place gradient
    grpo_loss.py    the per-sequence GRPO loss, its gradient w.r.t. logp and the metric sums
    advantages.py   group advantage normalization
    process_advantages.py  step rewards -> per-token advantages (process supervision)
    linear_grpo_loss.py  the fused loss's backward: its stored gradients scaled in place
    autotune.py     every launch configuration in one place
The kernels import only lvrpo_fast.contract (shared constants) and each other.
"""
