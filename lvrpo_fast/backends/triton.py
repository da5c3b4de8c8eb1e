"""The Triton backend: the primitives of lvrpo_fast.contract, launched from lvrpo_fast.kernels.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the CPU test suite
exercises the real kernel code). float64 is not a kernel dtype: "auto" sends it to the reference.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..kernels.advantages import group_advantages  # noqa: F401  (primitive)
from ..kernels.autotune import interpreted
from ..kernels.grpo_loss import grpo_token_loss  # noqa: F401  (primitive)
from ..kernels.linear_grpo_loss import scale_  # noqa: F401  (primitive)
from ..kernels.logprobs import logits_grad_, logits_stats  # noqa: F401  (primitives)
from ..kernels.process_advantages import process_advantages  # noqa: F401  (primitive)

name = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available(device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
    if dtype not in DTYPES:
        return False, f"the Triton kernels take {', '.join(map(str, DTYPES))}, not {dtype}"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpreted():
        return True, ""
    return False, f"Triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got {device}"
