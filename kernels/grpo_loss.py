"""The per-sequence GRPO loss (docs/math.md sections 3 to 7): loss, metric sums and d(loss)/d(logp) in one kernel.

One program per sequence loops over T in blocks. Every option is a tl.constexpr flag or a float
argument of the one kernel, so each combination compiles to straight-line code without dead branches.

Gradient, per token t of sequence b (m = mask, c = row_scale[b], L_t the per-token loss of docs/math.md sections 4-5):
    d(loss)/d(logp_t) = c m_t (dL_t/dlogp_t |direct  +  dL_t/drho_t * drho_t/dlogp_t)
The direct part is cispo's -cap A w, vespo's -phi A and the KL's beta (rho) dKL/dlogp; the part
through the ratio is every other policy term and the bias-corrected KL's beta KL. With d_t =
clamp(logp_t - logp_old_t, -20, 20) and i_t = [-20 <= logp_t - logp_old_t <= 20] (torch.clamp passes
the gradient at its bounds):
  token level:    rho_t = exp(d_t),  drho_t/dlogp_t = rho_t i_t
  sequence level: rho_t = s for every t, s = exp(sum_u m_u d_u / n), n = max(sum_u m_u, 1), so
                  ds/dlogp_t = s m_t i_t / n and, since s feeds every token of the sequence,
                  d(loss)/d(logp_t) = c m_t dL_t/dlogp_t|direct + (sum_u c m_u dL_u/ds) s m_t i_t / n.
The sequence level therefore takes three passes over the row: the sums of pass 1 (the mean log-ratio
s; vespo's weight, from the same sum; the off-policy mask's mean drift), the loss, metrics and the
sum over u of c m_u dL_u/ds, then the gradient of every token. vespo's weight and the two masks are
constants of the loss: they multiply the gradient, nothing flows through them.

torch.minimum and torch.clamp are matched exactly as autograd differentiates them: clamp passes the
gradient where min <= x <= max (bounds included), minimum splits it in halves at ties. The tie is the
common case, not a corner: inside the clip range rho_c = rho_1 = rho, and half of -A through each
branch gives the total -A of an unclipped surrogate.

NaN. Every minimum, maximum and clamp propagates NaN (tl.PropagateNan.ALL, as torch.minimum and
torch.clamp do): Triton's default drops a NaN operand, which turned a NaN log-probability (a NaN in
the hidden states, an inf in the head, an fp16 overflow) into a finite loss. Values at masked tokens
are loaded but never reach a sum (tl.where on the mask), so a NaN there does not matter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lvrpo_fast.contract import (LOG_RATIO_CLAMP, NSTATS, STAT_CLIP_HIGH, STAT_CLIP_LOW, STAT_CLIP_REGION,
                                 STAT_COUNT, STAT_ENTROPY, STAT_ENTROPY_KEPT, STAT_KEPT, STAT_KL, STAT_LOSS, STAT_RATIO,
                                 STAT_SEQ_CLIP_HIGH, STAT_SEQ_CLIP_LOW, STAT_SEQ_WEIGHT, STAT_WEIGHT, VESPO_LOG_W_MIN)

from . import autotune

_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)  # docs/math.md section 3, one constant with the reference
_LOG_W_MIN = tl.constexpr(VESPO_LOG_W_MIN)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # torch.nan_to_num's replacement of +inf in float32
_LOSS = tl.constexpr(STAT_LOSS)
_COUNT = tl.constexpr(STAT_COUNT)
_KL = tl.constexpr(STAT_KL)
_CLIP_LOW = tl.constexpr(STAT_CLIP_LOW)
_CLIP_HIGH = tl.constexpr(STAT_CLIP_HIGH)
_CLIP_REGION = tl.constexpr(STAT_CLIP_REGION)
_RATIO = tl.constexpr(STAT_RATIO)
_ENTROPY = tl.constexpr(STAT_ENTROPY)
_KEPT = tl.constexpr(STAT_KEPT)
_ENTROPY_KEPT = tl.constexpr(STAT_ENTROPY_KEPT)
_SEQ_CLIP_LOW = tl.constexpr(STAT_SEQ_CLIP_LOW)
_SEQ_CLIP_HIGH = tl.constexpr(STAT_SEQ_CLIP_HIGH)
_SEQ_WEIGHT = tl.constexpr(STAT_SEQ_WEIGHT)
_WEIGHT = tl.constexpr(STAT_WEIGHT)


@triton.jit
def _min(x, y):
    """torch.minimum: NaN if either operand is NaN."""
    return tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max(x, y):
    """torch.maximum: NaN if either operand is NaN."""
    return tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _log_ratio(logp_ptr, old_ptr, offs, in_row, HAS_OLD: tl.constexpr):
    """(logp, clamped log-ratio d, i = 1.0 where the clamp passes the gradient) of one block."""
    logp = tl.load(logp_ptr + offs, mask=in_row, other=0.0)
    if HAS_OLD:
        raw = logp - tl.load(old_ptr + offs, mask=in_row, other=0.0)
    else:
        # logp_old defaults to logp.detach(): ratio 1, but the gradient still flows through logp.
        raw = tl.full(logp.shape, 0.0, tl.float32)
    d = _min(_max(raw, -_CLAMP), _CLAMP)
    passes = ((raw >= -_CLAMP) & (raw <= _CLAMP)).to(tl.float32)
    return logp, d, passes


@triton.jit
def _min_grad_weight(x, y):
    """Share of d min(x, y) that goes to x, as autograd's torch.minimum: 1, 0, or 1/2 at a tie."""
    return tl.where(x < y, 1.0, tl.where(x == y, 0.5, 0.0))


@triton.jit
def _vespo_phi(log_w, w, k, lam):
    """vespo's gamma weight exp(lam + k log w - lam w), 0 where it overflows (TRL's nan_to_num(posinf=0))."""
    phi = tl.exp(lam + k * log_w - lam * w)
    return tl.where(phi == float("inf"), 0.0, phi)


@triton.jit
def _clip_coef(rho, delta, LOSS_KIND: tl.constexpr, HAS_DELTA: tl.constexpr):
    """The ratio the clip metrics test: min(rho, delta) for the clip family with delta (TRL's), else rho."""
    if LOSS_KIND == 0 and HAS_DELTA:
        return _min(rho, delta)
    return rho


@triton.jit
def _token_terms(logp, rho, adv, logp_ref, weight, phi, keep,
                 eps_low, eps_high, delta, clip_c, beta, sapo_pos, sapo_neg,
                 LOSS_KIND: tl.constexpr, KL_KIND: tl.constexpr, BIAS_CORRECTED: tl.constexpr,
                 HAS_DELTA: tl.constexpr, DUAL_CLIP: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                 POLICY_MASKED: tl.constexpr):
    """Per-token loss L (docs/math.md sections 4-5, before masking), its partial derivatives w.r.t. logp (not through
    rho) and w.r.t. rho, and the KL value of the metrics. adv is the token's advantage (the
    sequence's, broadcast, when advantages are per sequence); phi is vespo's weight, keep the product
    of the off-policy and high-entropy masks (1.0 or 0.0) when POLICY_MASKED."""
    if LOSS_KIND == 1:  # cispo: -stopgrad(min(rho, eps_high)) A logp
        cap = _min(rho, eps_high)
        policy = -cap * adv * logp
        d_policy_logp = -cap * adv
        d_policy_rho = tl.full(rho.shape, 0.0, tl.float32)
    elif LOSS_KIND == 2:  # sapo: -sigmoid(k (rho - 1)) 4 / k A, k by the sign of A
        k = tl.where(adv > 0, sapo_pos, sapo_neg)
        gate = 1.0 / (1.0 + tl.exp(-k * (rho - 1.0)))
        policy = -gate * (4.0 / k) * adv
        d_policy_logp = tl.full(rho.shape, 0.0, tl.float32)
        # d sigmoid(k x)/dx = k g (1 - g); the k cancels the 4 / k
        d_policy_rho = -4.0 * adv * gate * (1.0 - gate)
    elif LOSS_KIND == 3:  # vespo: -stopgrad(phi) A logp
        policy = -phi * adv * logp
        d_policy_logp = -phi * adv
        d_policy_rho = tl.full(rho.shape, 0.0, tl.float32)
    else:  # clip family: -min(rho_1 A, clamp(rho, 1 - eps_low, 1 + eps_high) A)
        lower = 1.0 - eps_low
        upper = 1.0 + eps_high
        rho_c = _min(_max(rho, lower), upper)
        d_rho_c = ((rho >= lower) & (rho <= upper)).to(tl.float32)
        if HAS_DELTA:
            rho_1 = _min(rho, delta)
            d_rho_1 = (rho <= delta).to(tl.float32)
        else:
            rho_1 = rho
            d_rho_1 = tl.full(rho.shape, 1.0, tl.float32)
        unclipped = rho_1 * adv
        clipped = rho_c * adv
        share = _min_grad_weight(unclipped, clipped)
        policy = -_min(unclipped, clipped)
        d_policy_rho = -adv * (share * d_rho_1 + (1.0 - share) * d_rho_c)
        if DUAL_CLIP:
            # where A < 0: L = min(L, -c A); -c A is constant, so L keeps its share of the gradient
            floor = -clip_c * adv
            keep_share = _min_grad_weight(policy, floor)
            d_policy_rho = tl.where(adv < 0, keep_share * d_policy_rho, d_policy_rho)
            policy = tl.where(adv < 0, _min(policy, floor), policy)
        d_policy_logp = tl.full(rho.shape, 0.0, tl.float32)
    if POLICY_MASKED:
        policy = policy * keep
        d_policy_logp = d_policy_logp * keep
        d_policy_rho = d_policy_rho * keep
    if HAS_WEIGHTS and LOSS_KIND != 3:
        # the rollout correction multiplies the policy term only, never the KL (vespo reads it in phi)
        policy = policy * weight
        d_policy_logp = d_policy_logp * weight
        d_policy_rho = d_policy_rho * weight
    loss = policy
    d_logp = d_policy_logp
    d_rho = d_policy_rho
    kl = tl.full(rho.shape, 0.0, tl.float32)
    if KL_KIND != 0:
        x = logp_ref - logp
        if KL_KIND == 1:
            kl = -x
            d_kl = tl.full(rho.shape, 1.0, tl.float32)
        elif KL_KIND == 2:
            kl = 0.5 * x * x
            d_kl = -x
        else:
            ex = tl.exp(x)
            kl = ex - x - 1.0
            d_kl = 1.0 - ex
        if BIAS_CORRECTED:
            # KL rho: the gradient goes through both factors (un-clipped rho, before delta)
            d_rho += beta * kl
            d_kl = d_kl * rho
            kl = kl * rho
        loss += beta * kl
        d_logp += beta * d_kl
    return loss, d_logp, d_rho, kl


@triton.jit
def _token_inputs(logp_ptr, old_ptr, ref_ptr, adv_ptr, weight_ptr, entropy_ptr, base, cols, in_row, adv_seq,
                  threshold, low_drift, log_w, w, vk_pos, vl_pos, vk_neg, vl_neg,
                  HAS_OLD: tl.constexpr, KL_KIND: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                  LOSS_KIND: tl.constexpr, ENTROPY_MASK: tl.constexpr, OFF_POLICY_MASK: tl.constexpr,
                  ADV_PER_TOKEN: tl.constexpr):
    """One block's per-token inputs: (logp, d, i, A, logp_ref, weight, entropy, phi, entropy kept, keep)."""
    offs = base + cols
    logp, d, passes = _log_ratio(logp_ptr + base, old_ptr + base, cols, in_row, HAS_OLD)
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + offs, mask=in_row, other=0.0)
    else:
        adv = adv_seq
    logp_ref = tl.load(ref_ptr + offs, mask=in_row, other=0.0) if KL_KIND != 0 else logp
    weight = tl.load(weight_ptr + offs, mask=in_row, other=0.0) if HAS_WEIGHTS else logp
    entropy = tl.load(entropy_ptr + offs, mask=in_row, other=0.0) if HAS_ENTROPY else logp
    phi = logp
    if LOSS_KIND == 3:
        phi = tl.where(adv >= 0, _vespo_phi(log_w, w, vk_pos, vl_pos), _vespo_phi(log_w, w, vk_neg, vl_neg))
    keep = tl.full(logp.shape, 1.0, tl.float32)
    entropy_kept = tl.full(logp.shape, 1, tl.int1)
    if ENTROPY_MASK:
        entropy_kept = entropy >= threshold
        keep = tl.where(entropy_kept, keep, 0.0)
    if OFF_POLICY_MASK:
        keep = tl.where((adv >= 0) | low_drift, keep, 0.0)
    return logp, d, passes, adv, logp_ref, weight, entropy, phi, entropy_kept, keep


@triton.jit
def _grpo_loss_kernel(
    logp_ptr, old_ptr, ref_ptr, sampling_ptr, adv_ptr, mask_ptr, weight_ptr, entropy_ptr, threshold_ptr, scale_ptr,
    stats_ptr, grad_ptr, T,
    eps_low, eps_high, delta, clip_c, beta, sapo_pos, sapo_neg, vk_pos, vl_pos, vk_neg, vl_neg, drift_threshold,
    LOSS_KIND: tl.constexpr, SEQUENCE_LEVEL: tl.constexpr, KL_KIND: tl.constexpr,
    BIAS_CORRECTED: tl.constexpr, HAS_DELTA: tl.constexpr, DUAL_CLIP: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_SAMPLING: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    ENTROPY_MASK: tl.constexpr, OFF_POLICY_MASK: tl.constexpr, POLICY_MASKED: tl.constexpr, NEED_GRAD: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr, N_STATS: tl.constexpr, STATS_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program per sequence b: stats[b, :] and (NEED_GRAD) grad[b, :] (see the module docstring).
    ADV_PER_TOKEN: advantages are [B, T] (one per token, e.g. process rewards) instead of [B].
    POLICY_MASKED: ENTROPY_MASK or OFF_POLICY_MASK (the policy term carries a 0/1 keep factor)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    row_scale = tl.load(scale_ptr + row)
    lanes = tl.arange(0, BLOCK_T)
    adv_seq = tl.full([BLOCK_T], 0.0, tl.float32)
    if not ADV_PER_TOKEN:
        # the sequence's advantage as a block, so that comparisons with it combine with per-token masks
        adv_seq = adv_seq + tl.load(adv_ptr + row)
    high_bound = eps_high if LOSS_KIND == 1 else 1.0 + eps_high  # cispo's eps_high is an absolute cap
    threshold = 0.0
    if ENTROPY_MASK:
        threshold = tl.load(threshold_ptr)

    # pass 1 (sequence level, vespo, the off-policy mask): the row's sums
    ratio_sum = tl.full([BLOCK_T], 0.0, tl.float32)
    count_sum = tl.full([BLOCK_T], 0.0, tl.float32)
    is_sum = tl.full([BLOCK_T], 0.0, tl.float32)
    drift_sum = tl.full([BLOCK_T], 0.0, tl.float32)
    if SEQUENCE_LEVEL or LOSS_KIND == 3 or OFF_POLICY_MASK:
        for start in range(0, T, BLOCK_T):
            cols = start + lanes
            in_row = cols < T
            m = tl.load(mask_ptr + base + cols, mask=in_row, other=0) != 0
            logp, d, _ = _log_ratio(logp_ptr + base, old_ptr + base, cols, in_row, HAS_OLD)
            ratio_sum += tl.where(m, d, 0.0)
            count_sum += m.to(tl.float32)
            if LOSS_KIND == 3 and HAS_WEIGHTS:
                log_is = tl.log(tl.load(weight_ptr + base + cols, mask=in_row, other=1.0))
                is_sum += tl.where(m, _min(_max(log_is, _LOG_W_MIN), _CLAMP), 0.0)
            if OFF_POLICY_MASK:
                if HAS_SAMPLING:
                    sampled = tl.load(sampling_ptr + base + cols, mask=in_row, other=0.0)
                elif HAS_OLD:
                    sampled = tl.load(old_ptr + base + cols, mask=in_row, other=0.0)
                else:
                    sampled = logp
                drift = sampled - logp
                drift = tl.where(drift != drift, 0.0, drift)  # torch.nan_to_num: NaN -> 0, +-inf -> +-max
                drift = tl.minimum(tl.maximum(drift, -_FLT_MAX), _FLT_MAX)
                drift_sum += tl.where(m, drift, 0.0)
    n_tokens = tl.maximum(tl.sum(count_sum, axis=0), 1.0)  # a count: never NaN
    seq_log_ratio = tl.sum(ratio_sum, axis=0)
    seq_ratio = tl.exp(seq_log_ratio / n_tokens)
    log_w = _min(_max(seq_log_ratio + tl.sum(is_sum, axis=0), _LOG_W_MIN), _CLAMP)
    w = tl.exp(log_w)
    low_drift = (tl.full([BLOCK_T], 0.0, tl.float32) + tl.sum(drift_sum, axis=0) / n_tokens) <= drift_threshold

    acc_loss = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_count = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_kl = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_low = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_high = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_region = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_ratio = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_entropy = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_kept = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_entropy_kept = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_weight = tl.full([BLOCK_T], 0.0, tl.float32)
    acc_d_seq = tl.full([BLOCK_T], 0.0, tl.float32)  # sum_u c m_u dL_u/ds (sequence level)
    for start in range(0, T, BLOCK_T):
        cols = start + lanes
        in_row = cols < T
        offs = base + cols
        m = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
        logp, d, passes, adv_t, logp_ref, weight, entropy, phi, entropy_kept, keep = _token_inputs(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, weight_ptr, entropy_ptr, base, cols, in_row, adv_seq,
            threshold, low_drift, log_w, w, vk_pos, vl_pos, vk_neg, vl_neg,
            HAS_OLD, KL_KIND, HAS_WEIGHTS, HAS_ENTROPY, LOSS_KIND, ENTROPY_MASK, OFF_POLICY_MASK, ADV_PER_TOKEN)
        if SEQUENCE_LEVEL:
            rho = tl.full([BLOCK_T], 0.0, tl.float32) + seq_ratio
        else:
            rho = tl.exp(d)
        loss, d_logp, d_rho, kl = _token_terms(
            logp, rho, adv_t, logp_ref, weight, phi, keep,
            eps_low, eps_high, delta, clip_c, beta, sapo_pos, sapo_neg,
            LOSS_KIND, KL_KIND, BIAS_CORRECTED, HAS_DELTA, DUAL_CLIP, HAS_WEIGHTS, POLICY_MASKED)
        coef = _clip_coef(rho, delta, LOSS_KIND, HAS_DELTA)
        low = m & (coef < 1.0 - eps_low) & (adv_t < 0)
        high = m & (coef > high_bound) & (adv_t > 0)
        acc_loss += tl.where(m, loss, 0.0)
        acc_count += m.to(tl.float32)
        acc_kl += tl.where(m, kl, 0.0)
        acc_low += low.to(tl.float32)
        acc_high += high.to(tl.float32)
        acc_region += (low | high).to(tl.float32)
        acc_ratio += tl.where(m, rho, 0.0)
        acc_kept += (m & entropy_kept).to(tl.float32)
        if HAS_ENTROPY:
            acc_entropy += tl.where(m, entropy, 0.0)
            acc_entropy_kept += tl.where(m & entropy_kept, entropy, 0.0)
        if LOSS_KIND == 3:
            acc_weight += tl.where(m, phi, 0.0)
        if NEED_GRAD:
            if SEQUENCE_LEVEL:
                acc_d_seq += tl.where(m, d_rho, 0.0)
            else:
                grad = row_scale * (d_logp + d_rho * rho * passes)
                tl.store(grad_ptr + offs, tl.where(m, grad, 0.0), mask=in_row)

    if NEED_GRAD:
        if SEQUENCE_LEVEL:
            # pass 3: the direct part of each token plus its share of the sequence ratio's gradient
            d_seq = tl.sum(acc_d_seq, axis=0) * seq_ratio / n_tokens
            for start in range(0, T, BLOCK_T):
                cols = start + lanes
                in_row = cols < T
                offs = base + cols
                m = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
                logp, d, passes, adv_t, logp_ref, weight, entropy, phi, entropy_kept, keep = _token_inputs(
                    logp_ptr, old_ptr, ref_ptr, adv_ptr, weight_ptr, entropy_ptr, base, cols, in_row, adv_seq,
                    threshold, low_drift, log_w, w, vk_pos, vl_pos, vk_neg, vl_neg,
                    HAS_OLD, KL_KIND, HAS_WEIGHTS, HAS_ENTROPY, LOSS_KIND, ENTROPY_MASK, OFF_POLICY_MASK, ADV_PER_TOKEN)
                rho = tl.full([BLOCK_T], 0.0, tl.float32) + seq_ratio
                _, d_logp, _, _ = _token_terms(
                    logp, rho, adv_t, logp_ref, weight, phi, keep,
                    eps_low, eps_high, delta, clip_c, beta, sapo_pos, sapo_neg,
                    LOSS_KIND, KL_KIND, BIAS_CORRECTED, HAS_DELTA, DUAL_CLIP, HAS_WEIGHTS, POLICY_MASKED)
                grad = row_scale * (d_logp + d_seq * passes)
                tl.store(grad_ptr + offs, tl.where(m, grad, 0.0), mask=in_row)

    # The sequence's own values (per-sequence advantages): lane 0 carries them into the reduction below.
    first = lanes == 0
    seq_low = tl.full([BLOCK_T], 0.0, tl.float32)
    seq_high = tl.full([BLOCK_T], 0.0, tl.float32)
    seq_weight = tl.full([BLOCK_T], 0.0, tl.float32)
    if not ADV_PER_TOKEN:
        if SEQUENCE_LEVEL:
            seq_coef = _clip_coef(tl.full([BLOCK_T], 0.0, tl.float32) + seq_ratio, delta, LOSS_KIND, HAS_DELTA)
            seq_low = tl.where(first & (seq_coef < 1.0 - eps_low) & (adv_seq < 0), 1.0, 0.0)
            seq_high = tl.where(first & (seq_coef > high_bound) & (adv_seq > 0), 1.0, 0.0)
        if LOSS_KIND == 3:
            seq_phi = tl.where(adv_seq >= 0, _vespo_phi(log_w, w, vk_pos, vl_pos), _vespo_phi(log_w, w, vk_neg, vl_neg))
            seq_weight = tl.where(first, seq_phi, 0.0)

    # One reduction for all the metric sums: the per-lane partial sums side by side in a
    # [BLOCK_T, STATS_BLOCK] tile, reduced over the lanes at once (one shared-memory exchange instead of
    # one per column, and one call instead of fourteen under the interpreter) and written with one store.
    stat_cols = tl.arange(0, STATS_BLOCK)
    tile = tl.full([BLOCK_T, STATS_BLOCK], 0.0, tl.float32)
    tile = tl.where(stat_cols[None, :] == _LOSS, acc_loss[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _COUNT, acc_count[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _KL, acc_kl[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _CLIP_LOW, acc_low[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _CLIP_HIGH, acc_high[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _CLIP_REGION, acc_region[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _RATIO, acc_ratio[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _ENTROPY, acc_entropy[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _KEPT, acc_kept[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _ENTROPY_KEPT, acc_entropy_kept[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _SEQ_CLIP_LOW, seq_low[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _SEQ_CLIP_HIGH, seq_high[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _SEQ_WEIGHT, seq_weight[:, None], tile)
    tile = tl.where(stat_cols[None, :] == _WEIGHT, acc_weight[:, None], tile)
    sums = tl.sum(tile, axis=0)
    sums = tl.where(stat_cols == _LOSS, row_scale * sums, sums)
    tl.store(stats_ptr + row * N_STATS + stat_cols, sums, mask=stat_cols < N_STATS)


def grpo_token_loss(logp, logp_old, logp_ref, logp_sampling, advantages, mask, rollout_weights, entropy,
                    entropy_threshold, row_scale, params, need_grad,
                    batch_invariant=False):
    """The grpo_token_loss primitive (lvrpo_fast.contract.Primitives).

    logp, logp_old, logp_ref, logp_sampling, rollout_weights, entropy: [B, T] float32 contiguous (all but
    logp may be None); advantages: [B] or [B, T] float32; entropy_threshold: 0-dim float32 or None;
    row_scale: [B] float32; mask: [B, T] bool; params: contract.token_loss_params.
    Returns (stats [B, NSTATS] float32, grad_logp [B, T] float32 or None). batch_invariant: the block
    does not follow T, so a sequence's sums do not depend on how far the batch is padded."""
    p = params
    B, T = logp.shape
    mask_bytes = mask.view(torch.uint8)  # bool -> uint8 without a copy
    if B == 0 or T == 0:  # no token: zero sums, zero gradient
        stats = torch.zeros((B, NSTATS), dtype=torch.float32, device=logp.device)
        return stats, torch.zeros((B, T), dtype=torch.float32, device=logp.device) if need_grad else None
    # The kernel writes every element of both (masked tokens get a zero gradient).
    stats = torch.empty((B, NSTATS), dtype=torch.float32, device=logp.device)
    grad = torch.empty((B, T), dtype=torch.float32, device=logp.device) if need_grad else None
    kl_kind = p["kl_estimator"]
    if kl_kind and logp_ref is None:
        raise ValueError(f"beta={p['beta']} > 0 needs logp_ref (the reference model's log-probabilities)")
    if entropy_threshold is not None and entropy is None:
        raise ValueError("the high-entropy mask (entropy_threshold) needs entropy [B, T]")
    # The block sets which lane sums which token and the shape of the final tree: fixed in the
    # batch-invariant mode (token t always in lane t % 1024), else fitted to T.
    block, num_warps = autotune.grpo_loss_config(autotune.GRPO_LOSS_MAX_BLOCK_T if batch_invariant else T)
    # Absent tensors are never read (their constexpr flag is off); logp stands in for the pointer.
    with autotune.on_device(logp):
        _grpo_loss_kernel[(B,)](
            logp, logp if logp_old is None else logp_old, logp if logp_ref is None else logp_ref,
            logp if logp_sampling is None else logp_sampling, advantages, mask_bytes,
            logp if rollout_weights is None else rollout_weights, logp if entropy is None else entropy,
            row_scale if entropy_threshold is None else entropy_threshold, row_scale, stats,
            logp if grad is None else grad, T,
            p["epsilon_low"], p["epsilon_high"], p["delta"], p["clip_ratio_c"], p["beta"],
            p["sapo_temperature_pos"], p["sapo_temperature_neg"], p["vespo_k_pos"], p["vespo_lambda_pos"],
            p["vespo_k_neg"], p["vespo_lambda_neg"], p["off_policy_mask_threshold"],
            LOSS_KIND=p["policy"], SEQUENCE_LEVEL=p["sequence_level"], KL_KIND=kl_kind,
            BIAS_CORRECTED=p["use_bias_correction_kl"], HAS_DELTA=p["has_delta"], DUAL_CLIP=p["has_clip_ratio_c"],
            HAS_OLD=logp_old is not None, HAS_SAMPLING=logp_sampling is not None,
            HAS_WEIGHTS=rollout_weights is not None, HAS_ENTROPY=entropy is not None,
            ENTROPY_MASK=entropy_threshold is not None, OFF_POLICY_MASK=p["has_off_policy_mask"],
            POLICY_MASKED=entropy_threshold is not None or p["has_off_policy_mask"],
            NEED_GRAD=bool(need_grad), ADV_PER_TOKEN=advantages.dim() == 2,
            N_STATS=NSTATS, STATS_BLOCK=triton.next_power_of_2(NSTATS), BLOCK_T=block,
            num_warps=num_warps,
        )
    return stats, grad
