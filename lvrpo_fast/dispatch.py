"""The one place that chooses a backend (../shared/SPEC.md section 9).

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
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")
_MODULES = {
    "triton": "lvrpo_fast.backends.triton",
    "cpp": "lvrpo_fast.backends.cpp",
    "reference": "lvrpo_fast.reference",
}
_warned = set()


def requested(backend: Optional[str] = None) -> str:
    """The backend name asked for: the keyword, else LVRPO_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get("LVRPO_BACKEND", "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else "LVRPO_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def _load(name: str):
    """Imports a backend module; returns (module or None, reason it cannot load)."""
    try:
        return importlib.import_module(_MODULES[name]), ""
    except Exception as exc:  # a missing triton or a broken build must not break the package
        return None, f"{type(exc).__name__}: {exc}"


def _usable(name: str, device: torch.device, dtype: torch.dtype):
    module, why = _load(name)
    if module is None:
        return None, why
    ok, why = module.available(device, dtype)
    return (module if ok else None), why


def select(backend: Optional[str], device: torch.device, dtype: torch.dtype):
    """Returns the backend object for tensors on `device` with floating dtype `dtype`.

    A backend object has logprobs_impl, advantages_impl, grpo_loss_impl and linear_grpo_loss_impl
    taking validated inputs (see lvrpo_fast.reference for their contracts)."""
    name = requested(backend)
    if name != "auto":
        module, why = _usable(name, device, dtype)
        if module is None:
            raise RuntimeError(f"backend {name!r} cannot run on {device} with {dtype}: {why}")
        return _backend_object(module)
    if dtype == torch.float64:
        return _backend_object(_load("reference")[0])
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
    if preferred is not None:
        module, why = _usable(preferred, device, dtype)
        if module is not None:
            return _backend_object(module)
        key = (preferred, why)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"lvrpo_fast: the {preferred} backend is unavailable ({why}); "
                          f"using the eager reference, which builds the full logits", RuntimeWarning,
                          stacklevel=3)
    return _backend_object(_load("reference")[0])


def _backend_object(module):
    # The reference module implements the *_impl functions itself; the kernel backends export
    # primitives, wrapped once in a KernelBackend that drives the shared autograd Functions.
    if hasattr(module, "logprobs_impl"):
        return module
    from .backends import KernelBackend

    return KernelBackend.for_primitives(module)
