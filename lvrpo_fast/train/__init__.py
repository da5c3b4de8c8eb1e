"""The language-visual GRPO trainer: `python -m lvrpo_fast.train --help`.

    config.py  TrainConfig (every field a flag) and its validation
    task.py    the embedded world of colored shapes on a grid: prompts, rewards, splits, data order
    model.py   the embedded tokenizer and model, local Hugging Face models, sampling
    loop.py    warm-up, GRPO through lvrpo_fast, evaluation, checkpoints, metrics, the plot
"""
from .config import TrainConfig, parse_args

__all__ = ["TrainConfig", "parse_args", "main"]


def main(argv=None) -> int:
    from .loop import main as _main

    return _main(argv)
