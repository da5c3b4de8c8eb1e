"""torch.compile traces through the fused ops without a graph break (fullgraph=True).

Each fused op is one torch.library custom op (lvrpo_fast/fused/library.py) with a fake implementation,
so dynamo records one node per call; the host synchronizations the ops need (the mask's live rows,
the target-range check, a tensor num_items_in_batch's value) happen inside the op at run time, not
in the traced code. The backend choice is made once at trace time (dispatch.resolve).

Packed sequences (cu_seqlens) trace the same way: the ops check cu_seqlens' values and lay the packed
inputs out inside the custom op. A vocab-parallel call cannot be one graph (its collective check reads
the host on every call): tests/test_vocab_parallel.py covers it.

Where a break stays unavoidable: the reference backend reads the mask on the host (its live rows) and
checks the target ids, so `backend="reference"` under torch.compile breaks the graph there (the test
below shows it compiles, with breaks). The tests use the "aot_eager" compiler: dynamo and AOTAutograd
trace exactly what inductor would receive, without spending a minute generating C++ on this CPU.
"""
import pytest
import torch

import lvrpo_fast
from backends_under_test import KERNEL_BACKENDS, device
from lvrpo_fast import dispatch

B, T, D, V, G = 4, 7, 16, 53, 2


def _inputs(dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, 0] = True
    return {
        "hidden": torch.randn(B, T, D, generator=g).to(dev),
        "weight": (torch.randn(V, D, generator=g) * 0.3).to(dev),
        "bias": (torch.randn(V, generator=g) * 0.1).to(dev),
        "targets": torch.randint(0, V, (B, T), generator=g).to(dev),
        "mask": mask.to(dev),
        "rewards": torch.rand(B, generator=g).to(dev),
        "logp_ref": (-torch.rand(B, T, generator=g) * 2).to(dev),
    }


def step(hidden, weight, bias, targets, mask, rewards, logp_ref, backend):
    """A GRPO step's use of every op: old log-probs (no grad), advantages, the fused loss (with the
    off-policy mask and its per-sequence statistics), and the loss on given log-probs with TRL's
    high-entropy mask and entropy bonus."""
    with torch.no_grad():
        logp_old = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, bias=bias, mask=mask, temperature=0.9,
                                                    backend=backend) - 0.01
    advantages = lvrpo_fast.group_advantages(rewards, G, backend=backend)
    loss, metrics, stats = lvrpo_fast.fused_linear_grpo_loss(
        hidden, weight, targets, mask, advantages, bias=bias, logp_old=logp_old, logp_ref=logp_ref, temperature=0.9,
        beta=0.04, loss_type="dapo", num_items_in_batch=mask.sum(), return_entropy=True, backend=backend,
        off_policy_mask_threshold=0.0, return_sequence_stats=True)
    logp, entropy = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, bias=bias, mask=mask, temperature=0.9,
                                                     return_entropy=True, backend=backend)
    loss2, _ = lvrpo_fast.grpo_loss(logp, advantages, mask, logp_old=logp_old, entropy=entropy, entropy_coef=0.01,
                                    importance_sampling_level="sequence", top_entropy_quantile=0.5,
                                    entropy_agg="token_mean", backend=backend)
    return loss + loss2, metrics["kl"] + stats.clip_low.sum()


def _run(fn, data, backend):
    leaves = {k: data[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    loss, kl = fn(leaves["hidden"], leaves["weight"], leaves["bias"], data["targets"], data["mask"], data["rewards"],
                  data["logp_ref"], backend)
    loss.backward()
    return loss.detach(), kl, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("invariant", ["0", "1"], ids=["default", "batch_invariant"])
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_fullgraph_compile_matches_eager(name, invariant, monkeypatch):
    """Both modes; the batch-invariant one chosen by LVRPO_BATCH_INVARIANT, read once at trace time."""
    monkeypatch.setenv("LVRPO_BATCH_INVARIANT", invariant)
    dev = torch.device("cpu") if name == "cpp" else device()
    if dispatch.usable(name, dev, torch.float32)[0] is None:
        pytest.skip(f"{name} unavailable on {dev}")
    torch._dynamo.reset()
    data = _inputs(dev)
    eager = _run(step, data, name)
    compiled = _run(torch.compile(step, fullgraph=True, backend="aot_eager"), data, name)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    for key in eager[2]:
        assert torch.equal(eager[2][key], compiled[2][key]), key
    # A second batch of another length reuses or recompiles the graph; either way the numbers agree.
    other = _inputs(dev, seed=1)
    assert torch.equal(_run(step, other, name)[0], _run(torch.compile(step, fullgraph=True, backend="aot_eager"),
                                                          other, name)[0])


LENGTHS = (7, 0, 1, 5, 3, 7, 2, 4)  # B = 8 sequences of G = 2: an empty one, a one-token one, unequal lengths


def _packed(dev, seed=0):
    """_inputs' tensors cut to LENGTHS and packed ([N, D] hidden, [N] per-token inputs), with cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    N, Bp = int(lengths.sum()), len(LENGTHS)
    mask = torch.rand(N, generator=g) < 0.8
    return {
        "hidden": torch.randn(N, D, generator=g).to(dev),
        "weight": (torch.randn(V, D, generator=g) * 0.3).to(dev),
        "bias": (torch.randn(V, generator=g) * 0.1).to(dev),
        "targets": torch.randint(0, V, (N,), generator=g).to(dev),
        "mask": mask.to(dev),
        "rewards": torch.rand(Bp, generator=g).to(dev),
        "logp_ref": (-torch.rand(N, generator=g) * 2).to(dev),
        "cu_seqlens": torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(dev, torch.int32),
    }


def packed_step(hidden, weight, bias, targets, mask, rewards, logp_ref, cu_seqlens, backend):
    """step() on packed sequences, every op given cu_seqlens: the old log-probs, advantages, the fused
    loss on hidden [N, D] (GSPO's sequence-level ratio, the KL, the entropy bonus, the per-sequence
    statistics), and grpo_loss on packed log-probs [N] with TRL's high-entropy mask."""
    with torch.no_grad():
        logp_old = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, bias=bias, mask=mask, temperature=0.9,
                                                    cu_seqlens=cu_seqlens, backend=backend) - 0.01
    advantages = lvrpo_fast.group_advantages(rewards, G, backend=backend)
    loss, metrics, stats = lvrpo_fast.fused_linear_grpo_loss(
        hidden, weight, targets, mask, advantages, bias=bias, logp_old=logp_old, logp_ref=logp_ref, temperature=0.9,
        beta=0.04, importance_sampling_level="sequence", entropy_coef=0.01, backend=backend,
        return_sequence_stats=True, cu_seqlens=cu_seqlens)
    logp, entropy = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, bias=bias, mask=mask, temperature=0.9,
                                                     return_entropy=True, cu_seqlens=cu_seqlens, backend=backend)
    loss2, _ = lvrpo_fast.grpo_loss(logp, advantages, mask, logp_old=logp_old, entropy=entropy, entropy_coef=0.01,
                                    loss_type="dr_grpo", max_completion_length=9, top_entropy_quantile=0.5,
                                    entropy_agg="token_mean", backend=backend, cu_seqlens=cu_seqlens)
    return loss + loss2, metrics["kl"] + stats.clip_low.sum()


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_fullgraph_compile_of_packed_sequences_matches_eager(name):
    """Packed sequences (cu_seqlens) trace as the padded ones: cu_seqlens' values are checked and the
    per-token inputs laid out inside the ops, so nothing in the traced code reads them."""
    dev = torch.device("cpu") if name == "cpp" else device()
    if dispatch.usable(name, dev, torch.float32)[0] is None:
        pytest.skip(f"{name} unavailable on {dev}")
    torch._dynamo.reset()
    data = _packed(dev)

    def run(fn, data):
        leaves = {k: data[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
        loss, kl = fn(leaves["hidden"], leaves["weight"], leaves["bias"], data["targets"], data["mask"],
                      data["rewards"], data["logp_ref"], data["cu_seqlens"], name)
        loss.backward()
        return loss.detach(), kl, {k: v.grad for k, v in leaves.items()}

    compiled_step = torch.compile(packed_step, fullgraph=True, backend="aot_eager")
    eager, compiled = run(packed_step, data), run(compiled_step, data)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    for key in eager[2]:
        assert torch.equal(eager[2][key], compiled[2][key]), key
    if name != "cpp":
        return  # what follows is the same trace on every backend; the interpreted Triton is slow
    # Other bounds, same N: the same graph (no value of cu_seqlens was baked in), the eager numbers
    other = dict(data, cu_seqlens=data["cu_seqlens"].flip(0).neg() + data["cu_seqlens"][-1])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(run(packed_step, other)[0], run(compiled_step, other)[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "recompiled for other bounds"
    # A malformed cu_seqlens raises inside the compiled graph as in eager
    bad = dict(data, cu_seqlens=data["cu_seqlens"].flip(0))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        run(compiled_step, bad)


def test_graph_breaks_are_counted_for_each_backend():
    """One graph and no break for the kernel backends; the reference's host reads are breaks."""
    data = _inputs(torch.device("cpu"))
    counts = {}
    for name in ("cpp", "reference"):
        if dispatch.usable(name, torch.device("cpu"), torch.float32)[0] is None:
            continue
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(step)(data["hidden"], data["weight"], data["bias"], data["targets"],
                                                 data["mask"], data["rewards"], data["logp_ref"], name)
        counts[name] = explanation.graph_break_count
    if "cpp" in counts:
        assert counts["cpp"] == 0, counts
    assert counts["reference"] > 0, counts


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schemas, fakes and autograd registrations agree with the implementations."""
    if dispatch.usable("cpp", torch.device("cpu"), torch.float32)[0] is None:
        pytest.skip("cpp unavailable")
    from lvrpo_fast.fused import library
    from lvrpo_fast.fused.linear_grpo_loss import _CODEC as LOSS
    from lvrpo_fast.fused.linear_grpo_loss import LinearLossParams
    from lvrpo_fast.fused.logprobs import _CODEC as LOGPROBS
    from lvrpo_fast.fused.logprobs import LogprobsParams
    from lvrpo_fast.options import GRPOOptions

    data = _inputs(torch.device("cpu"))
    hidden = data["hidden"].requires_grad_()
    weight = data["weight"].requires_grad_()
    for invariant in (False, True):
        scalars, _ = LOGPROBS.encode(LogprobsParams(backend="cpp", temperature=0.8, return_entropy=True,
                                                    batch_invariant=invariant))
        torch.library.opcheck(library.op("linear_logprobs"),
                              (hidden, weight, None, data["targets"], data["mask"], None), scalars,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        scalars, _ = LOSS.encode(LinearLossParams(backend="cpp", temperature=1.0, need_entropy=False, head_dtype="",
                                                  options=GRPOOptions(loss_type="bnpo"), batch_invariant=invariant))
        torch.library.opcheck(library.op("linear_grpo_loss"),
                              (hidden, weight, None, data["targets"], data["mask"], data["rewards"], None, None, None,
                               None, None, None, True, True, False), scalars,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # TRL's options: the high-entropy mask's two passes, a narrower head, the off-policy mask's tensor
    scalars, _ = LOSS.encode(LinearLossParams(backend="cpp", temperature=1.0, need_entropy=True,
                                              head_dtype="bfloat16", options=GRPOOptions(
                                                  loss_type="vespo", top_entropy_quantile=0.5, entropy_coef=0.1,
                                                  entropy_agg="token_mean", off_policy_mask_threshold=0.0)))
    torch.library.opcheck(library.op("linear_grpo_loss"),
                          (hidden, weight, None, data["targets"], data["mask"], data["rewards"], None, None,
                           data["logp_ref"], None, None, None, True, True, False), scalars,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # Packed sequences: hidden [N, D] and the per-token inputs [N] (the padded batch's first rows of each
    # sequence), as the public op passes them; the op lays them out as the padded batch itself
    B, T = data["mask"].shape
    lengths = torch.tensor([T - b % 3 for b in range(B)])
    valid = torch.arange(T) < lengths[:, None]
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    packed = data["hidden"].detach()[valid].requires_grad_()
    scalars, _ = LOSS.encode(LinearLossParams(backend="cpp", temperature=1.0, need_entropy=False, head_dtype="",
                                              options=GRPOOptions(importance_sampling_level="sequence")))
    torch.library.opcheck(library.op("linear_grpo_loss"),
                          (packed, weight, None, data["targets"][valid], data["mask"][valid], data["rewards"], None,
                           data["logp_ref"][valid], None, None, None, cu_seqlens, True, True, False), scalars,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    from lvrpo_fast.fused.grpo_loss import _CODEC as GRPO
    from lvrpo_fast.fused.grpo_loss import LossParams

    scalars, _ = GRPO.encode(LossParams(backend="cpp", options=GRPOOptions(loss_type="bnpo", entropy_coef=0.1)))
    logp = (-torch.rand(int(valid.sum()))).requires_grad_()
    entropy = torch.rand(1, int(valid.sum())).requires_grad_()  # verl's [1, N] layout
    torch.library.opcheck(library.op("grpo_loss"),
                          (logp, entropy, data["rewards"], data["mask"][valid], None, None, None, None, None,
                           cu_seqlens, True, True), scalars,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    scalars, _ = LOGPROBS.encode(LogprobsParams(backend="cpp", temperature=0.8, return_entropy=False))
    torch.library.opcheck(library.op("linear_logprobs"),
                          (packed, weight, None, data["targets"][valid], data["mask"][valid], cu_seqlens), scalars,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
