"""--check-every: the fused GRPO loss and its gradients on the live batch against lvrpo_fast.reference,
judged by the test suite's own rule (lvrpo_fast.testing: the float64 truth, the reference's error at
the working precision, the tolerance table), so the trainer's check cannot drift from the tests."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

import lvrpo_fast
from .. import reference, testing
from .report import CHECKED


class FusedCheckError(RuntimeError):
    """--check-every found the fused loss or a gradient past the tolerance; the message is the report."""


def check_fused(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                mask: torch.Tensor, advantages: torch.Tensor, logp_old: torch.Tensor, logp_ref: Optional[torch.Tensor],
                *, dtype: torch.dtype, backend: str, loss_kwargs: Dict, backend_name: str,
                step: int, batch_invariant: bool = False) -> Dict[str, float]:
    """Compares the fused loss and its gradients (hidden [B, T, D], weight [V, D], bias [V]) with the
    reference at `dtype` and in float64, on detached copies (the step's own graph is untouched).

    Returns the row's check_* metrics; raises FusedCheckError with the report when any of them is past
    the bound (backend_name, the backend `backend` chose, and `step` are named in it)."""

    def run(fn, run_dtype, **extra):
        leaves = {"grad_hidden": hidden, "grad_weight": weight, "grad_bias": bias}
        leaves = {k: v.detach().to(run_dtype).requires_grad_() for k, v in leaves.items() if v is not None}
        # The float64 truth also takes the per-token float32 inputs in float64.
        side = {"advantages": advantages, "logp_old": logp_old, "logp_ref": logp_ref}
        side = {k: None if v is None else v.detach().to(torch.float64 if run_dtype == torch.float64 else v.dtype)
                for k, v in side.items()}
        loss, _ = fn(leaves["grad_hidden"], leaves["grad_weight"], targets, mask, side.pop("advantages"),
                     bias=leaves.get("grad_bias"), **side, **loss_kwargs, **extra)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return {"loss": loss.detach(), **dict(zip(leaves, grads))}

    fused = run(lvrpo_fast.fused_linear_grpo_loss, dtype, backend=backend, batch_invariant=batch_invariant)
    ref = run(reference.fused_linear_grpo_loss, dtype)
    truth = run(reference.fused_linear_grpo_loss, torch.float64)
    outcomes = {o.name: o for o in testing.compare_results(fused, ref, truth, dtype)}
    ordered: List[testing.Closeness] = [outcomes[n] for n in CHECKED if n in outcomes]
    out = {}
    for o in ordered:
        out[f"check_{o.name}_max_diff"] = o.max_diff_reference
        out[f"check_{o.name}_max_error"] = o.max_error
        out[f"check_{o.name}_reference_error"] = o.reference_error
    if testing.failures(ordered):
        atol, rtol = testing.tolerance(dtype)
        raise FusedCheckError(
            f"--check-every: the fused loss (backend {backend_name}, {str(dtype).replace('torch.', '')}) left the "
            f"tolerance at step {step} (bound {testing.REF_FACTOR} x reference error + {atol:g} + {rtol:g} x "
            f"|float64|, lvrpo_fast.testing), "
            f"shapes hidden {tuple(hidden.shape)} weight {tuple(weight.shape)}:\n"
            + "\n".join(f"  {o}" for o in ordered))
    return out
