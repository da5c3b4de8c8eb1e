"""When a result is close enough: the one rule shared by the tests, the benchmarks' check and the
trainer's ``--check-every`` (as ``torch.testing`` is shared by PyTorch's own tests).

Three numbers per check. A result at working precision (a kernel's) is compared with the float64
ground truth, and so is the eager reference at the same working precision. The result passes when

    |result - truth| <= REF_FACTOR * max|reference - truth| + atol + rtol * |truth|

elementwise, with (atol, rtol) from TOLERANCES for the dtype of the inputs: a kernel may be as good
as the eager reference, or a little worse, never arbitrarily so. A non-finite result where the truth
is finite fails; a non-finite truth must be matched exactly (NaN where NaN, the same infinity).

This module imports nothing of the package: it is a leaf that any layer may use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional

import torch

REF_FACTOR = 2.0

# dtype of the inputs -> (atol, rtol) on outputs that are O(1) (log-probs, entropy, losses, gradients).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@dataclass(frozen=True)
class Closeness:
    """The outcome of one three-number comparison (see the module docstring)."""

    name: str
    ok: bool
    max_error: float          # max |result - truth| over the finite entries
    reference_error: float    # max |reference - truth|, the reference's own error at working precision
    max_diff_reference: float  # max |result - reference|
    worst_index: int          # flat index of the largest excess over the bound
    worst_result: float
    worst_truth: float
    worst_bound: float
    reason: str = ""          # why it failed, when not simply past the bound

    def __str__(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        text = (f"{self.name:12s} {status} max|result - reference| {self.max_diff_reference:.3e}  "
                f"max|result - float64| {self.max_error:.3e} (reference's own {self.reference_error:.3e})")
        if not self.ok:
            text += (f"  worst at flat index {self.worst_index}: result {self.worst_result:.6g}, "
                     f"float64 {self.worst_truth:.6g}, bound {self.worst_bound:.3e}")
            if self.reason:
                text += f" ({self.reason})"
        return text


def tolerance(dtype: torch.dtype):
    """(atol, rtol) for results computed from inputs of `dtype` (float64 gets float32's)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def closeness(result: torch.Tensor, reference: Optional[torch.Tensor], truth: torch.Tensor, dtype: torch.dtype,
              name: str = "") -> Closeness:
    """Compares `result` with the float64 `truth`, allowing REF_FACTOR times `reference`'s own error.

    result, reference, truth: tensors of one shape (any dtype, any device); reference may be None
    (then only the dtype's tolerance applies). dtype: the working precision of the inputs."""
    atol, rtol = tolerance(dtype)
    r = result.detach().double().cpu()
    t = truth.detach().double().cpu()
    if r.shape != t.shape:
        return Closeness(name, False, float("inf"), float("nan"), float("nan"), 0, float("nan"), float("nan"),
                         float("nan"), f"shape {tuple(r.shape)} != float64 shape {tuple(t.shape)}")
    ref = None if reference is None else reference.detach().double().cpu()
    finite = torch.isfinite(t)
    ref_err = 0.0
    if ref is not None and bool(finite.any()):
        ref_err = float((ref - t).abs()[finite].max())
    err = torch.where(finite, (r - t).abs(), torch.zeros_like(t))
    bound = REF_FACTOR * ref_err + atol + rtol * torch.where(finite, t.abs(), torch.zeros_like(t))
    excess = err - bound
    # Non-finite values: where the truth is finite the result must be too; where it is not, the result
    # must be the same non-finite value (NaN matches NaN).
    same_nonfinite = (r == t) | (torch.isnan(r) & torch.isnan(t))
    wrong = torch.where(finite, ~torch.isfinite(r) | (excess > 0), ~same_nonfinite)
    diff_ref = float("nan") if ref is None or r.numel() == 0 else float((r - ref).abs().nan_to_num(nan=0.0).max())
    if r.numel() == 0:
        return Closeness(name, True, 0.0, ref_err, 0.0, 0, 0.0, 0.0, 0.0)
    ok = not bool(wrong.any())
    key = torch.where(wrong, torch.full_like(excess, float("inf")), excess.nan_to_num(nan=-float("inf")))
    i = int(key.reshape(-1).argmax())
    reason = ""
    if not ok and not bool(torch.isfinite(r).reshape(-1)[i]):
        reason = "non-finite result" if bool(finite.reshape(-1)[i]) else "non-finite truth not matched"
    return Closeness(name, ok, float(err.max()), ref_err, diff_ref, i, float(r.reshape(-1)[i]),
                     float(t.reshape(-1)[i]), float(bound.reshape(-1)[i]), reason)


def assert_close_to_truth(result: torch.Tensor, reference: Optional[torch.Tensor], truth: torch.Tensor,
                          dtype: torch.dtype, name: str = "") -> Closeness:
    """:func:`closeness`, raising an AssertionError that says where and by how much when it fails."""
    outcome = closeness(result, reference, truth, dtype, name)
    if not outcome.ok:
        raise AssertionError(f"{outcome} (REF_FACTOR {REF_FACTOR}, dtype {dtype})")
    return outcome


def flatten(results: Mapping, prefix: str = "") -> Dict[str, Optional[torch.Tensor]]:
    """A nested mapping of tensors ({"loss": t, "metrics": {...}, "grads": {...}}) as {"metrics.kl": t, ...}."""
    flat: Dict[str, Optional[torch.Tensor]] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def compare_results(result: Mapping, reference: Mapping, truth: Mapping, dtype: torch.dtype,
                    dtypes: Optional[Mapping[str, torch.dtype]] = None) -> List[Closeness]:
    """Every entry of `truth` (nested mappings of tensors, e.g. loss, metrics and gradients) checked with
    :func:`closeness`. An entry that is None in the truth must be None (or absent) in the result too;
    a name present in one of result / truth and not the other fails. dtypes may give another working
    precision for some flattened names (e.g. float32 metrics of half-precision inputs)."""
    flat_result, flat_ref, flat_truth = flatten(result), flatten(reference), flatten(truth)
    outcomes = []
    for name in sorted(set(flat_truth) | set(flat_result)):
        want, got = flat_truth.get(name), flat_result.get(name)
        if want is None or got is None:
            ok = want is None and got is None
            outcomes.append(Closeness(name, ok, 0.0, 0.0, 0.0, 0, float("nan"), float("nan"), 0.0,
                                      "" if ok else ("missing from the result" if got is None
                                                     else "not in the float64 truth")))
            continue
        outcomes.append(closeness(got, flat_ref.get(name), want, (dtypes or {}).get(name, dtype), name))
    return outcomes


def failures(outcomes: Iterable[Closeness]) -> List[Closeness]:
    return [o for o in outcomes if not o.ok]


__all__ = ["REF_FACTOR", "TOLERANCES", "Closeness", "tolerance", "closeness", "assert_close_to_truth", "flatten",
           "compare_results", "failures"]
