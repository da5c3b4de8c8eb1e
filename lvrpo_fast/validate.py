"""Input checks shared by every backend (docs/math.md section 8), and the entry rules every public
function applies before dispatching.

Each check raises a ValueError or TypeError whose message names the argument, the value and what was
expected. The dispatching public functions (lvrpo_fast.fused_linear_logprobs, ...) and the reference's
public functions (lvrpo_fast.reference.fused_linear_logprobs, ...) call the same `*_inputs` functions
below, so every backend sees inputs of the same checked form.

Two kinds of checks:
  - on shapes, dtypes, devices and Python numbers: here, before dispatch (static under torch.compile);
  - on tensor *values* (target ids in range, a tensor num_items_in_batch finite and > 0, cu_seqlens'
    bounds): they need the data on the host, so the ops run them where they already synchronize (inside
    the fused ops' custom ops, and in the reference), never in traced code. See check_target_range,
    num_items_value, check_cu_seqlens. (The vocab-parallel path is eager anyway: it checks cu_seqlens
    before its collective check too.)
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Tuple

import torch

from .contract import ADVANTAGE_SCALES
from .options import GRPOOptions
from .packing import Packing


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
    """temperature as a float: a real number (Python or numpy scalar), finite and > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    value = float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return value


def as_mask(mask: Optional[torch.Tensor], shape, name: str = "mask") -> Optional[torch.Tensor]:
    """Returns the mask as a bool tensor of `shape` (None stays None)."""
    if mask is None:
        return None
    _tensor(name, mask)
    _shape(name, mask, shape, "the targets" if name == "mask" else "logp")
    return mask if mask.dtype == torch.bool else mask != 0


def head_autocast(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """The LM head's inputs in the dtype an eager head would compute in.

    Under torch.autocast for hidden's device type, a model's own head (F.linear) computes in autocast's
    dtype; so do the fused ops, on every backend: hidden, weight and bias are cast to it here (a
    differentiable cast: gradients flow back to the inputs' dtypes), and the op itself then runs with
    autocast disabled, so every backend sees inputs of one dtype and its statistics stay in float32.
    Outside autocast, or for inputs autocast would not cast (float64, or already the autocast dtype),
    the inputs are returned unchanged."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    if hidden.dtype == torch.float64 or (hidden.dtype == dtype and weight.dtype == dtype):
        return hidden, weight, bias
    cast = [t if t is None or not t.is_floating_point() else t.to(dtype) for t in (hidden, weight, bias)]
    return cast[0], cast[1], cast[2]


def autocast_off(device: torch.device):
    """A context in which the op's own matmuls are not cast again (see head_autocast)."""
    return torch.autocast(device_type=device.type, enabled=False)


# ------------------------------------------------------------------------------------------------------
# Entry checks of the public functions (called by the dispatching op and by the reference alike)
# ------------------------------------------------------------------------------------------------------
def check_linear_inputs(hidden, weight, targets, *, bias=None, mask=None, temperature=1.0):
    """Checks the inputs of the fused linear ops; returns (mask as bool or None, temperature).

    hidden: [..., D] floating; weight: [V, D] of hidden's dtype; targets: [...] integer ids;
    bias: [V] of weight's dtype or None; mask: [...] or None. Target ids are range-checked where the
    op reads them (check_target_range)."""
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
    return mask, temperature


def linear_logprobs_inputs(hidden, weight, targets, bias, mask, temperature, return_entropy):
    """The entry rule of fused_linear_logprobs on every backend.

    Returns (hidden [..., D], weight, targets [...], bias, mask [...] bool or None, temperature,
    return_entropy), hidden / weight / bias cast for autocast (head_autocast)."""
    mask, temperature = check_linear_inputs(hidden, weight, targets, bias=bias, mask=mask, temperature=temperature)
    hidden, weight, bias = head_autocast(hidden, weight, bias)
    return hidden, weight, targets, bias, mask, temperature, bool(return_entropy)


def check_head_dtype(head_dtype, input_dtype: torch.dtype) -> Optional[torch.dtype]:
    """head_dtype (None, or a floating dtype no wider than the inputs') as given; None when it is the
    inputs' own dtype (nothing to round)."""
    if head_dtype is None:
        return None
    if not isinstance(head_dtype, torch.dtype) or not head_dtype.is_floating_point:
        raise TypeError(f"head_dtype must be a floating torch.dtype or None, got {head_dtype!r}")
    if head_dtype.itemsize > input_dtype.itemsize:
        raise ValueError(f"head_dtype={head_dtype} is wider than the inputs' {input_dtype}: cast hidden and weight "
                         "to it instead (head_dtype only rounds the head's operands and product down)")
    return None if head_dtype == input_dtype else head_dtype


def linear_grpo_loss_inputs(hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref, rollout_weights,
                            temperature, options: GRPOOptions, *, logp_sampling=None, head_dtype=None):
    """The entry rule of fused_linear_grpo_loss on every backend; returns (hidden, weight, bias, mask as
    bool, temperature, head_dtype). Without head_dtype, hidden / weight / bias are cast for autocast
    (head_autocast); an explicit head_dtype replaces that rule (autocast is then ignored)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a 3-D tensor [B, T, D], got {got}")
    if mask is None and isinstance(targets, torch.Tensor):  # no completion mask: every token counts
        mask = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
    mask, temperature = check_linear_inputs(hidden, weight, targets, bias=bias, mask=mask, temperature=temperature)
    mask = check_grpo_inputs(targets, advantages, mask, logp_old=logp_old, logp_ref=logp_ref,
                             logp_sampling=logp_sampling, rollout_weights=rollout_weights, options=options,
                             need_logp=False)
    if head_dtype is None:
        hidden, weight, bias = head_autocast(hidden, weight, bias)
    else:
        head_dtype = check_head_dtype(head_dtype, hidden.dtype)
    return hidden, weight, bias, mask, temperature, head_dtype


def check_cu_seqlens_layout(cu_seqlens, device: torch.device) -> int:
    """cu_seqlens' type, dtype, rank and device, no value read (static under torch.compile); returns B,
    the number of sequences. Its values are checked where the op reads them (check_cu_seqlens)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor [B + 1] of sequence bounds, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [B + 1] (at least one element, 0), "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the packed tensors' device {device}, got {cu_seqlens.device}")
    return cu_seqlens.shape[0] - 1


def check_cu_seqlens(cu_seqlens, total_tokens: int, device: torch.device) -> Packing:
    """cu_seqlens [B + 1] (int32 or int64, non-decreasing from 0 to total_tokens, on `device`) -> its
    Packing (lvrpo_fast.packing). Reads cu_seqlens on the host (one sync): the ops call it inside their
    custom op (or eagerly, the reference and the vocab-parallel path), never in traced code."""
    check_cu_seqlens_layout(cu_seqlens, device)
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {bounds[0]}")
    for b in range(len(bounds) - 1):
        if bounds[b + 1] < bounds[b]:
            raise ValueError(f"cu_seqlens must be non-decreasing (sequence b holds the packed rows "
                             f"[cu_seqlens[b], cu_seqlens[b + 1])), got cu_seqlens[{b}] = {bounds[b]} > "
                             f"cu_seqlens[{b + 1}] = {bounds[b + 1]}")
    if bounds[-1] != total_tokens:
        raise ValueError(f"cu_seqlens must end at the number of packed tokens {total_tokens}, "
                         f"got cu_seqlens[-1] = {bounds[-1]}")
    return Packing(cu_seqlens, bounds)


def _packed_per_token(name: str, t, packing: Packing, per_sequence: bool, fill=0):
    """A packed per-token input [N] (or [1, N], verl's layout) as the padded [B, T] one (`fill` past the
    ends); with per_sequence, a [B] input (one value per sequence) is returned as it is."""
    if t is None:
        return None
    _tensor(name, t)
    B, N = packing.batch, packing.total
    if t.device != packing.cu_seqlens.device:
        raise ValueError(f"{name} must be on cu_seqlens' device {packing.cu_seqlens.device}, got {t.device}")
    if per_sequence and tuple(t.shape) == (B,):
        if B == N and any(packing.bounds[b + 1] - packing.bounds[b] != 1 for b in range(B)):
            raise ValueError(f"{name} of shape {(B,)} is ambiguous here (B = total_tokens = {B} but not every "
                             f"sequence has one token): pass one value per sequence as [B] with B != total_tokens, "
                             f"or per-token values as [1, total_tokens]")
        return t
    if tuple(t.shape) not in ((N,), (1, N)):
        expected = f"{(B,)} (per sequence) or {(N,)} (per token)" if per_sequence else f"{(N,)}"
        raise ValueError(f"{name} must have shape {expected} with packed sequences (cu_seqlens: B = {B}, "
                         f"total_tokens = {N}), got {tuple(t.shape)}")
    return packing.pad(t.reshape(N), fill)


def packed_grpo_inputs(packing: Packing, mask, advantages, logp_old=None, logp_ref=None, logp_sampling=None,
                       entropy=None, rollout_weights=None, logp=None):
    """The packed per-token GRPO inputs ([N] each; advantages and rollout_weights [B] or [N]) laid out as
    the padded [B, T] batch they stand for (lvrpo_fast.packing), in the argument order; mask padded with
    False (None: every token counts). Shapes are checked here, the rest by check_grpo_inputs."""
    if mask is None:
        mask = torch.ones(packing.total, dtype=torch.bool, device=packing.cu_seqlens.device)
    mask = _packed_per_token("mask", mask, packing, False)  # 0 / False past each sequence's end
    if mask.dtype != torch.bool:
        mask = mask != 0
    return (mask, _packed_per_token("advantages", advantages, packing, True),
            *(_packed_per_token(name, t, packing, False) for name, t in
              (("logp_old", logp_old), ("logp_ref", logp_ref), ("logp_sampling", logp_sampling),
               ("entropy", entropy))),
            _packed_per_token("rollout_weights", rollout_weights, packing, True),
            _packed_per_token("logp", logp, packing, False))


def unpack(cu_seqlens, total_tokens: int, targets, mask, advantages, logp_old=None, logp_ref=None,
           logp_sampling=None, rollout_weights=None):
    """The packed inputs of fused_linear_grpo_loss (as packed_linear_grpo_loss_inputs checked them) laid
    out as the padded [B, T] batch, where the op reads them: cu_seqlens' values are checked here (one
    host read). Returns (Packing, targets, mask, advantages, logp_old, logp_ref, logp_sampling,
    rollout_weights), the per-token ones [B, T]."""
    packing = check_cu_seqlens(cu_seqlens, total_tokens, cu_seqlens.device)
    mask, advantages, logp_old, logp_ref, logp_sampling, _, rollout_weights, _ = packed_grpo_inputs(
        packing, mask, advantages, logp_old, logp_ref, logp_sampling, None, rollout_weights)
    return packing, packing.pad(targets), mask, advantages, logp_old, logp_ref, logp_sampling, rollout_weights


def packed_rows(name: str, t, cu_seqlens, trailing: int = 0, values: bool = True):
    """Checks a packed input `name` [N, ...] (or verl's [1, N, ...]; `trailing` dimensions after N) against
    cu_seqlens; returns the Packing (values=True: reads cu_seqlens on the host) or, with values=False,
    checks its layout only and returns N."""
    _tensor(name, t)
    dims = t.dim() - trailing
    if dims not in (1, 2) or (dims == 2 and t.shape[0] != 1):
        raise ValueError(f"{name} must be [total_tokens{', D' if trailing else ''}] (or [1, total_tokens"
                         f"{', D' if trailing else ''}]) with cu_seqlens (packed sequences), got {tuple(t.shape)}")
    if not values:
        check_cu_seqlens_layout(cu_seqlens, t.device)
        return t.shape[dims - 1]
    return check_cu_seqlens(cu_seqlens, t.shape[dims - 1], t.device)


def packed_linear_grpo_loss_inputs(hidden, weight, targets, mask, advantages, bias, logp_old, logp_ref,
                                   rollout_weights, temperature, options: GRPOOptions, cu_seqlens, *,
                                   logp_sampling=None, head_dtype=None):
    """The entry rule of fused_linear_grpo_loss on packed sequences: hidden [N, D], targets / mask [N], the
    other per-token inputs [N] or [1, N], advantages and rollout_weights [B] or per token, cu_seqlens
    [B + 1]. Shapes, dtypes and devices only: nothing here reads a tensor's values, so it traces under
    torch.compile; cu_seqlens' values are checked, and the per-token inputs laid out as the padded
    [B, T] batch (packed_grpo_inputs), inside the op. Returns what linear_grpo_loss_inputs returns."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a 2-D tensor [total_tokens, D] with cu_seqlens (packed sequences), got {got}")
    if mask is None and isinstance(targets, torch.Tensor):  # no completion mask: every token counts
        mask = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
    mask, temperature = check_linear_inputs(hidden, weight, targets, bias=bias, mask=mask, temperature=temperature)
    sequences = check_cu_seqlens_layout(cu_seqlens, hidden.device)
    mask = check_grpo_inputs(targets, advantages, mask, logp_old=logp_old, logp_ref=logp_ref,
                             logp_sampling=logp_sampling, rollout_weights=rollout_weights, options=options,
                             need_logp=False, sequences=sequences)
    if head_dtype is None:
        hidden, weight, bias = head_autocast(hidden, weight, bias)
    else:
        head_dtype = check_head_dtype(head_dtype, hidden.dtype)
    return hidden, weight, bias, mask, temperature, head_dtype


def check_grpo_inputs(logp, advantages, mask, *, logp_old=None, logp_ref=None, logp_sampling=None, entropy=None,
                      rollout_weights=None, options: GRPOOptions, need_logp: bool = True,
                      sequences: Optional[int] = None):
    """Checks the per-token GRPO loss inputs; returns the mask as a bool tensor.

    logp, logp_old, logp_ref, logp_sampling, entropy: [B, T] floating; advantages: [B] (one per sequence) or [B, T]
    (one per token, e.g. process rewards) floating; mask: [B, T];
    rollout_weights: [B, T] or [B] floating. With need_logp=False (the fused linear op, where logp
    is computed inside and the entropy too), `logp` is only used for its shape.
    sequences: B of a packed batch (cu_seqlens, checked by the caller): logp is then [N], mask and
    the per-token inputs [N] or [1, N], advantages and rollout_weights [B] or per token. Shapes only:
    whether a [B] input with B = N is ambiguous depends on cu_seqlens' values (packed_grpo_inputs)."""
    if need_logp:
        _tensor("logp", logp, floating=True)
    if sequences is not None:
        return _check_packed_grpo_inputs(logp, advantages, mask, logp_old, logp_ref, logp_sampling, entropy,
                                         rollout_weights, options, need_logp, sequences)
    if len(logp.shape) != 2:
        raise ValueError(f"logp must be 2-D [B, T], got shape {tuple(logp.shape)}")
    B, T = logp.shape
    _tensor("advantages", advantages, floating=True)
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape {(B,)} (per sequence) or {(B, T)} (per token, as logp / "
                         f"targets), got {tuple(advantages.shape)}")
    _tensor("mask", mask)
    _shape("mask", mask, (B, T), "logp / targets")
    for name, t in (("logp_old", logp_old), ("logp_ref", logp_ref), ("logp_sampling", logp_sampling),
                    ("entropy", entropy)):
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
    return _check_grpo_options(logp, advantages, mask, logp_old, logp_ref, logp_sampling, entropy, rollout_weights,
                               options, need_logp, rollout_weights is not None and rollout_weights.dim() == 1,
                               (B, T), (B,))


def _check_packed_grpo_inputs(logp, advantages, mask, logp_old, logp_ref, logp_sampling, entropy, rollout_weights,
                              options, need_logp, B):
    """check_grpo_inputs on a packed batch of B sequences (see there)."""
    if logp.dim() != 1 and not (logp.dim() == 2 and logp.shape[0] == 1):
        raise ValueError(f"logp must be [total_tokens] (or [1, total_tokens]) with cu_seqlens (packed sequences), "
                         f"got shape {tuple(logp.shape)}")
    N = logp.shape[-1]

    def check(name, t, per_sequence, floating=True):
        if t is None:
            return
        _tensor(name, t, floating=floating)
        if per_sequence and tuple(t.shape) == (B,):
            return
        if tuple(t.shape) not in ((N,), (1, N)):
            expected = f"{(B,)} (per sequence) or {(N,)} (per token)" if per_sequence else f"{(N,)}"
            raise ValueError(f"{name} must have shape {expected} with packed sequences (cu_seqlens: B = {B}, "
                             f"total_tokens = {N}), got {tuple(t.shape)}")

    _tensor("advantages", advantages, floating=True)
    check("advantages", advantages, True)
    check("mask", mask, False, floating=False)
    for name, t in (("logp_old", logp_old), ("logp_ref", logp_ref), ("logp_sampling", logp_sampling),
                    ("entropy", entropy)):
        check(name, t, False)
    check("rollout_weights", rollout_weights, True)
    # B == N: a [B] rollout_weights is taken per sequence here; packed_grpo_inputs refuses it if ambiguous.
    return _check_grpo_options(logp, advantages, mask, logp_old, logp_ref, logp_sampling, entropy, rollout_weights,
                               options, need_logp, rollout_weights is not None and
                               tuple(rollout_weights.shape) == (B,) and B != N, (N,), (B,))


def _check_grpo_options(logp, advantages, mask, logp_old, logp_ref, logp_sampling, entropy, rollout_weights, options,
                        need_logp, per_sequence_weights, token_shape, sequence_shape):
    """The checks of check_grpo_inputs that do not depend on the layout; returns the mask as bool."""
    if options.loss_type == "vespo" and per_sequence_weights:
        raise ValueError(f"loss_type='vespo' takes per-token rollout_weights {token_shape} (their logs are summed "
                         f"into its sequence weight), got per-sequence ones of shape {sequence_shape}")
    if options.beta > 0 and logp_ref is None:
        raise ValueError(f"beta={options.beta} > 0 needs logp_ref (the reference model's log-probabilities)")
    if need_logp and options.entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={options.entropy_coef} needs entropy [B, T]")
    if need_logp and options.entropy_masked and entropy is None:
        raise ValueError(f"top_entropy_quantile={options.top_entropy_quantile} < 1 needs entropy [B, T]")
    n = options.num_items_in_batch
    _same_device(logp=logp if need_logp else None, advantages=advantages, mask=mask, logp_old=logp_old,
                 logp_ref=logp_ref, logp_sampling=logp_sampling, entropy=entropy, rollout_weights=rollout_weights,
                 num_items_in_batch=n if isinstance(n, torch.Tensor) and n.device.type != "cpu" else None)
    return mask if mask.dtype == torch.bool else mask != 0


def check_advantage_inputs(rewards, group_size, scale, eps, leave_one_out) -> Tuple[int, float]:
    """Checks group_advantages' inputs; returns (group_size, eps) as Python int and float."""
    _tensor("rewards", rewards, floating=True)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    group_size = _group_size(group_size, rewards.shape[0], f"the number of rewards B={rewards.shape[0]}")
    return group_size, _normalization(scale, eps, leave_one_out)


def _group_size(group_size, count: int, counted: str) -> int:
    """group_size as an int >= 2 dividing `count` (described by `counted` in the error)."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be an int, got {group_size!r}")
    group_size = int(group_size)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a baseline), got {group_size}")
    if count % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide {counted}")
    return group_size


def _normalization(scale, eps, leave_one_out) -> float:
    """Checks the group normalization's options (scale, eps, leave_one_out); returns eps as a float."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(leave_one_out, bool):
        raise TypeError(f"leave_one_out must be a bool, got {leave_one_out!r}")
    return float(eps)


def check_process_inputs(step_rewards, step_ends, step_offsets, group_size, seq_len, scale, eps, leave_one_out,
                         outcome_advantages, outcome_weight) -> Tuple[int, int, float, Optional[float]]:
    """Checks process_advantages' inputs that need no tensor value (docs/math.md section 11); returns
    (group_size, seq_len, eps, outcome_weight) as Python numbers. The values of step_ends and
    step_offsets are checked inside the op, by check_process_values."""
    _tensor("step_rewards", step_rewards, floating=True)
    if step_rewards.dim() != 1:
        raise ValueError(f"step_rewards must be 1-D [S], got shape {tuple(step_rewards.shape)}")
    for name, t in (("step_ends", step_ends), ("step_offsets", step_offsets)):
        _tensor(name, t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    _shape("step_ends", step_ends, step_rewards.shape, "step_rewards, one end per step")
    if step_offsets.shape[0] < 1:
        raise ValueError("step_offsets must have shape [B + 1] (B + 1 >= 1), got shape (0,)")
    B = step_offsets.shape[0] - 1
    group_size = _group_size(group_size, B, f"the number of sequences B={B} (step_offsets has B + 1 = {B + 1} entries)")
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 0:
        raise ValueError(f"seq_len must be an integer >= 0 (T, the completion positions), got {seq_len!r}")
    eps = _normalization(scale, eps, leave_one_out)
    if (outcome_advantages is None) != (outcome_weight is None):
        given = "outcome_advantages" if outcome_weight is None else "outcome_weight"
        missing = "outcome_weight" if outcome_weight is None else "outcome_advantages"
        raise ValueError(f"{given} was given without {missing}: the hybrid advantage (1 - w) A_process + w "
                         f"A_outcome needs both (or neither, for process advantages alone)")
    if outcome_advantages is not None:
        _tensor("outcome_advantages", outcome_advantages, floating=True)
        _shape("outcome_advantages", outcome_advantages, (B,), "one per sequence, B = len(step_offsets) - 1")
        if (isinstance(outcome_weight, bool) or not isinstance(outcome_weight, numbers.Real)
                or not 0 <= outcome_weight <= 1):
            raise ValueError(f"outcome_weight must be a number in [0, 1], got {outcome_weight!r}")
        outcome_weight = float(outcome_weight)
    _same_device(step_rewards=step_rewards, step_ends=step_ends, step_offsets=step_offsets,
                 outcome_advantages=outcome_advantages)
    return group_size, int(seq_len), float(eps), outcome_weight


# ------------------------------------------------------------------------------------------------------
# Checks on values, run inside the ops (they read tensors on the host)
# ------------------------------------------------------------------------------------------------------
def check_process_values(step_ends: torch.Tensor, step_offsets: torch.Tensor, group_size: int, seq_len: int) -> None:
    """Raises a ValueError naming the argument and the index when the packed steps of process_advantages
    are malformed (docs/math.md section 11): offsets not starting at 0, decreasing or not ending at S; a
    group without a step; a step end outside [0, seq_len); ends not strictly increasing within a sequence.
    Reads both tensors on the host (one synchronization)."""
    offsets = step_offsets.detach().to("cpu", torch.int64)
    ends = step_ends.detach().to("cpu", torch.int64)
    S, B = ends.shape[0], offsets.shape[0] - 1
    if int(offsets[0]) != 0:
        raise ValueError(f"step_offsets[0] must be 0 (the first sequence's steps start the packed arrays), "
                         f"got {int(offsets[0])}")
    counts = offsets[1:] - offsets[:-1]
    if bool((counts < 0).any()):
        b = int((counts < 0).nonzero()[0])
        raise ValueError(f"step_offsets must be non-decreasing: step_offsets[{b}] = {int(offsets[b])} > "
                         f"step_offsets[{b + 1}] = {int(offsets[b + 1])}")
    if int(offsets[B]) != S:
        raise ValueError(f"step_offsets[B] = step_offsets[{B}] must equal the number of steps S = {S} "
                         f"(len(step_rewards)), got {int(offsets[B])}")
    if B > 0:
        per_group = counts.view(-1, group_size).sum(1)
        if bool((per_group == 0).any()):
            g = int((per_group == 0).nonzero()[0])
            raise ValueError(f"group {g} (sequences {g * group_size} to {(g + 1) * group_size - 1}) has no step: "
                             f"step_offsets[{g * group_size}] = step_offsets[{(g + 1) * group_size}] = "
                             f"{int(offsets[g * group_size])}; every group needs at least one step reward")
    if S == 0:
        return
    outside = (ends < 0) | (ends >= seq_len)
    if bool(outside.any()):
        s = int(outside.nonzero()[0])
        b = int(torch.searchsorted(offsets, s, right=True)) - 1
        raise ValueError(f"step_ends must lie in [0, seq_len={seq_len}) (token indices of the completion); "
                         f"step_ends[{s}] = {int(ends[s])} (sequence {b})")
    sequence = torch.repeat_interleave(torch.arange(B), counts)
    unsorted = (sequence[1:] == sequence[:-1]) & (ends[1:] <= ends[:-1])
    if bool(unsorted.any()):
        s = int(unsorted.nonzero()[0])
        raise ValueError(f"step_ends must increase strictly within each sequence: sequence {int(sequence[s])} has "
                         f"step_ends[{s}] = {int(ends[s])} then step_ends[{s + 1}] = {int(ends[s + 1])}")


def check_target_range(targets: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor]) -> None:
    """Raises a ValueError if a target id at an unmasked position is outside [0, V).

    This costs one device synchronization; LVRPO_SKIP_TARGET_CHECK=1 turns it off for users who
    guarantee their ids (the kernels then give NaN for such a row, never a read out of bounds)."""
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


def num_items_value(num_items_in_batch, device: torch.device) -> Optional[torch.Tensor]:
    """num_items_in_batch (None, a number, or a one-element tensor) as a 0-dim float32 tensor on `device`,
    after checking that it is finite and > 0 (a tensor is read on the host for that)."""
    if num_items_in_batch is None:
        return None
    value = torch.as_tensor(num_items_in_batch, dtype=torch.float32).reshape(()).to(device)
    if isinstance(num_items_in_batch, torch.Tensor):
        number = float(num_items_in_batch.reshape(()))
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"num_items_in_batch must be finite and > 0, got tensor({number})")
    return value


def safe_targets(targets: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """targets as int64 with masked ids replaced by 0, so no kernel reads a masked id out of range."""
    targets = targets.long()
    if mask is None:
        return targets
    return torch.where(mask, targets, torch.zeros_like(targets))
