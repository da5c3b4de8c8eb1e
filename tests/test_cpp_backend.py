"""What is specific to the C++ CPU backend: its build and cache, the fallback when it cannot be built,
LVRPO_BACKEND=reference, thread-count independence, and each primitive against float64 formulas.

The numerics of the public ops through this backend are in the per-op test files (kernel_backend
fixture, "-k cpp"); here the primitives are called directly on random tiles.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lvrpo_fast
from lvrpo_fast import dispatch, reference
from lvrpo_fast.contract import NSTATS, STAT_LOSS, STAT_RATIO, token_loss_params
from lvrpo_fast.backends import cpp
from lvrpo_fast.options import GRPOOptions
from tolerances import assert_close_to_truth

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def built():
    module, why = cpp.load_extension()
    if module is None:
        pytest.skip(f"the C++ backend cannot be built here: {why}")
    return module


def _run_python(code, env_updates, timeout=600):
    env = dict(os.environ)
    env.update(env_updates)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _small_problem(dtype=torch.float32, B=3, T=5, D=19, V=1023):
    hidden = torch.randn(B, T, D, dtype=dtype)
    weight = (torch.randn(V, D) / D ** 0.5).to(dtype)
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    advantages = torch.randn(B)
    return hidden, weight, targets, mask, advantages


# ------------------------------------------------------------------------------------------------
# Build, cache and fallback
# ------------------------------------------------------------------------------------------------
def test_second_load_does_not_recompile(built):
    name = cpp.extension_name([cpp.source_dir() / f for f in cpp.SOURCES + cpp.HEADERS], *cpp.compile_flags())
    library = next((cpp.build_root() / name).glob(f"{name}.*"))
    stamp = library.stat().st_mtime_ns
    result = _run_python("""
        import torch
        import lvrpo_fast.backends.cpp as cpp
        print(cpp.available(torch.device("cpu"), torch.float32))
    """, {"LVRPO_BUILD_DIR": str(cpp.build_root())})
    assert result.returncode == 0, result.stderr
    assert "(True, '')" in result.stdout
    assert cpp.COMPILING_MESSAGE not in result.stderr
    assert library.stat().st_mtime_ns == stamp


def test_import_never_compiles_and_missing_compiler_falls_back(tmp_path):
    # A fresh cache and a compiler that does not exist: importing does nothing, "auto" warns with the
    # reason and returns the reference's result, backend="cpp" raises with the reason.
    result = _run_python("""
        import json, warnings, torch
        import lvrpo_fast
        import lvrpo_fast.backends.cpp as cpp
        import os
        out = {"built_on_import": os.path.exists(os.environ["LVRPO_BUILD_DIR"])}
        torch.manual_seed(0)
        hidden, weight = torch.randn(2, 3, 7), torch.randn(11, 7)
        targets, mask, adv = torch.randint(0, 11, (2, 3)), torch.ones(2, 3, dtype=torch.bool), torch.randn(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, _ = lvrpo_fast.fused_linear_grpo_loss(hidden, weight, targets, mask, adv)
        expected, _ = lvrpo_fast.reference.fused_linear_grpo_loss(hidden, weight, targets, mask, adv)
        out["same_as_reference"] = bool(torch.equal(loss, expected))
        out["warnings"] = [str(w.message) for w in caught]
        out["reason"] = cpp.available(torch.device("cpu"), torch.float32)[1]
        try:
            lvrpo_fast.fused_linear_grpo_loss(hidden, weight, targets, mask, adv, backend="cpp")
            out["raised"] = None
        except RuntimeError as exc:
            out["raised"] = str(exc)
        print(json.dumps(out))
    """, {"LVRPO_BUILD_DIR": str(tmp_path / "cache"), "CXX": str(tmp_path / "no-such-c++"),
          "LVRPO_BACKEND": "auto"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert not out["built_on_import"]
    assert "no-such-c++" in out["reason"] and "\n" not in out["reason"]
    assert out["same_as_reference"]
    assert any(out["reason"] in w and "reference" in w for w in out["warnings"]), out["warnings"]
    assert out["raised"] is not None and out["reason"] in out["raised"]


def test_compile_error_is_reported_once(tmp_path, monkeypatch):
    # Sources that fail at their first line: the reason is the compiler's error line, the build is
    # attempted once per process, and the one-line message says that it compiles.
    broken = tmp_path / "csrc"
    broken.mkdir()
    for file in cpp.SOURCES + cpp.HEADERS:
        (broken / file).write_text("#error lvrpo_fast test: deliberately broken source\n")
    monkeypatch.setattr(cpp, "source_dir", lambda: broken)
    monkeypatch.setenv("LVRPO_BUILD_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpp, "_state", None)
    attempts = []
    real_build = cpp.build
    monkeypatch.setattr(cpp, "build", lambda: attempts.append(1) or real_build())
    ok, why = cpp.available(torch.device("cpu"), torch.float32)
    assert not ok and "deliberately broken source" in why and "\n" not in why
    assert cpp.available(torch.device("cpu"), torch.float16) == (False, why)
    assert len(attempts) == 1
    with pytest.raises(RuntimeError, match="deliberately broken source"):
        lvrpo_fast.group_advantages(torch.randn(4), 2, backend="cpp")
    with pytest.warns(RuntimeWarning, match="deliberately broken source"):
        adv = lvrpo_fast.group_advantages(torch.tensor([1.0, 2.0, 4.0, 3.0]), 2, backend="auto")
    torch.testing.assert_close(adv, reference.group_advantages(torch.tensor([1.0, 2.0, 4.0, 3.0]), 2), rtol=0, atol=0)


def test_available_refuses_other_devices_and_dtypes():
    ok, why = cpp.available(torch.device("cuda"), torch.float32)
    assert not ok and "CPU" in why
    ok, why = cpp.available(torch.device("cpu"), torch.float64)
    assert not ok and "float64" in why


def test_environment_forces_reference(monkeypatch):
    monkeypatch.setenv("LVRPO_BACKEND", "reference")

    def no_build():
        raise AssertionError("LVRPO_BACKEND=reference must not touch the C++ backend")

    monkeypatch.setattr(cpp, "load_extension", no_build)
    assert dispatch.select(None, torch.device("cpu"), torch.float32) is reference
    hidden, weight, targets, mask, adv = _small_problem()
    logp_ref = -torch.rand(3, 5)
    loss, metrics = lvrpo_fast.fused_linear_grpo_loss(hidden, weight, targets, mask, adv, beta=0.1, logp_ref=logp_ref)
    expected, expected_metrics = reference.fused_linear_grpo_loss(hidden, weight, targets, mask, adv, beta=0.1,
                                                                  logp_ref=logp_ref)
    assert torch.equal(loss, expected)
    assert all(torch.equal(metrics[k], expected_metrics[k]) for k in expected_metrics)


# ------------------------------------------------------------------------------------------------
# Threads
# ------------------------------------------------------------------------------------------------
def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_primitives_do_not_depend_on_thread_count(built, dtype):
    C, V = 64, 3001  # enough rows per tile for at::parallel_for to split them
    logits = (torch.randn(C, V) * 4).to(dtype)
    targets = torch.randint(0, V, (C,))
    grad_logp, grad_entropy = torch.randn(C), torch.randn(C)

    def run():
        logp, lse, entropy = cpp.logits_stats(logits, targets, 0.8, True)
        grad = logits.clone()
        cpp.logits_grad_(grad, targets, lse, entropy, grad_logp, grad_entropy, 0.8)
        return logp, lse, entropy, grad

    for one, two in zip(_with_threads(1, run), _with_threads(2, run)):
        assert torch.equal(one, two)


def test_sequence_primitives_do_not_depend_on_thread_count(built):
    B, T, G = 1200, 7, 4  # more sequences (and groups) than one task's grain
    logp = -torch.rand(B, T) * 3
    args = (logp, logp + torch.randn(B, T) * 0.3, logp + torch.randn(B, T) * 0.3, logp + torch.randn(B, T) * 0.3,
            torch.randn(B), torch.rand(B, T) > 0.2, torch.rand(B, T) + 0.5, torch.rand(B, T), torch.tensor(0.5),
            torch.rand(B) + 0.1)
    options = GRPOOptions(importance_sampling_level="sequence", beta=0.1, off_policy_mask_threshold=0.05)
    rewards = torch.randn(G * 1500)

    def run():
        stats, grad = cpp.grpo_token_loss(*args, token_loss_params(options), True)
        return stats, grad, cpp.group_advantages(rewards, G, "group", 1e-4, True)

    for one, two in zip(_with_threads(1, run), _with_threads(2, run)):
        assert torch.equal(one, two)


# ------------------------------------------------------------------------------------------------
# Primitives against torch float64 formulas
# ------------------------------------------------------------------------------------------------
def _stats_formula(logits, targets, temperature, compute):
    z = logits.to(compute) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None])[:, 0] - lse
    p = torch.softmax(z, dim=-1)
    entropy = lse - torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)  # p z -> 0 at z = -inf
    return logp, lse, entropy


def _grad_formula(logits, targets, grad_logp, grad_entropy, temperature, compute):
    z = logits.to(compute) / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    log_p = z - lse
    p = torch.exp(log_p)
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(targets, z.shape[1]).to(compute)
    entropy_term = torch.where(p > 0, p * (log_p + entropy), torch.zeros_like(p))
    return (grad_logp.to(compute)[:, None] * (onehot - p) - grad_entropy.to(compute)[:, None] * entropy_term) / temperature


TILES = [  # (C, V, logit scale, temperature): vocabularies off every block size, one across blocks, V = 1
    (7, 1023, 3.0, 0.7),
    (5, 4099, 1.0, 1.0),
    (3, 1, 1.0, 1.3),
    (6, 2048, 8.0, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,V,scale,temperature", TILES)
def test_logits_stats_and_grad_match_float64(built, dtype, C, V, scale, temperature):
    logits = (torch.randn(C, V) * scale).to(dtype)
    targets = torch.randint(0, V, (C,))
    truth = _stats_formula(logits, targets, temperature, torch.float64)
    ref = _stats_formula(logits, targets, temperature, torch.float32)
    got = cpp.logits_stats(logits, targets, temperature, True)
    for name, k, r, t in zip(("logp", "lse", "entropy"), got, ref, truth):
        assert k.dtype == torch.float32 and k.shape == (C,)
        assert_close_to_truth(k, r, t, dtype, name)
    assert (got[0] <= 0).all() and (got[2] >= -1e-6).all()
    logp_only, _, no_entropy = cpp.logits_stats(logits, targets, temperature, False)
    assert no_entropy is None and torch.equal(logp_only, got[0])

    grad_logp, grad_entropy = torch.randn(C), torch.randn(C)
    grad_logp[0] = grad_entropy[0] = 0.0  # a masked row: exactly zero even with a poisoned tile
    logits[0] = float("nan")
    grad = logits.clone()
    cpp.logits_grad_(grad, targets, got[1], got[2], grad_logp, grad_entropy, temperature)
    truth_grad = _grad_formula(logits[1:], targets[1:], grad_logp[1:], grad_entropy[1:], temperature, torch.float64)
    ref_grad = _grad_formula(logits[1:], targets[1:], grad_logp[1:], grad_entropy[1:], temperature, torch.float32)
    assert_close_to_truth(grad[1:], ref_grad, truth_grad, dtype, "grad logits")
    assert (grad[0] == 0).all()

    grad = logits.clone()  # the entropy gets no gradient: both None
    cpp.logits_grad_(grad, targets, got[1], None, grad_logp, None, temperature)
    truth_grad = _grad_formula(logits[1:], targets[1:], grad_logp[1:], torch.zeros(C - 1), temperature, torch.float64)
    ref_grad = _grad_formula(logits[1:], targets[1:], grad_logp[1:], torch.zeros(C - 1), temperature, torch.float32)
    assert_close_to_truth(grad[1:], ref_grad, truth_grad, dtype, "grad logits, no entropy")


def test_large_logits_and_minus_inf_are_exact(built):
    # Logits near 1e4: lse - sum p z would cancel to ~1e-3 in float32; the accumulator relative to the
    # running maximum keeps the entropy to float32 accuracy (no reference slack in these checks).
    # -inf logits (a masked vocabulary) contribute nothing instead of 0 * -inf.
    C, V = 5, 3001
    logits = 1e4 + torch.randn(C, V) * 2
    logits[:, ::7] = float("-inf")
    targets = torch.randint(0, V, (C,))
    targets = torch.where(targets % 7 == 0, targets + 1, targets)
    truth = _stats_formula(logits, targets, 1.0, torch.float64)
    got = cpp.logits_stats(logits, targets, 1.0, True)
    for name, k, t in zip(("logp", "lse", "entropy"), got, truth):
        assert_close_to_truth(k, None, t, torch.float32, name)
    # The gradient reads lse back as float32 (the primitive contract), whose rounding at 1e4 (ulp 1e-3)
    # scales p by up to 5e-4: checked at ordinary magnitudes, with the same -inf entries.
    logits -= 1e4
    _, lse, entropy = cpp.logits_stats(logits, targets, 1.0, True)
    grad_logp, grad_entropy = torch.randn(C), torch.randn(C)
    grad = logits.clone()
    cpp.logits_grad_(grad, targets, lse, entropy, grad_logp, grad_entropy, 1.0)
    truth_grad = _grad_formula(logits, targets, grad_logp, grad_entropy, 1.0, torch.float64)
    assert_close_to_truth(grad, None, truth_grad, torch.float32, "grad logits")
    assert (grad[:, ::7] == 0).all()


def test_non_finite_logits_give_non_finite_stats(built):
    logits = torch.randn(3, 5000)
    logits[1, 2100:4200] = float("nan")  # a whole block of NaN must not be skipped as if it were -inf
    logits[2, 17] = float("inf")
    logp, lse, entropy = cpp.logits_stats(logits, torch.zeros(3, dtype=torch.long), 1.0, True)
    assert torch.isfinite(lse[0]) and torch.isfinite(entropy[0])
    assert not torch.isfinite(lse[1:]).any() and not torch.isfinite(logp[1:]).any()


def test_bad_primitive_inputs_name_the_argument(built):
    logits = torch.randn(3, 11)
    with pytest.raises(RuntimeError, match="targets"):
        cpp.logits_stats(logits, torch.tensor([0, 11, 2]), 1.0, False)
    with pytest.raises(RuntimeError, match="logits must be"):
        cpp.logits_stats(logits.double(), torch.tensor([0, 1, 2]), 1.0, False)
    with pytest.raises(RuntimeError, match="lse"):
        cpp.logits_grad_(logits, torch.tensor([0, 1, 2]), torch.zeros(2), None, torch.zeros(3), None, 1.0)


LOSS_OPTIONS = [
    dict(loss_type="seq_mean_token_sum"),
    dict(loss_type="seq_mean_token_sum", importance_sampling_level="sequence", beta=0.1, use_bias_correction_kl=True),
    dict(loss_type="seq_mean_token_sum", delta=1.2, clip_ratio_c=2.0, epsilon_high=0.3, beta=0.05, kl_estimator="k2"),
    dict(loss_type="seq_mean_token_sum", delta=0.9, epsilon_low=1.0, beta=0.05, kl_estimator="k1"),
    dict(loss_type="cispo", epsilon_high=1.3, beta=0.02),
    dict(loss_type="cispo", epsilon_high=1.3, importance_sampling_level="sequence"),
    dict(loss_type="sapo", beta=0.03, use_bias_correction_kl=True),
    dict(loss_type="sapo", importance_sampling_level="sequence", off_policy_mask_threshold=0.0),
    dict(loss_type="vespo", beta=0.03, vespo_lambda_neg=0.5),
    dict(loss_type="seq_mean_token_sum", importance_sampling_level="sequence", off_policy_mask_threshold=0.05),
]


def _sequence_truth(logp, logp_old, logp_ref, logp_sampling, advantages, mask, weights, entropy, row_scale, options,
                    compute):
    """Per-sequence stats [B, NSTATS] and d(sum_b row_scale_b sum_t m L)/dlogp from the reference, one
    sequence at a time (a batch of one: its loss is the sequence's token sum times its weight)."""
    B, T = logp.shape
    stats = torch.zeros(B, NSTATS, dtype=torch.float64)
    grads = torch.zeros(B, T, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(compute))
    for b in range(B):
        one = slice(b, b + 1)
        lp = logp[one].to(compute).requires_grad_()
        loss, _, row = reference.grpo_loss_impl(
            lp, advantages[one].to(compute), mask[one], cast(None if logp_old is None else logp_old[one]),
            cast(logp_ref[one]), cast(entropy[one]), cast(weights[one]), options,
            logp_sampling=cast(logp_sampling[one]), return_stats=True)
        count = max(float(mask[b].sum()), 1.0)
        weight = {"seq_mean_token_sum": 1.0, "cispo": 1.0 / count, "sapo": 1.0 / count, "vespo": 1.0 / count}
        token_sum = loss / weight[options.loss_type]
        (token_sum * row_scale[b].to(compute)).backward()
        grads[b] = lp.grad[0].double()
        stats[b] = row[0].detach().double()
        stats[b, STAT_LOSS] = float(token_sum.detach()) * float(row_scale[b])
    return stats, grads


@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("with_old", [False, True])
def test_grpo_token_loss_matches_float64(built, options, with_old):
    opts = GRPOOptions(**options)
    B, T = 5, 9
    logp = -torch.rand(B, T) * 4
    logp_old = logp + torch.randn(B, T) * 0.5 if with_old else None
    if with_old:
        logp_old[0, 1] = logp[0, 1] + 25.0  # a log-ratio beyond the clamp: no gradient through the ratio
    logp_ref = logp + torch.randn(B, T) * 0.3
    logp_sampling = logp + torch.randn(B, T) * 0.3
    advantages = torch.randn(B)
    mask = torch.rand(B, T) > 0.25
    mask[3] = False  # a fully masked sequence
    weights = torch.rand(B, T) + 0.5
    entropy = torch.rand(B, T) * 3
    row_scale = torch.rand(B) + 0.1
    inputs = (logp, logp_old, logp_ref, logp_sampling, advantages, mask, weights, entropy, row_scale, opts)
    truth = _sequence_truth(*inputs, torch.float64)
    ref = _sequence_truth(*inputs, torch.float32)
    stats, grad = cpp.grpo_token_loss(logp, logp_old, logp_ref, logp_sampling, advantages, mask, weights, entropy,
                                      None, row_scale, token_loss_params(opts), True)
    assert stats.shape == (B, NSTATS) and grad.shape == (B, T)
    assert_close_to_truth(stats, ref[0], truth[0], torch.float32, "stats")
    assert_close_to_truth(grad, ref[1], truth[1], torch.float32, "grad_logp")
    assert (grad[~mask] == 0).all()
    no_grad_stats, none = cpp.grpo_token_loss(logp, logp_old, logp_ref, logp_sampling, advantages, mask, weights,
                                              entropy, None, row_scale, token_loss_params(opts), False)
    assert none is None and torch.equal(no_grad_stats, stats)


def test_grpo_token_loss_ties_at_ratio_one(built):
    # logp_old == logp: rho = 1, where min(rho A, clip(rho) A) ties; autograd gives each branch half,
    # the total is -A d rho / d logp = -A (times mask and row scale).
    B, T = 4, 6
    logp = -torch.rand(B, T)
    advantages = torch.randn(B)
    mask = torch.ones(B, T, dtype=torch.bool)
    row_scale = torch.rand(B) + 0.1
    stats, grad = cpp.grpo_token_loss(logp, logp.clone(), None, None, advantages, mask, None, None, None, row_scale,
                                      token_loss_params(GRPOOptions()), True)
    expected = (-advantages * row_scale)[:, None].expand(B, T)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats[:, STAT_RATIO], torch.full((B,), float(T)), rtol=0, atol=0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_group_advantages_match_float64(built, scale, leave_one_out):
    G = 5
    rewards = torch.randn(7 * G)
    rewards[G:2 * G] = 0.25  # an all-equal group
    truth = reference.advantages_impl(rewards.double(), G, scale, 1e-4, leave_one_out)
    ref = reference.advantages_impl(rewards, G, scale, 1e-4, leave_one_out)
    got = cpp.group_advantages(rewards, G, scale, 1e-4, leave_one_out)
    assert got.dtype == torch.float32
    assert_close_to_truth(got, ref, truth, torch.float32, "advantages")
    assert (got[G:2 * G] == 0).all()
