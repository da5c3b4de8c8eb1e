"""Tests of the fused log-prob op (lvrpo_fast.fused_linear_logprobs) on every kernel backend, of the
two row primitives behind it (logits_stats, logits_grad_), and of the Triton launch configurations.

Every numeric check is three-number (tests/tolerances.py): float64 truth on the same inputs, the
eager reference at working precision, the kernel. The Triton kernels run through the interpreter on
a machine without a GPU, where each row costs tens of milliseconds, so the option grid is covered
by a covering array instead of the full cartesian product: every dtype meets every value of every
option, and every shape value appears.
"""
import math

import pytest
import torch

import lvrpo_fast
from lvrpo_fast import backends, dispatch, reference
from tolerances import assert_close_to_truth

from backends_under_test import device as _test_device

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (bias, temperature, entropy, mask): a strength-2 covering array of the four binary options, so
# every pair of option values occurs together at least once for every dtype.
OPTION_ROWS = (
    (False, 1.0, False, False),
    (False, 0.7, True, True),
    (True, 1.0, True, True),
    (True, 0.7, False, True),
    (True, 0.7, True, False),
)
# (N, D, V), rotated against the option rows per dtype so every dtype sees every N, D and V.
SHAPES = ((1, 123, 4099), (7, 32, 1023), (97, 123, 1023), (7, 123, 4099), (97, 32, 1023))


def _api_cases():
    cases = []
    for d, dtype in enumerate(DTYPES):
        for i, options in enumerate(OPTION_ROWS):
            shape = SHAPES[(i + 2 * d) % len(SHAPES)]
            bias, temperature, entropy, mask = options
            label = (f"{str(dtype)[6:]}-N{shape[0]}-D{shape[1]}-V{shape[2]}"
                     f"-bias{int(bias)}-T{temperature}-ent{int(entropy)}-mask{int(mask)}")
            cases.append(pytest.param(*shape, dtype, *options, id=label))
    # N = 97 with the larger vocabulary once: the largest tile, all options on.
    cases.append(pytest.param(97, 123, 4099, torch.bfloat16, True, 0.7, True, True, id="bfloat16-N97-D123-V4099-all"))
    return cases


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def make_inputs(N, D, V, dtype, dev, *, bias, mask, logit_scale=3.0, batch_shape=None):
    """Random LM-head inputs whose logits have standard deviation about logit_scale.

    Masked positions hold ids outside [0, V) (negative and >= V), which must be ignored."""
    shape = (N,) if batch_shape is None else batch_shape
    hidden = torch.randn(*shape, D, device=dev).to(dtype)
    weight = (torch.randn(V, D, device=dev) * (logit_scale / math.sqrt(D))).to(dtype)
    b = (torch.randn(V, device=dev) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, shape, device=dev)
    m = None
    if mask:
        m = torch.rand(shape, device=dev) > 0.3
        m.view(-1)[0] = True  # at least one scored token
        if m.numel() > 1:
            m.view(-1)[-1] = False  # and at least one masked one
        ids = torch.where(torch.rand(shape, device=dev) > 0.5, torch.full_like(targets, -100),
                          torch.full_like(targets, V + 7))
        targets = torch.where(m, targets, ids)
    return hidden, weight, b, targets, m


def run_logprobs(fn, hidden, weight, bias, targets, mask, temperature, entropy, grad_logp, grad_entropy, cast=None,
                 **kwargs):
    """Calls fn (the public op or the reference) on copies of the inputs cast to `cast`; returns
    (logp, entropy or None, grad_hidden, grad_weight, grad_bias or None) of
    sum(grad_logp * logp) + sum(grad_entropy * entropy)."""
    leaves = [t.detach().to(cast or t.dtype).requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature, return_entropy=entropy,
             mask=mask, **kwargs)
    logp, ent = out if entropy else (out, None)
    outputs, grads = [logp], [grad_logp.to(logp.dtype)]
    if entropy:
        outputs.append(ent)
        grads.append(grad_entropy.to(ent.dtype))
    inputs = [t for t in leaves if t is not None]
    gradients = torch.autograd.grad(outputs, inputs, grads)
    if bias is None:
        gradients = gradients + (None,)
    return (logp, ent) + tuple(gradients)


def backend_module(name):
    module, why = backends.load(name)
    assert module is not None, why
    return module


# ------------------------------------------------------------------------------------------------
# The public op against the float64 reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N, D, V, dtype, bias, temperature, entropy, masked", _api_cases())
def test_logprobs_matches_reference(kernel_backend, N, D, V, dtype, bias, temperature, entropy, masked):
    name, dev = kernel_backend
    hidden, weight, b, targets, mask = make_inputs(N, D, V, dtype, dev, bias=bias, mask=masked)
    grad_logp = torch.randn(N, device=dev)
    grad_entropy = torch.randn(N, device=dev)
    args = (hidden, weight, b, targets, mask, temperature, entropy, grad_logp, grad_entropy)
    kernel = run_logprobs(lvrpo_fast.fused_linear_logprobs, *args, backend=name)
    ref = run_logprobs(reference.fused_linear_logprobs, *args)
    truth = run_logprobs(reference.fused_linear_logprobs, *args, cast=torch.float64)

    for label, k, r, t in zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), kernel, ref, truth):
        if t is None:
            assert k is None, f"{label}: expected None"
            continue
        assert k.shape == t.shape, f"{label}: shape {tuple(k.shape)} != {tuple(t.shape)}"
        assert_close_to_truth(k, r, t, dtype, f"{name} {label}")
    logp, ent, grad_hidden, grad_weight, grad_bias = kernel
    assert logp.dtype == torch.float32 and (logp <= 0).all()
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    if entropy:
        assert ent.dtype == torch.float32 and (ent >= 0).all()
    if mask is not None:
        assert (logp[~mask] == 0).all()
        if entropy:
            assert (ent[~mask] == 0).all()
        # masked rows get zero gradient, whatever their (out-of-range) ids and upstream gradients
        assert (grad_hidden[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_chunk_matches_one_chunk(kernel_backend, monkeypatch, dtype):
    """A tile of 4 rows: the 15 rows' unmasked ones in chunks of 4 (masked rows never reach the LM
    head); hidden [3, 5, D] exercises the [..., D] layout."""
    name, dev = kernel_backend
    B, T, D, V = 3, 5, 123, 1023
    hidden, weight, b, targets, mask = make_inputs(B * T, D, V, dtype, dev, bias=True, mask=True, batch_shape=(B, T))
    grad_logp, grad_entropy = torch.randn(B, T, device=dev), torch.randn(B, T, device=dev)
    args = (hidden, weight, b, targets, mask, 0.7, True, grad_logp, grad_entropy)

    monkeypatch.delenv("LVRPO_CHUNK_BYTES", raising=False)
    one = run_logprobs(lvrpo_fast.fused_linear_logprobs, *args, backend=name)

    calls = []
    prims = backend_module(name)
    real_stats = prims.logits_stats

    def counting_stats(logits, *rest):
        calls.append(logits.shape[0])
        return real_stats(logits, *rest)

    monkeypatch.setattr(prims, "logits_stats", counting_stats)
    monkeypatch.setenv("LVRPO_CHUNK_BYTES", str(4 * V * hidden.element_size()))
    many = run_logprobs(lvrpo_fast.fused_linear_logprobs, *args, backend=name)
    live = int(mask.sum())
    assert 4 < live < B * T, "the inputs should need several chunks and hold masked rows"
    expected = [4] * (live // 4) + ([live % 4] if live % 4 else [])
    assert calls == expected, f"expected chunks of the {live} unmasked rows {expected}, logits_stats saw {calls}"

    ref = run_logprobs(reference.fused_linear_logprobs, *args)
    truth = run_logprobs(reference.fused_linear_logprobs, *args, cast=torch.float64)
    labels = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for label, c1, cn, r, t in zip(labels, one, many, ref, truth):
        assert cn.shape == t.shape
        assert_close_to_truth(cn, r, t, dtype, f"{name} {label}, 4 chunks")
        # The row-wise outputs do not depend on the chunking beyond the matmul's own rounding.
        assert_close_to_truth(cn, c1, t, dtype, f"{name} {label}, 4 chunks vs 1 chunk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits(kernel_backend, dtype):
    """Logits of magnitude 1e4: finite, and as close to float64 as the reference."""
    name, dev = kernel_backend
    N, D, V = 7, 32, 1023
    hidden, weight, b, targets, _ = make_inputs(N, D, V, dtype, dev, bias=False, mask=False, logit_scale=1e4)
    logits = hidden.double() @ weight.double().t()
    assert logits.abs().max() > 1e4
    grad_logp, grad_entropy = torch.randn(N, device=dev), torch.randn(N, device=dev)
    args = (hidden, weight, b, targets, None, 0.7, True, grad_logp, grad_entropy)
    kernel = run_logprobs(lvrpo_fast.fused_linear_logprobs, *args, backend=name)
    ref = run_logprobs(reference.fused_linear_logprobs, *args)
    truth = run_logprobs(reference.fused_linear_logprobs, *args, cast=torch.float64)
    for label, k, r, t in zip(("logp", "entropy", "grad_hidden", "grad_weight"), kernel, ref, truth):
        assert torch.isfinite(k).all(), f"{label} has non-finite values"
        assert_close_to_truth(k, r, t, dtype, f"{name} {label}")
    assert (kernel[0] <= 0).all() and (kernel[1] >= 0).all()


def test_all_negative_logits(kernel_backend):
    """Every logit below -50 (a bias of -100): the running max starts at -inf, not 0."""
    name, dev = kernel_backend
    N, D, V, dtype = 7, 32, 1023, torch.float32
    hidden, weight, _, targets, _ = make_inputs(N, D, V, dtype, dev, bias=False, mask=False)
    b = torch.full((V,), -100.0, device=dev) + torch.rand(V, device=dev)
    assert (hidden @ weight.t() + b).max() < -50
    grad_logp, grad_entropy = torch.randn(N, device=dev), torch.randn(N, device=dev)
    args = (hidden, weight, b, targets, None, 1.0, True, grad_logp, grad_entropy)
    kernel = run_logprobs(lvrpo_fast.fused_linear_logprobs, *args, backend=name)
    ref = run_logprobs(reference.fused_linear_logprobs, *args)
    truth = run_logprobs(reference.fused_linear_logprobs, *args, cast=torch.float64)
    for label, k, r, t in zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), kernel, ref, truth):
        assert_close_to_truth(k, r, t, dtype, f"{name} {label}")


def _poison(monkeypatch, value):
    """Makes torch.empty / torch.empty_like return memory filled with `value` (floating dtypes)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(value) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def test_every_output_written(kernel_backend, monkeypatch):
    """Outputs allocated with torch.empty are fully overwritten: NaN or -31337 poison changes nothing."""
    name, dev = kernel_backend
    N, D, V, dtype = 7, 32, 1023, torch.float16
    hidden, weight, b, targets, mask = make_inputs(N, D, V, dtype, dev, bias=True, mask=True)
    grad_logp, grad_entropy = torch.randn(N, device=dev), torch.randn(N, device=dev)
    args = (hidden, weight, b, targets, mask, 0.7, True, grad_logp, grad_entropy)
    clean = run_logprobs(lvrpo_fast.fused_linear_logprobs, *args, backend=name)
    tile = torch.randn(N, V, device=dev).to(dtype)
    clean_stats = backend_module(name).logits_stats(tile, targets.clamp(0, V - 1), 0.7, True)
    for value in (float("nan"), -31337.0):
        with monkeypatch.context() as patch:
            _poison(patch, value)
            poisoned = run_logprobs(lvrpo_fast.fused_linear_logprobs, *args, backend=name)
            poisoned_stats = backend_module(name).logits_stats(tile, targets.clamp(0, V - 1), 0.7, True)
        for c, p in zip(clean + clean_stats, poisoned + poisoned_stats):
            assert torch.isfinite(p).all(), f"poison {value} leaked into an output"
            assert torch.equal(c, p), f"poison {value} changed an output"


# ------------------------------------------------------------------------------------------------
# Errors, the no-grad path, non-finite inputs
# ------------------------------------------------------------------------------------------------
def _forbid_kernels(monkeypatch, name):
    prims = backend_module(name)

    def fail(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(prims, "logits_stats", fail)
    monkeypatch.setattr(prims, "logits_grad_", fail)


@pytest.mark.parametrize("bad_id", [-1, "V"])
@pytest.mark.parametrize("masked", [False, True])
def test_out_of_range_target_raises_before_any_kernel(kernel_backend, monkeypatch, bad_id, masked):
    name, dev = kernel_backend
    N, D, V = 7, 32, 1023
    hidden, weight, _, targets, mask = make_inputs(N, D, V, torch.float32, dev, bias=False, mask=masked)
    targets = targets.clone()
    targets[0] = V if bad_id == "V" else bad_id  # position 0 is never masked
    _forbid_kernels(monkeypatch, name)
    with pytest.raises(ValueError, match="targets"):
        lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, mask=mask, backend=name)


def test_no_grad_path_runs_only_the_forward_kernel(kernel_backend, monkeypatch):
    name, dev = kernel_backend
    N, D, V, dtype = 7, 32, 1023, torch.bfloat16
    hidden, weight, b, targets, mask = make_inputs(N, D, V, dtype, dev, bias=True, mask=True)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    with_grad = lvrpo_fast.fused_linear_logprobs(*leaves[:2], targets, bias=leaves[2], mask=mask,
                                                 return_entropy=True, temperature=0.7, backend=name)
    prims = backend_module(name)
    real_stats, calls = prims.logits_stats, []

    def counting_stats(*args):
        calls.append(args[0].shape)
        return real_stats(*args)

    _forbid_kernels(monkeypatch, name)
    monkeypatch.setattr(prims, "logits_stats", counting_stats)
    with torch.no_grad():
        logp, ent = lvrpo_fast.fused_linear_logprobs(*leaves[:2], targets, bias=leaves[2], mask=mask,
                                                     return_entropy=True, temperature=0.7, backend=name)
    assert calls == [(int(mask.sum()), V)]  # one forward pass over the unmasked rows, nothing else
    for out, ref in zip((logp, ent), with_grad):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, ref.detach())


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy under the interpreter, on purpose
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hidden_gives_non_finite_output(kernel_backend, bad):
    name, dev = kernel_backend
    N, D, V = 7, 32, 1023
    hidden, weight, b, targets, _ = make_inputs(N, D, V, torch.float32, dev, bias=True, mask=False)
    hidden[3, 5] = bad
    leaves = [t.requires_grad_() for t in (hidden, weight)]
    logp, ent = lvrpo_fast.fused_linear_logprobs(*leaves, targets, bias=b, return_entropy=True, backend=name)
    assert not torch.isfinite(logp[3]) and not torch.isfinite(ent[3])
    rows = [i for i in range(N) if i != 3]
    assert torch.isfinite(logp[rows]).all() and torch.isfinite(ent[rows]).all()
    grad_hidden, grad_weight = torch.autograd.grad((logp.sum(), ent.sum()), leaves)
    assert not torch.isfinite(grad_weight).all() and not torch.isfinite(grad_hidden[3]).all()


# ------------------------------------------------------------------------------------------------
# The primitives on random tiles, against float64 formulas
# ------------------------------------------------------------------------------------------------
def random_tile(C, V, dtype, dev, scale=3.0):
    """[C, V] logits with rows that move the running max every block (increasing), never
    (decreasing), or hold it equal (constant), beside random rows."""
    x = torch.randn(C, V, device=dev) * scale
    if C >= 4:
        x[1] = torch.linspace(-2 * scale, 2 * scale, V, device=dev)
        x[2] = torch.linspace(2 * scale, -2 * scale, V, device=dev)
        x[3] = 0.5
    return x.to(dtype)


def truth_stats(tile, targets, temperature):
    """float64 (logp, lse, entropy) of a tile, -inf logits allowed (p log p -> 0)."""
    z = tile.double() / temperature
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    entropy = lse - torch.where(p > 0, p * z, torch.zeros_like(p)).sum(-1)
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    return logp, lse, entropy


def truth_grad(tile, targets, temperature, grad_logp, grad_entropy):
    z = tile.double() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    onehot = torch.nn.functional.one_hot(targets, tile.shape[1]).double()
    grad = grad_logp.double()[:, None] * (onehot - p)
    if grad_entropy is not None:
        entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
        grad = grad - grad_entropy.double()[:, None] * torch.where(
            p > 0, p * (logp_all + entropy[:, None]), torch.zeros_like(p))
    return grad / temperature


def reference_grad_fp32(tile, targets, temperature, lse, entropy, grad_logp, grad_entropy):
    """The gradient formula in float32 torch, rounded to the tile dtype: the working-precision reference."""
    log_p = tile.float() / temperature - lse[:, None]
    p = log_p.exp()
    grad = grad_logp[:, None] * (torch.nn.functional.one_hot(targets, tile.shape[1]).float() - p)
    if grad_entropy is not None:
        grad = grad - grad_entropy[:, None] * p * (log_p + entropy[:, None])
    return (grad / temperature).to(tile.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C, V", [(1, 1), (5, 1023), (3, 4099)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_primitives_on_random_tiles(kernel_backend, dtype, C, V, temperature):
    name, dev = kernel_backend
    prims = backend_module(name)
    tile = random_tile(C, V, dtype, dev)
    targets = torch.randint(0, V, (C,), device=dev)
    truth = truth_stats(tile, targets, temperature)
    # The statistics are computed in fp32 from the tile's exact values, so the fp32 tolerance holds
    # whatever the tile dtype; the working-precision reference is torch's float32 log-softmax.
    z32 = tile.float() / temperature
    lse32 = torch.logsumexp(z32, dim=-1)
    ref = (z32.gather(1, targets[:, None]).squeeze(1) - lse32, lse32,
           lse32 - (torch.softmax(z32, dim=-1) * z32).sum(-1))
    for with_entropy in (True, False):
        out = prims.logits_stats(tile, targets, temperature, with_entropy)
        assert (out[2] is None) != with_entropy
        for label, k, r, t in zip(("logp", "lse", "entropy"), out, ref, truth):
            if k is None:
                continue
            assert k.dtype == torch.float32 and k.shape == (C,)
            assert_close_to_truth(k, r, t, torch.float32, f"{name} {label} ({dtype} tile)")
        assert (out[0] <= 0).all()
    logp, lse, entropy = prims.logits_stats(tile, targets, temperature, True)
    assert (entropy >= 0).all()
    if C >= 4:  # the constant row: uniform distribution
        assert abs(float(entropy[3]) - math.log(V)) < 1e-5 * math.log(V) + 1e-5

    grad_logp, grad_entropy = torch.randn(C, device=dev), torch.randn(C, device=dev)
    for with_entropy in (True, False):
        g_ent = grad_entropy if with_entropy else None
        ent = entropy if with_entropy else None
        grad = tile.clone()
        assert prims.logits_grad_(grad, targets, lse, ent, grad_logp, g_ent, temperature) is None
        truth_g = truth_grad(tile, targets, temperature, grad_logp, g_ent)
        ref_g = reference_grad_fp32(tile, targets, temperature, lse, ent, grad_logp, g_ent)
        assert grad.dtype == dtype
        assert_close_to_truth(grad, ref_g, truth_g, dtype, f"{name} logits_grad_ entropy={with_entropy}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_primitives_target_outside_the_tile(kernel_backend, dtype):
    """Target -1: the row's target lies in another vocab-parallel shard. The statistics give NaN for its
    logp and the tile's own lse and entropy; the gradient, given the whole row's lse and entropy, is
    the whole row's gradient restricted to the tile's columns (no one-hot term where the target is
    elsewhere)."""
    name, dev = kernel_backend
    prims = backend_module(name)
    C, V, split, temperature = 6, 1023, 400, 0.7
    tile = random_tile(C, V, dtype, dev)
    targets = torch.randint(0, V, (C,), device=dev)
    targets[0], targets[1] = 3, V - 1  # one row on each side at least
    truth_logp, truth_lse, truth_ent = truth_stats(tile, targets, temperature)
    lse, ent = truth_lse.float(), truth_ent.float()
    grad_logp, grad_entropy = torch.randn(C, device=dev), torch.randn(C, device=dev)
    truth_g = truth_grad(tile, targets, temperature, grad_logp, grad_entropy)
    ref_g = reference_grad_fp32(tile, targets, temperature, lse, ent, grad_logp, grad_entropy)
    for lo, hi in ((0, split), (split, V)):
        shard = tile[:, lo:hi].contiguous()
        inside = (targets >= lo) & (targets < hi)
        local = torch.where(inside, targets - lo, torch.full_like(targets, -1))
        logp, shard_lse, shard_ent = prims.logits_stats(shard, local, temperature, True)
        in_range = prims.logits_stats(shard, local.clamp(min=0), temperature, True)
        assert torch.isnan(logp[~inside]).all()
        assert torch.equal(logp[inside], in_range[0][inside])
        assert torch.equal(shard_lse, in_range[1]) and torch.equal(shard_ent, in_range[2])
        for with_entropy in (True, False):
            g = shard.clone()
            prims.logits_grad_(g, local, lse, ent if with_entropy else None, grad_logp,
                               grad_entropy if with_entropy else None, temperature)
            if with_entropy:
                assert_close_to_truth(g, ref_g[:, lo:hi], truth_g[:, lo:hi], dtype,
                                      f"{name} logits_grad_ of columns [{lo}, {hi})")
            else:
                full = truth_grad(tile, targets, temperature, grad_logp, None)[:, lo:hi]
                full_ref = reference_grad_fp32(tile, targets, temperature, lse, None, grad_logp, None)[:, lo:hi]
                assert_close_to_truth(g, full_ref, full, dtype, f"{name} logits_grad_ of columns [{lo}, {hi})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_primitives_huge_logits_no_cancellation(kernel_backend, dtype, temperature):
    """Rows around +-1e4 (entropy O(1)) and rows spread over +-1e4 (near one-hot).

    The entropy is checked against float64 on the same tile with no slack from a reference:
    lse - sum p z in float32 loses about 1e-3 here (the fp32 spacing at 1e4 / T), the kernel must
    not. logp and lse (differences of, or, numbers of size 1e4 / T) get the float32 reference's slack."""
    name, dev = kernel_backend
    prims = backend_module(name)
    C, V = 6, 1023
    x = torch.randn(C, V, device=dev)
    x[0] += 1e4
    x[1] -= 1e4
    x[2] = x[2] * 2 + 1e4
    x[3:] *= 1e4
    tile = x.to(dtype)
    targets = torch.randint(0, V, (C,), device=dev)
    targets[5] = tile[5].float().argmax()  # logp ~ 0: the rounding must not make it positive
    logp, lse, entropy = prims.logits_stats(tile, targets, temperature, True)
    truth = truth_stats(tile, targets, temperature)
    log_softmax32 = torch.log_softmax(tile.float() / temperature, dim=-1)
    ref = (log_softmax32.gather(1, targets[:, None]).squeeze(1), torch.logsumexp(tile.float() / temperature, dim=-1),
           None)
    for label, k, r, t in zip(("logp", "lse", "entropy"), (logp, lse, entropy), ref, truth):
        assert torch.isfinite(k).all(), f"{label} not finite"
        assert_close_to_truth(k, r, t, torch.float32, f"{name} {label} ({dtype} tile)")
    assert (logp <= 0).all() and (entropy >= 0).all()
    grad_logp, grad_entropy = torch.randn(C, device=dev), torch.randn(C, device=dev)
    grad = tile.clone()
    prims.logits_grad_(grad, targets, lse, entropy, grad_logp, grad_entropy, temperature)
    ref_g = reference_grad_fp32(tile, targets, temperature, lse, entropy, grad_logp, grad_entropy)
    assert_close_to_truth(grad, ref_g, truth_grad(tile, targets, temperature, grad_logp, grad_entropy), dtype,
                          f"{name} logits_grad_")


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy under the interpreter, on purpose
def test_primitives_non_finite_rows(kernel_backend):
    """A NaN or +inf logit makes its row's outputs non-finite; -inf logits (banned tokens) are either
    handled exactly (Triton: p = 0, contributing 0 to the entropy) or give non-finite outputs."""
    name, dev = kernel_backend
    prims = backend_module(name)
    C, V = 4, 1023
    tile = torch.randn(C, V, device=dev)
    tile[0, 700] = float("nan")
    tile[1, 3] = float("inf")
    tile[2, ::3] = float("-inf")
    targets = torch.tensor([5, 5, 4, 5], device=dev)  # row 2's target is finite
    logp, lse, entropy = prims.logits_stats(tile, targets, 1.0, True)
    for row in (0, 1):
        assert not torch.isfinite(logp[row]) and not torch.isfinite(lse[row]) and not torch.isfinite(entropy[row])
    assert torch.isfinite(logp[3]) and torch.isfinite(entropy[3])
    grad = tile.clone()
    ones = torch.ones(C, device=dev)
    prims.logits_grad_(grad, targets, lse, entropy, ones, ones, 1.0)
    assert not torch.isfinite(grad[0]).all() and not torch.isfinite(grad[1]).all()
    assert torch.isfinite(grad[3]).all()
    truth = truth_stats(tile[2:3], targets[2:3], 1.0)
    truth_g = truth_grad(tile[2:3], targets[2:3], 1.0, ones[:1], ones[:1])
    finite = all(torch.isfinite(v[2]) for v in (logp, lse, entropy)) and torch.isfinite(grad[2]).all()
    if name == "triton":
        assert finite, "the Triton kernels handle -inf logits exactly"
    if finite:
        for label, k, t in zip(("logp", "lse", "entropy"), (logp, lse, entropy), truth):
            assert_close_to_truth(k[2:3], None, t, torch.float32, f"{name} {label} with -inf logits")
        assert_close_to_truth(grad[2:3], None, truth_g, torch.float32, f"{name} grad with -inf logits")


# ------------------------------------------------------------------------------------------------
# The Triton launchers' own checks and the launch configurations
# ------------------------------------------------------------------------------------------------
def _triton_modules():
    module, why = dispatch.usable("triton", _test_device(), torch.float32)
    if module is None:
        pytest.skip(f"triton backend unavailable: {why}")
    from lvrpo_fast.kernels import autotune, logprobs

    return logprobs, autotune


def test_triton_launcher_rejects_bad_arguments():
    logprobs, _ = _triton_modules()
    dev = _test_device()
    tile = torch.randn(3, 17, device=dev)
    targets = torch.zeros(3, dtype=torch.int64, device=dev)
    row = torch.zeros(3, device=dev)
    with pytest.raises(ValueError, match="logits"):
        logprobs.logits_stats(tile[0], targets, 1.0, False)
    with pytest.raises(TypeError, match="logits"):
        logprobs.logits_stats(tile.double(), targets, 1.0, False)
    with pytest.raises(ValueError, match="logits"):
        logprobs.logits_stats(tile.t().contiguous().t(), targets, 1.0, False)
    with pytest.raises(ValueError, match="targets"):
        logprobs.logits_stats(tile, targets.int(), 1.0, False)
    with pytest.raises(ValueError, match="targets"):
        logprobs.logits_stats(tile, targets[:2], 1.0, False)
    with pytest.raises(ValueError, match="temperature"):
        logprobs.logits_stats(tile, targets, 0.0, False)
    with pytest.raises(ValueError, match="grad_entropy"):
        logprobs.logits_grad_(tile, targets, row, row, row, None, 1.0)
    with pytest.raises(ValueError, match="lse"):
        logprobs.logits_grad_(tile, targets, row[:2], None, row, None, 1.0)
    with pytest.raises(ValueError, match="grad_logp"):
        logprobs.logits_grad_(tile, targets, row, None, row.double(), None, 1.0)


def test_triton_strided_rows_and_empty_tile():
    """Rows of a wider buffer (stride > V) are read in place; a tile of no rows launches nothing."""
    logprobs, _ = _triton_modules()
    dev = _test_device()
    C, V = 3, 1023
    buffer = torch.randn(C, V + 37, device=dev)
    tile = buffer[:, 5:5 + V]
    targets = torch.randint(0, V, (C,), device=dev)
    out = logprobs.logits_stats(tile, targets, 0.7, True)
    for label, k, t in zip(("logp", "lse", "entropy"), out, truth_stats(tile, targets, 0.7)):
        assert_close_to_truth(k, None, t, torch.float32, f"strided {label}")
    grad = buffer.clone()
    g = torch.randn(C, device=dev)
    logprobs.logits_grad_(grad[:, 5:5 + V], targets, out[1], None, g, None, 0.7)
    assert torch.equal(grad[:, :5], buffer[:, :5]) and torch.equal(grad[:, 5 + V:], buffer[:, 5 + V:])
    assert_close_to_truth(grad[:, 5:5 + V], None, truth_grad(tile, targets, 0.7, g, None), torch.float32,
                          "strided grad")
    empty = logprobs.logits_stats(torch.empty(0, V, device=dev), targets[:0], 1.0, True)
    assert all(t.shape == (0,) for t in empty)


def test_triton_out_of_range_id_reads_nothing():
    """With the target check switched off (LVRPO_SKIP_TARGET_CHECK=1), a bad id gives NaN, not a read."""
    logprobs, _ = _triton_modules()
    dev = _test_device()
    C, V = 4, 1023
    tile = torch.randn(C, V, device=dev)
    targets = torch.tensor([3, -1, V, 2**40], device=dev)
    logp, lse, entropy = logprobs.logits_stats(tile, targets, 1.0, True)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()
    assert torch.isfinite(lse).all() and torch.isfinite(entropy).all()
    grad = tile.clone()
    logprobs.logits_grad_(grad, targets, lse, None, torch.ones(C, device=dev), None, 1.0)
    # no one-hot term anywhere in the rows of bad ids: the gradient is -p exactly there
    assert_close_to_truth(grad[1:], None, -torch.softmax(tile[1:].double(), dim=-1), torch.float32, "bad-id grad")


def test_launch_configurations(monkeypatch):
    _, autotune = _triton_modules()
    configs = [autotune.INTERPRETER, *autotune.DEFAULTS.values(), *(c for s in autotune.SEARCH.values() for c in s)]
    for config in configs:
        assert config.block_v >= 16 and config.block_v & (config.block_v - 1) == 0, config
        assert config.num_warps & (config.num_warps - 1) == 0 and config.num_stages >= 1, config
    assert set(autotune.SEARCH) == set(autotune.DEFAULTS) == set(autotune.KEYS)
    kernel = object()

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LVRPO_AUTOTUNE", "1")
    launched, meta = autotune.kernel_and_meta("logits_stats", kernel)
    assert launched is kernel and meta == autotune.INTERPRETER.launch_kwargs()  # never tune the interpreter

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("LVRPO_AUTOTUNE")
    for name, config in autotune.DEFAULTS.items():
        launched, meta = autotune.kernel_and_meta(name, kernel)
        assert launched is kernel and meta == config.launch_kwargs()
    with pytest.raises(KeyError, match="nope"):
        autotune.kernel_and_meta("nope", kernel)

    # Autotuning wraps the real kernel (nothing launches here); the in-place gradient kernel must
    # have its tile restored between trials.
    from lvrpo_fast.kernels.logprobs import _logits_grad_kernel

    monkeypatch.setattr(autotune, "_tuned", {})
    monkeypatch.setenv("LVRPO_AUTOTUNE", "1")
    tuner, meta = autotune.kernel_and_meta("logits_grad", _logits_grad_kernel)
    assert meta == {} and tuner is autotune.kernel_and_meta("logits_grad", _logits_grad_kernel)[0]
    assert [c.kwargs["BLOCK_V"] for c in tuner.configs] == [c.block_v for c in autotune.SEARCH["logits_grad"]]
    assert list(tuner.keys) == ["V", "HAS_ENTROPY"]
    assert list(tuner.restore_value) == ["logits_ptr"]
