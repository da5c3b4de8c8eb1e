"""LVRPOGRPOTrainer against trl.GRPOTrainer itself: two steps of the real trainer on a tiny locally
built Llama model and tokenizer, from the same seed, give the same losses, gradients and weights for
every supported loss type; the loss alone (with old / reference log-probs and vLLM-style rollout
weights) matches TRL's _compute_loss; unsupported options are refused."""
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'trl>=1.16')")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install datasets)")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
import transformers  # noqa: E402

from lvrpo_fast.integrations.trl import LVRPOGRPOTrainer  # noqa: E402
from tolerances import assert_close_to_truth  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama model and a word-level tokenizer, saved locally (TRL builds the reference model from the path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>", padding_side="left")
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _reward(completions, **kwargs):
    # Deterministic and varied within a group: rewards long completions mentioning low-numbered words.
    return [float(len(c.split())) - 0.1 * sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) / 10
            for c in completions]


def _dataset():
    prompts = [" ".join(WORDS[i:i + 3 + i % 2]) for i in range(0, 16, 2)]
    return datasets.Dataset.from_dict({"prompt": prompts})


def _config(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                   max_steps=2, learning_rate=5e-2, report_to="none", logging_steps=1, save_strategy="no",
                   use_cpu=True, seed=7, beta=0.05, num_iterations=2, temperature=0.9, epsilon_high=0.28,
                   max_grad_norm=0.0, disable_dropout=True, shuffle_dataset=False,
                   bf16=False)  # GRPOConfig turns on bfloat16 autocast by default: compare in float32
    options.update(overrides)
    return trl.GRPOConfig(**options)


class _GradientRecorder(transformers.TrainerCallback):
    def __init__(self):
        self.grads = []
        self.model = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = kwargs["model"]
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _train(trainer_cls, model_dir, tmp_path, dtype=torch.float32, **overrides):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    recorder = _GradientRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = _config(tmp_path, model_init_kwargs={"dtype": dtype}, **overrides)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        trainer = trainer_cls(model=model_dir if overrides.get("beta", 0.05) else model, reward_funcs=_reward,
                              args=config, train_dataset=_dataset(), processing_class=tokenizer, callbacks=[recorder])
        trainer.train()
    losses = torch.tensor([log["loss"] for log in trainer.state.log_history if "loss" in log], dtype=torch.float64)
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return losses, recorder.grads, params, trainer


LOSS_CASES = [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "token"), ("cispo", "token"),
              ("sapo", "token"), ("luspo", "sequence"), ("grpo", "sequence")]


@pytest.mark.parametrize("loss_type,level", LOSS_CASES)
def test_two_training_steps_match_trl(loss_type, level, model_dir, tmp_path):
    overrides = dict(loss_type=loss_type, importance_sampling_level=level)
    if loss_type == "cispo":
        overrides["epsilon_high"] = 1.6
    truth = _train(trl.GRPOTrainer, model_dir, tmp_path / "truth", dtype=torch.float64, **overrides)
    ref = _train(trl.GRPOTrainer, model_dir, tmp_path / "trl", **overrides)
    ours = _train(LVRPOGRPOTrainer, model_dir, tmp_path / "lvrpo", **overrides)
    assert len(ours[0]) == 2 and len(ours[1]) == 2
    assert_close_to_truth(ours[0], ref[0], truth[0], torch.float32, "loss")
    for step in range(2):
        for name, g in truth[1][step].items():
            assert_close_to_truth(ours[1][step][name], ref[1][step][name], g, torch.float32, f"step {step} grad {name}")
    for name, p in truth[2].items():
        assert_close_to_truth(ours[2][name], ref[2][name], p, torch.float32, f"weight {name}")
    logged = [log for log in ours[3].state.log_history if "loss" in log]
    assert all("entropy" in log and "kl" in log for log in logged), "lvrpo_fast's metrics reach TRL's logs"


@pytest.fixture(scope="module")
def trainers(model_dir, tmp_path_factory):
    """A stock and an lvrpo_fast trainer on the same model, for loss-level checks without training."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
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
    return {
        "prompt_ids": torch.randint(3, V, (B, P)), "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, V, (B, K)), "completion_mask": completion_mask,
        "advantages": torch.randn(B), "num_items_in_batch": completion_mask.sum() * 2,
        "old_per_token_logps": -torch.rand(B, K) * 3 - 2, "ref_per_token_logps": -torch.rand(B, K) * 3 - 2,
        "importance_sampling_ratio": torch.rand(B, K) + 0.5,
    }


@pytest.mark.parametrize("loss_type,level", LOSS_CASES)
def test_compute_loss_matches_trl_with_reference_and_rollout_weights(loss_type, level, trainers):
    """The loss with beta > 0, old log-probs far from the current ones, vLLM-style rollout weights and
    gradient accumulation, against TRL's own _compute_loss on the same inputs and weights."""
    inputs = _loss_inputs()
    results = []
    for trainer in trainers:
        trainer.loss_type, trainer.importance_sampling_level = loss_type, level
        trainer.beta, trainer.use_vllm, trainer.vllm_importance_sampling_correction = 0.07, True, True
        trainer.epsilon_high = 1.6 if loss_type == "cispo" else 0.28
        trainer.current_gradient_accumulation_steps = 3  # set by train(); the loss divides by it
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (trl_loss, trl_grads), (our_loss, our_grads) = results
    torch.testing.assert_close(our_loss, trl_loss, rtol=2e-5, atol=1e-6)
    for name, g in trl_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=2e-4, atol=2e-6, msg=name)


@pytest.mark.parametrize("option,value", [("loss_type", "vespo"), ("off_policy_mask_threshold", 0.5),
                                          ("top_entropy_quantile", 0.2), ("entropy_coef", 0.01),
                                          ("use_adaptive_entropy", True)])
def test_unsupported_options_are_refused(option, value, model_dir, tmp_path):
    config = _config(tmp_path, beta=0.0, **{option: value})
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=option):
        LVRPOGRPOTrainer(model=model, reward_funcs=_reward, args=config, train_dataset=_dataset(),
                         processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
