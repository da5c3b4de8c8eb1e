"""Inputs that used to give a wrong number without a word, on every backend they concern.

Each case is either computed right (zeros for an empty batch, NaN for a NaN at an unmasked position,
the same result whatever masked positions hold) or refused with an error that names what is wrong.
A wrong number is worse than an error.
"""
import warnings

import numpy as np
import pytest
import torch

import lvrpo_fast
from backends_under_test import KERNEL_BACKENDS, device
from lvrpo_fast import dispatch
from lvrpo_fast.contract import LOSS_TYPES
from tolerances import assert_close_to_truth

ALL_BACKENDS = ("reference",) + KERNEL_BACKENDS
V, D = 37, 12


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    name = request.param
    dev = torch.device("cpu") if name in ("cpp", "reference") else device()
    module, why = dispatch.usable(name, dev, torch.float32)
    if module is None:
        pytest.skip(f"{name} backend unavailable on {dev}: {why}")
    return name, dev


def _options(loss_type):
    options = {"loss_type": loss_type}
    if loss_type == "dr_grpo":
        options["max_completion_length"] = 8
    if loss_type == "luspo":
        options["importance_sampling_level"] = "sequence"
    return options


def _batch(b=4, t=6, dev="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {
        "hidden": torch.randn(b, t, D, generator=g),
        "weight": torch.randn(V, D, generator=g) * 0.5,
        "bias": torch.randn(V, generator=g) * 0.1,
        "targets": torch.randint(0, V, (b, t), generator=g),
        "mask": torch.rand(b, t, generator=g) < 0.7,
        "advantages": torch.randn(b, generator=g),
        "logp_old": -torch.rand(b, t, generator=g) * 3,
        "logp_ref": -torch.rand(b, t, generator=g) * 3,
        "rollout_weights": torch.rand(b, t, generator=g) + 0.5,
    }
    if b > 1 and t > 0:
        data["mask"][1] = False  # one fully masked sequence
    if b > 0 and t > 0:
        data["mask"][0, 0] = True
    out = {k: v.to(dev) for k, v in data.items()}
    for k in ("hidden", "weight", "bias"):
        out[k] = out[k].to(dtype)
    return out


def _leaves(data):
    return {k: data[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")}


def _linear_loss(data, name, leaves=None, **options):
    leaves = leaves or _leaves(data)
    loss, metrics = lvrpo_fast.fused_linear_grpo_loss(
        leaves["hidden"], leaves["weight"], data["targets"], data["mask"], data["advantages"], bias=leaves["bias"],
        logp_old=data["logp_old"], logp_ref=data["logp_ref"], rollout_weights=data["rollout_weights"], beta=0.05,
        return_entropy=True, backend=name, **options)
    return loss, metrics, leaves


# ------------------------------------------------------------------------------------------------------
# 1. All-masked and empty log-probabilities: zeros, zero gradients
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5), (0, 5), (3, 0)], ids=["all-masked", "B=0", "T=0"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_logprobs_with_no_live_token_are_zero(backend, shape, grad):
    name, dev = backend
    for attempt in range(2):  # uninitialized memory would differ between runs; zeros do not
        hidden = torch.randn(*shape, D, device=dev, requires_grad=grad)
        weight = torch.randn(V, D, device=dev, requires_grad=grad)
        targets = torch.randint(0, V, shape, device=dev)
        mask = torch.zeros(shape, dtype=torch.bool, device=dev)
        with torch.set_grad_enabled(grad):
            logp, entropy = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, mask=mask, return_entropy=True,
                                                             backend=name)
        assert logp.shape == shape and entropy.shape == shape
        assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(entropy, torch.zeros_like(entropy))
        if grad:
            (logp.sum() + entropy.sum()).backward()
            assert hidden.grad is None or torch.equal(hidden.grad, torch.zeros_like(hidden))
            assert weight.grad is None or torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_hf_completion_logprobs_all_masked_is_zero(name):
    transformers = pytest.importorskip("transformers")
    from lvrpo_fast.integrations.hf import completion_logprobs

    if dispatch.usable(name, torch.device("cpu"), torch.float32)[0] is None:
        pytest.skip(f"{name} unavailable here")
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, V, (2, 9))
    completion_mask = torch.zeros(2, 4, dtype=torch.bool)
    logp, entropy = completion_logprobs(model, ids, torch.ones_like(ids), logits_to_keep=4, completion_mask=completion_mask,
                                        return_entropy=True, backend=name)
    assert torch.equal(logp, torch.zeros(2, 4)) and torch.equal(entropy, torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------------------
# 2. NaN never becomes a number; values at masked positions never matter
# ------------------------------------------------------------------------------------------------------
def _poison(data, where, value=float("nan")):
    data = {k: v.clone() for k, v in data.items()}
    b, t = where
    if where == "weight":
        data["weight"][3, 0] = value
    elif where == "bias":
        data["bias"][5] = value
    else:
        data[where[2]][b, t] = value
    return data


UNMASKED_POISON = {
    "logp_old": (0, 0, "logp_old"),
    "logp_ref": (0, 0, "logp_ref"),
    "hidden": (0, 0, "hidden"),
    "rollout_weights": (0, 0, "rollout_weights"),
}


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("where", list(UNMASKED_POISON) + ["weight-nan", "weight-inf", "bias-nan"])
def test_nonfinite_input_at_an_unmasked_position_reaches_the_loss(backend, where, beta):
    name, dev = backend
    data = _batch(dev=dev)
    if where == "weight-nan":
        data["weight"][3, 0] = float("nan")
    elif where == "weight-inf":
        # +inf on the target's logit of token (0, 0): its log-probability is inf - inf = NaN. (An inf
        # elsewhere may legitimately give logp = -inf, which the log-ratio clamp turns into a number.)
        data["weight"][data["targets"][0, 0], 0] = float("inf") * torch.sign(data["hidden"][0, 0, 0])
    elif where == "bias-nan":
        data["bias"][3] = float("nan")
    else:
        b, t, key = UNMASKED_POISON[where]
        data[key][b, t] = float("nan")
    leaves = _leaves(data)
    loss, _ = lvrpo_fast.fused_linear_grpo_loss(
        leaves["hidden"], leaves["weight"], data["targets"], data["mask"], data["advantages"], bias=leaves["bias"],
        logp_old=data["logp_old"], logp_ref=data["logp_ref"], rollout_weights=data["rollout_weights"], beta=beta,
        backend=name)
    if where == "logp_ref" and beta == 0:
        assert torch.isfinite(loss), "logp_ref does not enter the loss when beta = 0"
    else:
        assert not torch.isfinite(loss), f"{name}: a non-finite {where} gave the finite loss {loss.item()}"


def test_fp16_logit_overflow_is_not_a_finite_loss(backend):
    name, dev = backend
    if dispatch.usable(name, dev, torch.float16)[0] is None:
        pytest.skip(f"{name} takes no float16 here")
    data = _batch(dev=dev)
    hidden = (data["hidden"] * 3000).half()  # logits past float16's 65504
    weight = (data["weight"] * 30).half()
    loss, _ = lvrpo_fast.fused_linear_grpo_loss(hidden, weight, data["targets"], data["mask"], data["advantages"],
                                                logp_old=data["logp_old"], backend=name)
    assert not torch.isfinite(loss)


def test_out_of_range_target_under_the_skip_switch_is_never_a_number(backend, monkeypatch):
    name, dev = backend
    monkeypatch.setenv("LVRPO_SKIP_TARGET_CHECK", "1")
    data = _batch(dev=dev)
    data["targets"][0, 0] = V + 5
    try:
        loss, _ = lvrpo_fast.fused_linear_grpo_loss(data["hidden"], data["weight"], data["targets"], data["mask"],
                                                    data["advantages"], logp_old=data["logp_old"], backend=name)
    except (RuntimeError, ValueError, IndexError) as exc:  # refusing is fine; a number is not
        assert "target" in str(exc) or "index" in str(exc).lower()
        return
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_nan_logp_at_an_unmasked_token_reaches_the_loss(backend, loss_type):
    name, dev = backend
    data = _batch(dev=dev)
    logp = -torch.rand(4, 6, device=dev)
    logp[0, 0] = float("nan")
    options = _options(loss_type)
    if loss_type in ("cispo", "sapo"):
        options.pop("importance_sampling_level", None)
    loss, _ = lvrpo_fast.grpo_loss(logp, data["advantages"], data["mask"], logp_old=data["logp_old"], backend=name,
                                   **options)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_values_at_masked_positions_never_matter(backend, level):
    name, dev = backend
    clean = _batch(dev=dev)
    dirty = {k: v.clone() for k, v in clean.items()}
    masked = ~clean["mask"]
    for key in ("logp_old", "logp_ref", "rollout_weights"):
        dirty[key][masked] = float("nan")
    dirty["hidden"][masked] = float("nan")
    dirty["targets"][masked] = -100
    dirty["advantages"][1] = float("nan")  # sequence 1 is fully masked
    results = []
    for data in (clean, dirty):
        loss, metrics, leaves = _linear_loss(data, name, importance_sampling_level=level)
        loss.backward()
        results.append((loss, metrics, {k: v.grad for k, v in leaves.items()}))
    (loss_c, metrics_c, grads_c), (loss_d, metrics_d, grads_d) = results
    assert torch.isfinite(loss_d) and torch.equal(loss_c, loss_d), (loss_c, loss_d)
    for key in metrics_c:
        assert torch.equal(metrics_c[key], metrics_d[key]), key
    for key in grads_c:
        assert torch.isfinite(grads_d[key]).all(), f"{name}: non-finite gradient w.r.t. {key}"
        assert torch.equal(grads_c[key], grads_d[key]), key


def test_values_at_masked_positions_never_matter_in_grpo_loss_and_logprobs(backend):
    name, dev = backend
    data = _batch(dev=dev)
    masked = ~data["mask"]
    logp = (-torch.rand(4, 6, device=dev)).requires_grad_()
    entropy = torch.rand(4, 6, device=dev).requires_grad_()
    clean = lvrpo_fast.grpo_loss(logp, data["advantages"], data["mask"], logp_old=data["logp_old"],
                                 logp_ref=data["logp_ref"], entropy=entropy, beta=0.1, entropy_coef=0.01,
                                 backend=name)[0]
    g_clean = torch.autograd.grad(clean, [logp, entropy])
    logp2 = logp.detach().clone()
    entropy2 = entropy.detach().clone()
    old2, ref2 = data["logp_old"].clone(), data["logp_ref"].clone()
    for t in (logp2, entropy2, old2, ref2):
        t[masked] = float("nan")
    logp2.requires_grad_()
    entropy2.requires_grad_()
    dirty = lvrpo_fast.grpo_loss(logp2, data["advantages"], data["mask"], logp_old=old2, logp_ref=ref2,
                                 entropy=entropy2, beta=0.1, entropy_coef=0.01, backend=name)[0]
    g_dirty = torch.autograd.grad(dirty, [logp2, entropy2])
    assert torch.equal(clean, dirty)
    for a, b in zip(g_clean, g_dirty):
        assert torch.equal(a, b)
    hidden = torch.randn(3, 5, D, device=dev)
    mask = torch.rand(3, 5, device=dev) < 0.6
    hidden_nan = hidden.clone()
    hidden_nan[~mask] = float("nan")
    weight = torch.randn(V, D, device=dev)
    targets = torch.randint(0, V, (3, 5), device=dev)
    a = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, mask=mask, backend=name)
    b = lvrpo_fast.fused_linear_logprobs(hidden_nan, weight, targets, mask=mask, backend=name)
    assert torch.equal(a, b)


def test_nan_reward_makes_its_group_nan(backend):
    name, dev = backend
    rewards = torch.tensor([1.0, float("nan"), 2.0, 3.0, 0.5, 0.5], device=dev)
    for scale in ("group", "batch", "none"):
        adv = lvrpo_fast.group_advantages(rewards, 2, scale=scale, backend=name).cpu()
        assert torch.isnan(adv[:2]).all(), f"{name} scale={scale}: {adv.tolist()}"
        assert torch.equal(adv[4:], torch.zeros(2)), "an equal group stays exactly 0"
        if scale != "batch":  # the batch std is NaN for every group
            assert torch.isfinite(adv[2:4]).all()


# ------------------------------------------------------------------------------------------------------
# 3. Autocast: the head runs in autocast's dtype on every backend
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_head_in_autocasts_dtype(backend, padded, dtype):
    name, dev = backend
    if dispatch.usable(name, dev, dtype)[0] is None:
        pytest.skip(f"{name} takes no {dtype} here")
    data = _batch(dev=dev)
    if not padded:
        data["mask"][:] = True
    leaves, leaves_logp = _leaves(data), _leaves(data)
    with torch.autocast(dev.type, dtype=dtype):
        loss, metrics, _ = _linear_loss(data, name, leaves=leaves)
        logp = lvrpo_fast.fused_linear_logprobs(leaves_logp["hidden"], leaves_logp["weight"], data["targets"],
                                                bias=leaves_logp["bias"], mask=data["mask"], backend=name)
    loss.backward()
    logp.sum().backward()
    for key in leaves:  # the gradients flow back through the cast, to the inputs' dtype
        assert leaves[key].grad.dtype == torch.float32 and leaves_logp[key].grad.dtype == torch.float32, key
    # The same as calling with inputs cast to autocast's dtype by hand, outside autocast.
    cast, cast_logp = ({k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()} for _ in range(2))
    loss_cast, _, _ = _linear_loss(data, name, leaves=cast)
    logp_cast = lvrpo_fast.fused_linear_logprobs(cast_logp["hidden"], cast_logp["weight"], data["targets"],
                                                 bias=cast_logp["bias"], mask=data["mask"], backend=name)
    loss_cast.backward()
    logp_cast.sum().backward()
    assert torch.equal(loss, loss_cast) and torch.equal(logp, logp_cast)
    for key in leaves:
        assert torch.equal(leaves[key].grad, cast[key].grad.float()), key
        assert torch.equal(leaves_logp[key].grad, cast_logp[key].grad.float()), key
    # And every backend agrees with the float64 truth on those bf16 / fp16 inputs, within the table.
    truth, _, _ = _linear_loss({**data, **{k: v.detach().to(dtype).double() for k, v in leaves.items()}},
                               "reference")
    ref, _, _ = _linear_loss({**data, **{k: v.detach().to(dtype) for k, v in leaves.items()}}, "reference")
    assert_close_to_truth(loss.cpu(), ref.detach().cpu(), truth.detach().cpu(), dtype, "loss under autocast")


# ------------------------------------------------------------------------------------------------------
# 4. Empty batches: loss 0, zero gradients
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(0, 6), (4, 0)], ids=["B=0", "T=0"])
def test_empty_batch_gives_zero_loss_and_gradients(backend, loss_type, shape):
    name, dev = backend
    data = _batch(*shape, dev=dev)
    options = _options(loss_type)
    loss, metrics, leaves = _linear_loss(data, name, **options)
    assert loss.item() == 0.0 and all(torch.isfinite(m) for m in metrics.values())
    loss.backward()
    for key, leaf in leaves.items():
        assert leaf.grad is None or not leaf.grad.any(), key
    logp = torch.zeros(shape, device=dev, requires_grad=True)
    loss, _ = lvrpo_fast.grpo_loss(logp, data["advantages"], data["mask"], backend=name, **options)
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad is None or logp.grad.shape == shape


# ------------------------------------------------------------------------------------------------------
# 5. Options given as tensors and numpy scalars
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-3.0, 0.0, float("nan"), float("inf")])
def test_num_items_in_batch_tensor_is_validated_like_a_number(backend, value):
    name, dev = backend
    data = _batch(dev=dev)
    with pytest.raises(ValueError, match="num_items_in_batch must be finite and > 0"):
        _linear_loss(data, name, loss_type="dapo", num_items_in_batch=torch.tensor(value, device=dev))
    with pytest.raises(ValueError, match="num_items_in_batch"):
        lvrpo_fast.grpo_loss(-torch.rand(4, 6, device=dev), data["advantages"], data["mask"], loss_type="dapo",
                             num_items_in_batch=torch.tensor(value, device=dev), backend=name)


def test_num_items_in_batch_tensor_must_be_a_scalar():
    with pytest.raises(ValueError, match="num_items_in_batch must be a scalar"):
        lvrpo_fast.GRPOOptions(loss_type="dapo", num_items_in_batch=torch.tensor([3.0, 4.0]))
    with pytest.raises(TypeError, match="num_items_in_batch must be a real number"):
        lvrpo_fast.GRPOOptions(loss_type="dapo", num_items_in_batch=torch.tensor(True))


def test_num_items_in_batch_tensor_equals_the_number(backend):
    name, dev = backend
    data = _batch(dev=dev)
    a = _linear_loss(data, name, loss_type="dapo", num_items_in_batch=17)[0]
    b = _linear_loss(data, name, loss_type="dapo", num_items_in_batch=torch.tensor(17, device=dev))[0]
    assert torch.equal(a, b)


def test_numpy_scalars_are_numbers(backend):
    name, dev = backend
    data = _batch(dev=dev)
    a = _linear_loss(data, name, temperature=0.75, epsilon_low=0.2)[0]
    b = _linear_loss(data, name, temperature=np.float32(0.75), epsilon_low=np.float64(0.2))[0]
    assert torch.equal(a, b)
    lvrpo_fast.group_advantages(torch.rand(4, device=dev), np.int64(2), eps=np.float32(1e-4), backend=name)
    with pytest.raises(TypeError, match="temperature must be a number"):
        _linear_loss(data, name, temperature=True)


# ------------------------------------------------------------------------------------------------------
# 6. Double backward: supported by the reference, a clear error elsewhere
# ------------------------------------------------------------------------------------------------------
def test_double_backward_is_refused_clearly_or_exact(backend):
    name, dev = backend
    data = _batch(dev=dev)
    leaves = _leaves(data)
    loss, _, _ = _linear_loss(data, name, leaves=leaves)
    logp = lvrpo_fast.fused_linear_logprobs(leaves["hidden"], leaves["weight"], data["targets"], mask=data["mask"],
                                            backend=name)
    logp_leaf = (-torch.rand(4, 6, device=dev)).requires_grad_()
    small = lvrpo_fast.grpo_loss(logp_leaf, data["advantages"], data["mask"], logp_old=data["logp_old"],
                                 backend=name)[0]
    for what, out, wrt in (("fused_linear_grpo_loss", loss, leaves["hidden"]),
                           ("fused_linear_logprobs", logp.sum(), leaves["hidden"]),
                           ("grpo_loss", small, logp_leaf)):
        if name == "reference":
            (g,) = torch.autograd.grad(out, wrt, create_graph=True, retain_graph=True)
            assert g.requires_grad, f"{what}: the reference keeps the graph of its gradient"
            continue
        with pytest.raises(RuntimeError, match=r"double backward .* not supported .*backend='reference'"):
            torch.autograd.grad(out, wrt, create_graph=True, retain_graph=True)


# ------------------------------------------------------------------------------------------------------
# 7. Inputs changed in place between the forward and the backward pass
# ------------------------------------------------------------------------------------------------------
def test_inputs_changed_in_place_before_backward_raise(backend):
    """The LM head's weight (or hidden states) changed in place after the forward pass: the reference's
    autograd needs them for the backward and raises; so do the fused ops (they save them for the
    version check). grpo_loss on given log-probabilities needs none of its inputs' values in the
    backward on any backend, so changing them afterwards is harmless there, as in the reference."""
    name, dev = backend
    data = _batch(dev=dev)
    leaves = _leaves(data)
    hidden = leaves["hidden"] * 1.0  # a non-leaf, as a model's last hidden states are
    loss, _ = lvrpo_fast.fused_linear_grpo_loss(hidden, leaves["weight"], data["targets"], data["mask"],
                                                data["advantages"], backend=name)
    with torch.no_grad():
        leaves["weight"].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    leaves = _leaves(data)
    logp = lvrpo_fast.fused_linear_logprobs(leaves["hidden"], leaves["weight"], data["targets"], mask=data["mask"],
                                            backend=name)
    with torch.no_grad():
        leaves["weight"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


# ------------------------------------------------------------------------------------------------------
# 8. The module validates at construction and takes attention_mask=None
# ------------------------------------------------------------------------------------------------------
def test_module_is_exported_and_validates_at_construction():
    assert lvrpo_fast.FusedLinearGRPOLoss is lvrpo_fast.modules.FusedLinearGRPOLoss
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        lvrpo_fast.FusedLinearGRPOLoss(temperature=0)
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'gpu'"):
        lvrpo_fast.FusedLinearGRPOLoss(backend="gpu")
    with pytest.raises(ValueError, match="loss_type"):
        lvrpo_fast.FusedLinearGRPOLoss(loss_type="ppo")


def test_module_attention_mask_none_means_every_token(backend):
    name, dev = backend
    data = _batch(dev=dev)
    module = lvrpo_fast.FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, backend=name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_none, _ = module(data["hidden"], data["weight"], data["targets"], None, data["advantages"])
    loss_ones, _ = module(data["hidden"], data["weight"], data["targets"], torch.ones(4, 6, device=dev),
                          data["advantages"])
    assert torch.equal(loss_none, loss_ones)
    loss_fn, _ = lvrpo_fast.fused_linear_grpo_loss(data["hidden"], data["weight"], data["targets"], None,
                                                   data["advantages"], loss_type="dapo", backend=name)
    assert torch.equal(loss_fn, loss_ones)
