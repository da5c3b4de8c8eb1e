"""group_advantages: rewards normalized within their groups (docs/math.md section 2)."""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, validate


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4,
                     leave_one_out: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Each reward normalized within its group of `group_size` contiguous generations.

    Args:
        rewards: [B] float rewards, B = P * group_size, each prompt's G generations contiguous.
        group_size: G >= 2, dividing B.
        scale: "group" (divide by the group's std + eps, TRL default), "batch" (by the batch std
            + eps) or "none" (Dr. GRPO: only subtract the group mean).
        eps: added to the std; default 1e-4 as in TRL.
        leave_one_out: use the mean of the other G - 1 rewards as the baseline (RLOO).
        backend: "auto", "triton", "cpp" or "reference".

    Returns:
        [B] float32 advantages (float64 for float64 rewards); a group of equal rewards gets exactly 0,
        a group holding a NaN reward gets NaN throughout (never a number).
    """
    group_size, eps = validate.check_advantage_inputs(rewards, group_size, scale, eps, leave_one_out)
    impl = dispatch.select(backend, rewards.device, rewards.dtype)
    return impl.advantages_impl(rewards, group_size, scale, eps, leave_one_out)
