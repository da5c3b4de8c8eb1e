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

Batch-invariant mode (the log-prob ops; lvrpo_fast/chunking.py, "Batch-invariant mode"): the keyword
`batch_invariant=` of those ops, else the environment variable LVRPO_BATCH_INVARIANT (1 / 0, true /
false, yes / no, on / off), else off. It selects the kernel backends' invariant variant; the reference
is exempt (its eager head runs all rows in one call whose shape follows the batch).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import torch

from . import backends, reference
from .contract import BACKENDS
from .fused import INVARIANT_KERNEL_BACKENDS, KERNEL_BACKENDS

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


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def batch_invariant(value: Optional[bool] = None) -> bool:
    """Whether a log-prob op runs in batch-invariant mode: the keyword `value` (a bool, or None), else
    LVRPO_BATCH_INVARIANT, else False. Raises naming the keyword or the variable for anything else."""
    if value is not None:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"batch_invariant must be a bool or None, got {value!r}")
        return bool(value)
    text = os.environ.get("LVRPO_BATCH_INVARIANT", "").strip().lower()
    if text not in _TRUE + _FALSE:
        raise ValueError(f"LVRPO_BATCH_INVARIANT must be one of {_TRUE + _FALSE[:-1]} (or unset), "
                         f"got {os.environ['LVRPO_BATCH_INVARIANT']!r}")
    return text in _TRUE


batch_invariant._dynamo_marked_constant = True  # a constant of the call, as resolve (above)


def select(backend: Optional[str], device: torch.device, dtype: torch.dtype, invariant: bool = False):
    """The backend object for tensors on `device` with floating dtype `dtype`: the reference module, or
    a lvrpo_fast.fused.KernelBackend (its batch-invariant variant when `invariant`, the value of
    :func:`batch_invariant`). Each has logprobs_impl, advantages_impl, grpo_loss_impl,
    linear_grpo_loss_impl and process_advantages_impl taking validated inputs (see lvrpo_fast.reference
    for their contracts)."""
    name = resolve(backend, str(device), dtype)
    if name == "reference":
        return reference
    return (INVARIANT_KERNEL_BACKENDS if invariant else KERNEL_BACKENDS)[name]
