"""The pure-PyTorch reference: the executable form of docs/math.md, and a backend like the others.

Plain eager PyTorch, written for clarity rather than speed: it builds the [N, V] logits of the rows it
needs. It works in any floating dtype; float64 inputs compute in float64 (the tests' ground truth),
every other dtype computes the softmax statistics in float32 after forming the logits in the input
dtype, as an eager Hugging Face model does. Gradients come from autograd. It is the oracle: it shares
no chunking and no hand-written gradient with the kernel backends.

Values at masked positions never matter (docs/math.md section 8): masked rows never reach the LM head,
and the per-token inputs of the loss are replaced at masked positions before any arithmetic, so that
neither a NaN there nor its gradient (0 * NaN) can leak into the result. A NaN or inf at an unmasked
position reaches the loss.

Public functions (the same names, keywords and entry checks as the package's top level, see
lvrpo_fast.validate): fused_linear_logprobs, group_advantages, grpo_loss, fused_linear_grpo_loss,
process_advantages.
Backend interface used by :mod:`lvrpo_fast.dispatch` (inputs already validated):
    logprobs_impl, advantages_impl, grpo_loss_impl, linear_grpo_loss_impl, process_advantages_impl
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from . import validate
from .contract import LOG_RATIO_CLAMP
from .options import GRPOOptions, world_size

name = "reference"


def available(device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
    return True, ""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# 1. Per-token log-probabilities and entropy
# ----------------------------------------------------------------------------------------------
def _row_stats(hidden, weight, targets, bias, temperature, return_entropy):
    """Every row of hidden [n, D] through the head: (logp [n], entropy [n] or None) in the compute dtype."""
    compute = _compute_dtype(hidden.dtype)
    logits = F.linear(hidden, weight, bias)  # [n, V] in the input dtype, as an eager LM head
    z = logits.to(compute) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1) if return_entropy else None
    return logp, entropy


def logprobs_impl(hidden, weight, targets, bias, temperature, return_entropy, mask):
    """hidden [..., D], weight [V, D], targets [...] int, bias [V]|None, mask [...] bool|None.

    Returns (logp [...], entropy [...] or None) in float32 (float64 for float64 inputs). Masked rows
    are never computed: they get 0 and no gradient, whatever hidden holds there."""
    validate.check_target_range(targets, weight.shape[0], mask)
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if mask is None:
        logp, entropy = _row_stats(hidden, weight, targets, bias, temperature, return_entropy)
    else:
        live = mask.reshape(-1).nonzero().squeeze(1)
        logp_live, entropy_live = _row_stats(hidden.index_select(0, live), weight, targets.index_select(0, live),
                                             bias, temperature, return_entropy)
        zeros = torch.zeros(targets.shape[0], dtype=_compute_dtype(hidden.dtype), device=hidden.device)
        logp = zeros.index_put((live,), logp_live)
        entropy = zeros.index_put((live,), entropy_live) if return_entropy else None
    return logp.reshape(shape), None if entropy is None else entropy.reshape(shape)


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False,
                          mask=None):
    """Reference per-token log-probabilities (and entropy) of `targets` under softmax((hidden W^T + b) / T).

    hidden [..., D], weight [V, D], targets [...] int, bias [V], mask [...] (masked positions give 0).
    Returns logp [...] (and entropy [...] if return_entropy) in float32 (float64 for float64 input).
    """
    hidden, weight, targets, bias, mask, temperature, return_entropy = validate.linear_logprobs_inputs(
        hidden, weight, targets, bias, mask, temperature, return_entropy)
    with validate.autocast_off(hidden.device):
        logp, entropy = logprobs_impl(hidden, weight, targets, bias, temperature, return_entropy, mask)
    return (logp, entropy) if return_entropy else logp


# ----------------------------------------------------------------------------------------------
# 2. Group advantages
# ----------------------------------------------------------------------------------------------
def advantages_impl(rewards, group_size, scale, eps, leave_one_out):
    compute = _compute_dtype(rewards.dtype)
    r = rewards.to(compute).view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if leave_one_out:
        # r - mean(others) = r - (G mu - r) / (G - 1) = G / (G - 1) * (r - mu)
        centered = centered * (group_size / (group_size - 1))
    if scale == "group":
        adv = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = centered / (r.reshape(-1).std() + eps)
    else:
        adv = centered
    # A group of equal rewards carries no signal: exactly 0, never 0/0 (docs/math.md section 2).
    equal = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))
    adv = torch.where(equal, torch.zeros_like(adv), adv)
    return adv.reshape(-1).to(rewards.dtype if rewards.dtype == torch.float64 else torch.float32)


def group_advantages(rewards, group_size, *, scale="group", eps=1e-4, leave_one_out=False):
    """Reference group-normalized advantages. rewards [B] float, B = P * group_size -> [B] float32."""
    group_size, eps = validate.check_advantage_inputs(rewards, group_size, scale, eps, leave_one_out)
    return advantages_impl(rewards, group_size, scale, eps, leave_one_out)


# ----------------------------------------------------------------------------------------------
# 11. Process-reward advantages (step rewards -> per-token advantages)
# ----------------------------------------------------------------------------------------------
def process_advantages_impl(step_rewards, step_ends, step_offsets, group_size, seq_len, scale, eps, leave_one_out,
                            outcome_advantages, outcome_weight):
    """Validated inputs (docs/math.md section 11) -> advantages [B, seq_len]. Segment sums by index_add
    and a reverse cumulative sum over a [B, T + 1] grid of step rewards placed at their ends."""
    validate.check_process_values(step_ends, step_offsets, group_size, seq_len)
    compute = _compute_dtype(step_rewards.dtype)
    device = step_rewards.device
    r = step_rewards.to(compute)
    offsets = step_offsets.to(device=device, dtype=torch.int64)
    ends = step_ends.to(device=device, dtype=torch.int64)
    B = offsets.shape[0] - 1
    P = B // group_size
    counts = offsets[1:] - offsets[:-1]
    sequence = torch.repeat_interleave(torch.arange(B, device=device), counts)
    group = sequence // group_size
    n = counts.view(P, group_size).sum(1).to(compute)  # S_g >= 1 (validated)
    mean = torch.zeros(P, dtype=compute, device=device).index_add_(0, group, r) / n
    centered = r - mean[group]
    if leave_one_out:
        # r - mean(other steps) = S_g / (S_g - 1) (r - mu); S_g = 1 is an equal group, set to 0 below.
        centered = centered * (n / (n - 1))[group]
    if scale == "group":
        var = torch.zeros(P, dtype=compute, device=device).index_add_(0, group, (r - mean[group]) ** 2) / (n - 1)
        normalized = centered / (var.sqrt()[group] + eps)
    elif scale == "batch":
        # One step in the whole batch is one equal group (0 below): no std of a single value is taken.
        normalized = centered / ((r.std() if r.numel() > 1 else r.new_ones(())) + eps)
    else:
        normalized = centered
    hi = torch.full((P,), -torch.inf, dtype=compute, device=device).scatter_reduce(0, group, r, "amax")
    lo = torch.full((P,), torch.inf, dtype=compute, device=device).scatter_reduce(0, group, r, "amin")
    # Equal step rewards carry no signal: exactly 0, never 0 / 0. amax and amin propagate a NaN, so a
    # group holding one is never "equal" and its NaN reaches every step.
    equal = (hi == lo)[group]
    normalized = torch.where(equal, torch.zeros_like(normalized), normalized)
    at_ends = torch.zeros(B, seq_len + 1, dtype=compute, device=device)
    at_ends.index_put_((sequence, ends), normalized, accumulate=True)
    # A[b, t] = sum over steps ending at t' >= t: a cumulative sum from the right.
    adv = at_ends.flip(1).cumsum(1).flip(1)[:, :seq_len]
    if outcome_advantages is not None:
        adv = (1.0 - outcome_weight) * adv + outcome_weight * outcome_advantages.to(compute).unsqueeze(1)
    return adv.to(torch.float64 if step_rewards.dtype == torch.float64 else torch.float32)


def process_advantages(step_rewards, step_ends, step_offsets, group_size, seq_len, *, scale="group", eps=1e-4,
                       leave_one_out=False, outcome_advantages=None, outcome_weight=None):
    """Reference process-reward advantages: step_rewards [S] float, step_ends [S] int, step_offsets [B + 1]
    int -> [B, seq_len] float32 (float64 for float64 step rewards)."""
    group_size, seq_len, eps, outcome_weight = validate.check_process_inputs(
        step_rewards, step_ends, step_offsets, group_size, seq_len, scale, eps, leave_one_out, outcome_advantages,
        outcome_weight)
    return process_advantages_impl(step_rewards, step_ends, step_offsets, group_size, seq_len, scale, eps,
                                   leave_one_out, outcome_advantages, outcome_weight)


# ----------------------------------------------------------------------------------------------
# 3-7. The per-token GRPO loss, its aggregation and metrics
# ----------------------------------------------------------------------------------------------
def grpo_loss_impl(logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights,
                   options: GRPOOptions):
    """logp, logp_old, logp_ref, entropy [B, T]; advantages [B] or [B, T]; mask [B, T] bool;
    rollout_weights [B, T] or [B]. Returns (loss 0-dim, metrics dict of detached 0-dim)."""
    o = options
    compute = _compute_dtype(logp.dtype)
    B = logp.shape[0]
    m = mask.to(compute)

    def live(t, fill=0.0):
        """t at unmasked tokens, `fill` elsewhere: a NaN at a masked token never enters the arithmetic,
        and torch.where passes no gradient (not even 0 * NaN) to the masked entries."""
        return torch.where(mask, t, torch.full_like(t, fill))

    logp = live(logp.to(compute))
    advantages = advantages.to(compute)
    A = live(advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(logp))
    # logp_old, logp_ref and the weights are constants (docs/math.md sections 3 and 5).
    old = logp.detach() if logp_old is None else live(logp_old.detach().to(compute))
    if rollout_weights is not None:
        w = rollout_weights.detach().to(compute)
        rollout_weights = live(w if w.dim() == 2 else w.unsqueeze(1).expand_as(logp))
    ref = None if logp_ref is None else live(logp_ref.detach().to(compute))
    if entropy is not None:
        entropy = live(entropy.to(compute))

    # 3. importance ratio
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if o.sequence_level:
        seq_log_ratio = (log_ratio * m).sum(1) / m.sum(1).clamp(min=1.0)
        rho = torch.exp(seq_log_ratio).unsqueeze(1).expand_as(logp)
    else:
        rho = torch.exp(log_ratio)

    # 4. policy term
    if o.loss_type == "cispo":
        capped = torch.clamp(rho, max=o.epsilon_high).detach()
        policy = -capped * A * logp
    elif o.loss_type == "sapo":
        k = torch.where(A > 0, torch.full_like(A, o.sapo_temperature_pos),
                        torch.full_like(A, o.sapo_temperature_neg))
        policy = -torch.sigmoid(k * (rho - 1.0)) * (4.0 / k) * A
    else:
        rho_clipped = torch.clamp(rho, 1.0 - o.epsilon_low, 1.0 + o.epsilon_high)
        rho_1 = torch.clamp(rho, max=o.delta) if o.delta is not None else rho
        policy = -torch.minimum(rho_1 * A, rho_clipped * A)
        if o.clip_ratio_c is not None:
            policy = torch.where(A < 0, torch.minimum(policy, -o.clip_ratio_c * A), policy)
    if rollout_weights is not None:
        policy = policy * rollout_weights
    per_token = policy

    # 5. KL regularizer and entropy bonus
    kl = None
    if o.beta > 0:
        x = ref - logp
        if o.kl_estimator == "k1":
            kl = -x
        elif o.kl_estimator == "k2":
            kl = 0.5 * x * x
        else:
            kl = torch.exp(x) - x - 1.0
        if o.use_bias_correction_kl:
            kl = kl * rho
        per_token = per_token + o.beta * kl
    if o.entropy_coef != 0:
        per_token = per_token - o.entropy_coef * entropy

    # 6. aggregation (an empty batch, B = 0 or T = 0, gives 0: every divisor is at least 1)
    masked = live(per_token)
    count = m.sum()
    batch = max(B, 1)
    if o.loss_type in ("grpo", "sapo"):
        loss = (masked.sum(1) / m.sum(1).clamp(min=1.0)).sum() / batch
    elif o.loss_type == "bnpo":
        loss = masked.sum() / count.clamp(min=1.0)
    elif o.loss_type == "dr_grpo":
        loss = masked.sum() / (batch * o.max_completion_length)
    elif o.loss_type in ("dapo", "cispo"):
        if o.num_items_in_batch is None:
            normalizer = count.clamp(min=1.0)
        else:
            normalizer = validate.num_items_value(o.num_items_in_batch, logp.device).to(compute) / world_size()
        loss = masked.sum() / normalizer
    else:  # luspo, seq_mean_token_sum
        loss = masked.sum(1).sum() / batch

    # 7. metrics: masked means over the batch
    denom = count.clamp(min=1.0)
    with torch.no_grad():
        def mean(x):
            return (live(x.to(compute)).sum() / denom).float()

        high_bound = o.epsilon_high if o.loss_type == "cispo" else 1.0 + o.epsilon_high
        low = (rho < 1.0 - o.epsilon_low) & (A < 0)
        high = (rho > high_bound) & (A > 0)
        metrics: Dict[str, torch.Tensor] = {
            "clip_ratio_low": mean(low),
            "clip_ratio_high": mean(high),
            "clip_ratio_region": mean(low | high),
            "ratio": mean(rho.detach()),
        }
        if kl is not None:
            metrics["kl"] = mean(kl.detach())
        if entropy is not None:
            metrics["entropy"] = mean(entropy.detach())
    return loss.to(torch.float64 if compute == torch.float64 else torch.float32), metrics


def grpo_loss(logp, advantages, mask, *, logp_old=None, logp_ref=None, entropy=None, rollout_weights=None,
              **options):
    """Reference GRPO loss on given per-token log-probabilities.

    logp [B, T] float (differentiable), advantages [B], mask [B, T], logp_old / logp_ref / entropy
    [B, T], rollout_weights [B, T] or [B]; options as in :class:`GRPOOptions`.
    Returns (loss 0-dim float32, metrics: dict of detached float32 0-dim tensors).
    """
    opts = GRPOOptions.from_kwargs(**options)
    mask = validate.check_grpo_inputs(logp, advantages, mask, logp_old=logp_old, logp_ref=logp_ref,
                                      entropy=entropy, rollout_weights=rollout_weights, options=opts)
    return grpo_loss_impl(logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights, opts)


def linear_grpo_loss_impl(hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                          rollout_weights, temperature, return_entropy, options: GRPOOptions):
    """hidden [B, T, D], weight [V, D], targets [B, T], mask [B, T] bool, advantages [B]."""
    need_entropy = return_entropy or options.entropy_coef != 0
    logp, entropy = logprobs_impl(hidden, weight, targets, bias, temperature, need_entropy, mask)
    return grpo_loss_impl(logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights, options)


def fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, *, bias=None, logp_old=None,
                           logp_ref=None, rollout_weights=None, temperature=1.0, return_entropy=False,
                           **options):
    """Reference GRPO loss from hidden states: logits, log-softmax, then :func:`grpo_loss`.

    hidden [B, T, D], weight [V, D], targets [B, T] int, mask [B, T] (None: every token), advantages [B];
    logp_old / logp_ref [B, T]; bias [V]. Returns (loss, metrics)."""
    opts = GRPOOptions.from_kwargs(**options)
    hidden, weight, bias, mask, temperature = validate.linear_grpo_loss_inputs(
        hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref, rollout_weights, temperature, opts)
    with validate.autocast_off(hidden.device):
        return linear_grpo_loss_impl(hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                                     rollout_weights, temperature, bool(return_entropy), opts)
