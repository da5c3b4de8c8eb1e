"""lvrpo_fast.integrations.verl against verl's own core_algos on random inputs: every policy loss we
provide (vanilla with dual clip, gspo, cispo, sapo) under every loss_agg_mode, agg_loss, kl_penalty,
and linear_cross_entropy against the float64 reference."""
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl is not installed (pip install --no-deps verl; plus ray, tensordict, "
                                        "omegaconf, codetiming, hydra-core)")
from verl.workers.config import ActorConfig  # noqa: E402

from lvrpo_fast import dispatch, reference  # noqa: E402
from lvrpo_fast.integrations import verl as ours  # noqa: E402
from tolerances import assert_close_to_truth  # noqa: E402

B, T = 6, 9
LOSSES = ("vanilla", "gspo", "cispo", "sapo")
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def _config(**batch_info):
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                         clip_ratio_high=0.28, clip_ratio_c=2.5, tau_pos=1.3, tau_neg=1.7)
    config.global_batch_info.update(batch_info)
    return config


def _inputs():
    mask = torch.rand(B, T) > 0.25
    mask[:, 0] = True
    mask[2] = False  # an empty response: verl's seq-mean modes skip it, SPEC's count it (section 10)
    old = -torch.rand(B, T) * 4
    log_prob = old + 0.4 * torch.randn(B, T)  # ratios well outside the clip range on both sides
    log_prob[:, 0] = old[:, 0] + 1.2  # ratio 3.3, beyond the dual-clip bound 2.5
    signs = torch.tensor([1.0, -1.0]).repeat(B // 2)
    advantages = (torch.rand(B, 1) + 0.1) * signs[:, None] * mask  # GRPO: one value per response, 0 on padding
    rollout = torch.rand(B, T) + 0.5
    return old, log_prob, advantages, mask, rollout


def _use_backend(monkeypatch, name):
    if name != "auto":
        module, why = dispatch.usable(name, torch.device("cpu"), torch.float32)
        if module is None:
            pytest.skip(f"{name} backend unavailable: {why}")
    monkeypatch.setenv("LVRPO_BACKEND", name)


def _evaluate(fn, old, log_prob, advantages, mask, rollout, mode, config, dtype):
    logp = log_prob.detach().to(dtype).requires_grad_()
    loss, metrics = fn(old.to(dtype), logp, advantages.to(dtype), mask, loss_agg_mode=mode, config=config,
                       rollout_is_weights=None if rollout is None else rollout.to(dtype))
    loss.backward()
    return loss, logp.grad, metrics


@pytest.mark.parametrize("backend", ["auto", "triton", "cpp"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_mode", LOSSES)
def test_policy_loss_matches_verl(loss_mode, mode, backend, monkeypatch):
    _use_backend(monkeypatch, backend)
    old, log_prob, advantages, mask, rollout = _inputs()
    config = _config()
    theirs_fn = core_algos.get_policy_loss_fn(loss_mode)
    args = (old, log_prob, advantages, mask, rollout, mode, config)
    truth_loss, truth_grad, truth_metrics = _evaluate(theirs_fn, *args, torch.float64)
    ref_loss, ref_grad, _ = _evaluate(theirs_fn, *args, torch.float32)
    loss, grad, metrics = _evaluate(ours.POLICY_LOSSES[loss_mode], *args, torch.float32)
    assert_close_to_truth(loss, ref_loss, truth_loss, torch.float32, "pg_loss")
    assert_close_to_truth(grad, ref_grad, truth_grad, torch.float32, "d pg_loss / d log_prob")
    assert metrics.keys() == truth_metrics.keys()
    for name, value in truth_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    if loss_mode == "vanilla":  # the inputs exercise every branch of the clip
        assert truth_metrics["actor/pg_clipfrac"] > 0 and truth_metrics["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("loss_mode", LOSSES)
@pytest.mark.parametrize("batch_info", [
    dict(dp_size=2, batch_num_tokens=61, global_batch_size=11),
    dict(dp_size=1, batch_num_tokens=23, global_batch_size=5, loss_scale_factor=7),
])
def test_global_batch_info_and_no_rollout_weights(loss_mode, batch_info):
    old, log_prob, advantages, mask, _ = _inputs()
    config = _config(**batch_info)
    for mode in MODES:
        args = (old, log_prob, advantages, mask, None, mode, config)
        truth_loss, truth_grad, _ = _evaluate(core_algos.get_policy_loss_fn(loss_mode), *args, torch.float64)
        ref_loss, ref_grad, _ = _evaluate(core_algos.get_policy_loss_fn(loss_mode), *args, torch.float32)
        loss, grad, _ = _evaluate(ours.POLICY_LOSSES[loss_mode], *args, torch.float32)
        assert_close_to_truth(loss, ref_loss, truth_loss, torch.float32, f"{mode} pg_loss")
        assert_close_to_truth(grad, ref_grad, truth_grad, torch.float32, f"{mode} grad")


def test_per_sequence_advantages_are_accepted():
    old, log_prob, advantages, mask, rollout = _inputs()
    config = _config()
    full, _, _ = _evaluate(ours.compute_policy_loss_vanilla, old, log_prob, advantages, mask, rollout, "token-mean",
                           config, torch.float32)
    per_seq, _, _ = _evaluate(ours.compute_policy_loss_vanilla, old, log_prob, advantages[:, 0].contiguous(), mask,
                              rollout, "token-mean", config, torch.float32)
    torch.testing.assert_close(full, per_seq)


def test_per_token_advantages_are_refused():
    old, log_prob, _, mask, _ = _inputs()
    with pytest.raises(ValueError, match="advantages vary within a response"):
        ours.compute_policy_loss_vanilla(old, log_prob, torch.randn(B, T), mask, config=_config())


@pytest.mark.parametrize("batch_info", [{}, dict(dp_size=4, batch_num_tokens=97, global_batch_size=17),
                                        dict(loss_scale_factor=5)])
@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_matches_verl(mode, batch_info):
    _, _, _, mask, _ = _inputs()
    loss_mat = torch.randn(B, T, dtype=torch.float64)  # padding holds values too: they must not count
    torch.testing.assert_close(ours.agg_loss(loss_mat, mask, mode, **batch_info),
                               core_algos.agg_loss(loss_mat, mask, mode, **batch_info), rtol=1e-12, atol=1e-12)


def test_agg_loss_errors():
    _, _, _, mask, _ = _inputs()
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ours.agg_loss(torch.zeros(B, T), mask, "token-average")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        ours.agg_loss(torch.zeros(B, T), mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        ours.agg_loss(torch.zeros(B, T), mask, "seq-mean-token-mean", dp_size=2)


@pytest.mark.parametrize("kind", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k2+", "k3+",
                                  "low_var_kl+"])
def test_kl_penalty_matches_verl(kind):
    logp = (-torch.rand(B, T, dtype=torch.float64) * 6).requires_grad_()
    ref = -torch.rand(B, T, dtype=torch.float64) * 6
    ref[0, :3] = torch.tensor([-60.0, 0.0, -1e-3])  # beyond verl's +-20 and +-10 clamps
    upstream = torch.randn(B, T, dtype=torch.float64)
    values = []
    for fn in (ours.kl_penalty, core_algos.kl_penalty):
        logp.grad = None
        value = fn(logp, ref, kind)
        (value * upstream).sum().backward()
        values.append((value.detach(), logp.grad.clone()))
    for got, expected in zip(*values):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_kl_penalty_errors():
    with pytest.raises(NotImplementedError, match="full"):
        ours.kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3), "full")
    with pytest.raises(ValueError, match="kl_penalty"):
        ours.kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3), "k4")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy(reduction):
    N, D, V = 3, 7, 53
    hidden, weight = torch.randn(N, 5, D), torch.randn(V, D) * 0.5
    labels = torch.randint(0, V, (N, 5))
    up_logp = torch.randn(N * 5) if reduction == "none" else torch.tensor(1.7)
    up_entropy = torch.randn(N * 5)
    results = []
    for fn, dtype in ((ours.linear_cross_entropy, torch.float32), (_reference_lce, torch.float32),
                      (_reference_lce, torch.float64)):
        h, w = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
        logprobs, entropy = fn(h, w, labels, 0.9, reduction)
        ((logprobs * up_logp.to(dtype)).sum() + (entropy * up_entropy.to(dtype)).sum()).backward()
        results.append((logprobs, entropy, h.grad, w.grad))
    assert results[0][0].shape == (() if reduction != "none" else (N * 5,)) and results[0][1].shape == (N * 5,)
    for name, got, ref, truth in zip(("logprobs", "entropy", "grad hidden", "grad weight"), *results):
        assert_close_to_truth(got, ref, truth, torch.float32, name)


def _reference_lce(hidden, weight, labels, temperature, reduction):
    logp, entropy = reference.fused_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                                    temperature=temperature, return_entropy=True)
    return {"none": logp, "sum": logp.sum(), "mean": logp.mean()}[reduction], entropy


def test_linear_cross_entropy_errors():
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        ours.linear_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), torch.zeros(2, dtype=torch.long),
                                  dist_process_group=object())
    with pytest.raises(ValueError, match="reduction"):
        ours.linear_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), torch.zeros(2, dtype=torch.long),
                                  reduction="max")


def test_register_replaces_verls_policy_losses(monkeypatch):
    monkeypatch.setattr(core_algos, "POLICY_LOSS_REGISTRY", dict(core_algos.POLICY_LOSS_REGISTRY))
    ours.register()
    for name, fn in ours.POLICY_LOSSES.items():
        assert core_algos.get_policy_loss_fn(name) is fn
