"""The one check of a loss run against the reference, shared by the loss tests (tests/test_grpo_loss.py,
tests/test_linear_grpo_loss.py): every number by lvrpo_fast.testing's three-number rule, plus the
contract's structure (dtypes, 0-dim detached metrics, the same metric names, no gradient where the
truth has none, exactly zero gradient at masked positions).

A run is (loss, metrics, {input name: gradient or None}), as the tests' run_* helpers return it, with the
per-sequence statistics [B, NSTATS] as a fourth element when the helper was asked for them.
"""
from typing import Dict, Optional

import torch

from lvrpo_fast.testing import compare_results, failures


def check_loss_run(label: str, kernel, reference, truth, dtype: torch.dtype, *,
                   metric_dtype: Optional[torch.dtype] = None,
                   zero_at: Optional[Dict[str, torch.Tensor]] = None,
                   tolerance_dtype: Optional[torch.dtype] = None) -> None:
    """kernel, reference: runs at working precision `dtype`; truth: the float64 reference's run (or one
    that rounds as the kernel does, see tolerance_dtype).

    metric_dtype: the precision the metrics and per-sequence statistics are judged at (default: the
    tolerance dtype). zero_at: {gradient name: boolean mask} of positions whose gradient must be exactly
    0 (masked tokens). tolerance_dtype: the precision every number is judged at when narrower than
    dtype (a head formed in bfloat16 from float32 inputs); gradients still have dtype."""
    loss, metrics, grads = kernel[:3]
    assert loss.dim() == 0 and loss.dtype == torch.float32, f"{label}: loss {loss.dtype} {tuple(loss.shape)}"
    assert set(metrics) == set(truth[1]), f"{label}: metric names {sorted(metrics)} != {sorted(truth[1])}"
    for key, value in metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, f"{label}: {key}"
    for key, grad in grads.items():
        if truth[2].get(key) is None:
            assert grad is None or not grad.any(), f"{label}: unexpected gradient w.r.t. {key}"
        else:
            assert grad is not None and grad.dtype == dtype, f"{label}: gradient w.r.t. {key}"

    has_stats = len(kernel) == 4
    if has_stats:
        assert kernel[3].shape == truth[3].shape and kernel[3].dtype == torch.float32, f"{label}: per-sequence stats"

    def as_results(run):
        out = {"loss": run[0], "metrics": run[1],
               "grads": {k: g for k, g in run[2].items() if truth[2].get(k) is not None}}
        if has_stats:
            out["stats"] = run[3]
        return out

    judged = dtype if tolerance_dtype is None else tolerance_dtype
    dtypes = None
    if metric_dtype is not None:
        dtypes = {f"metrics.{k}": metric_dtype for k in metrics}
        if has_stats:
            dtypes["stats"] = metric_dtype
    outcomes = compare_results({k: _cpu(v) for k, v in as_results(kernel).items()}, as_results(reference),
                               as_results(truth), judged, dtypes=dtypes)
    bad = failures(outcomes)
    assert not bad, f"{label}:\n" + "\n".join(str(o) for o in bad)
    for key, where in (zero_at or {}).items():
        grad = grads.get(key)
        if grad is not None:
            assert not grad[where.to(grad.device)].any(), f"{label}: gradient w.r.t. {key} at masked positions"


def _cpu(value):
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return None if value is None else value.detach().cpu()
