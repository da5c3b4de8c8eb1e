"""The language-visual GRPO trainer: `python -m lvrpo_fast.train --help`.

    config.py       TrainConfig (every field a flag) and its validation
    task.py         the embedded world of colored shapes on a grid: prompts, rewards, splits, data order
    model.py        the embedded tokenizer and model, local Hugging Face models, sampling
    processes.py    one process or torch.distributed ranks, and the collectives the loop needs
    loop.py         the Trainer: warm-up, GRPO (rollout, log-probs, update, record), evaluation
    check.py        --check-every: the fused loss against the reference, by lvrpo_fast.testing's rule
    checkpoints.py  checkpoint files (safetensors + JSON, checksummed, atomic) and RNG states
    rundir.py       the run directory: its checks, its lock, metrics.jsonl
    report.py       progress bars, the summary, curves.png
    compare.py      several runs side by side: a table and a plot of one task's held-out reward
    cli.py          main(): exit statuses, signals, messages
"""
from .cli import main
from .config import TrainConfig, parse_args

__all__ = ["TrainConfig", "parse_args", "main"]
