"""The GRPO loss on given per-token log-probabilities, forward plus backward.

logp [B, T] float32 (requires grad), logp_old and logp_ref near it (ratios and KL of a realistic
step), advantages [B], a completion mask with a random length per sequence (padding at the end).
Options: loss_type="dapo", beta=0.04 (k3 KL), epsilon 0.2: TRL's defaults with a KL term.
A memory-bound op: min_bytes = 17 B a token (read logp, logp_old, logp_ref and the 1-byte mask, write
grad_logp); extra_info records the GB/s achieved.
Implementations: the eager reference, torch.compile of lvrpo_fast.reference.grpo_loss_impl, the Triton
and C++ backends. No peer takes log-probabilities: Liger's GRPO losses start from hidden states
(test_bench_linear_grpo_loss.py) or from the full logits.
"""
import pytest
import torch

import lvrpo_fast
from lvrpo_fast import reference, validate
from lvrpo_fast.options import GRPOOptions

import harness

IMPLS = ("reference", "compiled", "triton", "cpp")
OPTIONS = {"loss_type": "dapo", "beta": 0.04, "epsilon_low": 0.2}


def completion_mask(B, T, device):
    """[B, T] bool: each sequence keeps a random length in [T/2, T], the rest is padding."""
    lengths = torch.randint(T // 2 + 1, T + 1, (B, 1), device=device)
    return torch.arange(T, device=device).unsqueeze(0) < lengths


def make_set(shape, device):
    B, T = shape.B, shape.T
    logp = -torch.rand(B, T, device=device) * 6.0
    return {
        "logp": logp,
        "logp_old": logp + 0.1 * torch.randn(B, T, device=device),
        "logp_ref": logp + 0.2 * torch.randn(B, T, device=device),
        "advantages": torch.randn(B, device=device),
        "mask": completion_mask(B, T, device),
    }


def loss_fn(impl):
    if impl == "compiled":
        impl_fn = harness.compiled(reference.grpo_loss_impl)
        opts = GRPOOptions(**OPTIONS)

        def fn(logp, advantages, mask, logp_old, logp_ref):
            mask = validate.check_grpo_inputs(logp, advantages, mask, logp_old=logp_old, logp_ref=logp_ref,
                                              options=opts)
            return impl_fn(logp, advantages, mask, logp_old, logp_ref, None, None, opts)
        return fn

    def fn(logp, advantages, mask, logp_old, logp_ref):
        return lvrpo_fast.grpo_loss(logp, advantages, mask, logp_old=logp_old, logp_ref=logp_ref, backend=impl,
                                    **OPTIONS)
    return fn


def make_call(fn):
    def call(s):
        logp = s["logp"].detach().requires_grad_()
        loss, _ = fn(logp, s["advantages"], s["mask"], s["logp_old"], s["logp_ref"])
        loss.backward()
        return {"loss": loss.detach(), "grad_logp": logp.grad}
    return call


@pytest.mark.bench_op("grpo_loss", impls=IMPLS)
def test_grpo_loss(bench, shape, impl):
    if impl in ("triton", "cpp"):
        harness.lvrpo_backend(impl, torch.float32)
    bench.run(
        case="grpo_loss fwd+bwd", op="grpo_loss", impl=impl, shape=shape, dtype=torch.float32,
        make_set=lambda: make_set(shape, bench.device),
        call=make_call(loss_fn(impl)), reference_call=make_call(loss_fn("reference")),
        checked=("loss", "grad_logp"), min_bytes=17 * shape.N)
