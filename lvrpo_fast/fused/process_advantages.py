"""Process-reward advantages on the kernel backends, as the custom op ``lvrpo_fast::process_advantages``
(no gradient: advantages are constants of the loss). The packed steps are validated inside the op,
where it reads them on the host (lvrpo_fast.validate.check_process_values), never in traced code."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends, validate
from . import library


@dataclass(frozen=True)
class ProcessAdvantagesParams:
    """The non-tensor inputs of the process advantage op (docs/math.md section 11). outcome_weight is
    read only when outcome advantages are given."""

    backend: str
    group_size: int
    seq_len: int
    scale: str
    eps: float
    leave_one_out: bool
    outcome_weight: float


_CODEC = library.ParamsCodec(ProcessAdvantagesParams)


def _op(step_rewards, step_ends, step_offsets, outcome_advantages, **scalars):
    p = _CODEC.decode(scalars)
    validate.check_process_values(step_ends, step_offsets, p.group_size, p.seq_len)
    outcome = None if outcome_advantages is None else outcome_advantages.float().contiguous()
    return backends.primitives(p.backend).process_advantages(
        step_rewards.float().contiguous(), step_ends.to(torch.int64).contiguous(),
        step_offsets.to(torch.int64).contiguous(), p.group_size, p.seq_len, p.scale, p.eps, p.leave_one_out,
        outcome, p.outcome_weight)


def _fake(step_rewards, step_ends, step_offsets, outcome_advantages, **scalars):
    return step_rewards.new_empty((step_offsets.shape[0] - 1, scalars["seq_len"]), dtype=torch.float32)


library.define("process_advantages", "Tensor step_rewards, Tensor step_ends, Tensor step_offsets, "
               "Tensor? outcome_advantages", _CODEC, "Tensor", _op, _fake)


def process_advantages_with(backend: str, step_rewards, step_ends, step_offsets, group_size: int, seq_len: int,
                            scale: str, eps: float, leave_one_out: bool, outcome_advantages, outcome_weight):
    """Backend entry (statically validated inputs): packed steps -> advantages [B, seq_len] float32."""
    scalars, _ = _CODEC.encode(ProcessAdvantagesParams(
        backend=backend, group_size=group_size, seq_len=seq_len, scale=scale, eps=eps, leave_one_out=leave_one_out,
        outcome_weight=0.0 if outcome_weight is None else outcome_weight))
    return library.op("process_advantages")(step_rewards, step_ends, step_offsets, outcome_advantages, **scalars)
