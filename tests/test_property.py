"""Property-based tests: shapes, dtypes, options and inputs drawn at random by hypothesis.

Each example runs a kernel backend (Triton, C++) and the reference at the working precision on the
same drawn inputs, and checks the backend against the float64 reference with the three numbers of
tests/tolerances.py (loss, every metric, every gradient), plus properties that hold for any input:
the clip ratios are fractions, the region contains low and high and no more, the mean ratio is
positive, masked positions get exactly zero gradient. The example counts are bounded for a 2-core
CI under the Triton interpreter, and derandomized so that CI sees the same examples on every run.
Hypothesis tries the first element of a sampled_from first and most often, so the informative
choice (a given logp_old, spread ratios, a mostly unmasked batch) comes first in each list.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvrpo_fast import dispatch
from lvrpo_fast.options import KL_ESTIMATORS, LOSS_TYPES
from test_grpo_loss import check_grpo_loss
from test_grpo_loss import make_inputs as grpo_inputs
from test_linear_grpo_loss import check_linear
from test_linear_grpo_loss import make_inputs as linear_inputs

PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def grpo_options(draw, length, entropy_mask=True):
    """Any valid combination of the GRPO options, with values where they bind on the drawn ratios.
    The high-entropy mask's quantile is drawn from values exact in binary (0.25 steps), so that its
    rank, (1 - q)(n - 1), is the same number in float32 and float64 and the truth keeps the tokens the
    kernel keeps; entropy_mask=False leaves it out (the fused op's entropies are its own float32 ones,
    whose ties with the threshold the float64 truth may break the other way)."""
    loss_type = draw(st.sampled_from(LOSS_TYPES))
    options = {"loss_type": loss_type, "epsilon_low": draw(st.floats(0.0, 1.5))}
    options["importance_sampling_level"] = draw(st.sampled_from(("token", "sequence")))
    if loss_type == "cispo":
        options["epsilon_high"] = draw(st.floats(0.5, 3.0))
    else:
        options["epsilon_high"] = draw(st.one_of(st.none(), st.floats(0.0, 0.6)))
    options["delta"] = draw(st.one_of(st.none(), st.floats(0.5, 2.5)))
    options["clip_ratio_c"] = draw(st.one_of(st.none(), st.floats(1.01, 3.0)))
    options["beta"] = draw(st.sampled_from((0.0, 0.04, 0.5)))
    options["kl_estimator"] = draw(st.sampled_from(KL_ESTIMATORS))
    options["use_bias_correction_kl"] = draw(st.booleans())
    options["entropy_coef"] = draw(st.sampled_from((0.0, 0.02, -0.1)))
    if loss_type == "dr_grpo":
        options["max_completion_length"] = draw(st.integers(length, length + 16))
    if loss_type in ("dapo", "cispo", "vespo"):
        options["num_items_in_batch"] = draw(st.one_of(st.none(), st.integers(1, 64)))
    if loss_type == "sapo":
        options["sapo_temperature_pos"] = draw(st.floats(0.25, 3.0))
        options["sapo_temperature_neg"] = draw(st.floats(0.25, 3.0))
    if loss_type == "vespo":
        for name in ("vespo_k_pos", "vespo_k_neg"):
            options[name] = draw(st.floats(0.0, 3.0))
        for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
            options[name] = draw(st.floats(0.0, 4.0))
    options["off_policy_mask_threshold"] = draw(st.one_of(st.none(), st.floats(-0.5, 0.5)))
    if entropy_mask:
        options["top_entropy_quantile"] = draw(st.sampled_from((1.0, 0.75, 0.5, 0.25, 0.0)))
    options["entropy_agg"] = draw(st.sampled_from(("loss_type", "token_mean")))
    return options


def _weights(data, options):
    """Rollout weights to draw: vespo takes per-token ones only."""
    choices = (None, "token") if options["loss_type"] == "vespo" else (None, "token", "sequence")
    return data.draw(st.sampled_from(choices), label="rollout_weights")


def _check_metric_properties(metrics):
    low, high, region = (metrics[k].item() for k in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region"))
    tol = 1e-6
    assert all(-tol <= x <= 1 + tol for x in (low, high, region)), metrics
    assert max(low, high) - tol <= region <= low + high + tol, metrics  # low and high never overlap
    assert metrics["ratio"].item() >= 0.0


def _skip_unless(name, device, dtype):
    if dispatch.usable(name, device, dtype)[0] is None:
        pytest.skip(f"{name} does not run {dtype} on {device}")


@settings(max_examples=80, **PROPERTY_SETTINGS)
@given(data=st.data(), b=st.integers(1, 5), t=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_grpo_loss_property(kernel_backend, data, b, t, seed):
    name, device = kernel_backend
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    _skip_unless(name, device, dtype)
    options = data.draw(grpo_options(t), label="options")
    inputs = grpo_inputs(
        b, t, old=data.draw(st.sampled_from((True, False)), label="logp_old"), ref=True,
        weights=_weights(data, options),
        entropy=options["entropy_coef"] != 0 or options["top_entropy_quantile"] < 1
        or data.draw(st.booleans(), label="entropy"),
        sampling=data.draw(st.booleans(), label="logp_sampling"),
        masked_row=data.draw(st.one_of(st.none(), st.integers(0, b - 1)), label="masked_row"),
        spread=data.draw(st.sampled_from((0.5, 2.0, 0.1, 0.0)), label="spread"),
        density=data.draw(st.sampled_from((0.9, 0.5, 1.0, 0.0)), label="density"),
        generator=torch.Generator().manual_seed(seed))
    # Inputs exactly representable in the working dtype, so the float64 truth sees what the kernel sees.
    inputs = {k: v if v is None or not v.is_floating_point() else v.to(dtype).float() for k, v in inputs.items()}
    _, metrics, _ = check_grpo_loss(name, device, inputs, options, dtype=dtype)
    _check_metric_properties(metrics)


@settings(max_examples=25, **PROPERTY_SETTINGS)
@given(data=st.data(), b=st.integers(1, 4), t=st.integers(1, 6), d=st.integers(1, 48),
       v=st.integers(2, 300), seed=st.integers(0, 2**31 - 1))
def test_fused_linear_grpo_loss_property(kernel_backend, data, b, t, d, v, seed):
    name, device = kernel_backend
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    _skip_unless(name, device, dtype)
    options = data.draw(grpo_options(t, entropy_mask=False), label="options")
    temperature = data.draw(st.sampled_from((1.0, 0.6, 1.7)), label="temperature")
    inputs = linear_inputs(
        b, t, d, v, group_size=2, bias=data.draw(st.booleans(), label="bias"),
        weights=_weights(data, options), sampling=data.draw(st.booleans(), label="logp_sampling"),
        temperature=temperature,
        masked_row=data.draw(st.one_of(st.none(), st.integers(0, b - 1)), label="masked_row"),
        density=data.draw(st.sampled_from((0.8, 1.0, 0.0)), label="density"),
        generator=torch.Generator().manual_seed(seed))
    for key in ("hidden", "weight", "bias"):
        if inputs[key] is not None:
            inputs[key] = inputs[key].to(dtype).float()
    return_entropy = data.draw(st.booleans(), label="return_entropy")
    _, metrics, _ = check_linear(name, device, inputs, options, dtype, temperature=temperature,
                                 return_entropy=return_entropy)
    _check_metric_properties(metrics)
