"""lvrpo_fast.fused_linear_grpo_loss on the kernel backends against the float64 reference.

The op goes from hidden states to the scalar loss without the [B*T, V] logits; each check compares
the loss, the metrics and the gradients w.r.t. hidden, weight and bias with the three numbers of
tests/tolerances.py. The options are a reduced but representative set (each loss_type at least
once, the sequence level, beta with every estimator and the bias-corrected KL, the entropy bonus,
rollout weights, temperature != 1, a bias); the per-option math is covered in depth by
tests/test_grpo_loss.py, this file covers the fused path around it: dtypes, odd shapes, chunking,
the no-grad forward and the gradient formed in the forward pass.
"""
import pytest
import torch

import lvrpo_fast
from lvrpo_fast import backends, chunking, dispatch, reference
from checks import check_loss_run
from tolerances import assert_close_to_truth

# Odd on purpose: V = 1023 is no multiple of any block, D = 123 neither, T = 7; B = 6 in G = 3.
B, G, T, D, V = 6, 3, 7, 123, 1023
# The tests of the op's mechanics (chunking, no-grad, gradient scaling) use a vocabulary within one
# interpreter block (V_SMALL < 512): they run several forwards each, at about half the cost.
V_SMALL = 389

# name -> (options, extras): extras are temperature, bias (bool), rollout weights ("token" /
# "sequence"), return_entropy.
CASES = {
    "grpo": ({"loss_type": "grpo"}, {"temperature": 0.7, "bias": True}),
    "bnpo_delta_dual": ({"loss_type": "bnpo", "delta": 1.3, "clip_ratio_c": 1.4, "epsilon_high": 0.28}, {}),
    "dr_grpo_weights": ({"loss_type": "dr_grpo", "max_completion_length": T + 5}, {"weights": "sequence"}),
    "dapo_items_k2": ({"loss_type": "dapo", "num_items_in_batch": 50, "beta": 0.05, "kl_estimator": "k2"},
                      {"bias": True}),
    "luspo_sequence": ({"loss_type": "luspo", "importance_sampling_level": "sequence"}, {"temperature": 1.3}),
    "seq_mean_token_sum_k1": ({"loss_type": "seq_mean_token_sum", "beta": 0.1, "kl_estimator": "k1"},
                              {"return_entropy": True}),
    "cispo": ({"loss_type": "cispo", "epsilon_high": 1.25}, {"weights": "token"}),
    "sapo_entropy": ({"loss_type": "sapo", "entropy_coef": 0.05}, {"temperature": 0.9}),
    "gspo_k3_bias_kl_entropy": ({"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.1,
                                 "kl_estimator": "k3", "use_bias_correction_kl": True, "entropy_coef": 0.03,
                                 "epsilon_high": 0.28},
                                {"temperature": 0.8, "bias": True, "weights": "token"}),
    "vespo_weights": ({"loss_type": "vespo", "beta": 0.05}, {"weights": "token"}),
    "cispo_sequence": ({"loss_type": "cispo", "importance_sampling_level": "sequence", "epsilon_high": 1.1}, {}),
    "sapo_sequence_off_policy": ({"loss_type": "sapo", "importance_sampling_level": "sequence",
                                 "off_policy_mask_threshold": 0.02}, {"sampling": True}),
    # TRL's high-entropy mask with its token-mean bonus: the two-pass path of the op
    "entropy_mask_token_mean": ({"loss_type": "dapo", "top_entropy_quantile": 0.5, "entropy_coef": 0.05,
                                 "entropy_agg": "token_mean", "delta": 1.0, "beta": 0.05,
                                 "use_bias_correction_kl": True}, {"temperature": 0.9, "bias": True}),
}
# The dtypes run on every case in float32 and on these in float16 / bfloat16.
HALF_CASES = ("grpo", "gspo_k3_bias_kl_entropy", "cispo", "entropy_mask_token_mean")


def make_inputs(b=B, t=T, d=D, v=V, *, group_size=G, bias=False, weights=None, sampling=False, temperature=1.0,
                masked_row=1, density=0.8, generator=None):
    """Fresh random float32 CPU inputs of fused_linear_grpo_loss as a dict.

    Logits ~ N(0, 1); advantages from group rewards; logp_old and logp_ref are the float64 reference
    log-probabilities plus N(0, 0.3) noise, so the ratios straddle the clip bounds."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    hidden = randn(b, t, d)
    weight = randn(v, d) / d ** 0.5
    targets = torch.randint(0, v, (b, t), generator=generator)
    mask = torch.rand(b, t, generator=generator) < density
    if masked_row is not None and masked_row < b:
        mask[masked_row] = False
    targets[~mask] = -100  # masked ids may hold anything, an ignore index included
    rewards = randn(b)
    advantages = (reference.group_advantages(rewards, group_size) if b % group_size == 0 else rewards)
    data = {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask, "advantages": advantages,
            "bias": randn(v) * 0.5 if bias else None, "rollout_weights": None}
    with torch.no_grad():
        logp = reference.fused_linear_logprobs(hidden.double(), weight.double(), targets,
                                               bias=None if data["bias"] is None else data["bias"].double(),
                                               temperature=temperature, mask=mask).float()
    data["logp_old"] = logp + 0.3 * randn(b, t)
    data["logp_ref"] = logp + 0.3 * randn(b, t)
    data["logp_sampling"] = logp + 0.3 * randn(b, t) if sampling else None
    if weights == "token":
        data["rollout_weights"] = torch.rand(b, t, generator=generator) * 1.5 + 0.25
    elif weights == "sequence":
        data["rollout_weights"] = torch.rand(b, generator=generator) * 1.5 + 0.25
    return data


def run_linear(backend, data, dtype, device, options, *, temperature=1.0, return_entropy=False,
               requires_grad=True, grad_scale=None, head_dtype=None, stats=False):
    """fused_linear_grpo_loss on `data` with hidden / weight / bias in dtype.

    Returns (loss, metrics, {"hidden", "weight", "bias": gradient or None}), and the per-sequence
    statistics [B, NSTATS] as a fourth element when `stats`."""
    def leaf(t):
        if t is None:
            return None
        t = t.detach().to(device=device, dtype=dtype, copy=True)
        return t.requires_grad_(requires_grad)

    def const(t):
        return None if t is None else t.to(device)

    hidden, weight, bias = leaf(data["hidden"]), leaf(data["weight"]), leaf(data["bias"])
    loss, metrics, sequence_stats = lvrpo_fast.fused_linear_grpo_loss(
        hidden, weight, const(data["targets"]), const(data["mask"]), const(data["advantages"]), bias=bias,
        logp_old=const(data["logp_old"]), logp_ref=const(data["logp_ref"]),
        logp_sampling=const(data.get("logp_sampling")), rollout_weights=const(data["rollout_weights"]),
        temperature=temperature, return_entropy=return_entropy, head_dtype=head_dtype, backend=backend,
        return_sequence_stats=True, **options)
    if loss.requires_grad:
        (loss if grad_scale is None else loss * grad_scale).backward()
    grads = {"hidden": hidden.grad, "weight": weight.grad, "bias": None if bias is None else bias.grad}
    if stats:
        return loss, metrics, grads, sequence_stats.columns()
    return loss, metrics, grads


def check_linear(name, device, data, options, dtype, *, temperature=1.0, return_entropy=False, head_dtype=None,
                 truth_dtype=torch.float64):
    """The three-number check of the loss, every metric, every gradient and the per-sequence statistics;
    returns the backend's run. With head_dtype, the truth rounds the head as the kernel does (inputs of
    truth_dtype) and the tolerance is head_dtype's."""
    kwargs = {"temperature": temperature, "return_entropy": return_entropy, "head_dtype": head_dtype}
    kernel = run_linear(name, data, dtype, device, options, stats=True, **kwargs)
    ref = run_linear("reference", data, dtype, torch.device("cpu"), options, stats=True, **kwargs)
    truth = run_linear("reference", data, truth_dtype, torch.device("cpu"), options, stats=True, **kwargs)
    check_loss_run(f"{name} {dtype} {options}", kernel, ref, truth, dtype, zero_at={"hidden": ~data["mask"]},
                   tolerance_dtype=head_dtype)
    return kernel[:3]


def _case(name, dtype=torch.float32, v=V):
    options, extras = CASES[name]
    data = make_inputs(v=v, bias=extras.get("bias", False), weights=extras.get("weights"),
                       sampling=extras.get("sampling", False), temperature=extras.get("temperature", 1.0))
    for key in ("hidden", "weight", "bias"):  # the truth sees exactly the inputs the kernel sees
        if data[key] is not None:
            data[key] = data[key].to(dtype).float()
    kwargs = {"temperature": extras.get("temperature", 1.0), "return_entropy": extras.get("return_entropy", False)}
    return data, options, kwargs


def _skip_unless(name, device, dtype):
    ok, why = dispatch.usable(name, device, dtype)
    if ok is None:
        pytest.skip(f"{name} does not run {dtype} on {device}: {why}")


@pytest.mark.parametrize("dtype,case", [pytest.param(dt, c, id=f"{str(dt)[6:]}-{c}")
                                        for dt, cases in ((torch.float32, CASES), (torch.float16, HALF_CASES),
                                                          (torch.bfloat16, HALF_CASES)) for c in cases])
def test_matches_reference(kernel_backend, case, dtype):
    name, device = kernel_backend
    _skip_unless(name, device, dtype)
    data, options, kwargs = _case(case, dtype)
    check_linear(name, device, data, options, dtype, **kwargs)


@pytest.mark.parametrize("case", ["gspo_k3_bias_kl_entropy", "dapo_items_k2", "entropy_mask_token_mean"])
@pytest.mark.parametrize("seqs_per_chunk", [1, 2])
def test_multi_chunk(kernel_backend, monkeypatch, case, seqs_per_chunk):
    """Chunks of one or two whole sequences (a ragged last chunk with B = 5) give the one-chunk result:
    the sequence ratio stays exact and batch normalizers (bnpo, dapo) come from the whole mask; with
    the high-entropy mask, the second pass starts from the chunk left in the tile and recomputes the
    others' logits."""
    name, device = kernel_backend
    options, extras = CASES[case]
    data = make_inputs(b=5, v=V_SMALL, bias=extras.get("bias", False), weights=extras.get("weights"),
                       temperature=extras.get("temperature", 1.0))
    kwargs = {"temperature": extras.get("temperature", 1.0)}
    one_chunk = run_linear(name, data, torch.float32, device, options, **kwargs)
    monkeypatch.setenv("LVRPO_CHUNK_BYTES", str(seqs_per_chunk * T * V_SMALL * 4))
    chunked = check_linear(name, device, data, options, torch.float32, **kwargs)
    torch.testing.assert_close(chunked[0], one_chunk[0], rtol=1e-6, atol=1e-7)
    for key in one_chunk[1]:
        torch.testing.assert_close(chunked[1][key], one_chunk[1][key], rtol=1e-6, atol=1e-7)
    for key, grad in one_chunk[2].items():
        if grad is not None:
            # Only the matmuls' blocking differs between the chunkings.
            torch.testing.assert_close(chunked[2][key], grad, rtol=1e-5, atol=1e-7)


def test_no_grad_forward(kernel_backend):
    """The old-policy pass: no graph, and the same loss and metrics as the differentiable forward."""
    name, device = kernel_backend
    data, options, kwargs = _case("gspo_k3_bias_kl_entropy", v=V_SMALL)
    with torch.no_grad():
        loss, metrics, _ = run_linear(name, data, torch.float32, device, options, **kwargs)
    assert loss.grad_fn is None and not loss.requires_grad
    plain, plain_metrics, grads = run_linear(name, data, torch.float32, device, options, requires_grad=False,
                                             **kwargs)
    assert plain.grad_fn is None and all(g is None for g in grads.values())
    with_grad, grad_metrics, _ = run_linear(name, data, torch.float32, device, options, **kwargs)
    torch.testing.assert_close(loss, with_grad.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(plain, loss, rtol=0, atol=0)
    for key in grad_metrics:
        torch.testing.assert_close(metrics[key], grad_metrics[key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(plain_metrics[key], metrics[key], rtol=0, atol=0)


def test_backward_twice_raises(kernel_backend):
    name, device = kernel_backend
    data, options, kwargs = _case("grpo", v=V_SMALL)
    hidden = data["hidden"].to(device).requires_grad_()
    weight = data["weight"].to(device).requires_grad_()
    loss, _ = lvrpo_fast.fused_linear_grpo_loss(hidden, weight, data["targets"].to(device),
                                                data["mask"].to(device), data["advantages"].to(device),
                                                backend=name)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("case", ["grpo", "gspo_k3_bias_kl_entropy"])
def test_gradient_scale(kernel_backend, case):
    """(loss * 3.5).backward() scales the gradients formed in the forward pass by exactly 3.5."""
    name, device = kernel_backend
    data, options, kwargs = _case(case, v=V_SMALL)
    _, _, plain = run_linear(name, data, torch.float32, device, options, **kwargs)
    _, _, scaled = run_linear(name, data, torch.float32, device, options, grad_scale=3.5, **kwargs)
    for key, grad in plain.items():
        if grad is not None:
            torch.testing.assert_close(scaled[key], grad * 3.5, rtol=1e-6, atol=0)


def test_only_some_inputs_require_grad(kernel_backend):
    """A frozen head (weight without grad) still gives hidden its gradient, and vice versa."""
    name, device = kernel_backend
    data, options, kwargs = _case("grpo", v=V_SMALL)
    truth = run_linear("reference", data, torch.float64, torch.device("cpu"), options, **kwargs)
    ref = run_linear("reference", data, torch.float32, torch.device("cpu"), options, **kwargs)
    for frozen in ("hidden", "weight"):
        tensors = {k: data[k].to(device).clone().requires_grad_(k != frozen) for k in ("hidden", "weight", "bias")}
        loss, _ = lvrpo_fast.fused_linear_grpo_loss(
            tensors["hidden"], tensors["weight"], data["targets"].to(device), data["mask"].to(device),
            data["advantages"].to(device), bias=tensors["bias"], logp_old=data["logp_old"].to(device),
            backend=name, **kwargs, **options)
        loss.backward()
        assert tensors[frozen].grad is None
        for key in ("hidden", "weight", "bias"):
            if key != frozen:
                assert_close_to_truth(tensors[key].grad.cpu(), ref[2][key], truth[2][key], torch.float32,
                                      name=f"{name} frozen {frozen}: d/d{key}")


def test_input_errors(kernel_backend):
    name, device = kernel_backend
    data = make_inputs(b=3, group_size=3)
    hidden, weight = data["hidden"].to(device), data["weight"].to(device)
    targets, mask, adv = data["targets"].to(device), data["mask"].to(device), data["advantages"].to(device)
    with pytest.raises(ValueError, match="hidden must be a 3-D"):
        lvrpo_fast.fused_linear_grpo_loss(hidden[0], weight, targets[0], mask[0], adv, backend=name)
    with pytest.raises(ValueError, match="D=123 does not match"):
        lvrpo_fast.fused_linear_grpo_loss(hidden, weight[:, :-1], targets, mask, adv, backend=name)
    bad = torch.where(mask, targets, torch.zeros_like(targets))
    bad[0, 0] = V
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=1023\).*targets\[0, 0\] = 1023"):
        lvrpo_fast.fused_linear_grpo_loss(hidden, weight, bad, torch.ones_like(mask), adv, backend=name)
    with pytest.raises(ValueError, match="temperature"):
        lvrpo_fast.fused_linear_grpo_loss(hidden, weight, targets, mask, adv, temperature=0.0, backend=name)
    with pytest.raises(ValueError, match="logp_ref"):
        lvrpo_fast.fused_linear_grpo_loss(hidden, weight, targets, mask, adv, beta=0.1, backend=name)


def test_masked_tokens_never_reach_the_head(kernel_backend, monkeypatch):
    """Chunks of one sequence's worth of rows: logits_stats sees exactly each chunk's unmasked rows (a
    fully masked sequence makes an empty chunk that runs no kernel), and the result is the reference's."""
    name, device = kernel_backend
    options, extras = CASES["gspo_k3_bias_kl_entropy"]
    data = make_inputs(b=5, v=V_SMALL, bias=True, weights=extras["weights"], temperature=extras["temperature"],
                       masked_row=0, density=0.6)
    counts = data["mask"].sum(1).tolist()
    assert counts[0] == 0 and 0 < min(counts[1:]) and max(counts) < T, counts
    module, why = backends.load(name)
    assert module is not None, why
    real_stats, calls = module.logits_stats, []

    def counting_stats(logits, *rest):
        calls.append(logits.shape[0])
        return real_stats(logits, *rest)

    monkeypatch.setattr(module, "logits_stats", counting_stats)
    monkeypatch.setenv("LVRPO_CHUNK_BYTES", str(V_SMALL * 4))  # one row: every chunk is one sequence
    check_linear(name, device, data, options, torch.float32, temperature=extras["temperature"])
    assert calls == counts[1:], f"logits_stats saw rows {calls}, the unmasked tokens per sequence are {counts}"


@pytest.mark.parametrize("case", ["grpo", "bnpo_delta_dual", "gspo_k3_bias_kl_entropy", "cispo", "sapo_entropy",
                                  "luspo_sequence"])
def test_per_token_advantages(kernel_backend, case):
    """Advantages [B, T] (process rewards): the fused loss and its gradients against float64, and a
    per-sequence advantage broadcast over its tokens gives the [B] result bit for bit."""
    name, device = kernel_backend
    data, options, kwargs = _case(case)
    per_sequence = run_linear(name, data, torch.float32, device, options, **kwargs)
    broadcast = {**data, "advantages": data["advantages"][:, None].expand(-1, T).contiguous()}
    same = run_linear(name, broadcast, torch.float32, device, options, **kwargs)
    assert torch.equal(per_sequence[0], same[0])
    for key, grad in per_sequence[2].items():
        if grad is not None:
            assert torch.equal(grad, same[2][key]), key
    per_token = {**data, "advantages": torch.randn(data["advantages"].shape[0], T)}
    check_linear(name, device, per_token, options, torch.float32, **kwargs)


@pytest.mark.parametrize("case", ["grpo", "entropy_mask_token_mean"])
def test_mixed_precision_head(kernel_backend, case):
    """head_dtype=bfloat16 with float32 inputs (TRL's chunked head under autocast): the logits tile and its
    gradient in bfloat16, the statistics and the gradients in float32. The truth is the reference with
    float64 inputs and the same rounding of the operands and the product; the tolerance is bfloat16's."""
    name, device = kernel_backend
    data, options, kwargs = _case(case)
    check_linear(name, device, data, options, torch.float32, head_dtype=torch.bfloat16, **kwargs)
    plain = run_linear(name, data, torch.float32, device, options, **kwargs)
    mixed = run_linear(name, data, torch.float32, device, options, head_dtype=torch.bfloat16, **kwargs)
    assert not torch.equal(plain[0], mixed[0]), "head_dtype changed nothing"
    with pytest.raises(ValueError, match="head_dtype=torch.float32 is wider"):
        run_linear(name, data, torch.bfloat16, device, options, head_dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch_invariant"])
@pytest.mark.parametrize("need_grad", [True, False])
def test_entropy_mask_costs_one_extra_head_per_chunk_but_the_last(kernel_backend, monkeypatch, need_grad, invariant):
    """The high-entropy mask's two passes (lvrpo_fast/fused/linear_grpo_loss.py): every chunk's logits once
    for the statistics, then again for the gradient, except the chunk still in the tile; 2 (N - C_last) V D
    extra FLOPs, none when one chunk holds the batch or no gradient is needed. The batch-invariant mode
    cuts its tiles from the plan in order, so its second pass recomputes every chunk."""
    from lvrpo_fast.fused import linear_grpo_loss as fused

    name, device = kernel_backend
    options, extras = CASES["entropy_mask_token_mean"]
    data = make_inputs(b=5, v=V_SMALL, masked_row=None, bias=True)
    calls = []
    real = fused.Logits.of

    def counting(self, chunk, rows=None):
        calls.append(chunk.size)
        return real(self, chunk, rows)

    monkeypatch.setattr(fused.Logits, "of", counting)
    monkeypatch.setenv("LVRPO_BATCH_INVARIANT", "1" if invariant else "0")
    for seqs_per_chunk in (5, 2):
        calls.clear()
        monkeypatch.setenv("LVRPO_CHUNK_BYTES", str(seqs_per_chunk * T * V_SMALL * 4))
        run_linear(name, data, torch.float32, device, options, requires_grad=need_grad,
                   temperature=extras["temperature"])
        # the chunks that compute a row (a chunk of fully masked sequences has none)
        chunks = sum(1 for c in chunking.sequence_chunks(data["mask"], seqs_per_chunk * T) if c.size)
        assert chunks == 1 if seqs_per_chunk == 5 else chunks >= 2, chunks
        expected = (2 * chunks if invariant else 2 * chunks - 1) if need_grad else chunks
        assert len(calls) == expected, (seqs_per_chunk, calls)
        assert sum(calls[:chunks]) == int(data["mask"].sum()), calls
