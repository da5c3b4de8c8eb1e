"""Plain TRL against LVRPOGRPOTrainer in TRL's own GRPOTrainer: the helpers of
tests/test_integrations_trl.py, and (run as a script under torch.distributed.run) its two-process run.

    python -m torch.distributed.run --nproc_per_node 2 tests/trl_parity.py MODEL_DIR OUT CASE

trains plain TRL in float64 (the truth) and in float32, and LVRPOGRPOTrainer in float32, on every
process (gloo, CPU), with the GRPOConfig values of TWO_PROCESS_CASES[CASE]; rank 0 saves the three
runs' logs (TRL's, reduced across the processes), gradients and final weights to OUT (torch.save).
"""
import os
import sys
import warnings

import torch
import datasets
import tokenizers
import transformers
import trl

from lvrpo_fast.integrations.trl import LVRPOGRPOTrainer
from tolerances import assert_close_to_truth

WORDS = [f"w{i}" for i in range(40)]


def save_tiny_model(path, arch):
    """A tiny model of `arch` ("llama": tied embeddings; "qwen2": an untied head and attention biases) and a
    word-level tokenizer, saved locally (TRL builds the reference model from the path)."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>", padding_side="left")
    torch.manual_seed(1234)
    sizes = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                 eos_token_id=1, bos_token_id=1)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **sizes))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=False, **sizes))
    model.save_pretrained(path)
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


def train(trainer_cls, model_dir, tmp_path, dtype=torch.float32, peft_config=None, **overrides):
    """Trains with trainer_cls; returns (the per-step logs, the gradients before each optimizer step, the
    final trainable parameters, the trainer)."""
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    recorder = _GradientRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = _config(tmp_path, model_init_kwargs={"dtype": dtype}, **overrides)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        trainer = trainer_cls(model=model_dir if overrides.get("beta", 0.05) and peft_config is None else model,
                              reward_funcs=_reward, args=config, train_dataset=_dataset(), processing_class=tokenizer,
                              callbacks=[recorder], peft_config=peft_config)
        trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return logs, recorder.grads, params, trainer


# Logged values that measure time, not numbers.
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def check_runs(ours, trl_run, truth, steps=2, dtype=torch.float32):
    """Per step: every value TRL logs (loss, grad_norm, every metric) and the gradients; then the final
    weights; each with the closeness rule of lvrpo_fast.testing against the float64 truth."""
    assert len(ours[0]) == len(trl_run[0]) == steps and len(ours[1]) == steps
    for step in range(steps):
        want, theirs, got = truth[0][step], trl_run[0][step], ours[0][step]
        assert set(got) == set(theirs) == set(want), f"step {step}: logged {sorted(got)} vs TRL {sorted(theirs)}"
        for key in sorted(want):
            if key in TIMING:
                continue
            assert_close_to_truth(torch.tensor(float(got[key])), torch.tensor(float(theirs[key])),
                                  torch.tensor(float(want[key]), dtype=torch.float64), dtype, f"step {step} {key}")
        for name, g in truth[1][step].items():
            assert_close_to_truth(ours[1][step][name], trl_run[1][step][name], g, dtype, f"step {step} grad {name}")
    for name, p in truth[2].items():
        assert_close_to_truth(ours[2][name], trl_run[2][name], p, dtype, f"weight {name}")


# Plain SGD: see tests/test_integrations_trl.py, OPTION_CASES.
SGD = dict(optim="sgd", learning_rate=1.0)
# What the cross-process reductions touch: the entropy quantile gathered from every process, the
# adaptive controller's reduced window, dapo's num_items_in_batch over the world size, the global token
# means of kl / entropy / clip ratios and the gathered per-sequence extremes; sequence-level clip means.
TWO_PROCESS_CASES = {
    "dapo-top-entropy-adaptive": dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.01,
                                      use_adaptive_entropy=True, entropy_target=10.0, **SGD),
    "gspo-off-policy-delta": dict(loss_type="grpo", importance_sampling_level="sequence",
                                  off_policy_mask_threshold=0.0, delta=1.0, **SGD),
}


def main(model_dir, out, case):
    overrides = TWO_PROCESS_CASES[case]
    runs = {}
    for name, cls, dtype in (("truth", trl.GRPOTrainer, torch.float64), ("trl", trl.GRPOTrainer, torch.float32),
                             ("lvrpo", LVRPOGRPOTrainer, torch.float32)):
        logs, grads, params, trainer = train(cls, model_dir, os.path.join(os.path.dirname(out), name), dtype=dtype,
                                             **overrides)
        runs[name] = (logs, grads, params)
        world = trainer.accelerator.num_processes
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"runs": runs, "world_size": world}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
