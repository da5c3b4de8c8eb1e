"""Group-relative advantages from rewards (docs/math.md section 2): rewards [B] float32 -> advantages [B] float32.

One variant: scale="group" (each reward minus its group's mean, over the group's std + eps), the TRL
and verl default. A memory-bound op: min_bytes = 8 B (read the rewards, write the advantages), and
extra_info records the GB/s achieved; at these sizes the time is mostly launch and dispatch overhead.
Implementations: the eager reference, torch.compile of lvrpo_fast.reference.advantages_impl, the
Triton and C++ backends. The peers have no separate advantage op (TRL and verl use eager PyTorch, which
is what the reference is).
"""
import pytest
import torch

import lvrpo_fast
from lvrpo_fast import reference, validate

import harness

IMPLS = ("reference", "compiled", "triton", "cpp")


def make_set(shape, device):
    # Rewards in [0, 1] with a continuous part, so that no group is all equal by chance.
    return {"rewards": torch.rand(shape.N, device=device)}


def advantages_fn(impl, group_size):
    if impl == "compiled":
        impl_fn = harness.compiled(reference.advantages_impl)

        def fn(rewards):
            validate.check_advantage_inputs(rewards, group_size, "group", 1e-4, False)
            return impl_fn(rewards, group_size, "group", 1e-4, False)
        return fn
    return lambda rewards: lvrpo_fast.group_advantages(rewards, group_size, backend=impl)


@pytest.mark.bench_op("advantages", impls=IMPLS)
def test_advantages(bench, shape, impl):
    if impl in ("triton", "cpp"):
        harness.lvrpo_backend(impl, torch.float32)
    fn = advantages_fn(impl, shape.G)
    reference_fn = advantages_fn("reference", shape.G)
    bench.run(
        case=f"advantages G={shape.G}", op="advantages", impl=impl, shape=shape, dtype=torch.float32,
        make_set=lambda: make_set(shape, bench.device),
        call=lambda s: {"advantages": fn(s["rewards"])},
        reference_call=lambda s: {"advantages": reference_fn(s["rewards"])},
        checked=("advantages",), min_bytes=8 * shape.N)
