"""process_advantages: step-wise (process) rewards -> per-token advantages (docs/math.md section 11)."""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, validate


def process_advantages(step_rewards: torch.Tensor, step_ends: torch.Tensor, step_offsets: torch.Tensor,
                       group_size: int, seq_len: int, *, scale: str = "group", eps: float = 1e-4,
                       leave_one_out: bool = False, outcome_advantages: Optional[torch.Tensor] = None,
                       outcome_weight: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Per-token advantages from step rewards, as GRPO's process supervision defines them: the step
    rewards of each group are normalized together, and a token's advantage is the sum of the normalized
    rewards of its sequence's steps that end at or after it (0 after the last step).

    Args:
        step_rewards: [S] float, the reward of every step of every sequence, sequence by sequence.
        step_ends: [S] int, the token index (in [0, seq_len)) at which each step ends; strictly
            increasing within a sequence.
        step_offsets: [B + 1] int, sequence b's steps are step_offsets[b] .. step_offsets[b + 1] - 1;
            step_offsets[0] = 0, non-decreasing, step_offsets[B] = S. B = P * group_size, each prompt's
            G sequences contiguous; every group needs at least one step.
        group_size: G >= 2, dividing B.
        seq_len: T, the completion positions of the [B, T] result (as the loss's logp / targets).
        scale: "group" (divide by the std of the group's step rewards + eps), "batch" (by the std of
            all S step rewards + eps) or "none" (only subtract the group's mean step reward).
        eps: added to the std; default 1e-4 as in group_advantages.
        leave_one_out: the baseline of a step is the mean of the group's other steps.
        outcome_advantages: [B] float (e.g. group_advantages of the outcome rewards), mixed in as
            (1 - outcome_weight) * process + outcome_weight * outcome at every token; needs outcome_weight.
        outcome_weight: in [0, 1]; only with outcome_advantages.
        backend: "auto", "triton", "cpp" or "reference".

    Returns:
        [B, seq_len] float32 advantages (float64 for float64 step rewards), for the advantages argument
        of grpo_loss / fused_linear_grpo_loss. A group of equal step rewards gets 0 from its steps; a
        NaN step reward makes its group's steps NaN. Malformed packing raises a ValueError naming the
        argument and the index.
    """
    group_size, seq_len, eps, outcome_weight = validate.check_process_inputs(
        step_rewards, step_ends, step_offsets, group_size, seq_len, scale, eps, leave_one_out, outcome_advantages,
        outcome_weight)
    impl = dispatch.select(backend, step_rewards.device, step_rewards.dtype)
    return impl.process_advantages_impl(step_rewards, step_ends, step_offsets, group_size, seq_len, scale, eps,
                                        leave_one_out, outcome_advantages, outcome_weight)
