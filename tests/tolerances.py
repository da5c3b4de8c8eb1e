"""The one table of error bounds, and the three-number check every kernel test uses.

A kernel result at working precision is compared with the float64 ground truth, and so is the
reference at the same working precision. The kernel passes when its error is at most
REF_FACTOR times the reference's own error plus the dtype's absolute/relative tolerance:

    |kernel - truth| <= REF_FACTOR * max|reference - truth| + atol + rtol * |truth|

so a kernel may be as good as the eager reference, or a little worse, but never arbitrarily so.
"""
import torch

REF_FACTOR = 2.0

# dtype of the inputs -> (atol, rtol) on outputs that are O(1) (log-probs, entropy, losses, gradients)
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close_to_truth(kernel, reference, truth, dtype, name=""):
    """kernel, reference: results at working precision; truth: float64 result on the same inputs."""
    atol, rtol = TOLERANCES[dtype]
    truth = truth.detach().double()
    kernel_err = (kernel.detach().double() - truth).abs()
    ref_err = (reference.detach().double() - truth).abs().max() if reference is not None else torch.tensor(0.0)
    bound = REF_FACTOR * ref_err + atol + rtol * truth.abs()
    if not torch.isfinite(kernel.detach().double()).all():
        raise AssertionError(f"{name}: kernel output has non-finite values")
    excess = kernel_err - bound
    if (excess > 0).any():
        i = int(excess.reshape(-1).argmax())
        raise AssertionError(
            f"{name}: kernel error {kernel_err.reshape(-1)[i].item():.3e} at flat index {i} exceeds bound "
            f"{bound.reshape(-1)[i].item():.3e} (reference error {float(ref_err):.3e}, dtype {dtype}, "
            f"truth {truth.reshape(-1)[i].item():.6g}, kernel {kernel.detach().double().reshape(-1)[i].item():.6g})"
        )
