"""The one place that chooses a backend (docs/math.md section 9).

Backends:
    "triton"    fused Triton kernels (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1, for tests)
    "cpp"       the C++ CPU extension built from csrc/ (CPU tensors)
    "reference" the eager PyTorch reference (any device, any float dtype)
    "auto"      the default: Triton for CUDA tensors, C++ for CPU tensors when it builds, else the
                reference; float64 inputs always go to the reference (the kernels accumulate in fp32,
                so float64 is kept exact where users ask for it).
The choice comes from the `backend=` keyword of every public function, else the environment
variable LVRPO_BACKEND, else "auto". Asking for a backend that cannot run raises a RuntimeError
saying why; "auto" falls back with a one-time warning naming the reason.

The choice depends only on constants of a call (the keyword, the environment, the device and the
dtype), so under torch.compile it is made once at trace time (assume_constant_result) and the
compiled graph holds the chosen op.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from . import backends, reference
from .contract import BACKENDS
from .fused import KERNEL_BACKENDS

_warned = set()


def requested(backend: Optional[str] = None) -> str:
    """The backend name asked for: the keyword, else LVRPO_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get("LVRPO_BACKEND", "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else "LVRPO_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def usable(name: str, device: torch.device, dtype: torch.dtype):
    """(backend module, "") when `name` runs `dtype` tensors on `device`, else (None, the reason)."""
    if name == "reference":
        return reference, ""
    return backends.usable(name, device, dtype)


def resolve(backend: Optional[str], device: str, dtype: torch.dtype) -> str:
    """The name of the backend that runs a call: see the module docstring."""
    device = torch.device(device)
    name = requested(backend)
    if name != "auto":
        module, why = usable(name, device, dtype)
        if module is None:
            raise RuntimeError(f"backend {name!r} cannot run on {device} with {dtype}: {why}")
        return name
    if dtype == torch.float64:
        return "reference"
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
    if preferred is not None:
        module, why = usable(preferred, device, dtype)
        if module is not None:
            return preferred
        key = (preferred, why)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"lvrpo_fast: the {preferred} backend is unavailable ({why}); "
                          f"using the eager reference, which builds the full logits", RuntimeWarning,
                          stacklevel=4)
    return "reference"


# What torch.compiler.assume_constant_result(resolve) does, without calling it: that function imports
# torch._dynamo, and with it triton, at decoration time, i.e. on every `import lvrpo_fast` (a second
# of import time, and triton loaded before a test harness can choose its interpreter). Dynamo reads
# this attribute when it meets the function; tests/test_compile.py fails if that ever stops working.
resolve._dynamo_marked_constant = True


def select(backend: Optional[str], device: torch.device, dtype: torch.dtype):
    """The backend object for tensors on `device` with floating dtype `dtype`: the reference module, or
    a lvrpo_fast.fused.KernelBackend. Each has logprobs_impl, advantages_impl, grpo_loss_impl,
    linear_grpo_loss_impl and process_advantages_impl taking validated inputs (see lvrpo_fast.reference
    for their contracts)."""
    name = resolve(backend, str(device), dtype)
    return reference if name == "reference" else KERNEL_BACKENDS[name]
