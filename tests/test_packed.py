"""Packed sequences (cu_seqlens, lvrpo_fast.packing): fused_linear_grpo_loss, grpo_loss and
fused_linear_logprobs on hidden [N, D] / per-token [N] inputs equal the ops on the same batch padded.

Each check runs the packed op on a kernel backend and on the reference at the working precision, and
judges them by the three-number rule (lvrpo_fast.testing) against the float64 reference run on the
*padded* batch, its hidden-state gradient taken at the packed rows. The batches hold an empty
sequence (a repeated bound), one-token sequences, unequal lengths, masked tokens inside sequences and
a fully masked one; the padded length of the truth is longer than the longest packed sequence in
some cases, so nothing may depend on it.
"""
import pathlib
import re

import pytest
import torch

import lvrpo_fast
from lvrpo_fast import dispatch
from checks import check_loss_run
from test_linear_grpo_loss import CASES, V_SMALL, make_inputs

T = 7
# Sequence lengths of B = 6 sequences (G = 3): an empty one, one-token ones, unequal lengths.
LENGTHS = {"ragged": [5, 0, 1, 7, 3, 7], "short": [1, 4, 0, 2, 1, 5]}  # "short": every one < T


def pack(data, lengths):
    """(packed inputs, padded inputs, cu_seqlens) of make_inputs' [B, T] data cut to `lengths`."""
    B, T_ = data["mask"].shape
    valid = torch.arange(T_) < torch.tensor(lengths)[:, None]
    padded = dict(data, mask=data["mask"] & valid)
    packed = {}
    for key, value in padded.items():
        per_token = isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == (B, T_)
        packed[key] = value[valid] if per_token else value
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    return packed, padded, cu_seqlens


def run(backend, data, dtype, device, options, cu_seqlens=None, per_token_advantages=None, **kwargs):
    """fused_linear_grpo_loss on data (packed when cu_seqlens is given): (loss, metrics, grads, stats)."""
    def leaf(t):
        return None if t is None else t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True)

    def const(t):
        return None if t is None else t.to(device)

    hidden, weight, bias = leaf(data["hidden"]), leaf(data["weight"]), leaf(data["bias"])
    advantages = data["advantages"] if per_token_advantages is None else per_token_advantages
    loss, metrics, stats = lvrpo_fast.fused_linear_grpo_loss(
        hidden, weight, const(data["targets"]), const(data["mask"]), const(advantages), bias=bias,
        logp_old=const(data["logp_old"]), logp_ref=const(data["logp_ref"]),
        logp_sampling=const(data.get("logp_sampling")), rollout_weights=const(data["rollout_weights"]),
        backend=backend, return_sequence_stats=True, cu_seqlens=const(cu_seqlens), **options, **kwargs)
    loss.backward()
    grads = {"hidden": hidden.grad, "weight": weight.grad, "bias": None if bias is None else bias.grad}
    return loss, metrics, grads, stats.columns()


def check_packed(name, device, data, lengths, options, *, per_token=False, dtype=torch.float32, **kwargs):
    for key in ("hidden", "weight", "bias"):  # the truth sees exactly the inputs the kernel sees
        if data[key] is not None:
            data[key] = data[key].to(dtype).float()
    packed, padded, cu = pack(data, lengths)
    adv_packed = adv_padded = None
    if per_token:  # one advantage per token: a different value at every position
        adv_padded = torch.randn(padded["mask"].shape)
        adv_packed = adv_padded[torch.arange(T) < torch.tensor(lengths)[:, None]]
    kernel = run(name, packed, dtype, device, options, cu, adv_packed, **kwargs)
    ref = run("reference", packed, dtype, torch.device("cpu"), options, cu, adv_packed, **kwargs)
    truth = run("reference", padded, torch.float64, torch.device("cpu"), options, None, adv_padded, **kwargs)
    valid = torch.arange(T) < torch.tensor(lengths)[:, None]
    truth[2]["hidden"] = truth[2]["hidden"][valid]  # the padded batch's gradient at the packed rows
    check_loss_run(f"packed {name} {dtype} {lengths} {options}", kernel, ref, truth, dtype,
                   zero_at={"hidden": ~packed["mask"]})
    return kernel


@pytest.mark.parametrize("case", list(CASES))
def test_every_case_matches_padded(kernel_backend, case):
    name, device = kernel_backend
    options, extras = CASES[case]
    data = make_inputs(v=V_SMALL, bias=extras.get("bias", False), weights=extras.get("weights"),
                       sampling=extras.get("sampling", False), temperature=extras.get("temperature", 1.0))
    check_packed(name, device, data, LENGTHS["ragged"], options, temperature=extras.get("temperature", 1.0),
                 return_entropy=extras.get("return_entropy", False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["grpo", "gspo_k3_bias_kl_entropy"])
def test_half_precision(kernel_backend, case, dtype):
    name, device = kernel_backend
    ok, why = dispatch.usable(name, device, dtype)
    if ok is None:
        pytest.skip(f"{name} does not run {dtype} on {device}: {why}")
    options, extras = CASES[case]
    data = make_inputs(v=V_SMALL, bias=extras.get("bias", False), weights=extras.get("weights"),
                       temperature=extras.get("temperature", 1.0))
    check_packed(name, device, data, LENGTHS["ragged"], options, dtype=dtype,
                 temperature=extras.get("temperature", 1.0))


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("case", ["gspo_k3_bias_kl_entropy", "dr_grpo_weights", "entropy_mask_token_mean"])
def test_per_token_advantages_and_lengths(kernel_backend, case, lengths):
    name, device = kernel_backend
    options, extras = CASES[case]
    data = make_inputs(v=V_SMALL, bias=extras.get("bias", False), weights=extras.get("weights"),
                       temperature=extras.get("temperature", 1.0))
    check_packed(name, device, data, LENGTHS[lengths], options, per_token=True,
                 temperature=extras.get("temperature", 1.0))


@pytest.mark.parametrize("seqs_per_chunk", [1, 2])
def test_chunks_read_packed_rows_in_place(kernel_backend, monkeypatch, seqs_per_chunk):
    """Several chunks of whole sequences, with no masked token (each chunk a contiguous range of the
    packed rows, read in place) and with masked tokens (the rows gathered): both equal the padded op."""
    name, device = kernel_backend
    options, extras = CASES["gspo_k3_bias_kl_entropy"]
    monkeypatch.setenv("LVRPO_CHUNK_BYTES", str(seqs_per_chunk * T * V_SMALL * 4))
    for density, masked_row in ((1.0, None), (0.7, 1)):
        data = make_inputs(v=V_SMALL, bias=True, weights="token", density=density, masked_row=masked_row)
        check_packed(name, device, data, LENGTHS["ragged"], options, temperature=0.8)


def test_batch_invariant_packed_equals_padded_bits(kernel_backend):
    """In batch-invariant mode a token's statistics do not depend on the layout: packed and padded give
    the same loss and per-sequence statistics, bit for bit."""
    name, device = kernel_backend
    options, _ = CASES["gspo_k3_bias_kl_entropy"]
    data = make_inputs(v=V_SMALL, bias=True)
    packed, padded, cu = pack(data, LENGTHS["ragged"])
    a = run(name, packed, torch.float32, device, options, cu, batch_invariant=True)
    b = run(name, padded, torch.float32, device, options, None, batch_invariant=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])


def test_all_empty_and_all_masked(kernel_backend):
    """Only empty sequences (N = 0), or every token masked: loss 0, zero gradients, as the padded op."""
    name, device = kernel_backend
    for lengths, density in (([0] * 6, 0.8), ([3, 1, 0, 2, 7, 4], 0.0)):
        data = make_inputs(v=V_SMALL, density=density)
        packed, _, cu = pack(data, lengths)
        loss, _, grads, stats = run(name, packed, torch.float32, device, {"loss_type": "grpo"}, cu)
        assert float(loss.detach()) == 0.0 and stats.shape == (6, stats.shape[1])
        assert not grads["hidden"].any() and not grads["weight"].any()
        assert grads["hidden"].shape == packed["hidden"].shape


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_on_packed_logprobs(kernel_backend, loss_type, level):
    """grpo_loss on packed log-probabilities [N] equals it on the padded [B, T] ones (gradient at the
    packed positions), per-sequence and per-token advantages alike."""
    name, device = kernel_backend
    lengths = LENGTHS["ragged"]
    valid = torch.arange(T) < torch.tensor(lengths)[:, None]
    mask = (torch.rand(6, T) < 0.8) & valid
    logp = -torch.rand(6, T) * 3
    data = {"logp": logp, "logp_old": logp + 0.3 * torch.randn(6, T), "logp_ref": logp + 0.3 * torch.randn(6, T),
            "entropy": torch.rand(6, T) * 2}
    options = {"loss_type": loss_type, "importance_sampling_level": level, "beta": 0.05, "entropy_coef": 0.02,
               "max_completion_length": 9}
    for advantages in (torch.randn(6), torch.randn(6, T)):
        def go(backend, dtype, dev, packed):
            inputs = {k: (v[valid] if packed else v).to(dev, dtype) for k, v in data.items()}
            for k in ("logp", "entropy"):
                inputs[k].requires_grad_(True)
            adv = advantages[valid] if packed and advantages.dim() == 2 else advantages
            loss, metrics, stats = lvrpo_fast.grpo_loss(
                inputs["logp"], adv.to(dev, dtype), (mask[valid] if packed else mask).to(dev),
                logp_old=inputs["logp_old"], logp_ref=inputs["logp_ref"], entropy=inputs["entropy"], backend=backend,
                return_sequence_stats=True, cu_seqlens=(torch.tensor([0, *torch.tensor(lengths).cumsum(0)]).to(dev)
                                                        if packed else None), **options)
            loss.backward()
            grads = {k: inputs[k].grad if packed else inputs[k].grad[valid] for k in ("logp", "entropy")}
            return loss, metrics, grads, stats.columns()

        check_loss_run(f"grpo_loss packed {name} {options}", go(name, torch.float32, device, True),
                       go("reference", torch.float32, torch.device("cpu"), True),
                       go("reference", torch.float64, torch.device("cpu"), False), torch.float32)


def test_logprobs_accept_cu_seqlens(kernel_backend):
    """fused_linear_logprobs computes every row on its own: cu_seqlens is checked and changes nothing."""
    name, device = kernel_backend
    data = make_inputs(v=V_SMALL)
    packed, _, cu = pack(data, LENGTHS["ragged"])
    hidden, weight = packed["hidden"].to(device), packed["weight"].to(device)
    targets, mask = packed["targets"].to(device), packed["mask"].to(device)
    plain = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, mask=mask, backend=name)
    with_bounds = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, mask=mask, backend=name,
                                                   cu_seqlens=cu.to(device))
    assert torch.equal(plain, with_bounds)
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, mask=mask, cu_seqlens=cu[:-1].to(device))


def _packed_call(**changes):
    data = make_inputs(b=3, v=31, d=5)
    packed, _, cu = pack(data, [2, 0, 3])
    args = dict(hidden=packed["hidden"], weight=packed["weight"], targets=packed["targets"], mask=packed["mask"],
                advantages=packed["advantages"], cu_seqlens=cu, backend="reference")
    args.update(changes)
    return lvrpo_fast.fused_linear_grpo_loss(**args)


@pytest.mark.parametrize("changes,error,match", [
    ({"cu_seqlens": torch.tensor([1, 2, 2, 5])}, ValueError, r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 1"),
    ({"cu_seqlens": torch.tensor([0, 3, 2, 5])}, ValueError, r"non-decreasing.*cu_seqlens\[1\] = 3 > cu_seqlens\[2\]"),
    ({"cu_seqlens": torch.tensor([0, 2, 2, 4])}, ValueError, r"end at the number of packed tokens 5"),
    ({"cu_seqlens": torch.tensor([0.0, 2, 2, 5])}, TypeError, r"cu_seqlens must be an int32 or int64"),
    ({"cu_seqlens": torch.tensor([[0, 2, 2, 5]])}, ValueError, r"cu_seqlens must be a 1-D tensor"),
    ({"cu_seqlens": [0, 2, 2, 5]}, TypeError, r"cu_seqlens must be a torch.Tensor"),
    ({"hidden": torch.randn(1, 5, 5)}, ValueError, r"hidden must be a 2-D tensor \[total_tokens, D\]"),
    ({"targets": torch.zeros(4, dtype=torch.long)}, ValueError, r"targets must have shape \(5,\)"),
    ({"mask": torch.ones(4, dtype=torch.bool)}, ValueError, r"mask must have shape \(5,\)"),
    ({"advantages": torch.randn(4)}, ValueError, r"advantages must have shape \(3,\) \(per sequence\) or \(5,\)"),
    ({"logp_old": torch.randn(3, 2)}, ValueError, r"logp_old must have shape \(5,\)"),
    ({"logp_old": torch.zeros(5, dtype=torch.long)}, TypeError, r"logp_old must be a floating-point tensor"),
    ({"rollout_weights": torch.rand(3), "loss_type": "vespo"}, ValueError,
     r"loss_type='vespo' takes per-token rollout_weights \(5,\).*per-sequence ones of shape \(3,\)"),
    ({"beta": 0.1}, ValueError, r"beta=0.1 > 0 needs logp_ref"),
])
def test_malformed_packed_inputs_are_named(changes, error, match):
    with pytest.raises(error, match=match):
        _packed_call(**changes)


def test_ambiguous_per_sequence_values_are_refused():
    """B == N with a sequence that is not one token long: [B] could be per sequence or per token."""
    data = make_inputs(b=3, v=31, d=5)
    packed, _, cu = pack(data, [2, 0, 1])
    with pytest.raises(ValueError, match="advantages of shape .* is ambiguous"):
        lvrpo_fast.fused_linear_grpo_loss(packed["hidden"], packed["weight"], packed["targets"], packed["mask"],
                                          torch.randn(3), cu_seqlens=cu, backend="reference")
    loss, _ = lvrpo_fast.fused_linear_grpo_loss(packed["hidden"], packed["weight"], packed["targets"],
                                                packed["mask"], torch.randn(1, 3), cu_seqlens=cu, backend="reference")
    assert torch.isfinite(loss)


def test_readme_packed_example_runs():
    """README's packed-sequence example runs as written, and its gradient is the packed [N, D]."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("\n### Packed sequences\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["hidden"].grad.shape == (13, 64) and torch.isfinite(scope["loss"])


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_module_on_packed_sequences_equals_the_op(kernel_backend, loss_type, level):
    """FusedLinearGRPOLoss(...)(..., cu_seqlens=...) is fused_linear_grpo_loss on the packed batch, bit for
    bit (loss, kl, clip ratio, gradients), with per-token vllm_is_ratio; verl's [1, N, ...] layout and a
    reference from ref_input / ref_weight give the same bits as [N, ...] with its log-probabilities."""
    from lvrpo_fast.modules import FusedLinearGRPOLoss

    name, device = kernel_backend
    data = make_inputs(v=V_SMALL, bias=True, weights="token", temperature=0.8)
    packed, _, cu = pack(data, LENGTHS["ragged"])
    p = {k: None if v is None else v.to(device) for k, v in packed.items()}
    cu = cu.to(device)
    ref_hidden = (p["hidden"] + 0.1 * torch.randn(p["hidden"].shape).to(device)).detach()
    ref_weight = (p["weight"] * 1.1).detach()
    with torch.no_grad():
        ref_logp = lvrpo_fast.fused_linear_logprobs(ref_hidden, ref_weight, p["targets"], mask=p["mask"],
                                                    temperature=0.8, backend=name)

    def leaves(layout=lambda t: t):
        """Fresh leaves of hidden (in `layout`), weight and bias."""
        return [layout(p["hidden"].detach().clone()).requires_grad_(),
                *(t.detach().clone().requires_grad_() for t in (p["weight"], p["bias"]))]

    def result(loss, metrics, hidden, weight, bias):
        loss.backward()
        return [loss.detach(), *metrics, hidden.grad, weight.grad, bias.grad]

    module = FusedLinearGRPOLoss(beta=0.05, loss_type=loss_type, importance_sampling_level=level, temperature=0.8,
                                 backend=name)
    h, w, b = leaves()
    loss, (kl, clip) = module(h, w, p["targets"], p["mask"], p["advantages"], b, ref_per_token_logps=ref_logp,
                              old_per_token_logps=p["logp_old"], vllm_is_ratio=p["rollout_weights"], cu_seqlens=cu)
    got = result(loss, (kl, clip), h, w, b)
    h, w, b = leaves()
    loss, metrics = lvrpo_fast.fused_linear_grpo_loss(
        h, w, p["targets"], p["mask"], p["advantages"], bias=b, logp_old=p["logp_old"], logp_ref=ref_logp,
        rollout_weights=p["rollout_weights"], temperature=0.8, loss_type=loss_type, importance_sampling_level=level,
        beta=0.05, epsilon_low=0.2, epsilon_high=0.2, kl_estimator="k3", backend=name, cu_seqlens=cu)
    want = result(loss, (metrics["kl"], metrics["clip_ratio_region"]), h, w, b)
    assert got[-3].shape == p["hidden"].shape
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), f"output {i}"
    # verl's layout [1, N, ...], the reference from its hidden states and head
    one = lambda t: t[None]  # noqa: E731
    h, w, b = leaves(one)
    loss, metrics = module(h, w, one(p["targets"]), one(p["mask"]), p["advantages"], b, ref_input=one(ref_hidden),
                           ref_weight=ref_weight, old_per_token_logps=one(p["logp_old"]),
                           vllm_is_ratio=one(p["rollout_weights"]), cu_seqlens=cu)
    verl = result(loss, metrics, h, w, b)
    assert verl[-3].shape == (1, *p["hidden"].shape)
    verl[-3] = verl[-3][0]
    for i, (a, e) in enumerate(zip(verl, want)):
        assert torch.equal(a, e), f"[1, N] layout, output {i}"


def test_module_on_packed_sequences_refuses_what_it_refuses_padded():
    """luspo takes one vllm_is_ratio per sequence ([B]); a per-token one ([N]) is refused when packed too.
    A packed _input of another rank is named."""
    from lvrpo_fast.modules import FusedLinearGRPOLoss

    data = make_inputs(v=31, d=5)
    packed, _, cu = pack(data, LENGTHS["ragged"])
    module = FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="luspo",
                                 importance_sampling_level="sequence", backend="reference")
    args = (packed["hidden"], packed["weight"], packed["targets"], packed["mask"], packed["advantages"])
    with pytest.raises(ValueError, match="per-sequence vllm_is_ratio"):
        module(*args, vllm_is_ratio=torch.rand(cu[-1].item()) + 0.5, cu_seqlens=cu)
    loss, _ = module(*args, vllm_is_ratio=torch.rand(6) + 0.5, cu_seqlens=cu)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"_input must be a tensor \[N, D\] \(or \[1, N, D\]\) with cu_seqlens"):
        module(packed["hidden"][None, None], *args[1:], cu_seqlens=cu)
