"""LVRPOGRPOTrainer against trl.GRPOTrainer 1.16 itself (issue 16).

Trainer level: two steps of the real trainer on tiny locally built Llama and Qwen2 models and a
word-level tokenizer, from the same seed, plain against switched, give the same per-step loss,
grad_norm and every metric TRL logs, the same gradients and the same final weights (the float64 run
of plain TRL as the truth, lvrpo_fast's float32 error at most twice TRL's own), for every loss type
and the options TRL 1.16 added (the off-policy and high-entropy masks, the entropy bonus and its
adaptive controller, delta and epsilon at 1, cispo / sapo at the sequence level, vespo); in bfloat16
autocast and with cast_lm_head_to_fp32; with a LoRA adapter; on two processes (gloo,
tests/trl_two_processes.py). Loss level: TRL's _compute_loss and ours on the same inputs (old and
reference log-probabilities, vLLM ratios, a NaN sampler log-probability, a fully masked completion,
accumulation) give the same loss, gradients, logged metrics and adaptive entropy state. Values TRL
cannot train with are refused at construction, naming GRPOConfig's option."""
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'trl>=1.16')")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install datasets)")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
import transformers  # noqa: E402

from lvrpo_fast.integrations.trl import LVRPOGRPOTrainer, check_supported  # noqa: E402
from trl_parity import (SGD, TIMING, TWO_PROCESS_CASES, _config, _dataset, _reward, check_runs,  # noqa: E402
                        save_tiny_model, train)

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


LOSS_CASES = [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "token"), ("cispo", "token"),
              ("sapo", "token"), ("luspo", "sequence"), ("grpo", "sequence")]


@pytest.mark.parametrize("loss_type,level", LOSS_CASES)
def test_two_training_steps_match_trl(loss_type, level, model_dir, tmp_path):
    overrides = dict(loss_type=loss_type, importance_sampling_level=level)
    if loss_type == "cispo":
        overrides["epsilon_high"] = 1.6
    truth = train(trl.GRPOTrainer, model_dir, tmp_path / "truth", dtype=torch.float64, **overrides)
    ref = train(trl.GRPOTrainer, model_dir, tmp_path / "trl", **overrides)
    ours = train(LVRPOGRPOTrainer, model_dir, tmp_path / "lvrpo", **overrides)
    check_runs(ours, ref, truth)


# TRL 1.16's options, combined so that three runs cover them on the Qwen2 model (untied head, biases);
# with num_iterations=2 the second step's old log-probabilities differ from the policy's. Plain SGD
# here: Adam's first steps move each weight by about the learning rate times the sign of its gradient,
# so a weight whose gradient is small (Qwen2's key biases: 3e-4) moves by an amount that float32
# rounding of that gradient changes by ~1e-4 in TRL's own float32 run against float64, and the final
# weights would compare the rounding of a few gradients, not the trainer; with SGD they are the sum of
# the gradients (which check_runs compares step by step anyway), scaled by the learning rate.
OPTION_CASES = {
    "gspo-delta1-epsilon1-masks-adaptive": dict(
        loss_type="grpo", importance_sampling_level="sequence", delta=1.0, epsilon=1.0, epsilon_high=0.28,
        off_policy_mask_threshold=0.0, top_entropy_quantile=0.5, entropy_coef=0.01, use_adaptive_entropy=True,
        entropy_target=10.0, **SGD),
    "cispo-sequence-bonus": dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.6,
                                 entropy_coef=0.02, **SGD),
    "vespo-top-entropy": dict(loss_type="vespo", top_entropy_quantile=0.3, **SGD),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_trl_1_16_options_train_as_trl(case, qwen_dir, tmp_path):
    overrides = OPTION_CASES[case]
    truth = train(trl.GRPOTrainer, qwen_dir, tmp_path / "truth", dtype=torch.float64, **overrides)
    ref = train(trl.GRPOTrainer, qwen_dir, tmp_path / "trl", **overrides)
    ours = train(LVRPOGRPOTrainer, qwen_dir, tmp_path / "lvrpo", **overrides)
    check_runs(ours, ref, truth)


@pytest.mark.parametrize("cast_lm_head_to_fp32", [False, True])
def test_bf16_autocast_as_trl_does_it(cast_lm_head_to_fp32, qwen_dir, tmp_path):
    """bf16=True (TRL's default autocast) with and without cast_lm_head_to_fp32: lvrpo_fast's head rounds
    the same operands to the head's dtype as TRL's chunked head and accumulates the gradients in float32
    (head_dtype), so the two differ only in float32 summation order. Such a difference can change the
    last bit of a bfloat16 value the backbone's backward rounds to, 2^-8 relative: the bound here, per
    parameter, on the relative norm of the step-1 gradients' difference and on each logged value.
    Measured (this model): 0 without the cast (bit for bit), 1.3e-7 with it; before head_dtype the
    integration was 2e-3 to 7e-3 away. The second generation (after one update) gives the same rewards."""
    overrides = dict(bf16=True, cast_lm_head_to_fp32=cast_lm_head_to_fp32, num_iterations=1, **SGD)
    ref = train(trl.GRPOTrainer, qwen_dir, tmp_path / "trl", **overrides)
    ours = train(LVRPOGRPOTrainer, qwen_dir, tmp_path / "lvrpo", **overrides)
    bound = 2.0 ** -8
    for name, g in ref[1][0].items():
        difference = float((ours[1][0][name].double() - g.double()).norm())
        assert difference <= bound * float(g.double().norm()), f"step 1 grad {name}: {difference:.3e}"
    for key, value in ref[0][0].items():
        if key not in TIMING:
            assert abs(ours[0][0][key] - value) <= bound * abs(value) + 1e-6, (key, ours[0][0][key], value)
    assert ours[0][1]["reward"] == ref[0][1]["reward"], "the second generation differs"


def test_lora_adapter_trains_as_trl(model_dir, tmp_path):
    """A LoRA adapter (peft): the adapter's gradients and weights, the logs, and the reference model
    being the adapter disabled (beta > 0), as TRL trains them."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])

    overrides = dict(loss_type="dapo", top_entropy_quantile=0.5, **SGD)
    truth = train(trl.GRPOTrainer, model_dir, tmp_path / "truth", dtype=torch.float64, peft_config=lora(), **overrides)
    ref = train(trl.GRPOTrainer, model_dir, tmp_path / "trl", peft_config=lora(), **overrides)
    ours = train(LVRPOGRPOTrainer, model_dir, tmp_path / "lvrpo", peft_config=lora(), **overrides)
    assert ours[2] and all("lora" in name for name in ours[2]), sorted(ours[2])
    check_runs(ours, ref, truth)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", list(TWO_PROCESS_CASES))
def test_two_processes_match_trl(case, model_dir, tmp_path):
    """Two processes (torch.distributed.run, gloo on the CPU): every process trains plain TRL (float64 and
    float32) and LVRPOGRPOTrainer; TRL's logs reduce its tensors across the processes, ours the
    per-sequence statistics, and the two must agree as on one process (tests/trl_parity.py)."""
    out = tmp_path / "runs.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(Path(__file__).parent / "trl_parity.py"), model_dir, str(out),
               case]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    saved = torch.load(out, weights_only=False)
    assert saved["world_size"] == 2
    runs = saved["runs"]
    check_runs(runs["lvrpo"], runs["trl"], runs["truth"])


@pytest.fixture(scope="module")
def trainers(model_dir, tmp_path_factory):
    """A stock and an lvrpo_fast trainer on the same model, for loss-level checks without training."""
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = _config(tmp_path_factory.mktemp("loss"), beta=0.0, gradient_accumulation_steps=3)
        made = [cls(model=transformers.AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=_reward,
                    args=config, train_dataset=_dataset(), processing_class=tokenizer)
                for cls in (trl.GRPOTrainer, LVRPOGRPOTrainer)]
    return made


def _loss_inputs(B=4, P=5, K=6, V=43):
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_mask = (torch.rand(B, K) > 0.2).long()
    completion_mask[:, 0] = 1
    completion_mask[2] = 0  # a truncated completion under mask_truncated_completions: no token at all
    sampling = -torch.rand(B, K) * 3 - 2
    sampling[1, 2] = float("nan")  # a token vLLM could not score
    ratio = torch.rand(B, K) + 0.5
    return {
        "prompt_ids": torch.randint(3, V, (B, P)), "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, V, (B, K)), "completion_mask": completion_mask,
        "advantages": torch.randn(B), "num_items_in_batch": completion_mask.sum() * 2,
        "old_per_token_logps": -torch.rand(B, K) * 3 - 2, "ref_per_token_logps": -torch.rand(B, K) * 3 - 2,
        "sampling_per_token_logps": sampling,
        # TRL's vLLM ratio is exp(0) = 1 at padding (then clipped to a range holding 1), which VESPO reads
        "importance_sampling_ratio": torch.where(completion_mask.bool(), ratio, torch.ones_like(ratio)),
    }


def _configure(trainer, mode="train", **options):
    """GRPOConfig values set on a built trainer as TRL 1.16's __init__ sets them (its _compute_loss reads
    some from the trainer, the others from args), with the vLLM importance-sampling correction on."""
    args = trainer.args
    for name, value in options.items():
        setattr(args, name, value)
    trainer.loss_type, trainer.importance_sampling_level = args.loss_type, args.importance_sampling_level
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.beta, trainer.top_entropy_quantile = args.beta, args.top_entropy_quantile
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.entropy_coef, trainer.use_adaptive_entropy = args.entropy_coef, args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    # the adaptive controller's last measurement, below entropy_target so that the bonus applies
    trainer._last_world_entropy, trainer._entropy_window_stats = 0.1, None
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    trainer.current_gradient_accumulation_steps = 3  # set by train(); the loss divides by it
    trainer.model.train(mode == "train")
    trainer._metrics[mode].clear()


_DEFAULTS = dict(loss_type="grpo", importance_sampling_level="token", epsilon=0.2, epsilon_high=0.28, delta=None,
                 beta=0.07, top_entropy_quantile=1.0, off_policy_mask_threshold=None, entropy_coef=0.0,
                 use_adaptive_entropy=False, entropy_target=0.2, use_bias_correction_kl=True)
# name -> (GRPOConfig values, advantages per token). Each runs TRL's and lvrpo_fast's _compute_loss on the
# same inputs: a fully masked completion, a NaN sampling log-probability, vLLM ratios, accumulation 3.
LOSS_LEVEL_CASES = {
    **{f"{lt}-{lv}": (dict(loss_type=lt, importance_sampling_level=lv), False) for lt, lv in LOSS_CASES},
    "cispo-sequence": (dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.6), False),
    "sapo-sequence": (dict(loss_type="sapo", importance_sampling_level="sequence"), False),
    "vespo-token": (dict(loss_type="vespo"), False),
    "vespo-sequence-lambda": (dict(loss_type="vespo", importance_sampling_level="sequence", vespo_k_pos=1.5,
                                   vespo_lambda_pos=0.5, vespo_lambda_neg=0.0), False),
    "delta-1": (dict(delta=1.0), False),
    "delta-0.9-epsilon-1.2-bnpo": (dict(loss_type="bnpo", delta=0.9, epsilon=1.2, epsilon_high=None), False),
    "epsilon-1-dapo-sequence": (dict(loss_type="dapo", epsilon=1.0, importance_sampling_level="sequence"), False),
    "off-policy": (dict(off_policy_mask_threshold=0.0), False),
    "off-policy-dapo-sequence": (dict(loss_type="dapo", importance_sampling_level="sequence",
                                      off_policy_mask_threshold=0.3), False),
    "top-entropy-0.2": (dict(top_entropy_quantile=0.2), False),
    "top-entropy-dapo-bonus": (dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.02), False),
    "entropy-bonus-dr-grpo": (dict(loss_type="dr_grpo", entropy_coef=-0.03), False),
    "adaptive-entropy-luspo": (dict(loss_type="luspo", importance_sampling_level="sequence", entropy_coef=0.01,
                                    use_adaptive_entropy=True, entropy_target=9.0), False),
    "vespo-everything": (dict(loss_type="vespo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.0,
                              entropy_coef=0.02, use_adaptive_entropy=True, entropy_target=9.0), False),
    "per-token-advantages-gspo": (dict(importance_sampling_level="sequence"), True),
    "per-token-advantages-cispo": (dict(loss_type="cispo", epsilon_high=1.6), True),
    "per-token-advantages-vespo": (dict(loss_type="vespo"), True),
}


def _trl_metrics(trainer, mode):
    return {k: v for k, v in trainer._metrics[mode].items() if v}


# Evaluation changes only the accumulation scaling (and freezes the adaptive controller): a few cases.
_EVAL_CASES = ("grpo-token", "dapo-token", "adaptive-entropy-luspo", "vespo-everything")


@pytest.mark.parametrize("case,mode", [(c, "train") for c in LOSS_LEVEL_CASES] + [(c, "eval") for c in _EVAL_CASES])
def test_compute_loss_matches_trl(case, mode, trainers):
    """The loss, its gradients, every metric TRL logs and the adaptive entropy state, against TRL's own
    _compute_loss on the same inputs and weights (beta > 0, old log-probabilities far from the current
    ones, vLLM-style rollout weights, gradient accumulation, a fully masked completion)."""
    options, per_token = LOSS_LEVEL_CASES[case]
    inputs = _loss_inputs()
    if per_token:
        inputs["advantages"] = torch.randn(inputs["completion_ids"].shape)
    results = []
    for trainer in trainers:
        _configure(trainer, mode, **{**_DEFAULTS, **options})
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()},
                        _trl_metrics(trainer, mode), (trainer.entropy_coef, trainer._last_world_entropy)))
    (trl_loss, trl_grads, trl_metrics, trl_state), (our_loss, our_grads, our_metrics, our_state) = results
    # Two float32 computations of the same formula (TRL's eager tensor ops against the fused kernels, with
    # different summation orders over tokens, sequences and accumulation steps): a float32 reduction of
    # ~100 terms differs by up to ~1e-6 relative; 2e-5 keeps a margin and is still 1e4x below a wrong option.
    torch.testing.assert_close(our_loss, trl_loss, rtol=2e-5, atol=1e-6)
    for name, g in trl_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=2e-4, atol=2e-6, msg=name)
    assert our_metrics.keys() == trl_metrics.keys()
    for key, values in trl_metrics.items():
        torch.testing.assert_close(torch.tensor(our_metrics[key]), torch.tensor(values), rtol=2e-5, atol=1e-6,
                                   equal_nan=True, msg=key)
    assert our_state == pytest.approx(trl_state, rel=1e-5)


ACCEPTED = [dict(loss_type="vespo"), dict(loss_type="cispo", importance_sampling_level="sequence"),
            dict(loss_type="sapo", importance_sampling_level="sequence"), dict(delta=1.0), dict(epsilon=1.0),
            dict(off_policy_mask_threshold=0.5), dict(top_entropy_quantile=0.2), dict(top_entropy_quantile=0.0),
            dict(entropy_coef=0.01), dict(use_adaptive_entropy=True), dict(loss_type="vespo", use_vllm=True,
                                                                             vllm_importance_sampling_mode="token_mask")]


@pytest.mark.parametrize("options", ACCEPTED, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_what_trl_trains_with_is_accepted(options, tmp_path):
    check_supported(_config(tmp_path, **options))


@pytest.mark.parametrize("option,value,match", [
    ("epsilon", -0.1, "epsilon must be >= 0"),  # GRPOOptions' epsilon_low, named as GRPOConfig names it
    ("epsilon_high", -0.1, "epsilon_high must be >= 0"),
    ("top_entropy_quantile", 1.5, "top_entropy_quantile must be in"),  # TRL fails in torch.quantile mid-training
    ("sapo_temperature_pos", 0.0, "sapo_temperature_pos must be > 0"),  # TRL divides by it: NaN losses
])
def test_unsupported_values_are_refused_at_construction(option, value, match, model_dir, tmp_path):
    config = _config(tmp_path, beta=0.0, **{option: value})
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=match):
        LVRPOGRPOTrainer(model=model, reward_funcs=_reward, args=config, train_dataset=_dataset(),
                         processing_class=transformers.PreTrainedTokenizerFast.from_pretrained(model_dir))


def test_sharded_parameters_are_named():
    """FSDP and DeepSpeed ZeRO-3 shard the LM head's weight, which the fused head reads whole: the
    trainer refuses them at construction (the check, on the attributes Trainer sets)."""
    from types import SimpleNamespace

    from lvrpo_fast.integrations.trl import sharded_parameters

    plain = SimpleNamespace(is_fsdp_enabled=False, accelerator=SimpleNamespace(state=SimpleNamespace()))
    assert sharded_parameters(plain) == ""
    fsdp = SimpleNamespace(is_fsdp_enabled=True, args=SimpleNamespace(fsdp="full_shard"), accelerator=plain.accelerator)
    assert "fsdp='full_shard'" in sharded_parameters(fsdp)
    zero = SimpleNamespace(is_fsdp_enabled=False, accelerator=SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3))))
    assert "ZeRO-3" in sharded_parameters(zero)
    zero.accelerator.state.deepspeed_plugin.zero_stage = 2  # ZeRO-2 keeps whole parameters
    assert sharded_parameters(zero) == ""


def test_vespo_with_a_vllm_clip_range_excluding_one_is_refused(tmp_path):
    """TRL adds padding positions' clipped vLLM ratio to VESPO's weight: 1 unless the range excludes it."""
    config = _config(tmp_path, loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="token_truncate",
                     vllm_importance_sampling_clip_min=1.5, vllm_importance_sampling_clip_max=3.0)
    with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min=1.5"):
        check_supported(config)
