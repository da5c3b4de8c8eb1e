"""Test configuration: the Triton interpreter on machines without a GPU, fresh seeds per test."""
import os
import shutil
import zlib

# The interpreter must be chosen before triton is imported anywhere. On a machine with an NVIDIA
# driver the kernels compile for the GPU instead; LVRPO_TEST_INTERPRET=1 forces the interpreter.
if shutil.which("nvidia-smi") is None or os.environ.get("LVRPO_TEST_INTERPRET") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from backends_under_test import KERNEL_BACKENDS, device  # noqa: E402
from lvrpo_fast import dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but reproducible seed per test: fresh random inputs, never the same draw twice.
    seed = zlib.crc32(request.node.nodeid.encode())  # hash() of a str is salted per process
    torch.manual_seed(seed)
    yield


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """Each kernel backend that can run here; one that cannot is skipped with its reason shown."""
    name = request.param
    dev = torch.device("cpu") if name == "cpp" else device()
    module, why = dispatch.usable(name, dev, torch.float32)
    if module is None:
        pytest.skip(f"{name} backend unavailable on {dev}: {why}")
    return name, dev
