"""Process-reward advantages (docs/math.md section 11): packed step rewards -> per-token advantages [B, T].

Two kernels. The first normalizes the step rewards, one program per group: the group's steps are
contiguous in the packed arrays (step_offsets[g G] .. step_offsets[(g + 1) G]), so it runs the group
advantages' normalize_run (mean with min / max / NaN count, squared deviations, write) over a run of
S_g steps whose length is read from the offsets. scale="batch" reads the std of all S steps
from the group advantages' one-program batch kernel. The second writes the tokens, one program per
(sequence, block of tokens): each token sums the normalized rewards of its sequence's steps that end
at or after it, a loop over the sequence's few steps, so every token is written exactly once and no
prefix sum crosses programs. The packed inputs are validated on the host before the launch
(lvrpo_fast.validate.check_process_values): the kernels trust them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import autotune
from .advantages import SCALES, _batch_std_kernel, normalize_run


@triton.jit
def _normalize_steps_kernel(rewards_ptr, offsets_ptr, std_ptr, out_ptr, G, eps,
                            LEAVE_ONE_OUT: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """out[s] = normalized step reward s, for the steps of group g = program id. SCALE: 0 none, 1 group
    std, 2 batch std (std_ptr[0])."""
    g = tl.program_id(0).to(tl.int64)
    first = tl.load(offsets_ptr + g * G)
    count = tl.load(offsets_ptr + (g + 1) * G) - first  # S_g >= 1
    if LEAVE_ONE_OUT:
        # r - mean(the other S_g - 1 steps) = S_g / (S_g - 1) (r - mu); a group of one step is an equal
        # group (normalize_run writes 0 and divides by nothing), kept off 0 / 0 here too
        n = count.to(tl.float32)
        factor = n / tl.maximum(n - 1.0, 1.0)
    else:
        factor = 1.0
    normalize_run(rewards_ptr, std_ptr, out_ptr, first, count, eps, factor, SCALE, BLOCK)


@triton.jit
def _token_advantages_kernel(normalized_ptr, ends_ptr, offsets_ptr, outcome_ptr, out_ptr, T, outcome_weight,
                             HAS_OUTCOME: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[b, t] for sequence b = program id 0 and the tokens of block program id 1:
    sum of normalized[s] over b's steps s with ends[s] >= t, mixed with outcome[b] when HAS_OUTCOME."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    first = tl.load(offsets_ptr + b)
    last = tl.load(offsets_ptr + b + 1)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for s in range(first, last):
        end = tl.load(ends_ptr + s)
        # Selected, not multiplied: a NaN step reaches only the tokens at or before its end.
        acc += tl.where(t <= end, tl.load(normalized_ptr + s), 0.0)
    if HAS_OUTCOME:
        acc = (1.0 - outcome_weight) * acc + outcome_weight * tl.load(outcome_ptr + b)
    tl.store(out_ptr + b * T + t, acc, mask=t < T)


def process_advantages(step_rewards: torch.Tensor, step_ends: torch.Tensor, step_offsets: torch.Tensor,
                       group_size: int, seq_len: int, scale: str, eps: float, leave_one_out: bool,
                       outcome_advantages: Optional[torch.Tensor], outcome_weight: float) -> torch.Tensor:
    """step_rewards [S] float32, step_ends [S] int64, step_offsets [B + 1] int64 (validated: see
    lvrpo_fast.validate.check_process_values), outcome_advantages [B] float32 or None ->
    advantages [B, seq_len] float32."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {tuple(SCALES)}, got {scale!r}")
    rewards = step_rewards.float().contiguous()
    ends = step_ends.to(torch.int64).contiguous()
    offsets = step_offsets.to(torch.int64).contiguous()
    B, S = offsets.shape[0] - 1, rewards.shape[0]
    out = torch.empty(B, seq_len, dtype=torch.float32, device=rewards.device)
    if B == 0 or seq_len == 0:
        return out
    normalized = torch.empty_like(rewards)
    std = torch.ones(1, dtype=torch.float32, device=rewards.device)
    has_outcome = outcome_advantages is not None
    outcome = outcome_advantages.float().contiguous() if has_outcome else rewards  # a placeholder pointer
    block_t = autotune.process_advantages_block_t(seq_len)
    with autotune.on_device(rewards):
        if scale == "batch" and S > 1:  # one step in the batch is an equal group: its std is never read
            _batch_std_kernel[(1,)](rewards, std, S, BLOCK=autotune.ADVANTAGES_BLOCK_BATCH)
        _normalize_steps_kernel[(B // group_size,)](rewards, offsets, std, normalized, group_size, float(eps),
                                                     LEAVE_ONE_OUT=bool(leave_one_out), SCALE=SCALES[scale],
                                                     BLOCK=autotune.PROCESS_ADVANTAGES_BLOCK_STEPS)
        _token_advantages_kernel[(B, triton.cdiv(seq_len, block_t))](
            normalized, ends, offsets, outcome, out, seq_len, float(outcome_weight), HAS_OUTCOME=has_outcome,
            BLOCK_T=block_t)
    return out
