"""FusedLinearGRPOLoss (the Liger-compatible module): against the float64 reference, and against
liger-kernel's own LigerFusedLinearGRPOLoss(compiled=False) for every loss type both implement."""
import warnings

import pytest
import torch

from lvrpo_fast import dispatch, reference
from lvrpo_fast.modules import FusedLinearGRPOLoss
from tolerances import assert_close_to_truth

B, T, D, V = 4, 7, 13, 37  # odd on purpose: no dimension is a multiple of a block

# (loss_type, importance_sampling_level, epsilon_high): every combination both Liger and docs/math.md define.
CASES = [
    ("grpo", "token", 0.28), ("grpo", "sequence", 0.28), ("bnpo", "token", 0.28), ("bnpo", "sequence", 0.28),
    ("dr_grpo", "token", 0.28), ("dapo", "token", 0.28), ("dapo", "sequence", 0.28), ("cispo", "token", 1.5),
    ("sapo", "token", 0.28), ("luspo", "sequence", 0.28), ("vespo", "token", 0.28),
]


def _backend_or_skip(name):
    if name == "auto":
        return None
    module, why = dispatch.usable(name, torch.device("cpu"), torch.float32)
    if module is None:
        pytest.skip(f"{name} backend unavailable: {why}")
    return name


def _inputs(with_bias=True):
    hidden = torch.randn(B, T, D)
    weight = torch.randn(V, D) * 0.4
    bias = torch.randn(V) * 0.2 if with_bias else None
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.3).long()
    mask[1] = 0  # a fully masked sequence: both libraries divide by B regardless
    mask[0, 0] = 1
    ids[mask == 0] = V + 5  # padding ids outside the vocabulary must never be read
    advantages = torch.randn(B)
    logp_old = -torch.rand(B, T) * 3 - 0.5
    logp_ref = -torch.rand(B, T) * 3 - 0.5
    return hidden, weight, bias, ids, mask, advantages, logp_old, logp_ref


def _run(module, hidden, weight, bias, *args, **kwargs):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    loss, metrics = module(h, w, *args[:3], b, *args[3:], **kwargs)
    loss.backward()
    return {"loss": loss, "metrics": torch.stack(list(metrics)), "grad_hidden": h.grad, "grad_weight": w.grad,
            **({} if b is None else {"grad_bias": b.grad})}


def _truth(hidden, weight, bias, ids, mask, advantages, logp_old, logp_ref, *, dtype, temperature, vllm=None,
           **options):
    """The reference at `dtype` with Liger's option values spelled out in the names of docs/math.md."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    b = None if bias is None else bias.to(dtype).requires_grad_()
    loss, metrics = reference.fused_linear_grpo_loss(
        h, w, torch.where(mask.bool(), ids, 0), mask, cast(advantages), bias=b, logp_old=cast(logp_old),
        logp_ref=cast(logp_ref), rollout_weights=cast(vllm), temperature=temperature, kl_estimator="k3", **options)
    loss.backward()
    clip = metrics["clip_ratio_high"] if options["loss_type"] == "cispo" else metrics["clip_ratio_region"]
    if options["loss_type"] in ("sapo", "vespo"):
        clip = torch.zeros_like(clip)
    stacked = torch.stack([metrics["kl"], clip]) if options.get("beta", 0) > 0 else clip.reshape(1)
    return {"loss": loss, "metrics": stacked, "grad_hidden": h.grad, "grad_weight": w.grad,
            **({} if b is None else {"grad_bias": b.grad})}


def _options(loss_type, level, eps_high, beta):
    return dict(loss_type=loss_type, importance_sampling_level=level, epsilon_low=0.2, epsilon_high=eps_high,
                beta=beta, max_completion_length=9 if loss_type == "dr_grpo" else None, use_bias_correction_kl=True)


@pytest.mark.parametrize("backend", ["auto", "triton", "cpp"])
@pytest.mark.parametrize("loss_type,level,eps_high", CASES)
def test_matches_float64_reference(loss_type, level, eps_high, backend):
    backend = _backend_or_skip(backend)
    hidden, weight, bias, ids, mask, adv, old, ref = _inputs()
    vllm = torch.rand(B, T) + 0.5 if loss_type != "luspo" else torch.rand(B) + 0.5
    vllm = None if loss_type == "vespo" else vllm
    beta = 0.0 if loss_type == "luspo" else 0.07
    opts = _options(loss_type, level, eps_high, beta)
    module = FusedLinearGRPOLoss(temperature=0.7, backend=backend, **opts)
    got = _run(module, hidden, weight, bias, ids, mask, adv, ref, old, vllm_is_ratio=vllm)
    kw = dict(temperature=0.7, vllm=vllm, **opts)
    truth = _truth(hidden, weight, bias, ids, mask, adv, old, ref, dtype=torch.float64, **kw)
    ref32 = _truth(hidden, weight, bias, ids, mask, adv, old, ref, dtype=torch.float32, **kw)
    for name in truth:
        assert_close_to_truth(got[name], ref32[name], truth[name], torch.float32, name)


try:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
except ImportError:
    LigerFusedLinearGRPOLoss = None
needs_liger = pytest.mark.skipif(LigerFusedLinearGRPOLoss is None,
                                 reason="liger-kernel is not installed (pip install liger-kernel)")


def _liger(**kwargs):
    return LigerFusedLinearGRPOLoss(compiled=False, **kwargs)


@needs_liger
@pytest.mark.parametrize("loss_type,level,eps_high", CASES)
def test_parity_with_liger(loss_type, level, eps_high):
    hidden, weight, bias, ids, mask, adv, old, ref = _inputs()
    ids = torch.where(mask.bool(), ids, 0)  # Liger reads every position's id
    vllm = torch.rand(B, T) + 0.5 if loss_type != "luspo" else torch.rand(B, 1) + 0.5
    vllm = None if loss_type == "vespo" else vllm
    beta = 0.0 if loss_type == "luspo" else 0.07
    opts = _options(loss_type, level, eps_high, beta)
    args = (ids, mask, adv, ref, old)
    ours = _run(FusedLinearGRPOLoss(temperature=0.7, **opts), hidden, weight, bias, *args, vllm_is_ratio=vllm)
    theirs = _run(_liger(temperature=0.7, **opts), hidden, weight, bias, *args, vllm_is_ratio=vllm)
    kw = dict(temperature=0.7, vllm=vllm[:, 0] if vllm is not None and vllm.shape == (B, 1) else vllm, **opts)
    truth = _truth(hidden, weight, bias, ids, mask, adv, old, ref, dtype=torch.float64, **kw)
    ref32 = _truth(hidden, weight, bias, ids, mask, adv, old, ref, dtype=torch.float32, **kw)
    assert ours.keys() == theirs.keys()
    for name in truth:
        assert_close_to_truth(ours[name], theirs[name], truth[name], torch.float32, f"lvrpo {name}")
        assert_close_to_truth(theirs[name], ref32[name], truth[name], torch.float32, f"liger {name}")


@needs_liger
def test_defaults_match_liger():
    """Constructed with no arguments both are dapo, beta 0.04, k3 against a reference, token level."""
    hidden, weight, _, ids, mask, adv, old, ref = _inputs(with_bias=False)
    ids = torch.where(mask.bool(), ids, 0)
    ours = _run(FusedLinearGRPOLoss(), hidden, weight, None, ids, mask, adv, ref)
    theirs = _run(_liger(), hidden, weight, None, ids, mask, adv, ref)
    assert ours["metrics"].shape == (2,)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


@needs_liger
@pytest.mark.parametrize("num_items", [None, 53, "tensor"])
def test_reference_from_hidden_states_and_num_items(num_items):
    """ref_input / ref_weight / ref_bias: the reference log-probs are computed, as Liger computes them."""
    hidden, weight, bias, ids, mask, adv, old, _ = _inputs()
    ids = torch.where(mask.bool(), ids, 0)
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    ref_weight, ref_bias = weight + 0.1 * torch.randn_like(weight), bias + 0.1 * torch.randn_like(bias)
    n = torch.tensor(53.0) if num_items == "tensor" else num_items
    kwargs = dict(ref_input=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, num_items_in_batch=n)
    opts = dict(beta=0.3, loss_type="dapo", temperature=1.3)
    ours = _run(FusedLinearGRPOLoss(**opts), hidden, weight, bias, ids, mask, adv, None, old, **kwargs)
    theirs = _run(_liger(**opts), hidden, weight, bias, ids, mask, adv, None, old, **kwargs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert ours["metrics"][0] > 0  # the KL to a different reference is not zero


@needs_liger
def test_without_reference_model_kl_vanishes():
    hidden, weight, bias, ids, mask, adv, old, ref = _inputs()
    ids = torch.where(mask.bool(), ids, 0)
    opts = dict(beta=0.5, use_ref_model=False, loss_type="grpo")
    ours = _run(FusedLinearGRPOLoss(**opts), hidden, weight, bias, ids, mask, adv, ref, old)
    theirs = _run(_liger(**opts), hidden, weight, bias, ids, mask, adv, ref, old)
    assert ours["metrics"][0] == 0
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mixed_dtype_weight_is_cast_like_liger():
    hidden, weight, _, ids, mask, adv, old, ref = _inputs(with_bias=False)
    ids = torch.where(mask.bool(), ids, 0)
    h = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.clone().requires_grad_()  # float32 head, bfloat16 hidden states (TRL's cast_lm_head_to_fp32 off)
    loss, _ = FusedLinearGRPOLoss(loss_type="bnpo")(h, w, ids, mask, adv, None, ref, old)
    loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="vespo", importance_sampling_level="sequence"), "Liger refuses"),
    (dict(loss_type="luspo"), "importance_sampling_level='sequence'"),
    (dict(delta=0.5), "delta"),
    (dict(delta=1.2, epsilon_high=0.28), "delta"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(loss_type="cispo", importance_sampling_level="sequence"), "importance_sampling_level"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearGRPOLoss(**kwargs)


def test_forward_errors():
    hidden, weight, _, ids, mask, adv, old, ref = _inputs(with_bias=False)
    with pytest.raises(ValueError, match="ref_per_token_logps or ref_input"):
        FusedLinearGRPOLoss()(hidden, weight, ids, mask, adv)
    with pytest.raises(ValueError, match="ref_weight"):
        FusedLinearGRPOLoss()(hidden, weight, ids, mask, adv, ref_input=hidden)
    luspo = FusedLinearGRPOLoss(loss_type="luspo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="beta"):
        luspo(hidden, weight, ids, mask, adv, None, ref, old)
    luspo = FusedLinearGRPOLoss(beta=0.0, loss_type="luspo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="per-sequence vllm_is_ratio"):
        luspo(hidden, weight, ids, mask, adv, None, ref, old, vllm_is_ratio=torch.ones(B, T))
    with pytest.raises(ValueError, match="_input"):
        FusedLinearGRPOLoss()(hidden[0], weight, ids, mask, adv, None, ref)
    with pytest.raises(ValueError, match="targets"):
        FusedLinearGRPOLoss()(hidden, weight, torch.full_like(ids, V), mask, adv, None, ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FusedLinearGRPOLoss()(hidden, weight, torch.where(mask.bool(), ids, 0), mask, adv, None, ref,
                              ref_input=hidden, ref_weight=weight)
    assert any("Using ref_per_token_logps" in str(w.message) for w in caught)
