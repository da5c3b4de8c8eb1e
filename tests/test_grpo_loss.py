"""lvrpo_fast.grpo_loss on the kernel backends against the float64 reference (docs/math.md sections 3 to 7).

Every check takes three numbers (tests/tolerances.py): the float64 reference as the truth, the
reference at the working precision, and the backend, for the loss, every metric and the gradients
w.r.t. logp and entropy.

Coverage of the options. The full product, loss_type x importance-sampling level x (beta = 0, k1,
k2, k3) x delta x dual clip x bias-corrected KL (with beta > 0) x rollout weights (none, [B, T], [B])
x entropy bonus, is 2,352 cases per backend. Measured on a random sample of 80 of them under the
Triton interpreter (B = 5, T = 7, this project's 2 shared CPU cores): 0.14 s of CPU a case, so about
5.6 CPU-minutes for Triton alone (16 minutes of wall time on the loaded machine), over the 3-minute
budget. So every loss_type x level x KL setting runs with all toggles off, each toggle alone and
all toggles on (434 cases per backend: 76 s of CPU for Triton, 3 minutes of wall time on the loaded
machine; a few seconds for C++). The toggles are separate terms of the per-token loss and its
gradient, so a wrong interaction between them shows in the all-on case. The masks and the TRL-style
entropy bonus (off-policy mask, high-entropy mask, token-mean bonus) act on the policy term only, so
they run with beta = 0 and k3 alone (the KL estimators cannot interact with them). With vespo and
cispo / sapo at the sequence level (TRL 1.16) that is 666 cases per backend; the whole file took 141 s
of CPU under the Triton interpreter (5 minutes of wall time, load 3-4 from other jobs), a few seconds
for C++. Every check also compares the per-sequence statistics (return_sequence_stats) with the float64
reference's.
"""
import pytest
import torch

import lvrpo_fast
from lvrpo_fast import dispatch
from lvrpo_fast.contract import NSTATS
from lvrpo_fast.options import CLIP_FAMILY, LOSS_TYPES
from checks import check_loss_run

B, T = 5, 7

# Every (loss_type, importance_sampling_level): the sequence-level ratio takes the place of the token's
# ratio in every policy term (vespo's weight is a sequence quantity at either level).
LOSS_LEVELS = [(lt, level) for level in ("token", "sequence") for lt in LOSS_TYPES]

KL_SETTINGS = {
    "beta0": {},
    "k1": {"beta": 0.1, "kl_estimator": "k1"},
    "k2": {"beta": 0.1, "kl_estimator": "k2"},
    "k3": {"beta": 0.1, "kl_estimator": "k3"},
}

# Each toggle: (options, inputs). Inputs: "weights" None / "token" ([B, T]) / "sequence" ([B]),
# "entropy" True to pass an entropy tensor. delta and clip_ratio_c are chosen inside the range of
# the ratios drawn below (exp(N(0, 0.3))), so the two-sided and dual clips both bind on some tokens.
TOGGLES = {
    "off": ({}, {}),
    "delta": ({"delta": 1.3}, {}),
    "dual_clip": ({"clip_ratio_c": 1.4}, {}),
    "bias_kl": ({"use_bias_correction_kl": True}, {}),
    "weights_token": ({}, {"weights": "token"}),
    "weights_seq": ({}, {"weights": "sequence"}),
    "entropy": ({"entropy_coef": 0.05}, {"entropy": True}),
    "off_policy": ({"off_policy_mask_threshold": 0.02}, {"sampling": True}),
    "entropy_mask": ({"top_entropy_quantile": 0.5}, {"entropy": True}),
    "entropy_token_mean": ({"entropy_coef": 0.05, "entropy_agg": "token_mean", "top_entropy_quantile": 0.25},
                           {"entropy": True}),
    # delta and the dual clip both bound the loss of A < 0 tokens from above, so with both on only
    # the smaller binds (here delta); each alone covers the other.
    "all": ({"delta": 1.3, "clip_ratio_c": 1.4, "use_bias_correction_kl": True, "entropy_coef": 0.05,
             "off_policy_mask_threshold": 0.02, "top_entropy_quantile": 0.5},
            {"weights": "token", "entropy": True, "sampling": True}),
}
# The toggles of the policy term's masks, run with beta = 0 and k3 only (see the module docstring).
MASK_TOGGLES = ("off_policy", "entropy_mask", "entropy_token_mean")


def base_options(loss_type, level="token", length=T):
    """Options of a loss_type with its clip range: asymmetric (DAPO clip-higher) for the clip family
    and sapo, an absolute cap inside the drawn ratios for cispo; dr_grpo's normalizer."""
    options = {"loss_type": loss_type, "importance_sampling_level": level, "epsilon_low": 0.2,
               "epsilon_high": 1.25 if loss_type == "cispo" else 0.28}
    if loss_type == "dr_grpo":
        options["max_completion_length"] = length + 4
    return options


def make_inputs(b=B, t=T, *, old=True, ref=True, weights=None, entropy=False, sampling=False, masked_row=1,
                spread=0.3, density=0.75, generator=None):
    """Fresh random float32 CPU inputs of grpo_loss as a dict.

    logp in [-3, -0.05]; logp_old, logp_ref and logp_sampling = logp + N(0, spread) so that the ratios
    straddle the clip bounds and the off-policy mask drops some sequences; mask a fraction `density` of
    ones with row `masked_row` fully masked (None: none is)."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    logp = -(rand(b, t) * 2.95 + 0.05)
    mask = rand(b, t) < density
    if masked_row is not None and masked_row < b:
        mask[masked_row] = False
    data = {"logp": logp, "advantages": randn(b), "mask": mask,
            "logp_old": logp + spread * randn(b, t) if old else None,
            "logp_ref": logp + spread * randn(b, t) if ref else None,
            "logp_sampling": logp + spread * randn(b, t) if sampling else None,
            "entropy": rand(b, t) * 3.0 if entropy else None,
            "rollout_weights": None}
    if weights == "token":
        data["rollout_weights"] = rand(b, t) * 1.5 + 0.25
    elif weights == "sequence":
        data["rollout_weights"] = rand(b) * 1.5 + 0.25
    return data


def run_grpo_loss(backend, data, dtype, device, options, constants_require_grad=False, stats=False):
    """grpo_loss on `data` cast to dtype; returns (loss, metrics, {input name: gradient or None}), and
    the per-sequence statistics [B, NSTATS] as a fourth element when `stats`."""
    def cast(t):  # a fresh leaf each run, never the caller's tensor
        if t is None:
            return None
        return t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)

    logp = cast(data["logp"]).requires_grad_()
    entropy = cast(data["entropy"])
    if entropy is not None:
        entropy.requires_grad_()
    constants = {k: cast(data.get(k)) for k in ("logp_old", "logp_ref", "logp_sampling", "rollout_weights")}
    if constants_require_grad:
        for t in constants.values():
            if t is not None:
                t.requires_grad_()
    loss, metrics, sequence_stats = lvrpo_fast.grpo_loss(
        logp, cast(data["advantages"]), data["mask"].to(device), entropy=entropy, backend=backend,
        return_sequence_stats=True, **constants, **options)
    if loss.requires_grad:
        loss.backward()
    grads = {"logp": logp.grad, "entropy": None if entropy is None else entropy.grad}
    if constants_require_grad:
        grads.update({k: t.grad for k, t in constants.items() if t is not None})
    if stats:
        return loss, metrics, grads, sequence_stats.columns()
    return loss, metrics, grads


def check_grpo_loss(name, device, data, options, dtype=torch.float32):
    """The three-number check of the loss, every metric and both gradients; returns the backend's run."""
    kernel = run_grpo_loss(name, data, dtype, device, options, stats=True)
    ref = run_grpo_loss("reference", data, dtype, torch.device("cpu"), options, stats=True)
    truth = run_grpo_loss("reference", data, torch.float64, torch.device("cpu"), options, stats=True)
    check_loss_run(f"{name} {options}", kernel, ref, truth, dtype, metric_dtype=torch.float32,
                   zero_at={"logp": ~data["mask"]})
    return kernel[:3]


def _product_cases():
    for loss_type, level in LOSS_LEVELS:
        for kl in KL_SETTINGS:
            for toggle in TOGGLES:
                if toggle == "bias_kl" and kl == "beta0":
                    continue  # bias correction of an absent KL is the "off" case again
                if toggle in MASK_TOGGLES and kl in ("k1", "k2"):
                    continue
                if toggle == "weights_seq" and loss_type == "vespo":
                    continue  # vespo sums its rollout weights' logs per token: [B] weights are refused
                yield pytest.param(loss_type, level, kl, toggle, id=f"{loss_type}-{level}-{kl}-{toggle}")


@pytest.mark.parametrize("loss_type,level,kl,toggle", list(_product_cases()))
def test_options(kernel_backend, loss_type, level, kl, toggle):
    name, device = kernel_backend
    toggle_options, toggle_inputs = TOGGLES[toggle]
    options = {**base_options(loss_type, level), **KL_SETTINGS[kl], **toggle_options}
    data = make_inputs(**toggle_inputs)
    check_grpo_loss(name, device, data, options)


@pytest.mark.parametrize("loss_type,level", [pytest.param(*c, id="-".join(c)) for c in LOSS_LEVELS])
def test_default_logp_old(kernel_backend, loss_type, level):
    """logp_old = None means logp.detach(): ratio exactly 1, so every clip-family token sits on the
    tie of torch.minimum and its gradient must total -A (half through each branch)."""
    name, device = kernel_backend
    options = {**base_options(loss_type, level), "beta": 0.05, "use_bias_correction_kl": True}
    data = make_inputs(old=False)
    check_grpo_loss(name, device, data, options)
    if loss_type in ("grpo", "luspo", "seq_mean_token_sum"):
        _, metrics, grads = run_grpo_loss(name, data, torch.float32, device, base_options(loss_type, level))
        counts = data["mask"].sum(1, keepdim=True).clamp(min=1)
        per_row = 1.0 / counts if loss_type == "grpo" else torch.ones_like(counts, dtype=torch.float32)
        expected = -data["advantages"][:, None] * per_row / B * data["mask"]
        torch.testing.assert_close(grads["logp"].cpu(), expected, rtol=1e-6, atol=1e-7)
        assert metrics["ratio"].item() == 1.0 and metrics["clip_ratio_region"].item() == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("explicit_old", [False, True])
def test_clip_bounds_inclusive(kernel_backend, level, explicit_old):
    """epsilon_low = epsilon_high = 0 and ratio exactly 1: every token sits on both clip bounds at
    once. torch.clamp passes the gradient at its bounds, so the clipped branch still carries its half
    of the tie and the total is -A, as for an unclipped token (an exclusive bound would give -A / 2)."""
    name, device = kernel_backend
    data = make_inputs(old=explicit_old, spread=0.0)
    options = {"loss_type": "seq_mean_token_sum", "importance_sampling_level": level, "epsilon_low": 0.0,
               "epsilon_high": 0.0}
    _, _, grads = check_grpo_loss(name, device, data, options)
    expected = -data["advantages"][:, None] / B * data["mask"]
    torch.testing.assert_close(grads["logp"].cpu(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token")])
def test_half_precision_logp(kernel_backend, loss_type, level, dtype):
    name, device = kernel_backend
    if not dispatch.usable(name, device, dtype)[0]:
        pytest.skip(f"{name} does not take {dtype}")
    data = make_inputs(entropy=True, weights="sequence")
    data = {k: None if v is None else (v.to(dtype).float() if v.is_floating_point() else v) for k, v in data.items()}
    options = {**base_options(loss_type, level), "beta": 0.1, "entropy_coef": 0.02}
    check_grpo_loss(name, device, data, options, dtype=dtype)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_mask(kernel_backend, loss_type):
    """No unmasked token: loss 0, zero gradients, metrics 0, nothing NaN (docs/math.md section 6)."""
    name, device = kernel_backend
    data = make_inputs(entropy=True)
    data["mask"] = torch.zeros(B, T, dtype=torch.bool)
    options = {**base_options(loss_type), "beta": 0.1, "entropy_coef": 0.1}
    loss, metrics, grads = run_grpo_loss(name, data, torch.float32, device, options)
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for v in metrics.values()), metrics
    assert torch.equal(grads["logp"], torch.zeros_like(grads["logp"]))
    assert torch.equal(grads["entropy"], torch.zeros_like(grads["entropy"]))


@pytest.mark.parametrize("loss_type,level", [pytest.param(*c, id="-".join(c)) for c in LOSS_LEVELS])
def test_equal_rewards(kernel_backend, loss_type, level):
    """Groups of equal rewards have advantages 0: no policy term, only the KL remains."""
    name, device = kernel_backend
    rewards = torch.full((B,), 0.5, device=device)
    advantages = lvrpo_fast.group_advantages(rewards, B, backend=name)
    assert not advantages.any()
    data = make_inputs()
    data["advantages"] = advantages.cpu()
    loss, _, grads = run_grpo_loss(name, data, torch.float32, device, base_options(loss_type, level))
    assert loss.item() == 0.0 and not grads["logp"].any()
    check_grpo_loss(name, device, data, {**base_options(loss_type, level), "beta": 0.2})


@pytest.mark.parametrize("loss_type,level", [pytest.param(*c, id="-".join(c)) for c in LOSS_LEVELS])
def test_fully_masked_sequence(kernel_backend, loss_type, level):
    """A sequence with no token contributes nothing (its GSPO ratio is exp(0 / 1) = 1, unused),
    gets zero gradient, and still counts in the batch mean of grpo / luspo / seq_mean_token_sum."""
    name, device = kernel_backend
    data = make_inputs(masked_row=2, entropy=True)
    options = {**base_options(loss_type, level), "beta": 0.1, "entropy_coef": 0.05}
    _, _, grads = check_grpo_loss(name, device, data, options)
    assert not grads["logp"][2].any() and not grads["entropy"][2].any()


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("bnpo", "sequence"), ("cispo", "token"),
                                             ("sapo", "token"), ("luspo", "sequence")])
def test_single_token(kernel_backend, loss_type, level):
    name, device = kernel_backend
    data = make_inputs(t=1, masked_row=None, entropy=True, weights="token")
    options = {**base_options(loss_type, level, length=1), "beta": 0.1, "entropy_coef": 0.1, "delta": 1.3}
    check_grpo_loss(name, device, data, options)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_num_items_in_batch(kernel_backend, loss_type):
    """dapo / cispo / vespo divide by a given token count (of the whole generation batch), int or tensor."""
    name, device = kernel_backend
    data = make_inputs()
    count = int(data["mask"].sum())
    for items in (3 * count + 1, torch.tensor(float(2 * count), device=device)):
        options = {**base_options(loss_type), "num_items_in_batch": items}
        loss, _, _ = check_grpo_loss(name, device, data, options)
        default, _, _ = run_grpo_loss(name, data, torch.float32, device, base_options(loss_type))
        torch.testing.assert_close(loss * float(items), default * count, rtol=1e-5, atol=1e-6)


def test_dr_grpo_max_completion_length(kernel_backend):
    """dr_grpo divides by B * max_completion_length, not by the token count."""
    name, device = kernel_backend
    data = make_inputs()
    losses = {}
    for length in (T, 3 * T + 2):
        options = {**base_options("dr_grpo"), "max_completion_length": length}
        losses[length], _, _ = check_grpo_loss(name, device, data, options)
    torch.testing.assert_close(losses[T] * T, losses[3 * T + 2] * (3 * T + 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entropy_coef", [0.3, -0.2, 0.0])
def test_entropy_gradient(kernel_backend, entropy_coef):
    """The entropy bonus's gradient w.r.t. entropy is -entropy_coef * mask * row_scale; with
    entropy_coef = 0 the entropy is only a metric and gets no gradient."""
    name, device = kernel_backend
    data = make_inputs(entropy=True)
    for loss_type in ("grpo", "bnpo"):
        options = {**base_options(loss_type), "entropy_coef": entropy_coef}
        _, metrics, grads = check_grpo_loss(name, device, data, options)
        assert "entropy" in metrics
        if entropy_coef == 0:
            assert grads["entropy"] is None or not grads["entropy"].any()


def test_constants_get_no_gradient(kernel_backend):
    """logp_old, logp_ref and the rollout weights are constants of the loss (docs/math.md sections 3, 5)."""
    name, device = kernel_backend
    data = make_inputs(weights="token")
    options = {**base_options("grpo", "sequence"), "beta": 0.1, "use_bias_correction_kl": True}
    _, _, grads = run_grpo_loss(name, data, torch.float32, device, options, constants_require_grad=True)
    for key in ("logp_old", "logp_ref", "rollout_weights"):
        assert grads[key] is None or not grads[key].any(), f"{key} got a gradient"
    assert grads["logp"] is not None and grads["logp"].any()


def test_clamped_log_ratio(kernel_backend):
    """Log-ratios beyond +-20 are clamped (verl's guard): no gradient through a clamped ratio, and at
    exactly +-20 the gradient still passes, as torch.clamp's does."""
    name, device = kernel_backend
    data = make_inputs(masked_row=None)
    # exactly representable differences, so that +-20 is hit exactly in float32 and float64 alike
    data["logp"][0, :3] = torch.tensor([-0.5, -1.0, -0.25])
    data["logp_old"][0, :3] = torch.tensor([-25.5, 29.0, -20.25])
    data["mask"][0, :3] = True
    # A < 0 puts the clip family on its un-clipped branch, where a ratio of exp(20) would multiply
    # any gradient leaking through the clamp by 5e8.
    data["advantages"][0] = -1.5
    data["logp_old"][3] = data["logp"][3] + 40.0  # a whole sequence far off: s = exp(-20)
    data["mask"][3, :2] = True
    for loss_type, level in (("grpo", "token"), ("sapo", "token"), ("luspo", "sequence")):
        options = {**base_options(loss_type, level), "beta": 0.1, "use_bias_correction_kl": True}
        check_grpo_loss(name, device, data, options)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_multi_block(monkeypatch, level):
    """Sequences longer than one block: every pass of the kernel loops with a ragged last block."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dispatch.usable("triton", device, torch.float32)[0] is None:
        pytest.skip("triton backend unavailable")
    from lvrpo_fast.kernels import autotune

    monkeypatch.setattr(autotune, "GRPO_LOSS_MAX_BLOCK_T", 4)
    data = make_inputs(t=13, entropy=True, weights="token")
    options = {**base_options("grpo", level), **TOGGLES["all"][0], "beta": 0.1}
    check_grpo_loss("triton", device, data, options)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_sequence_ratio_takes_the_place_of_rho(kernel_backend, loss_type):
    """cispo and sapo at the sequence level (TRL 1.16): the per-token ratio replaced by the sequence's s.
    With every token of a sequence sharing logp - logp_old = c, s = exp(c) = rho: both levels agree."""
    name, device = kernel_backend
    data = make_inputs(masked_row=None)
    data["logp_old"] = data["logp"] - 0.3 * torch.randn(B, 1)  # one log-ratio per sequence
    options = base_options(loss_type, "token")
    token = run_grpo_loss(name, data, torch.float32, device, options)
    sequence = check_grpo_loss(name, device, data, {**options, "importance_sampling_level": "sequence"})
    # Equal in exact arithmetic; in float32 s = exp(mean of the token log-ratios) rounds differently from
    # each token's exp(log-ratio) (a T-term sum, a division, another exp): a few ulps, so ~80 ulps of room,
    # far below any real disagreement (a wrong level moves the loss by ~1e-1 on these inputs).
    torch.testing.assert_close(sequence[0], token[0], rtol=1e-5, atol=1e-7)
    if loss_type == "cispo":  # no gradient through the capped weight: the two levels' gradients agree
        torch.testing.assert_close(sequence[2]["logp"], token[2]["logp"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("delta,epsilon", [(1.0, 0.2), (0.9, 0.2), (None, 1.0), (None, 1.5)])
def test_delta_and_epsilon_as_trl_takes_them(kernel_backend, delta, epsilon):
    """delta <= 1 (TRL bounds the un-clipped ratio by any delta) and epsilon_low >= 1 (no lower clip bound)."""
    name, device = kernel_backend
    options = {**base_options("grpo"), "epsilon_low": epsilon, "delta": delta, "beta": 0.1}
    check_grpo_loss(name, device, make_inputs(spread=0.6), options)


def test_input_errors(kernel_backend):
    name, device = kernel_backend
    data = make_inputs()
    logp = data["logp"].to(device)
    adv = data["advantages"].to(device)
    mask = data["mask"].to(device)
    with pytest.raises(ValueError, match="beta"):
        lvrpo_fast.grpo_loss(logp, adv, mask, beta=0.1, backend=name)
    with pytest.raises(ValueError, match="max_completion_length"):
        lvrpo_fast.grpo_loss(logp, adv, mask, loss_type="dr_grpo", backend=name)
    with pytest.raises(ValueError, match="advantages"):
        lvrpo_fast.grpo_loss(logp, adv[:-1], mask, backend=name)
    with pytest.raises(ValueError, match="rollout_weights"):
        lvrpo_fast.grpo_loss(logp, adv, mask, rollout_weights=adv[:-1], backend=name)
    with pytest.raises(ValueError, match="entropy"):
        lvrpo_fast.grpo_loss(logp, adv, mask, entropy_coef=0.1, backend=name)


def test_non_finite_input_is_not_hidden(kernel_backend):
    """A NaN at an unmasked position must not come out as a finite loss (docs/math.md section 8)."""
    name, device = kernel_backend
    data = make_inputs(masked_row=None)
    data["mask"][0, 0] = True
    data["logp"][0, 0] = float("nan")
    loss, _, _ = run_grpo_loss(name, data, torch.float32, device, {"beta": 0.1})
    assert not torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------
# Per-token advantages [B, T] (process rewards, GAE)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,level", [pytest.param(*c, id="-".join(c)) for c in LOSS_LEVELS])
def test_per_token_advantages(kernel_backend, loss_type, level):
    """Advantages [B, T] of both signs within a sequence, every loss type and level, with the KL,
    delta, dual clip and rollout weights on: loss, metrics and gradients against float64."""
    name, device = kernel_backend
    options = {**base_options(loss_type, level), **KL_SETTINGS["k3"]}
    if loss_type in CLIP_FAMILY:
        options.update(delta=1.5, clip_ratio_c=2.0)
    data = make_inputs(weights="token", entropy=True)
    data["advantages"] = torch.randn(B, T)
    check_grpo_loss(name, device, data, options)


@pytest.mark.parametrize("loss_type,level", [pytest.param(*c, id="-".join(c)) for c in LOSS_LEVELS])
def test_per_sequence_advantages_broadcast_give_the_same_bits(kernel_backend, loss_type, level):
    name, device = kernel_backend
    options = {**base_options(loss_type, level), **KL_SETTINGS["k3"]}
    data = make_inputs(weights="token" if loss_type == "vespo" else "sequence")
    per_sequence = run_grpo_loss(name, data, torch.float32, device, options)
    broadcast = run_grpo_loss(name, {**data, "advantages": data["advantages"][:, None].expand(B, T).contiguous()},
                              torch.float32, device, options)
    assert torch.equal(per_sequence[0], broadcast[0])
    for key in per_sequence[1]:
        assert torch.equal(per_sequence[1][key], broadcast[1][key]), key
    assert torch.equal(per_sequence[2]["logp"], broadcast[2]["logp"])


def test_advantages_of_a_wrong_shape_are_refused(kernel_backend):
    name, device = kernel_backend
    data = make_inputs()
    with pytest.raises(ValueError, match=r"advantages must have shape \(5,\) \(per sequence\) or \(5, 7\)"):
        lvrpo_fast.grpo_loss(data["logp"].to(device), torch.randn(B, T + 1, device=device), data["mask"].to(device),
                             backend=name)
