"""Row statistics of a logits tile (log-prob of the target, log-sum-exp, entropy) and their gradient.

The two primitives of lvrpo_fast.backends that touch the [C, V] logits tile, each a @triton.jit
kernel plus a thin launcher (allocate, launch; no autograd). One program per row (token) streams
the row's V logits in blocks of BLOCK_V (kernels/autotune.py), masking the ragged last block, so
nothing of size V is ever held at once and any V works. Arithmetic is fp32 whatever the tile dtype.

Notation of a row: x the raw logits, T the temperature, z = x / T, p = softmax(z),
lse = logsumexp(z), H = -sum p log p = lse - sum p z.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import autotune

TILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _logits_stats_kernel(logits_ptr, targets_ptr, logp_ptr, lse_ptr, entropy_ptr, V, stride_row,
                         inv_temperature, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    # Online softmax statistics of one row. m is the running max of the raw logits (-inf until a
    # finite or +inf logit is seen); per lane j of the block, relative to m and in units of z:
    #     s_j = sum_i exp(u_i),   t_j = sum_i exp(u_i) u_i,   u_i = (x_i - m) / T  (<= 0)
    # over the logits i the lane has seen. When the max grows to m' = m + delta * T, every u_i
    # shifts by -delta and, with alpha = exp(-delta):
    #     s_j' = alpha s_j,   t_j' = sum exp(u_i - delta) (u_i - delta) = alpha (t_j - delta s_j).
    # t_j <= 0 and delta s_j >= 0, so the update adds two terms of one sign: no cancellation. At the
    # end, with s = sum_j s_j and t = sum_j t_j:
    #     lse = m / T + log s,   H = lse - sum p z = log s - t / s,
    # both of whose terms are >= 0: logits of magnitude 1e4 lose nothing, whereas lse - sum p z
    # subtracts two numbers of size 1e4 / T. Only the max needs a block-wide reduction per step;
    # the sums stay per lane and are reduced once after the loop.
    # The loop works in base 2: with scale = log2(e) / T, u2 = (x - m) scale = u log2(e) and
    # exp(u) = exp2(u2), one multiply and one ex2 per logit (tl.exp would scale (x - m) / T by log2(e)
    # again before its ex2). t is accumulated in the same units, t2 = t log2(e), hence H = log s -
    # ln(2) t2 / s at the end; lse and logp keep the natural-unit m / T that the gradient kernel
    # recomputes (see the launchers' note on rounding).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offsets = tl.arange(0, BLOCK_V)
    m = float("-inf")
    scale = inv_temperature * 1.4426950408889634  # log2(e) / T
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit so far is -inf there is no finite max to shift by; 0 keeps u = -inf,
        # p = 0 and avoids -inf - -inf. A NaN or +inf logit still reaches s as NaN (exp(NaN),
        # exp(inf - inf)), so non-finite rows give non-finite outputs.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m - m_ref) * scale)
        u = (x - m_ref) * scale
        p = tl.exp2(u)
        if WITH_ENTROPY:
            # delta = inf when nothing was seen yet, where s_j = t_j = 0: the update is 0, not inf * 0.
            delta = tl.where(m == float("-inf"), 0.0, (m_ref - m) * scale)
            # p log p -> 0 as p -> 0: a -inf logit (a banned token, or the padding of the last
            # block) contributes 0 to the entropy, not 0 * -inf.
            t = alpha * (t - delta * s) + p * tl.where(p > 0.0, u, 0.0)
        s = alpha * s + p
        m = m_new
    s_row = tl.sum(s, axis=0)
    log_s = tl.log(s_row)
    tl.store(lse_ptr + row, m * inv_temperature + log_s)
    # Targets are validated in [0, V) before any launch; an id that slipped through (the check can
    # be switched off) reads nothing and yields NaN instead of reading out of bounds.
    target = tl.load(targets_ptr + row)
    in_range = (target >= 0) & (target < V)
    x_target = tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32)
    logp = (x_target - m) * inv_temperature - log_s
    # The max's own term makes s >= 1, so logp <= 0 and H >= log s >= 0 hold already; the clamps
    # guard the contract against rounding. tl.where, not tl.minimum / tl.maximum: those may drop
    # a NaN operand on the GPU and turn a NaN into a finite 0.
    tl.store(logp_ptr + row, tl.where(logp > 0.0, 0.0, logp))
    if WITH_ENTROPY:
        entropy = log_s - 0.6931471805599453 * (tl.sum(t, axis=0) / s_row)  # ln(2) t2 / s
        tl.store(entropy_ptr + row, tl.where(entropy < 0.0, 0.0, entropy))


@triton.jit
def _logits_grad_kernel(logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, V,
                        stride_row, inv_temperature, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    # With log p = z - lse, the derivatives w.r.t. z are
    #     d logp / dz = onehot(target) - p,     d H / dz = -p (log p + H)
    # and d/dx = (d/dz) / T. One read and one in-place write per logit.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offsets = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    grad_logp = tl.load(grad_logp_ptr + row)
    # int32, as the column index it is compared with (V < 2^31): an int64 compare costs a widening and
    # a 64-bit setp per logit. An id outside [0, V) (only when the target check is switched off)
    # becomes -1, which matches no column, before the narrowing could wrap it onto one.
    target = tl.load(targets_ptr + row)
    target = tl.where((target >= 0) & (target < V), target, -1).to(tl.int32)
    if HAS_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        grad_entropy = tl.load(grad_entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        valid = cols < V
        # -inf past the end gives p = 0 there; 0 would give exp(-lse), which overflows for lse < -88.
        x = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
        log_p = x * inv_temperature - lse
        p = tl.exp(log_p)
        grad = tl.where(cols == target, grad_logp, 0.0) - grad_logp * p
        if HAS_ENTROPY:
            # As in the forward pass: a -inf logit has p = 0 and p (log p + H) -> 0, not NaN.
            grad -= grad_entropy * p * tl.where(p > 0.0, log_p + entropy, 0.0)
        tl.store(row_ptr + cols, (grad * inv_temperature).to(logits_ptr.dtype.element_ty), mask=valid)


def _check_tile(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [C, V], got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dtype not in TILE_DTYPES:
        raise TypeError(f"logits must be one of {TILE_DTYPES}, got {logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along V, got strides {logits.stride()}")
    rows = logits.shape[0]
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or tuple(targets.shape) != (rows,):
        raise ValueError(f"targets must be an int64 tensor of shape ({rows},) (logits' rows), got "
                         f"{(targets.dtype, tuple(targets.shape)) if isinstance(targets, torch.Tensor) else targets!r}")
    if targets.device != logits.device or not targets.is_contiguous():
        raise ValueError(f"targets must be contiguous and on logits' device {logits.device}, got {targets.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


def _check_row_vector(name: str, value: Optional[torch.Tensor], rows: int, device: torch.device) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or tuple(value.shape) != (rows,):
        raise ValueError(f"{name} must be a float32 tensor of shape ({rows},), got "
                         f"{(value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else value!r}")
    if value.device != device or not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous and on {device}, got {value.device}")


# Both kernels launch with enable_fp_fusion=False. The gradient recomputes log p = x / T - lse from
# the lse the statistics kernel stored as m / T + log s; on a row peaked at a 1e4 logit these cancel
# to ~0 only if x / T is rounded identically in both kernels. A fused multiply-add rounds it once in
# one kernel and not in the other, leaving ~1e-3 of error in p (the C++ backend measured exactly
# this). The kernels are memory-bound, so giving up FMA costs nothing.
def logits_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                 batch_invariant: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-row log-prob of the target, log-sum-exp and (optionally) entropy of softmax(logits / T).

    logits [C, V] float16/bfloat16/float32 (rows may be strided, V contiguous); targets [C] int64
    in [0, V), or -1 for a row whose target is not in this tile (a vocab-parallel shard): its logp is
    NaN (the masked load below), its lse and entropy those of the tile. Returns (logp [C], lse [C], entropy [C] or None), float32, logp <= 0, entropy >= 0.
    One program per row, its blocks of V in order: a row's results never depend on the other rows.
    batch_invariant: the fixed launch configuration even under LVRPO_AUTOTUNE=1, whose choice (per
    process, per entropy flag) would set the lanes' summation order.
    """
    _check_tile(logits, targets, temperature)
    rows, vocab = logits.shape
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    if rows == 0:
        return logp, lse, entropy
    kernel, meta = autotune.kernel_and_meta("logits_stats", _logits_stats_kernel, tune=not batch_invariant)
    with autotune.on_device(logits):
        kernel[(rows,)](logits, targets, logp, lse, lse if entropy is None else entropy, vocab, logits.stride(0),
                        1.0 / float(temperature), WITH_ENTROPY=bool(with_entropy), enable_fp_fusion=False, **meta)
    return logp, lse, entropy


def logits_grad_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                 grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], temperature: float) -> None:
    """Overwrites logits [C, V] in place with d(loss)/d(logits), in logits' dtype.

    d = (grad_logp * (onehot(target) - p) - grad_entropy * p * (log p + entropy)) / T, p = softmax(logits / T).
    targets [C] int64 (-1: the target is not in this tile, no one-hot term); lse, grad_logp [C] float32;
    entropy, grad_entropy [C] float32, or both None when the entropy gets no gradient.
    """
    _check_tile(logits, targets, temperature)
    rows, vocab = logits.shape
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("entropy and grad_entropy must be given together or both be None")
    _check_row_vector("lse", lse, rows, logits.device)
    _check_row_vector("grad_logp", grad_logp, rows, logits.device)
    has_entropy = entropy is not None
    if has_entropy:
        _check_row_vector("entropy", entropy, rows, logits.device)
        _check_row_vector("grad_entropy", grad_entropy, rows, logits.device)
    if rows == 0 or vocab == 0:
        return
    kernel, meta = autotune.kernel_and_meta("logits_grad", _logits_grad_kernel)
    with autotune.on_device(logits):
        kernel[(rows,)](logits, targets, lse, entropy if has_entropy else lse, grad_logp,
                        grad_entropy if has_entropy else grad_logp, vocab, logits.stride(0), 1.0 / float(temperature),
                        HAS_ENTROPY=has_entropy, enable_fp_fusion=False, **meta)
