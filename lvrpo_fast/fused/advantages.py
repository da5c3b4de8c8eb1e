"""Group advantages on the kernel backends, as the custom op ``lvrpo_fast::group_advantages`` (no
gradient: advantages are constants of the loss)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends
from . import library


@dataclass(frozen=True)
class AdvantagesParams:
    """The non-tensor inputs of the group advantage op (docs/math.md section 2)."""

    backend: str
    group_size: int
    scale: str
    eps: float
    leave_one_out: bool


_CODEC = library.ParamsCodec(AdvantagesParams)


def _op(rewards, **scalars):
    p = _CODEC.decode(scalars)
    return backends.primitives(p.backend).group_advantages(rewards.float().contiguous(), p.group_size, p.scale,
                                                           p.eps, p.leave_one_out)


def _fake(rewards, **scalars):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


library.define("group_advantages", "Tensor rewards", _CODEC, "Tensor", _op, _fake)


def group_advantages_with(backend: str, rewards, group_size: int, scale: str, eps: float, leave_one_out: bool):
    """Backend entry (validated inputs): rewards [B] -> advantages [B] float32."""
    scalars, _ = _CODEC.encode(AdvantagesParams(backend=backend, group_size=group_size, scale=scale, eps=eps,
                                                leave_one_out=leave_one_out))
    return library.op("group_advantages")(rewards, **scalars)
