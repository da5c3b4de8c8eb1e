"""The kernel backends: where each one's primitives live, and loading them.

A kernel backend is a module exporting the primitives of :class:`lvrpo_fast.contract.Primitives`:
    triton  lvrpo_fast.backends.triton   kernels in kernels/ (CUDA; the CPU under TRITON_INTERPRET=1)
    cpp     lvrpo_fast.backends.cpp      sources in csrc/, compiled on first use (CPU)
They are imported by name, on first use, because each may be unavailable on a given machine (no
triton, no compiler): importing lvrpo_fast never needs either. This module imports nothing of the
package, so the fused ops (lvrpo_fast/fused/) and the dispatch can both depend on it.
"""
from __future__ import annotations

import importlib
from typing import Tuple

import torch

MODULES = {
    "triton": "lvrpo_fast.backends.triton",
    "cpp": "lvrpo_fast.backends.cpp",
}


def load(name: str):
    """(primitives module or None, the reason it cannot be imported)."""
    if name not in MODULES:
        return None, f"unknown kernel backend {name!r}; known: {sorted(MODULES)}"
    try:
        return importlib.import_module(MODULES[name]), ""
    except Exception as exc:  # a missing triton or a broken build must not break the package
        return None, f"{type(exc).__name__}: {exc}"


def usable(name: str, device: torch.device, dtype: torch.dtype) -> Tuple[object, str]:
    """(primitives module, "") when backend `name` runs `dtype` tensors on `device`, else (None, why)."""
    module, why = load(name)
    if module is None:
        return None, why
    ok, why = module.available(device, dtype)
    return (module if ok else None), why


def primitives(name: str):
    """The primitives module of a backend already chosen by the dispatch; raises if it cannot load."""
    module, why = load(name)
    if module is None:
        raise RuntimeError(f"the {name} backend cannot be loaded: {why}")
    return module
