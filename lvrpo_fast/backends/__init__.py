"""Kernel backends and the contract they implement.

The Triton backend (``lvrpo_fast.backends.triton``, kernels in ``kernels/``) and the C++ CPU backend
(``lvrpo_fast.backends.cpp``, sources in ``csrc/``) export the same *primitives*. The autograd
Functions in ``lvrpo_fast/logprobs.py``, ``grpo_loss.py`` and ``linear_grpo_loss.py`` are written
once against these primitives, so both backends share one chunking scheme, one gradient formula
and one set of saved tensors; only the row-wise work differs.

Primitive contract (module-level names of a backend module; all tensors contiguous, on one device):

``name: str``
``available(device, dtype) -> (bool, reason: str)``
``logits_stats(logits, targets, temperature, with_entropy) -> (logp, lse, entropy or None)``
    logits [C, V] float16/bfloat16/float32 (the LM head's output, bias included, before the
    temperature), targets [C] int64 in [0, V). Returns float32 [C] tensors of
    logp = z[target] - lse, lse = logsumexp(z), entropy = lse - sum softmax(z) z, z = logits / T,
    computed blockwise over V with an online max so nothing of size [C, V] is allocated.
``logits_grad_(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature) -> None``
    Overwrites logits [C, V] in place with d(loss)/d(logits) =
    (grad_logp * (onehot(target) - p) - grad_entropy * p * (log p + entropy)) / T, p = softmax(z).
    entropy and grad_entropy are None together when the entropy gets no gradient.
``grpo_token_loss(logp, logp_old, logp_ref, advantages, mask, rollout_weights, entropy, row_scale,
                  options, need_grad) -> (stats, grad_logp or None)``
    logp, logp_old, logp_ref, entropy, rollout_weights [B, T] float32 (the last four may be None),
    advantages [B] float32, mask [B, T] bool, row_scale [B] float32 (the aggregation weight of each
    sequence, see lvrpo_fast.grpo_loss.row_scales). Rows are whole sequences. Returns
    stats [B, NSTATS] float32 (columns below) and, if need_grad, grad_logp [B, T] float32 =
    d(loss)/d(logp) including the row scale and the mask. The entropy bonus's gradient w.r.t. the
    entropy is the constant -entropy_coef * mask * row_scale and is formed by the caller.
``group_advantages(rewards, group_size, scale, eps, leave_one_out) -> advantages``
    rewards [B] float32 -> [B] float32, SPEC section 2.
"""
from __future__ import annotations

# Columns of the per-sequence statistics returned by grpo_token_loss. Sums over the sequence's
# unmasked tokens; the loss column is already multiplied by the row scale.
STAT_LOSS = 0
STAT_COUNT = 1
STAT_KL = 2
STAT_CLIP_LOW = 3
STAT_CLIP_HIGH = 4
STAT_CLIP_REGION = 5
STAT_RATIO = 6
STAT_ENTROPY = 7
NSTATS = 8


class KernelBackend:
    """Adapts a primitives module to the backend interface that lvrpo_fast.dispatch hands out."""

    _instances = {}

    def __init__(self, primitives):
        self.primitives = primitives
        self.name = primitives.name

    @classmethod
    def for_primitives(cls, primitives):
        if primitives not in cls._instances:
            cls._instances[primitives] = cls(primitives)
        return cls._instances[primitives]

    def logprobs_impl(self, hidden, weight, targets, bias, temperature, return_entropy, mask):
        from ..logprobs import linear_logprobs

        return linear_logprobs(self.primitives, hidden, weight, targets, bias, temperature, return_entropy, mask)

    def advantages_impl(self, rewards, group_size, scale, eps, leave_one_out):
        return self.primitives.group_advantages(rewards.float().contiguous(), group_size, scale, eps, leave_one_out)

    def grpo_loss_impl(self, logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights, options):
        from ..grpo_loss import grpo_loss_with

        return grpo_loss_with(self.primitives, logp, advantages, mask, logp_old, logp_ref, entropy,
                              rollout_weights, options)

    def linear_grpo_loss_impl(self, hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                              rollout_weights, temperature, return_entropy, options):
        from ..linear_grpo_loss import linear_grpo_loss_with

        return linear_grpo_loss_with(self.primitives, hidden, weight, targets, mask, advantages, bias, logp_old,
                                     logp_ref, rollout_weights, temperature, return_entropy, options)

    def __repr__(self):
        return f"KernelBackend({self.name})"
