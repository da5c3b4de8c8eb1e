"""A few steps of TRL's own GRPOTrainer, plain (trl) or switched to lvrpo_fast (lvrpo), in this process.

    python benchmarks/trl_e2e.py --impl {trl,lvrpo} --vocab 151936 --hidden 256 --batch 8 --steps 3 OUT.json

A Qwen2-shaped model built from a config (2 layers, tied embeddings, the given vocabulary and hidden
size; random weights), a word-level tokenizer of the same vocabulary, in-memory prompts of 8 words,
completions of --completion-length tokens, float32 on the CPU, beta = 0 (no reference model), one
optimizer step per generation. Written to OUT.json:
    step_s         TRL's own step_time of each step (generation, scoring and the training step)
    generate_s     the part of each step spent in _prepare_inputs (generation and rewards: the same
                   code in both), so step_s - generate_s is the loss, its backward and the optimizer
    peak_rss_bytes the process's resident high-water mark at the end (resource.getrusage)
    rss_before_bytes  its resident size after building the trainer, before the first step
One process per run, so that the high-water mark belongs to that run alone.
"""
import argparse
import json
import resource
import tempfile
import time
import warnings

import datasets
import tokenizers
import torch
import transformers
import trl

from lvrpo_fast.integrations.trl import LVRPOGRPOTrainer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build(directory, vocab_size, hidden_size):
    words = [f"w{i}" for i in range(vocab_size - 3)]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>", padding_side="left")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=1)
    model = transformers.Qwen2ForCausalLM(config)
    prompts = [" ".join(words[(7 * i + j) % len(words)] for j in range(8)) for i in range(64)]
    return model, tokenizer, datasets.Dataset.from_dict({"prompt": prompts})


def reward(completions, **kwargs):
    return [float(len(set(c.split()))) for c in completions]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("trl", "lvrpo"), required=True)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (per_device_train_batch_size)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer, dataset = build(tmp, args.vocab, args.hidden)
        config = trl.GRPOConfig(output_dir=tmp, per_device_train_batch_size=args.batch, num_generations=4,
                                max_completion_length=args.completion_length, max_steps=args.steps,
                                learning_rate=1e-5, report_to="none", logging_steps=1, save_strategy="no",
                                use_cpu=True, seed=0, beta=0.0, bf16=False, disable_dropout=True)
        cls = LVRPOGRPOTrainer if args.impl == "lvrpo" else trl.GRPOTrainer
        generate_s = []
        prepare = cls._prepare_inputs

        def timed_prepare(self, *a, **k):
            start = time.perf_counter()
            try:
                return prepare(self, *a, **k)
            finally:
                generate_s.append(time.perf_counter() - start)

        cls = type(f"Timed{cls.__name__}", (cls,), {"_prepare_inputs": timed_prepare})
        trainer = cls(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer)
        rss_before = rss_bytes()
        trainer.train()
    steps = [log["step_time"] for log in trainer.state.log_history if "step_time" in log]
    result = {"impl": args.impl, "vocab": args.vocab, "hidden": args.hidden, "batch": args.batch,
              "completion_length": args.completion_length, "step_s": steps, "generate_s": generate_s,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "rss_before_bytes": rss_before, "threads": torch.get_num_threads()}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
