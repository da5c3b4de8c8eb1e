"""Drop-in use of lvrpo_fast from other GRPO codebases, one small module per codebase.

    liger  lvrpo_fast.modules.FusedLinearGRPOLoss       LigerFusedLinearGRPOLoss's interface
    trl    lvrpo_fast.integrations.trl.LVRPOGRPOTrainer  trl.GRPOTrainer with lvrpo_fast's loss
    verl   lvrpo_fast.integrations.verl                  the switch verl's workers import (external_lib):
                                                         policy losses, ppo_loss's helpers, the LM head
    hf     lvrpo_fast.integrations.hf                    a transformers model's LM-head inputs

Each module imports its codebase only when loaded, so ``import lvrpo_fast`` never needs TRL or verl.
:func:`load` imports one by name and says what to install when its codebase is missing. The one-line
switch for each, and what it does not support, is in README.md, section "Drop-in use".
"""
from __future__ import annotations

import importlib

INTEGRATIONS = {
    "liger": ("lvrpo_fast.modules", "liger-kernel (only for the parity tests)"),
    "trl": ("lvrpo_fast.integrations.trl", "trl>=1.16"),
    "verl": ("lvrpo_fast.integrations.verl",
             "verl (pip install --no-deps verl==0.9.1; pip install 'lvrpo-fast[verl]')"),
    "hf": ("lvrpo_fast.integrations.hf", "transformers"),
}


def load(name: str):
    """The integration module for `name` (one of INTEGRATIONS)."""
    if name not in INTEGRATIONS:
        raise ValueError(f"unknown integration {name!r}; known: {sorted(INTEGRATIONS)}")
    module, requirement = INTEGRATIONS[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"the {name} integration needs {requirement}: {exc}") from exc


__all__ = ["INTEGRATIONS", "load"]
