"""lvrpo_fast's verl integration against verl 0.9.1 itself.

- The policy losses (vanilla with dual clip, gspo, cispo, sapo) under every loss_agg_mode, agg_loss and
  kl_penalty against verl's own core_algos functions on random inputs, in float32 and in float64, and
  the documented differences (all-masked batches, GSPO's log-ratio cap) as verl shows them.
- linear_cross_entropy (verl's fused-kernel slot) for verl's packed and padded layouts, a DTensor head.
- The switch: importing lvrpo_fast.integrations.verl installs it (once), in a Ray worker through verl's
  external_lib and in any process through VERL_USE_EXTERNAL_MODULES, and refuses what it cannot do.
- verl's own FSDP engine on the CPU (tests/verl_engine_run.py), plain and switched, on one process and
  on two: loss, grad norm, every gradient, the log-probs and entropy of compute_log_prob, and the
  widest [..., V] tensor each run allocates. The harness registers a CPU platform for verl and uses
  sdpa attention (verl's default, flash-attention, needs a GPU); its docstring says why each is needed.

verl's own functions are taken from core_algos' module attributes: the registry itself holds lvrpo_fast's
once the switch is imported in this process.
"""
import os
import sys

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                 reason="verl is not installed (pip install --no-deps verl==0.9.1 and "
                                        "pip install 'lvrpo-fast[verl]')")
from verl.workers.config import ActorConfig  # noqa: E402

from lvrpo_fast import dispatch, reference  # noqa: E402
from lvrpo_fast.integrations import verl_losses as ours  # noqa: E402
from tolerances import assert_close_to_truth  # noqa: E402
from verl_engine_run import installed_state, save_tiny_model  # noqa: E402

B, T = 6, 9
LOSSES = ("vanilla", "gspo", "cispo", "sapo")
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
TESTS = os.path.dirname(os.path.abspath(__file__))


def theirs(loss_mode):
    return getattr(core_algos, f"compute_policy_loss_{loss_mode}")


def switch():
    """The switch module, or a skip saying why verl's engine cannot be imported here."""
    try:
        from lvrpo_fast.integrations import verl as module
    except ImportError as exc:
        pytest.skip(f"verl's engine cannot start here: {exc}")
    return module


def _config(**batch_info):
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                         clip_ratio_high=0.28, clip_ratio_c=2.5, tau_pos=1.3, tau_neg=1.7)
    config.global_batch_info.update(batch_info)
    return config


def _inputs():
    mask = torch.rand(B, T) > 0.25
    mask[:, 0] = True
    mask[2] = False  # an empty response: verl's seq-mean modes skip it, lvrpo_fast's grpo counts it
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


# ----------------------------------------------------------------------------------------------
# Policy losses, agg_loss, kl_penalty
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "triton", "cpp"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_mode", LOSSES)
def test_policy_loss_matches_verl(loss_mode, mode, backend, monkeypatch):
    _use_backend(monkeypatch, backend)
    old, log_prob, advantages, mask, rollout = _inputs()
    config = _config()
    args = (old, log_prob, advantages, mask, rollout, mode, config)
    truth_loss, truth_grad, truth_metrics = _evaluate(theirs(loss_mode), *args, torch.float64)
    ref_loss, ref_grad, _ = _evaluate(theirs(loss_mode), *args, torch.float32)
    loss, grad, metrics = _evaluate(ours.POLICY_LOSSES[loss_mode], *args, torch.float32)
    assert loss.dtype == torch.float32
    assert_close_to_truth(loss, ref_loss, truth_loss, torch.float32, "pg_loss")
    assert_close_to_truth(grad, ref_grad, truth_grad, torch.float32, "d pg_loss / d log_prob")
    assert metrics.keys() == truth_metrics.keys()
    for name, value in truth_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    if loss_mode == "vanilla":  # the inputs exercise every branch of the clip
        assert truth_metrics["actor/pg_clipfrac"] > 0 and truth_metrics["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("loss_mode", LOSSES)
def test_policy_loss_float64_matches_verl_to_float64_precision(loss_mode):
    # float64 in, float64 throughout (the reference backend): verl's float64 numbers to ~1e-15, where a
    # float32 step anywhere (the per-sequence or rollout weights, say) would leave ~1e-7.
    old, log_prob, advantages, mask, rollout = _inputs()
    for mode in MODES:
        for batch_info in ({}, dict(dp_size=2, batch_num_tokens=61, global_batch_size=11, loss_scale_factor=7)):
            args = (old, log_prob, advantages, mask, rollout, mode, _config(**batch_info))
            truth_loss, truth_grad, truth_metrics = _evaluate(theirs(loss_mode), *args, torch.float64)
            loss, grad, metrics = _evaluate(ours.POLICY_LOSSES[loss_mode], *args, torch.float64)
            assert loss.dtype == grad.dtype == torch.float64
            torch.testing.assert_close(loss, truth_loss, rtol=1e-12, atol=1e-14, msg=f"{mode} {batch_info}")
            torch.testing.assert_close(grad, truth_grad, rtol=1e-12, atol=1e-14, msg=f"{mode} {batch_info}")
            for name, value in truth_metrics.items():
                assert metrics[name] == pytest.approx(value, rel=1e-12, abs=1e-14), name


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
        truth_loss, truth_grad, _ = _evaluate(theirs(loss_mode), *args, torch.float64)
        ref_loss, ref_grad, _ = _evaluate(theirs(loss_mode), *args, torch.float32)
        loss, grad, _ = _evaluate(ours.POLICY_LOSSES[loss_mode], *args, torch.float32)
        assert_close_to_truth(loss, ref_loss, truth_loss, torch.float32, f"{mode} pg_loss")
        assert_close_to_truth(grad, ref_grad, truth_grad, torch.float32, f"{mode} grad")


@pytest.mark.parametrize("loss_mode", LOSSES)
def test_all_masked_batch_gives_zero_where_verl_gives_nan(loss_mode):
    # The README's note, checked against verl: with no global counts (a plain call), verl's loss is NaN
    # for every mode but token-sum, and for sapo (always seq-mean-token-mean) in every mode; with the
    # global counts verl's ppo_loss passes, 0 when they are non-zero, NaN for token-mean (not sapo) when
    # the whole mini-batch has no token. lvrpo_fast gives 0 and a zero gradient in every case, agg_loss too.
    old, log_prob, _, _, rollout = _inputs()
    mask = torch.zeros(B, T, dtype=torch.bool)
    advantages = torch.randn(B, 1).expand(B, T).contiguous()
    cases = (({}, lambda mode: mode != "token-sum" or loss_mode == "sapo"),
             (dict(dp_size=1, batch_num_tokens=10, global_batch_size=4), lambda mode: False),
             (dict(dp_size=2, batch_num_tokens=0, global_batch_size=4),
              lambda mode: mode == "token-mean" and loss_mode != "sapo"))
    for mode in MODES:
        for batch_info, verl_nan in cases:
            args = (old, log_prob, advantages, mask, rollout, mode, _config(**batch_info))
            their_loss, _, _ = _evaluate(theirs(loss_mode), *args, torch.float32)
            loss, grad, _ = _evaluate(ours.POLICY_LOSSES[loss_mode], *args, torch.float32)
            assert bool(torch.isnan(their_loss)) == verl_nan(mode), (mode, batch_info)
            assert loss.item() == 0.0 and not grad.any(), (mode, batch_info)
            assert ours.agg_loss(torch.randn(B, T), mask, mode, **batch_info).item() == 0.0, (mode, batch_info)


def test_gspo_log_ratio_cap():
    # verl caps GSPO's sequence log ratio at 10 with a clamp, which zeroes that sequence's gradient; here
    # the value is the same (exp(10)) and the gradient is kept (A < 0: the ratio is not clipped): GSPO-token
    # gives each token -A * s_i, summed over tokens by token-sum.
    old, log_prob, _, mask, _ = _inputs()
    log_prob[0] = old[0] + 11.0  # mean log ratio 11 > 10
    advantages = torch.full((B, T), -0.7) * mask
    args = (old, log_prob, advantages, mask, None, "token-sum", _config())
    their_loss, their_grad, _ = _evaluate(theirs("gspo"), *args, torch.float64)
    loss, grad, _ = _evaluate(ours.compute_policy_loss_gspo, *args, torch.float64)
    torch.testing.assert_close(loss, their_loss, rtol=1e-12, atol=0.0)
    assert not their_grad[0].any()
    capped_ratio = torch.exp(torch.tensor(10.0, dtype=torch.float64))
    expected = torch.where(mask[0], -advantages[0, 0].double() * capped_ratio, 0.0)
    torch.testing.assert_close(grad[0], expected, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(grad[1:], their_grad[1:], rtol=1e-12, atol=1e-14)


def test_per_sequence_advantages_are_accepted():
    old, log_prob, advantages, mask, rollout = _inputs()
    config = _config()
    full, _, _ = _evaluate(ours.compute_policy_loss_vanilla, old, log_prob, advantages, mask, rollout, "token-mean",
                           config, torch.float32)
    per_seq, _, _ = _evaluate(ours.compute_policy_loss_vanilla, old, log_prob, advantages[:, 0].contiguous(), mask,
                              rollout, "token-mean", config, torch.float32)
    torch.testing.assert_close(full, per_seq)


@pytest.mark.parametrize("backend", ["auto", "triton", "cpp"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("loss_mode", LOSSES)
def test_per_token_advantages_match_verl(loss_mode, mode, backend, monkeypatch):
    """Advantages that vary within a response (GAE, process rewards) give verl's numbers too."""
    _use_backend(monkeypatch, backend)
    old, log_prob, _, mask, rollout = _inputs()
    advantages = torch.randn(B, T) * mask
    args = (old, log_prob, advantages, mask, rollout, mode, _config())
    truth_loss, truth_grad, truth_metrics = _evaluate(theirs(loss_mode), *args, torch.float64)
    ref_loss, ref_grad, _ = _evaluate(theirs(loss_mode), *args, torch.float32)
    loss, grad, metrics = _evaluate(ours.POLICY_LOSSES[loss_mode], *args, torch.float32)
    assert_close_to_truth(loss, ref_loss, truth_loss, torch.float32, "pg_loss")
    assert_close_to_truth(grad, ref_grad, truth_grad, torch.float32, "d pg_loss / d log_prob")
    for name, value in truth_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_advantages_of_a_wrong_shape_are_refused():
    old, log_prob, _, mask, _ = _inputs()
    with pytest.raises(ValueError, match="advantages must have shape"):
        ours.compute_policy_loss_vanilla(old, log_prob, torch.randn(B, T + 1), mask, config=_config())


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


# ----------------------------------------------------------------------------------------------
# linear_cross_entropy: verl's fused-kernel slot
# ----------------------------------------------------------------------------------------------
def _reference_lce(hidden, weight, labels, temperature, reduction):
    logp, entropy = reference.fused_linear_logprobs(hidden, weight, labels, temperature=temperature,
                                                    return_entropy=True)
    return {"none": logp, "sum": logp.sum(), "mean": logp.mean()}[reduction], entropy


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("layout", [(1, 37), (5, 7)], ids=["packed", "padded"])
def test_linear_cross_entropy(layout, reduction):
    # verl's fused forward passes [1, total_nnz, D] (remove padding) or [B, T, D] (padded) hidden states
    # and reads log_probs.squeeze(0), resp. log_probs[mask] of shape [B, T]: the labels' shape.
    lce = switch().linear_cross_entropy
    D, V = 11, 53
    hidden, weight = torch.randn(*layout, D), torch.randn(V, D) * 0.5
    labels = torch.randint(0, V, layout)
    up_logp = torch.randn(layout) if reduction == "none" else torch.tensor(1.7)
    up_entropy = torch.randn(layout)
    results = []
    for fn, dtype in ((lce, torch.float32), (_reference_lce, torch.float32), (_reference_lce, torch.float64)):
        h, w = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
        logprobs, entropy = fn(h, w, labels, 0.9, reduction)
        ((logprobs * up_logp.to(dtype)).sum() + (entropy * up_entropy.to(dtype)).sum()).backward()
        results.append((logprobs, entropy, h.grad, w.grad))
    assert results[0][0].shape == (layout if reduction == "none" else ()) and results[0][1].shape == layout
    for name, got, ref, truth in zip(("logprobs", "entropy", "grad hidden", "grad weight"), *results):
        assert_close_to_truth(got, ref, truth, torch.float32, name)


def test_linear_cross_entropy_head_in_another_dtype_and_no_entropy():
    # Under verl's bf16 autocast the hidden states are bf16 while an FSDP2 shard may stay float32: the
    # head runs in the hidden states' dtype, as the autocast matmul would. Inside the engine, a
    # micro-batch that does not ask for the entropy gets None.
    module = switch()
    hidden, weight, labels = torch.randn(2, 5, 16).bfloat16(), torch.randn(40, 16), torch.randint(0, 40, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs, entropy = module.linear_cross_entropy(hidden, weight, labels)
    expected = module.fused_linear_logprobs(hidden, weight.bfloat16(), labels, return_entropy=True)
    torch.testing.assert_close(logprobs, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(entropy, expected[1], rtol=0, atol=0)
    token = module._ENTROPY_NEEDED.set(False)
    try:
        logprobs, entropy = module.linear_cross_entropy(hidden, weight, labels)
    finally:
        module._ENTROPY_NEEDED.reset(token)
    assert entropy is None
    torch.testing.assert_close(logprobs, expected[0], rtol=0, atol=0)


def test_linear_cross_entropy_gathers_a_dtensor_head(tmp_path):
    # FSDP2 shards an untied head as a DTensor that verl's fused forward reads outside the head's module.
    # One process here (the engine test shards it over two): the gather, and the gradient reaching the
    # shard as a DTensor of the same placement.
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    lce = switch().linear_cross_entropy
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        hidden, weight, labels = torch.randn(1, 9, 8), torch.randn(31, 8), torch.randint(0, 31, (1, 9))
        shard = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
        logprobs, entropy = lce(hidden, shard, labels)
        (logprobs.sum() + entropy.sum()).backward()
        plain = weight.clone().requires_grad_()
        expected = lce(hidden, plain, labels)
        (expected[0].sum() + expected[1].sum()).backward()
    finally:
        torch.distributed.destroy_process_group()
    torch.testing.assert_close(logprobs, expected[0], rtol=0, atol=0)
    assert shard.grad.placements == (Shard(0),)
    torch.testing.assert_close(shard.grad.full_tensor(), plain.grad, rtol=0, atol=0)


def test_linear_cross_entropy_errors():
    lce = switch().linear_cross_entropy
    with pytest.raises(NotImplementedError, match="dist_process_group"):
        lce(torch.randn(2, 3), torch.randn(5, 3), torch.zeros(2, dtype=torch.long), dist_process_group=object())
    with pytest.raises(ValueError, match="reduction"):
        lce(torch.randn(2, 3), torch.randn(5, 3), torch.zeros(2, dtype=torch.long), reduction="max")


# ----------------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------------
def _switched(state):
    return all(module.startswith("lvrpo_fast.integrations.verl") for module in state.values())


def test_install_is_idempotent_and_complete():
    module = switch()
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine, FSDPEngineWithLMHead

    module.install()
    module.install()
    assert _switched(installed_state()), installed_state()
    for name in LOSSES:
        assert core_algos.get_policy_loss_fn(name) is ours.POLICY_LOSSES[name]
    # one wrapper around verl's own method, not a wrapper around a wrapper
    assert FSDPEngineWithLMHead.forward_step.__wrapped__.__module__ == FSDPEngine.__module__
    assert FSDPEngineWithLMHead._build_module.__wrapped__ is FSDPEngine._build_module
    assert EngineRegistry.new.__func__.__wrapped__.__module__ == "verl.workers.engine.base"


def _model_config_worker(model_config):
    """In a Ray worker: the switch's footprint before and after HFModelConfig is built from verl's config
    (ActorRolloutRefWorker.init_model's first step, which imports external_lib)."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl_engine_run import installed_state

    before = installed_state()
    omega_conf_to_dataclass(model_config)
    return os.getpid(), before, installed_state()


def _import_verl_worker():
    """In a Ray worker: the switch's footprint once `import verl` has run."""
    import verl  # noqa: F401
    from verl_engine_run import installed_state

    return os.getpid(), installed_state()


def test_switch_reaches_ray_workers(tmp_path):
    # verl's trainer sends its workers the model section of its config; each worker turns it into
    # HFModelConfig (ActorRolloutRefWorker.init_model), whose __post_init__ imports external_lib. One Ray
    # worker (CPU) does exactly that with verl's own model config file; another gets
    # VERL_USE_EXTERNAL_MODULES through Ray's runtime environment, as a user's environment reaches workers.
    switch()
    ray = pytest.importorskip("ray")
    from omegaconf import OmegaConf

    import verl

    save_tiny_model(str(tmp_path / "model"), tied=False, layers=1)
    config = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/model/hf_model.yaml"))
    config.merge_with({"path": str(tmp_path / "model"), "external_lib": "lvrpo_fast.integrations.verl",
                       "load_tokenizer": False})
    path = os.pathsep.join([TESTS, os.path.dirname(TESTS)])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        by_config = ray.remote(num_cpus=1)(_model_config_worker).options(
            runtime_env={"env_vars": {"PYTHONPATH": path}}).remote(config)
        by_environment = ray.remote(num_cpus=1)(_import_verl_worker).options(
            runtime_env={"env_vars": {"PYTHONPATH": path,
                                      "VERL_USE_EXTERNAL_MODULES": "lvrpo_fast.integrations.verl"}}).remote()
        (pid, before, after), (pid_env, state_env) = ray.get([by_config, by_environment], timeout=600)
    finally:
        ray.shutdown()
    assert os.getpid() not in (pid, pid_env) and pid != pid_env
    assert not any(module.startswith("lvrpo_fast") for module in before.values()), before
    assert _switched(after), after
    assert _switched(state_env), state_env


def test_switch_refuses_other_engines(monkeypatch):
    switch()
    from verl.workers.engine.base import BaseEngine, EngineRegistry

    class OtherEngine(BaseEngine):
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setitem(EngineRegistry._engines["language_model"], "other",
                        {"cuda": OtherEngine, "cpu": OtherEngine, "npu": OtherEngine})
    with pytest.raises(ValueError, match="strategy 'other' builds OtherEngine"):
        EngineRegistry.new(model_type="language_model", backend="other")


def test_switch_refuses_models_it_cannot_reproduce():
    module = switch()
    import transformers

    with pytest.raises(ValueError, match="final_logit_softcapping"):
        module.check_model_config(transformers.Gemma2Config())
    with pytest.raises(ValueError, match="logit_scale"):
        module.check_model_config(transformers.CohereConfig())
    with pytest.raises(ValueError, match="kimi_vl"):
        module.check_model_config(transformers.PretrainedConfig(model_type="kimi_vl"))
    module.check_model_config(transformers.Qwen2Config())

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    module.check_lm_head(model)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(50))
    with pytest.raises(ValueError, match="bias"):
        module.check_lm_head(model)
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_config(config)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        module.check_lm_head(lora)
    module.check_lm_head(peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                                             peft.LoraConfig(r=2, target_modules="all-linear")))


def test_switch_keeps_an_untied_head_in_fsdp2s_root_unit():
    # verl's FSDP2 wrapping gives an untied head a unit of its own (read, never called, by the fused
    # forward); while the switch builds an LM engine's FSDP module, the head is left to the root unit.
    module = switch()
    import transformers
    import verl.utils.fsdp_utils as fsdp_utils

    config = transformers.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    layers = ["Qwen2DecoderLayer"]
    assert model.lm_head in fsdp_utils._select_fsdp2_wrap_targets(model, layers)
    with module._head_in_root_unit():
        targets = fsdp_utils._select_fsdp2_wrap_targets(model, layers)
    assert model.lm_head not in targets and model.model.embed_tokens in targets
    assert model.lm_head in fsdp_utils._select_fsdp2_wrap_targets(model, layers)


@pytest.mark.parametrize("key, value, match", [
    ("temperature", torch.full((2,), 0.7), "temperature"),
    ("calculate_sum_pi_squared", True, "calculate_sum_pi_squared"),
    ("distillation_use_topk", True, "distillation_use_topk"),
])
def test_switch_refuses_micro_batches_it_cannot_compute(key, value, match):
    module = switch()
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    micro_batch = TensorDict({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, batch_size=[2])
    tu.assign_non_tensor(micro_batch, temperature=1.0)
    module.check_micro_batch(micro_batch)
    if isinstance(value, torch.Tensor):
        micro_batch[key] = value
    else:
        tu.assign_non_tensor(micro_batch, **{key: value})
    with pytest.raises(ValueError, match=match):
        module.check_micro_batch(micro_batch)


# ----------------------------------------------------------------------------------------------
# verl's own FSDP engine, plain and switched
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    switch()
    import verl_engine_run

    out = str(tmp_path_factory.mktemp("verl_engine") / "runs")
    verl_engine_run.parity(out)
    return [torch.load(f"{out}.rank{rank}", weights_only=False) for rank in (0, 1)]


def _engine_params():
    from verl_engine_run import CASES, CASES_ONE_PROCESS

    params = []
    for world_size, cases in ((1, CASES_ONE_PROCESS), (2, CASES)):
        for index, (strategy, tied, packed, entropy, param_dtype) in enumerate(cases):
            name = (f"{world_size}proc-{strategy}-{'tied' if tied else 'untied'}-{'packed' if packed else 'padded'}-"
                    f"entropy{'on' if entropy else 'off'}-{param_dtype}")
            params.append(pytest.param(world_size, index, id=name))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("world_size, index", _engine_params())
def test_verl_engine_matches_and_never_forms_the_logits(engine_runs, world_size, index):
    # float32: switched against plain within float32 tolerance. bf16 (verl's default mixed precision):
    # the three-number rule, with verl's plain bf16 run as the reference and the float32 run of the same
    # case (CASES[0]) as the truth.
    from verl_engine_run import CASES, CHUNK_ROWS

    bf16 = CASES[index][4] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    for rank in range(world_size):
        plain = engine_runs[rank][world_size, "plain"][index]
        switched = engine_runs[rank][world_size, "switched"][index]
        truth = engine_runs[rank][world_size, "plain"][CASES.index(CASES[index][:4] + ("fp32",))] if bf16 else plain
        reference = plain if bf16 else {"grads": {}}
        for name in ("loss", "grad_norm", "pg_loss", "log_probs", "entropy"):
            assert_close_to_truth(switched[name], reference.get(name), truth[name], dtype, f"rank {rank} {name}")
        assert plain["grads"].keys() == switched["grads"].keys()
        checked = 0
        for name, grad in truth["grads"].items():
            assert (grad is None) == (switched["grads"][name] is None), name
            if grad is not None:
                assert_close_to_truth(switched["grads"][name], reference["grads"].get(name), grad, dtype,
                                      f"rank {rank} grad {name}")
                checked += 1
        assert checked >= 10
        # verl's own path allocates [micro-batch tokens, V] logits; the switched one a [CHUNK_ROWS, V] tile
        assert plain["logit_rows"] > CHUNK_ROWS, plain["logit_rows"]
        assert 0 < switched["logit_rows"] <= CHUNK_ROWS, switched["logit_rows"]
