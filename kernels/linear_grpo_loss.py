"""The one kernel of the fused linear GRPO loss's backward pass: scaling its stored gradients.

fused_linear_grpo_loss forms d(loss)/d(hidden, weight, bias) in its forward pass; the backward pass
only multiplies them by the incoming gradient of the scalar loss. That factor is almost always exactly
1 (``loss.backward()``), and then the multiplication is a wasted pass over the [V, D] weight gradient
(1.2 GB read and written in bf16 at V = 151,936, D = 4,096). Checking the factor on the host would
synchronize with the GPU, so each program of this kernel loads the factor itself and returns at once
when it is 1: no host sync, and no traffic beyond one scalar load per program.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import autotune


@triton.jit
def _scale_kernel(x_ptr, factor_ptr, n, BLOCK: tl.constexpr):
    factor = tl.load(factor_ptr)
    if factor != 1.0:  # also true for a NaN factor, which must reach the gradient
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        x = tl.load(x_ptr + offs, mask=valid)
        tl.store(x_ptr + offs, (x.to(tl.float32) * factor).to(x_ptr.dtype.element_ty), mask=valid)


def scale_(tensors: Sequence[torch.Tensor], factor: torch.Tensor) -> None:
    """Multiplies each contiguous tensor in place by the 0-dim `factor` (cast to float32), skipping all
    memory traffic when the factor is exactly 1."""
    config = autotune.scale_config()
    for t in tensors:
        if t.numel() == 0:
            continue
        if not t.is_contiguous():
            raise ValueError(f"scale_ needs contiguous tensors, got strides {t.stride()}")
        f = factor.reshape(1).to(device=t.device, dtype=torch.float32)
        with autotune.on_device(t):
            _scale_kernel[(triton.cdiv(t.numel(), config.block_v),)](
                t, f, t.numel(), BLOCK=config.block_v, num_warps=config.num_warps)
