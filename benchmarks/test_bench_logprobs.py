"""Per-token log-probabilities (and entropy) from hidden states through the LM head.

Variants: forward only, under torch.no_grad (the old-policy / reference-model pass), and forward plus
backward (the policy pass; upstream gradients random per token), each with the entropy off and on.
Inputs: hidden [N, D] ~ N(0, 1) and weight [V, D] scaled so that the logits have a standard deviation
of ~3, as a trained LM head's do; targets uniform in [0, V); temperature 1 (the peers have none).

FLOPs counted, what each implementation's design executes: 2 N V D for the forward; for forward plus
backward 8 N V D where the backward recomputes the logits (lvrpo_fast's backends, Liger, CCE's Triton
kernels) and 6 N V D where they are kept (the reference, torch.compile, CCE's torch_compile, flash-attn).
So the fraction of the matmul ceiling says how well each design uses the hardware; the speed-up
compares the implementations.

Implementations: the eager reference, torch.compile of lvrpo_fast.reference.logprobs_impl, the Triton
and C++ backends, and the peers that compute the same log-probabilities: TRL 1.16's chunked LM head
(trl.kernels.chunked_logprob.ChunkedLogProbFunction, TRL's vocabulary chunk of 32768, what its
GRPOTrainer computes log-probabilities and entropies with; a Triton fold on CUDA, torch tiles on the
CPU; its backward recomputes the logits), Liger-Kernel's fused linear cross entropy and Cut
Cross-Entropy's linear_cross_entropy (both reduction="none", negated), and flash-attn's Triton cross
entropy on logits from F.linear. Of the peers only TRL returns the entropy.

Batch-invariant mode (issue 19): the Triton and C++ backends with batch_invariant=True, as rows of
their own (test_logprobs_batch_invariant: time, memory, TFLOP/s, checked against the reference) and as
the mode's cost, each call timed alternately with the default mode's on the same inputs
(test_logprobs_batch_invariant_cost: the median of the per-pair time ratios, invariant / default).
test_logprobs_vocab_blocks_cost: the layout that also gives the same bits at every tensor-parallel
degree (vocab_block = V / 8 on the whole head) against the batch-invariant mode alone, paired.
"""
import pytest
import torch
import torch.nn.functional as F

import lvrpo_fast
from lvrpo_fast import reference, validate

import harness

IMPLS = ("reference", "compiled", "triton", "cpp", "trl", "liger", "cce", "flash_attn")
KERNEL_IMPLS = ("triton", "cpp")
# Pairs of the mode's cost rows: a cost of ~5% is within one pair's noise on a shared machine.
COST_PAIRS = 9
# The vocabulary blocks of the TP-degree-invariant layout: V / 8, one block per shard at TP = 8.
VOCAB_BLOCKS = 8
VARIANTS = [{"mode": mode, "entropy": entropy} for mode in ("fwd", "fwd+bwd") for entropy in (False, True)]
LOGIT_STD = 3.0


def executed_flops(impl, mode, shape, device):
    nvd = shape.N * shape.V * shape.D
    if mode == "fwd":
        return 2 * nvd
    recomputes = impl in ("triton", "cpp", "trl", "liger") or (impl == "cce" and device.type == "cuda")
    return (8 if recomputes else 6) * nvd


def make_set(shape, dtype, device):
    N, D, V = shape.N, shape.D, shape.V
    return {
        "hidden": torch.randn(N, D, device=device).to(dtype),
        "weight": (torch.randn(V, D, device=device) * (LOGIT_STD / D ** 0.5)).to(dtype),
        "targets": torch.randint(0, V, (N,), device=device),
        "grad_logp": torch.randn(N, device=device),
        "grad_entropy": torch.randn(N, device=device),
    }


def logprobs_fn(impl, entropy, device, invariant=False, vocab_blocks=False):
    """(hidden [N, D], weight [V, D], targets [N]) -> (logp [N], entropy [N] or None) of one implementation
    (invariant: the kernel backends' batch-invariant mode; vocab_blocks: with it, the whole head as a
    degree-1 VocabParallel of VOCAB_BLOCKS blocks, the layout that is bitwise the same at any TP degree)."""
    if impl in ("reference", "triton", "cpp"):
        def fn(h, w, t):
            extra = {}
            if vocab_blocks:
                V = w.shape[0]
                extra["vocab_parallel"] = lvrpo_fast.VocabParallel(vocab_size=V, vocab_block=-(-V // VOCAB_BLOCKS))
            out = lvrpo_fast.fused_linear_logprobs(h, w, t, return_entropy=entropy, backend=impl,
                                                   batch_invariant=invariant if impl != "reference" else None,
                                                   **extra)
            return out if entropy else (out, None)
        return fn
    if impl == "compiled":
        impl_fn = harness.compiled(reference.logprobs_impl)

        def fn(h, w, t):
            validate.check_linear_inputs(h, w, t)
            return impl_fn(h, w, t, None, 1.0, entropy, None)
        return fn
    if impl == "trl":
        trl_head = harness.trl_chunked_logprobs()
        return lambda h, w, t: trl_head(h, w, t, entropy)
    if entropy:
        pytest.skip(f"{impl} computes no entropy")
    if impl == "liger":
        harness.require_cuda("Liger-Kernel's fused linear cross entropy")
        flce = harness.require_module("liger_kernel.transformers.fused_linear_cross_entropy")
        loss = flce.LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda h, w, t: (-loss(w, h, t), None)
    if impl == "cce":
        # Its "cce" kernels are Triton (CUDA only); its torch_compile implementation runs wherever inductor does.
        variant = "cce" if device.type == "cuda" else "torch_compile"
        if variant == "torch_compile":
            harness.require_compile()
        cce = harness.require_module("cut_cross_entropy")
        return lambda h, w, t: (-cce.linear_cross_entropy(h, w, t, reduction="none", impl=variant), None)
    if impl == "flash_attn":
        harness.require_cuda("flash-attn's cross entropy")
        ce = harness.require_module("flash_attn.ops.triton.cross_entropy").cross_entropy_loss

        def fn(h, w, t):
            out = ce(F.linear(h, w), t)  # (losses, z_losses) in flash-attn 2.x
            return -(out[0] if isinstance(out, tuple) else out), None
        return fn
    raise ValueError(f"unknown implementation {impl!r}")


def make_call(fn, mode):
    """The timed call on one input set: returns the outputs and, for fwd+bwd, the input gradients."""
    def call(s):
        if mode == "fwd":
            with torch.no_grad():
                logp, ent = fn(s["hidden"], s["weight"], s["targets"])
            return {"logp": logp} if ent is None else {"logp": logp, "entropy": ent}
        hidden = s["hidden"].detach().requires_grad_()
        weight = s["weight"].detach().requires_grad_()
        logp, ent = fn(hidden, weight, s["targets"])
        outs, grads = [logp], [s["grad_logp"].to(logp.dtype)]
        if ent is not None:
            outs.append(ent)
            grads.append(s["grad_entropy"].to(ent.dtype))
        torch.autograd.backward(outs, grads)
        result = {"logp": logp.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}
        if ent is not None:
            result["entropy"] = ent.detach()
        return result
    return call


def case_fields(shape, impl, mode, entropy, dtype, device, invariant=False, vocab_blocks=False):
    """The harness.Case fields of one implementation, mode ("fwd" | "fwd+bwd") and entropy flag
    (invariant: the batch-invariant mode of a kernel backend; vocab_blocks: see logprobs_fn)."""
    if impl in ("triton", "cpp"):
        harness.lvrpo_backend(impl, dtype)
    fn = logprobs_fn(impl, entropy, device, invariant, vocab_blocks)
    checked = ("logp", "entropy")
    if mode == "fwd+bwd" and impl != "cce":
        # CCE drops small softmax entries from its gradient by design (filter_eps): forward compared only.
        checked += ("grad_hidden", "grad_weight")
    return dict(
        case=f"logprobs {mode}{' entropy' if entropy else ''}{' batch-invariant' if invariant else ''}"
             f"{' vocab blocks' if vocab_blocks else ''}", op="logprobs",
        impl=impl, shape=shape, dtype=dtype,
        make_set=lambda: make_set(shape, dtype, device),
        call=make_call(fn, mode),
        reference_call=make_call(logprobs_fn("reference", entropy, device), mode),
        checked=checked, flops=executed_flops(impl, mode, shape, device), mm=(shape.N, shape.D, shape.V))


@pytest.mark.bench_op("logprobs", impls=IMPLS, variants=VARIANTS)
def test_logprobs(bench, shape, impl, mode, entropy):
    bench.run(**case_fields(shape, impl, mode, entropy, bench.dtype, bench.device))


@pytest.mark.bench_op("logprobs", impls=KERNEL_IMPLS, variants=VARIANTS)
def test_logprobs_batch_invariant(bench, shape, impl, mode, entropy):
    bench.run(**case_fields(shape, impl, mode, entropy, bench.dtype, bench.device, invariant=True))


@pytest.mark.bench_op("logprobs", impls=KERNEL_IMPLS, variants=VARIANTS)
def test_logprobs_batch_invariant_cost(bench, shape, impl, mode, entropy):
    """The mode's time over the default mode's, call by call on the same inputs (Bench.paired)."""
    cases = {label: harness.Case(**case_fields(shape, impl, mode, entropy, bench.dtype, bench.device, invariant))
             for label, invariant in (("batch_invariant", True), ("default", False))}
    bench.paired(cases, name=f"logprobs {mode}{' entropy' if entropy else ''} batch-invariant cost ({impl})",
                 min_pairs=COST_PAIRS)


@pytest.mark.bench_op("logprobs", impls=KERNEL_IMPLS, variants=VARIANTS)
def test_logprobs_vocab_blocks_cost(bench, shape, impl, mode, entropy):
    """The TP-degree-invariant layout (batch-invariant mode with VocabParallel(vocab_block=V / 8) on the
    whole head: per-block GEMMs and statistics combined in block order) over the batch-invariant mode
    alone, call by call on the same inputs (Bench.paired)."""
    cases = {label: harness.Case(**case_fields(shape, impl, mode, entropy, bench.dtype, bench.device, True, blocks))
             for label, blocks in (("vocab_blocks", True), ("batch_invariant", False))}
    bench.paired(cases, name=f"logprobs {mode}{' entropy' if entropy else ''} vocab-blocks cost ({impl})",
                 min_pairs=COST_PAIRS)
