"""Every input error of docs/math.md section 8 gets a clear error naming the argument.

Checked through the package's public functions and through lvrpo_fast.reference, which share the
checks of lvrpo_fast.validate; backend="reference" keeps these tests independent of the kernels.
"""
import pytest
import torch

import lvrpo_fast
from lvrpo_fast import reference

APIS = {"public": lvrpo_fast, "reference": reference}


def _inputs(B=4, T=3, D=8, V=11):
    return dict(
        hidden=torch.randn(B, T, D),
        weight=torch.randn(V, D),
        targets=torch.randint(0, V, (B, T)),
        mask=torch.ones(B, T, dtype=torch.bool),
        advantages=torch.randn(B),
    )


def _call_linear(api, **overrides):
    x = _inputs()
    kw = {k: overrides.pop(k) for k in list(overrides) if k not in x}
    x.update(overrides)
    extra = {"backend": "reference"} if api is lvrpo_fast else {}
    return api.fused_linear_grpo_loss(x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"], **kw,
                                      **extra)


def _call_logprobs(api, hidden, weight, targets, **kw):
    extra = {"backend": "reference"} if api is lvrpo_fast else {}
    return api.fused_linear_logprobs(hidden, weight, targets, **kw, **extra)


def _call_grpo(api, logp, adv, mask, **kw):
    extra = {"backend": "reference"} if api is lvrpo_fast else {}
    return api.grpo_loss(logp, adv, mask, **kw, **extra)


@pytest.fixture(params=list(APIS))
def api(request):
    return APIS[request.param]


# --- shapes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,bad,match", [
    ("targets", torch.randint(0, 11, (4, 2)), r"targets must have shape \(4, 3\)"),
    ("mask", torch.ones(4, 2, dtype=torch.bool), r"mask must have shape \(4, 3\)"),
    ("advantages", torch.randn(3), r"advantages must have shape \(4,\)"),
    ("logp_old", torch.randn(4, 2), r"logp_old must have shape \(4, 3\)"),
    ("logp_ref", torch.randn(3, 3), r"logp_ref must have shape \(4, 3\)"),
    ("rollout_weights", torch.rand(4, 2), r"rollout_weights must have shape"),
    ("bias", torch.randn(10), r"bias must have shape \(11,\)"),
])
def test_shape_mismatch_names_the_argument(api, name, bad, match):
    with pytest.raises(ValueError, match=match):
        _call_linear(api, **{name: bad})


def test_hidden_d_must_match_weight_d(api):
    with pytest.raises(ValueError, match=r"hidden's last dimension D=8 does not match weight's D=9"):
        _call_linear(api, weight=torch.randn(11, 9))


def test_hidden_must_be_3d_for_the_fused_loss(api):
    with pytest.raises(ValueError, match=r"hidden must be a 3-D tensor \[B, T, D\], got \(12, 8\)"):
        _call_linear(api, hidden=torch.randn(12, 8))


def test_grpo_loss_shapes(api):
    with pytest.raises(ValueError, match=r"logp must be 2-D"):
        _call_grpo(api, torch.randn(4), torch.randn(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"entropy must have shape \(2, 5\)"):
        _call_grpo(api, torch.randn(2, 5), torch.randn(2), torch.ones(2, 5), entropy=torch.rand(2, 4))


# --- target ids -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", [-1, 11, 10**6])
def test_out_of_range_targets_at_unmasked_positions(api, bad_id):
    targets = torch.randint(0, 11, (4, 3))
    targets[2, 1] = bad_id
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, V=11\).*targets\[2, 1\] = {bad_id}"):
        _call_linear(api, targets=targets)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=11\)"):
        _call_logprobs(api, torch.randn(4, 3, 8), torch.randn(11, 8), targets)


def test_out_of_range_targets_at_masked_positions_are_allowed(api):
    targets = torch.randint(0, 11, (4, 3))
    mask = torch.ones(4, 3, dtype=torch.bool)
    targets[2, 1] = -100
    mask[2, 1] = False
    loss, _ = _call_linear(api, targets=targets, mask=mask)
    assert torch.isfinite(loss)


# --- dtypes and devices -------------------------------------------------------------------------------
def test_non_floating_hidden_or_weight(api):
    with pytest.raises(TypeError, match=r"hidden must be a floating-point tensor"):
        _call_linear(api, hidden=torch.randint(0, 3, (4, 3, 8)))
    with pytest.raises(TypeError, match=r"weight must be a floating-point tensor"):
        _call_linear(api, weight=torch.randint(0, 3, (11, 8)))
    with pytest.raises(TypeError, match=r"targets must be an integer tensor"):
        _call_linear(api, targets=torch.rand(4, 3))
    with pytest.raises(TypeError, match=r"hidden and weight must have the same dtype"):
        _call_linear(api, weight=torch.randn(11, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"logp must be a floating-point tensor"):
        _call_grpo(api, torch.zeros(2, 3, dtype=torch.long), torch.randn(2), torch.ones(2, 3))


def test_tensors_on_different_devices(api):
    with pytest.raises(ValueError, match=r"all tensors must be on one device.*weight on meta"):
        _call_linear(api, weight=torch.randn(11, 8, device="meta"))
    with pytest.raises(ValueError, match=r"all tensors must be on one device.*logp_ref on meta"):
        _call_grpo(api, torch.randn(2, 3), torch.randn(2), torch.ones(2, 3), beta=0.1,
                   logp_ref=torch.randn(2, 3, device="meta"))


# --- scalar options --------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(api, temperature):
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        _call_linear(api, temperature=temperature)


@pytest.mark.parametrize("opts,exc,match", [
    ({"epsilon_low": -0.1}, ValueError, r"epsilon_low must be >= 0"),
    ({"epsilon_high": -0.1}, ValueError, r"epsilon_high must be >= 0"),
    ({"loss_type": "ppo"}, ValueError, r"loss_type must be one of"),
    ({"kl_estimator": "k4", "beta": 0.1}, ValueError, r"kl_estimator must be one of"),
    ({"importance_sampling_level": "batch"}, ValueError, r"importance_sampling_level must be one of"),
    ({"beta": 0.1}, ValueError, r"beta=0.1 > 0 needs logp_ref"),
    ({"beta": -0.1}, ValueError, r"beta must be >= 0"),
    ({"loss_type": "dr_grpo"}, ValueError, r"dr_grpo' needs max_completion_length"),
    ({"delta": float("inf")}, ValueError, r"delta must be finite"),
    ({"top_entropy_quantile": 1.5}, ValueError, r"top_entropy_quantile must be in \[0, 1\]"),
    ({"top_entropy_quantile": -0.1}, ValueError, r"top_entropy_quantile must be >= 0"),
    ({"entropy_agg": "sum"}, ValueError, r"entropy_agg must be one of"),
    ({"off_policy_mask_threshold": float("nan")}, ValueError, r"off_policy_mask_threshold must be finite"),
    ({"vespo_k_pos": "2"}, TypeError, r"vespo_k_pos must be a number"),
    ({"clip_ratio_c": 1.0}, ValueError, r"clip_ratio_c must be > 1"),
    ({"sapo_temperature_pos": 0.0}, ValueError, r"sapo_temperature_pos must be > 0"),
    ({"num_items_in_batch": 0}, ValueError, r"num_items_in_batch must be > 0"),
    ({"max_completion_length": 0, "loss_type": "dr_grpo"}, ValueError, r"max_completion_length must be >= 1"),
    ({"epsilon": 0.2}, TypeError, r"unknown GRPO option\(s\) \['epsilon'\]"),
    ({"use_bias_correction_kl": "yes"}, TypeError, r"use_bias_correction_kl must be a bool"),
])
def test_bad_options(api, opts, exc, match):
    with pytest.raises(exc, match=match):
        _call_linear(api, **opts)
    with pytest.raises(exc, match=match):
        _call_grpo(api, -torch.rand(4, 3), torch.randn(4), torch.ones(4, 3), **opts)


def test_entropy_coef_needs_entropy(api):
    with pytest.raises(ValueError, match=r"entropy_coef=0.1 needs entropy"):
        _call_grpo(api, -torch.rand(2, 3), torch.randn(2), torch.ones(2, 3), entropy_coef=0.1)
    with pytest.raises(ValueError, match=r"top_entropy_quantile=0.5 < 1 needs entropy"):
        _call_grpo(api, -torch.rand(2, 3), torch.randn(2), torch.ones(2, 3), top_entropy_quantile=0.5)


def test_trl_values_that_were_refused_are_accepted(api):
    """TRL 1.16 trains with delta <= 1, epsilon >= 1 and cispo / sapo at the sequence level."""
    for opts in ({"delta": 1.0}, {"delta": 0.5}, {"epsilon_low": 1.0}, {"epsilon_low": 1.5},
                 {"loss_type": "cispo", "importance_sampling_level": "sequence"},
                 {"loss_type": "sapo", "importance_sampling_level": "sequence"}):
        loss, _ = _call_grpo(api, -torch.rand(4, 3), torch.randn(4), torch.ones(4, 3), **opts)
        assert torch.isfinite(loss), opts


# --- advantages ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    ({"group_size": 3}, ValueError, r"group_size=3 must divide the number of rewards B=8"),
    ({"group_size": 1}, ValueError, r"group_size must be >= 2"),
    ({"group_size": 2.0}, TypeError, r"group_size must be an int"),
    ({"group_size": 2, "scale": "global"}, ValueError, r"scale must be one of"),
    ({"group_size": 2, "eps": -1.0}, ValueError, r"eps must be a finite number >= 0"),
    ({"group_size": 2, "leave_one_out": 1}, TypeError, r"leave_one_out must be a bool"),
])
def test_bad_advantage_inputs(api, kwargs, exc, match):
    extra = {"backend": "reference"} if api is lvrpo_fast else {}
    kwargs = dict(kwargs)
    group_size = kwargs.pop("group_size")
    with pytest.raises(exc, match=match):
        api.group_advantages(torch.rand(8), group_size, **kwargs, **extra)


def test_rewards_must_be_1d_float(api):
    extra = {"backend": "reference"} if api is lvrpo_fast else {}
    with pytest.raises(ValueError, match=r"rewards must be 1-D \[B\]"):
        api.group_advantages(torch.rand(4, 2), 2, **extra)
    with pytest.raises(TypeError, match=r"rewards must be a floating-point tensor"):
        api.group_advantages(torch.arange(4), 2, **extra)
