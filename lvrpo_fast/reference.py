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

import contextlib
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from . import validate
from . import vocab_parallel as tp
from .contract import (LOG_RATIO_CLAMP, NSTATS, STAT_CLIP_HIGH, STAT_CLIP_LOW, STAT_CLIP_REGION, STAT_COUNT,
                       STAT_ENTROPY, STAT_ENTROPY_KEPT, STAT_KEPT, STAT_KL, STAT_LOSS, STAT_RATIO, STAT_SEQ_CLIP_HIGH,
                       STAT_SEQ_CLIP_LOW, STAT_SEQ_WEIGHT, STAT_WEIGHT, VESPO_LAMBDA_MIN, VESPO_LOG_W_MIN,
                       SequenceStats)
from .options import GRPOOptions, entropy_threshold, replicated, world_size

name = "reference"


def available(device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
    return True, ""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# 1. Per-token log-probabilities and entropy
# ----------------------------------------------------------------------------------------------
def _head(hidden, weight, bias, partition):
    """The logits [n, V] of hidden [n, D] in the input dtype, as an eager LM head; a vocab-parallel head
    (partition) all-gathers its shards' logits (lvrpo_fast.vocab_parallel.gathered_logits)."""
    if partition is None:
        return F.linear(hidden, weight, bias)
    return tp.gathered_logits(hidden, weight, bias, partition)


def _row_stats(hidden, weight, targets, bias, temperature, return_entropy, partition=None):
    """Every row of hidden [n, D] through the head: (logp [n], entropy [n] or None) in the compute dtype."""
    compute = _compute_dtype(hidden.dtype)
    logits = _head(hidden, weight, bias, partition)
    z = logits.to(compute) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1) if return_entropy else None
    return logp, entropy


def logprobs_impl(hidden, weight, targets, bias, temperature, return_entropy, mask, *, vocab_parallel=None,
                  cu_seqlens=None):
    """hidden [..., D], weight [V, D], targets [...] int, bias [V]|None, mask [...] bool|None.

    Returns (logp [...], entropy [...] or None) in float32 (float64 for float64 inputs). Masked rows
    are never computed: they get 0 and no gradient, whatever hidden holds there. vocab_parallel: a
    lvrpo_fast.vocab_parallel.Partition (weight and bias this rank's shards), the logits gathered.
    cu_seqlens: the bounds of packed rows (hidden [N, D] or [1, N, D]), checked against N; each row is
    computed on its own whatever sequence holds it."""
    if cu_seqlens is not None:
        validate.check_cu_seqlens(cu_seqlens, targets.shape[-1], hidden.device)
    validate.check_target_range(targets, weight.shape[0] if vocab_parallel is None else vocab_parallel.vocab_size,
                                mask)
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if mask is None:
        logp, entropy = _row_stats(hidden, weight, targets, bias, temperature, return_entropy, vocab_parallel)
    else:
        live = mask.reshape(-1).nonzero().squeeze(1)
        logp_live, entropy_live = _row_stats(hidden.index_select(0, live), weight, targets.index_select(0, live),
                                             bias, temperature, return_entropy, vocab_parallel)
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
                   options: GRPOOptions, *, logp_sampling=None, return_stats=False, cu_seqlens=None):
    """logp, logp_old, logp_ref, logp_sampling, entropy [B, T]; advantages [B] or [B, T]; mask [B, T] bool;
    rollout_weights [B, T] or [B]. Returns (loss 0-dim, metrics dict of detached 0-dim), and the
    per-sequence statistics [B, NSTATS] (contract.STAT_*) as a third element when return_stats.
    cu_seqlens: the inputs packed as the public op takes them (logp [N], ...); checked, and laid out
    as the padded batch (logp and entropy differentiably, so their gradients come back packed)."""
    if cu_seqlens is not None:
        packing = validate.check_cu_seqlens(cu_seqlens, logp.shape[-1], logp.device)
        mask, advantages, logp_old, logp_ref, logp_sampling, entropy, rollout_weights, logp = \
            validate.packed_grpo_inputs(packing, mask, advantages, logp_old, logp_ref, logp_sampling, entropy,
                                        rollout_weights, logp)
    o = options
    compute = _compute_dtype(logp.dtype)
    B, T = logp.shape
    m = mask.to(compute)

    def live(t, fill=0.0):
        """t at unmasked tokens, `fill` elsewhere: a NaN at a masked token never enters the arithmetic,
        and torch.where passes no gradient (not even 0 * NaN) to the masked entries."""
        return torch.where(mask, t, torch.full_like(t, fill))

    logp = live(logp.to(compute))
    advantages = advantages.to(compute)
    A = live(advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(logp))
    # logp_old, logp_ref, logp_sampling and the weights are constants (docs/math.md sections 3 to 5).
    old = logp.detach() if logp_old is None else live(logp_old.detach().to(compute))
    if rollout_weights is not None:
        w = rollout_weights.detach().to(compute)
        rollout_weights = live(w if w.dim() == 2 else w.unsqueeze(1).expand_as(logp))
    ref = None if logp_ref is None else live(logp_ref.detach().to(compute))
    if entropy is not None:
        entropy = live(entropy.to(compute))
    counts = m.sum(1)
    n = counts.clamp(min=1.0)

    # 3. importance ratio
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    seq_ratio = torch.exp((log_ratio * m).sum(1) / n)
    if o.sequence_level:
        rho = seq_ratio.unsqueeze(1).expand_as(logp)
    else:
        rho = torch.exp(log_ratio)

    # 4. policy term
    phi = None
    coef = rho  # the ratio the clip metrics test (TRL's: after delta for the clip family)
    if o.loss_type == "cispo":
        capped = torch.clamp(rho, max=o.epsilon_high).detach()
        policy = -capped * A * logp
    elif o.loss_type == "sapo":
        k = torch.where(A > 0, torch.full_like(A, o.sapo_temperature_pos),
                        torch.full_like(A, o.sapo_temperature_neg))
        policy = -torch.sigmoid(k * (rho - 1.0)) * (4.0 / k) * A
    elif o.loss_type == "vespo":
        phi_of = _vespo_weight(log_ratio.detach(), m, rollout_weights, o)
        phi = phi_of(A)
        policy = -phi * A * logp
    else:
        rho_clipped = torch.clamp(rho, 1.0 - o.epsilon_low, 1.0 + o.epsilon_high)
        rho_1 = torch.clamp(rho, max=o.delta) if o.delta is not None else rho
        coef = rho_1
        policy = -torch.minimum(rho_1 * A, rho_clipped * A)
        if o.clip_ratio_c is not None:
            policy = torch.where(A < 0, torch.minimum(policy, -o.clip_ratio_c * A), policy)
    if o.off_policy_mask_threshold is not None:
        sampling = old if logp_sampling is None else live(logp_sampling.detach().to(compute))
        drift = (torch.nan_to_num(sampling - logp.detach(), nan=0.0) * m).sum(1) / n
        keep = (A >= 0) | (drift <= o.off_policy_mask_threshold).unsqueeze(1)
        policy = policy * keep.to(compute)
    kept = mask
    if o.entropy_masked:
        threshold = entropy_threshold(entropy, mask, o.top_entropy_quantile)
        kept = mask & (entropy.detach() >= threshold)
        policy = policy * kept.to(compute)
    if rollout_weights is not None and o.loss_type != "vespo":  # vespo reads them inside its weight
        policy = policy * rollout_weights
    per_token = policy

    # 5. KL regularizer (the entropy bonus is aggregated in 6)
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
    bonus = None
    if o.entropy_coef != 0:
        bonus = live(entropy * kept.to(compute))
        if o.entropy_agg == "loss_type":
            per_token = per_token - o.entropy_coef * bonus

    # 6. aggregation (an empty batch, B = 0 or T = 0, gives 0: every divisor is at least 1)
    masked = live(per_token)
    count = m.sum()
    batch = max(B, 1)
    if o.loss_type in ("grpo", "sapo"):
        loss = (masked.sum(1) / n).sum() / batch
    elif o.loss_type == "bnpo":
        loss = masked.sum() / count.clamp(min=1.0)
    elif o.loss_type == "dr_grpo":
        loss = masked.sum() / (batch * o.max_completion_length)
    elif o.loss_type in ("dapo", "cispo", "vespo"):
        loss = masked.sum() / _dapo_normalizer(o, count, logp.device, compute)
    else:  # luspo, seq_mean_token_sum
        loss = masked.sum(1).sum() / batch
    if bonus is not None and o.entropy_agg == "token_mean":
        loss = loss - o.entropy_coef * bonus.sum() / kept.to(compute).sum().clamp(min=1.0)

    # 7. metrics: masked means over the batch, and the per-sequence statistics
    denom = count.clamp(min=1.0)
    with torch.no_grad():
        def mean(x):
            return (live(x.to(compute)).sum() / denom).float()

        high_bound = o.epsilon_high if o.loss_type == "cispo" else 1.0 + o.epsilon_high
        low = (coef < 1.0 - o.epsilon_low) & (A < 0)
        high = (coef > high_bound) & (A > 0)
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
    result_dtype = torch.float64 if compute == torch.float64 else torch.float32
    if not return_stats:
        return loss.to(result_dtype), metrics
    with torch.no_grad():
        stats = torch.zeros(B, NSTATS, dtype=compute, device=logp.device)

        def token_sum(x):
            return live(x.detach().to(compute)).sum(1)

        policy_kl = live(policy.detach() + (0.0 if kl is None else o.beta * kl.detach()))
        stats[:, STAT_LOSS] = policy_kl.sum(1) * _row_weights(o, counts, count, logp.device, compute)
        stats[:, STAT_COUNT] = counts
        if kl is not None:
            stats[:, STAT_KL] = token_sum(kl)
        stats[:, STAT_CLIP_LOW] = token_sum(low)
        stats[:, STAT_CLIP_HIGH] = token_sum(high)
        stats[:, STAT_CLIP_REGION] = token_sum(low | high)
        stats[:, STAT_RATIO] = token_sum(rho)
        if entropy is not None:
            stats[:, STAT_ENTROPY] = token_sum(entropy)
            stats[:, STAT_ENTROPY_KEPT] = token_sum(entropy * kept.to(compute))
        stats[:, STAT_KEPT] = kept.to(compute).sum(1)
        if advantages.dim() == 1:
            # The sequence's own values, an empty sequence (ratio exp(0) = 1) included.
            if o.sequence_level:
                seq_coef = seq_ratio
                if o.is_clip_family and o.delta is not None:
                    seq_coef = torch.clamp(seq_ratio, max=o.delta)
                stats[:, STAT_SEQ_CLIP_LOW] = ((seq_coef < 1.0 - o.epsilon_low) & (advantages < 0)).to(compute)
                stats[:, STAT_SEQ_CLIP_HIGH] = ((seq_coef > high_bound) & (advantages > 0)).to(compute)
            if phi is not None:
                stats[:, STAT_SEQ_WEIGHT] = phi_of(advantages.unsqueeze(1))[:, 0]
        if phi is not None:
            stats[:, STAT_WEIGHT] = token_sum(phi)
    return loss.to(result_dtype), metrics, stats.to(result_dtype)


def _dapo_normalizer(o: GRPOOptions, count, device, compute):
    """dapo / cispo / vespo: num_items_in_batch over the world size, or the batch's token count."""
    if o.num_items_in_batch is None:
        return count.clamp(min=1.0)
    return validate.num_items_value(o.num_items_in_batch, device).to(compute) / world_size()


def _row_weights(o: GRPOOptions, counts, count, device, compute):
    """[B]: the weight of each sequence's token sum in the loss (docs/math.md section 6)."""
    B = counts.shape[0]
    batch = max(B, 1)
    if o.loss_type in ("grpo", "sapo"):
        return 1.0 / (batch * counts.clamp(min=1.0))
    if o.loss_type == "bnpo":
        return (1.0 / count.clamp(min=1.0)).expand(B)
    if o.loss_type == "dr_grpo":
        return torch.full((B,), 1.0 / (batch * o.max_completion_length), dtype=compute, device=device)
    if o.loss_type in ("dapo", "cispo", "vespo"):
        return (1.0 / _dapo_normalizer(o, count, device, compute)).expand(B)
    return torch.full((B,), 1.0 / batch, dtype=compute, device=device)


def _vespo_weight(log_ratio, m, rollout_weights, o: GRPOOptions):
    """vespo's gamma weight (docs/math.md section 4) as a function of the advantages: phi(w) = exp(lambda +
    k log w - lambda w), with w the sequence's importance weight (the sum, not the mean, of its clamped
    log-ratios, plus its rollout weights' clamped logs), (k, lambda) by the sign of A; 0 where exp
    overflows. A constant of the loss: no gradient."""
    log_w = (log_ratio * m).sum(1)
    if rollout_weights is not None:
        log_is = torch.clamp(torch.log(rollout_weights), VESPO_LOG_W_MIN, LOG_RATIO_CLAMP)
        log_w = log_w + torch.where(m > 0, log_is, torch.zeros_like(log_is)).sum(1)
    log_w = torch.clamp(log_w, VESPO_LOG_W_MIN, LOG_RATIO_CLAMP).unsqueeze(1)
    w = torch.exp(log_w)

    def phi(A):
        positive = A >= 0

        def by_sign(pos, neg):  # in the compute dtype: a float32 1e-4 would move float64's phi by 1e-11
            return torch.where(positive, torch.full_like(A, pos), torch.full_like(A, neg))

        k = by_sign(o.vespo_k_pos, o.vespo_k_neg)
        lam = by_sign(max(o.vespo_lambda_pos, VESPO_LAMBDA_MIN), max(o.vespo_lambda_neg, VESPO_LAMBDA_MIN))
        value = torch.exp(lam + k * log_w - lam * w)
        return torch.where(value == float("inf"), torch.zeros_like(value), value)
    return phi


def grpo_loss(logp, advantages, mask, *, logp_old=None, logp_ref=None, logp_sampling=None, entropy=None,
              rollout_weights=None, return_sequence_stats=False, **options):
    """Reference GRPO loss on given per-token log-probabilities.

    logp [B, T] float (differentiable), advantages [B] or [B, T], mask [B, T], logp_old / logp_ref /
    logp_sampling / entropy [B, T], rollout_weights [B, T] or [B]; options as in :class:`GRPOOptions`.
    Returns (loss 0-dim float32, metrics: dict of detached float32 0-dim tensors), and a
    contract.SequenceStats when return_sequence_stats.
    """
    opts = GRPOOptions.from_kwargs(**options)
    mask = validate.check_grpo_inputs(logp, advantages, mask, logp_old=logp_old, logp_ref=logp_ref,
                                      logp_sampling=logp_sampling, entropy=entropy,
                                      rollout_weights=rollout_weights, options=opts)
    out = grpo_loss_impl(logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights, opts,
                         logp_sampling=logp_sampling, return_stats=return_sequence_stats)
    return out if not return_sequence_stats else (out[0], out[1], SequenceStats.from_columns(out[2]))


def linear_grpo_loss_impl(hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                          rollout_weights, temperature, return_entropy, options: GRPOOptions, *,
                          logp_sampling=None, head_dtype=None, return_stats=False, cu_seqlens=None,
                          vocab_parallel=None):
    """hidden [B, T, D], weight [V, D], targets [B, T], mask [B, T] bool, advantages [B] or [B, T].
    head_dtype: the dtype the logits are formed in (None: the inputs'); see fused_linear_grpo_loss.
    cu_seqlens: every input packed as the public op takes it (hidden [N, D], targets / mask [N], ...);
    the oracle checks cu_seqlens, pads hidden (differentiably) and the rest, and computes the padded
    batch. vocab_parallel: as in logprobs_impl."""
    need_entropy = return_entropy or options.needs_entropy
    if cu_seqlens is not None:
        packing, targets, mask, advantages, logp_old, logp_ref, logp_sampling, rollout_weights = validate.unpack(
            cu_seqlens, hidden.shape[0], targets, mask, advantages, logp_old, logp_ref, logp_sampling,
            rollout_weights)
        hidden = packing.pad(hidden)
    if head_dtype is not None and head_dtype != hidden.dtype:
        # Operands rounded to head_dtype, the product rounded to it, the statistics in float32 or
        # wider; autograd then forms the gradients through the rounding casts in the inputs' dtype.
        logp, entropy = _rounded_head_logprobs(hidden, weight, targets, bias, temperature, need_entropy, mask,
                                               head_dtype, vocab_parallel)
    else:
        logp, entropy = logprobs_impl(hidden, weight, targets, bias, temperature, need_entropy, mask,
                                      vocab_parallel=vocab_parallel)
    # The ranks of a tensor-parallel group hold the same tokens: one data-parallel replica.
    replicas = (contextlib.nullcontext() if vocab_parallel is None else
                replicated(vocab_parallel.rank, vocab_parallel.world))
    with replicas:
        return grpo_loss_impl(logp, advantages, mask, logp_old, logp_ref, entropy, rollout_weights, options,
                              logp_sampling=logp_sampling, return_stats=return_stats)


class _RoundTo(torch.autograd.Function):
    """x rounded to a narrower dtype and back, with the identity as its gradient: the value a
    mixed-precision head multiplies, while the gradient stays in x's dtype."""

    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _rounded_head_logprobs(hidden, weight, targets, bias, temperature, need_entropy, mask, head_dtype,
                           partition=None):
    """logprobs_impl with the logits formed in head_dtype from operands rounded to it (TRL's chunked head
    under autocast), the gradients flowing back in the inputs' dtype."""
    h = _RoundTo.apply(hidden, head_dtype)
    w = _RoundTo.apply(weight, head_dtype)
    b = None if bias is None else _RoundTo.apply(bias, head_dtype)
    live = mask.reshape(-1).nonzero().squeeze(1)
    flat = h.reshape(-1, h.shape[-1]).index_select(0, live)
    logits = _RoundTo.apply(_head(flat, w, b, partition), head_dtype)  # the product rounded as a head_dtype tile
    z = logits.to(_compute_dtype(hidden.dtype)) / temperature
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, targets.reshape(-1).index_select(0, live).long().unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1) if need_entropy else None
    zeros = torch.zeros(targets.numel(), dtype=z.dtype, device=hidden.device)
    logp = zeros.index_put((live,), lp).reshape(targets.shape)
    entropy = zeros.index_put((live,), ent).reshape(targets.shape) if need_entropy else None
    return logp, entropy


def fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, *, bias=None, logp_old=None,
                           logp_ref=None, logp_sampling=None, rollout_weights=None, temperature=1.0,
                           return_entropy=False, head_dtype=None, return_sequence_stats=False, **options):
    """Reference GRPO loss from hidden states: logits, log-softmax, then :func:`grpo_loss`.

    hidden [B, T, D], weight [V, D], targets [B, T] int, mask [B, T] (None: every token), advantages [B]
    or [B, T]; logp_old / logp_ref / logp_sampling [B, T]; bias [V]. Returns (loss, metrics), and a
    contract.SequenceStats when return_sequence_stats."""
    opts = GRPOOptions.from_kwargs(**options)
    hidden, weight, bias, mask, temperature, head_dtype = validate.linear_grpo_loss_inputs(
        hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref, rollout_weights, temperature, opts,
        logp_sampling=logp_sampling, head_dtype=head_dtype)
    with validate.autocast_off(hidden.device):
        out = linear_grpo_loss_impl(hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                                    rollout_weights, temperature, bool(return_entropy), opts,
                                    logp_sampling=logp_sampling, head_dtype=head_dtype,
                                    return_stats=return_sequence_stats)
    return out if not return_sequence_stats else (out[0], out[1], SequenceStats.from_columns(out[2]))
