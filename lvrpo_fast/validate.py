"""Input checks shared by every backend (../shared/SPEC.md section 8).

Each check raises a ValueError or TypeError whose message names the argument and the sizes. The
public functions call these before dispatching, so the Triton, C++ and reference backends all see
inputs of the same, checked form.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .options import ADVANTAGE_SCALES, GRPOOptions


def _tensor(name: str, value, *, floating: bool = False, integer: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {value.dtype}")
    return value


def _same_device(**tensors) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def _shape(name: str, tensor: torch.Tensor, expected, expected_from: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} (as {expected_from}), got {tuple(tensor.shape)}"
        )


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def as_mask(mask: Optional[torch.Tensor], shape, name: str = "mask") -> Optional[torch.Tensor]:
    """Returns the mask as a bool tensor of `shape` (None stays None)."""
    if mask is None:
        return None
    _tensor(name, mask)
    _shape(name, mask, shape, "the targets" if name == "mask" else "logp")
    return mask if mask.dtype == torch.bool else mask != 0


def check_linear_inputs(hidden, weight, targets, *, bias=None, mask=None, temperature=1.0):
    """Checks the inputs of the fused linear ops; returns (mask as bool or None, temperature).

    hidden: [..., D] floating; weight: [V, D] of hidden's dtype; targets: [...] integer ids;
    bias: [V] or None; mask: [...] or None.
    """
    _tensor("hidden", hidden, floating=True)
    _tensor("weight", weight, floating=True)
    _tensor("targets", targets, integer=True)
    if bias is not None:
        _tensor("bias", bias, floating=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., D]")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension D={hidden.shape[-1]} does not match weight's D={weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)})"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    _shape("targets", targets, hidden.shape[:-1], "hidden without its last dimension")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        _shape("bias", bias, (weight.shape[0],), "weight's V")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    mask = as_mask(mask, targets.shape)
    _same_device(hidden=hidden, weight=weight, targets=targets, bias=bias, mask=mask)
    temperature = check_temperature(temperature)
    check_target_range(targets, weight.shape[0], mask)
    return mask, temperature


def check_target_range(targets: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor]) -> None:
    """Raises a ValueError if a target id at an unmasked position is outside [0, V).

    This costs one device synchronization; LVRPO_SKIP_TARGET_CHECK=1 turns it off for users who
    guarantee their ids (the Triton kernels then give NaN for such a row; the other backends may read
    out of bounds).
    """
    if targets.numel() == 0 or os.environ.get("LVRPO_SKIP_TARGET_CHECK") == "1":
        return
    bad = (targets < 0) | (targets >= vocab_size)
    if mask is not None:
        bad &= mask
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"targets must lie in [0, V={vocab_size}) at unmasked positions; "
            f"targets{list(first)} = {int(targets[first])}"
        )


def check_grpo_inputs(logp, advantages, mask, *, logp_old=None, logp_ref=None, entropy=None,
                      rollout_weights=None, options: GRPOOptions, need_logp: bool = True):
    """Checks the per-token GRPO loss inputs; returns the mask as a bool tensor.

    logp, logp_old, logp_ref, entropy: [B, T] floating; advantages: [B] floating; mask: [B, T];
    rollout_weights: [B, T] or [B] floating. With need_logp=False (the fused linear op, where logp
    is computed inside), `logp` is only used for its shape.
    """
    if need_logp:
        _tensor("logp", logp, floating=True)
    if len(logp.shape) != 2:
        raise ValueError(f"logp must be 2-D [B, T], got shape {tuple(logp.shape)}")
    B, T = logp.shape
    _tensor("advantages", advantages, floating=True)
    _shape("advantages", advantages, (B,), "the batch size B of logp / targets")
    _tensor("mask", mask)
    _shape("mask", mask, (B, T), "logp / targets")
    for name, t in (("logp_old", logp_old), ("logp_ref", logp_ref), ("entropy", entropy)):
        if t is not None:
            _tensor(name, t, floating=True)
            _shape(name, t, (B, T), "logp / targets")
    if rollout_weights is not None:
        _tensor("rollout_weights", rollout_weights, floating=True)
        if tuple(rollout_weights.shape) not in ((B, T), (B,)):
            raise ValueError(
                f"rollout_weights must have shape {(B, T)} (per token) or {(B,)} (per sequence), "
                f"got {tuple(rollout_weights.shape)}"
            )
    if options.beta > 0 and logp_ref is None:
        raise ValueError(f"beta={options.beta} > 0 needs logp_ref (the reference model's log-probabilities)")
    _same_device(logp=logp if need_logp else None, advantages=advantages, mask=mask, logp_old=logp_old,
                 logp_ref=logp_ref, entropy=entropy, rollout_weights=rollout_weights)
    return mask if mask.dtype == torch.bool else mask != 0


def check_advantage_inputs(rewards, group_size, scale, eps, leave_one_out) -> None:
    _tensor("rewards", rewards, floating=True)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a baseline), got {group_size}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide the number of rewards B={rewards.shape[0]}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(leave_one_out, bool):
        raise TypeError(f"leave_one_out must be a bool, got {leave_one_out!r}")
