"""Which kernel backends the tests exercise, and on which device.

Kept out of conftest.py: `pytest tests benchmarks` imports both directories' conftest.py as the
top-level module `conftest`, so `from conftest import ...` would pick up whichever came last.
"""
import torch

KERNEL_BACKENDS = ("triton", "cpp")


def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
