"""Group advantage normalization (docs/math.md section 2): rewards [B] -> advantages [B], one program per group.

Every group of G contiguous rewards is reduced in two passes over G (mean, then the sum of squared
deviations, so the unbiased std does not suffer the cancellation of sum(r^2) - G mu^2) and written
in a third. scale="batch" divides by the std of all B rewards instead: a first one-program kernel
reduces the whole batch (B is a few thousand at most) into a one-element device buffer that the
group kernel reads, so the host never waits for a value.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import autotune

SCALES = {"none": 0, "group": 1, "batch": 2}


@triton.jit
def _batch_std_kernel(rewards_ptr, std_ptr, B, BLOCK: tl.constexpr):
    """std_ptr[0] = unbiased std of rewards[0:B] (B >= 2), two passes in float32."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(rewards_ptr + offs, mask=offs < B, other=0.0)
    mean = tl.sum(acc, axis=0) / B
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_range = offs < B
        r = tl.load(rewards_ptr + offs, mask=in_range, other=0.0)
        dev = tl.where(in_range, r - mean, 0.0)
        acc += dev * dev
    tl.store(std_ptr, tl.sqrt(tl.sum(acc, axis=0) / (B - 1)))


@triton.jit
def normalize_run(rewards_ptr, std_ptr, out_ptr, first, count, eps, factor, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """out[first:first + count] = the normalized rewards of one group, rewards[first:first + count]
    (count >= 1): (r - mean) * factor / (std + eps), factor the leave-one-out factor (1 without it).
    SCALE: 0 none, 1 the group's std, 2 the batch's (std_ptr[0]). Three passes over the run: mean with
    min / max / NaN count, squared deviations (SCALE 1), write. Used by the group advantages (runs of G)
    and the process advantages' step normalization (runs of S_g, kernels/process_advantages.py)."""
    n = count.to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    nans = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < count
        r = tl.load(rewards_ptr + first + offs, mask=inside, other=0.0)
        total += r
        hi = tl.maximum(hi, tl.where(inside, r, float("-inf")))
        lo = tl.minimum(lo, tl.where(inside, r, float("inf")))
        nans += (r != r).to(tl.float32)
    mean = tl.sum(total, axis=0) / n
    # Equality is decided on the rewards themselves, not on a computed std: a group of equal
    # rewards (a run of one included) gets exactly 0 even with eps = 0, where (r - mu) / std would be
    # 0 / 0. The minimum and maximum skip a NaN, so a NaN is counted apart: a group with one is never
    # "equal", and its NaN mean reaches every advantage of the group (never a 0 for its mates).
    equal = (tl.max(hi, axis=0) == tl.min(lo, axis=0)) & (tl.sum(nans, axis=0) == 0)
    if SCALE == 1:
        sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, count, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < count
            r = tl.load(rewards_ptr + first + offs, mask=inside, other=0.0)
            dev = tl.where(inside, r - mean, 0.0)
            sq += dev * dev
        denom = tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(n - 1.0, 1.0)) + eps
    elif SCALE == 2:
        denom = tl.load(std_ptr) + eps
    else:
        denom = 1.0
    # An equal group must not divide by a zero denominator even in lanes that are discarded.
    denom = tl.where(equal, 1.0, denom)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < count
        r = tl.load(rewards_ptr + first + offs, mask=inside, other=0.0)
        adv = ((r - mean) * factor) / denom
        tl.store(out_ptr + first + offs, tl.where(equal, 0.0, adv), mask=inside)


@triton.jit
def _group_advantages_kernel(rewards_ptr, std_ptr, out_ptr, G, eps, loo_factor,
                             SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """out[g*G:(g+1)*G] for group g = program id. SCALE: 0 none, 1 group std, 2 batch std (std_ptr).
    loo_factor: G / (G - 1) with leave-one-out (r - mean(others) = G / (G - 1) (r - mu)), else 1."""
    normalize_run(rewards_ptr, std_ptr, out_ptr, tl.program_id(0).to(tl.int64) * G, G, eps, loo_factor, SCALE, BLOCK)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str, eps: float,
                     leave_one_out: bool) -> torch.Tensor:
    """rewards [B] float32 contiguous, B = P * group_size (validated) -> advantages [B] float32.

    scale: "group" | "batch" | "none"; eps >= 0 added to the std; leave_one_out: RLOO baseline."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {tuple(SCALES)}, got {scale!r}")
    rewards = rewards.float().contiguous()
    B = rewards.shape[0]
    out = torch.empty_like(rewards)
    if B == 0:
        return out
    groups = B // group_size
    std = torch.empty(1, dtype=torch.float32, device=rewards.device)
    block = autotune.advantages_block(group_size)
    loo_factor = group_size / (group_size - 1) if leave_one_out else 1.0
    with autotune.on_device(rewards):
        if scale == "batch":
            _batch_std_kernel[(1,)](rewards, std, B, BLOCK=autotune.ADVANTAGES_BLOCK_BATCH)
        _group_advantages_kernel[(groups,)](rewards, std, out, group_size, float(eps), float(loo_factor),
                                            SCALE=SCALES[scale], BLOCK=block)
    return out
