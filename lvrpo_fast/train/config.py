"""The trainer's configuration: one dataclass, its command line, and its validation.

Every field is a flag (`--group-size 8`); `python -m lvrpo_fast.train --help` lists them with their
defaults. :meth:`TrainConfig.validate` runs before any work (no directory, model or process group
is created first) and raises a ValueError naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import List, Optional

from .. import dispatch
from ..options import ADVANTAGE_SCALES, IS_LEVELS, KL_ESTIMATORS, LOSS_TYPES, GRPOOptions
from .rundir import output_dir_problem
from .task import DEFAULT_TASKS, TASKS

DTYPES = ("float32", "bfloat16")
# Without --warmup-reading-steps, the warm-up reads for 1/READING_SHARE of its steps (50 of the default 400).
READING_SHARE = 8
EPILOG = """\
the run directory (--output-dir, default runs/lvrpo under the current directory):
  metrics.jsonl  one JSON row per step and per held-out evaluation
  checkpoints/   the newest --keep-checkpoints checkpoints (step_NNNNNN.safetensors, checksummed)
  summary.json   the configuration and the held-out rewards after warm-up and after GRPO
  curves.png     the per-step curves
  model/         the trained model and tokenizer: a Hugging Face folder, usable as --model
A directory that holds a run is refused unless --resume (continue it from its newest checkpoint)
or --overwrite (delete it and start afresh) is given; two runs on one directory at once are refused.
Ctrl-C or SIGTERM stops after the step in progress with a checkpoint, and prints how to resume.
"""


def _opt(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # what to train
    model: Optional[str] = _opt(None, "path of a local Hugging Face causal LM and tokenizer; None: the "
                                      "embedded model built from a config")
    output_dir: str = _opt("runs/lvrpo", "run directory, relative to the current directory unless absolute: "
                                         "metrics.jsonl, curves.png, summary.json, checkpoints/, model/")
    resume: bool = _opt(False, "continue the run in output_dir from its newest checkpoint that loads")
    overwrite: bool = _opt(False, "start afresh, deleting the previous run in output_dir")
    seed: int = _opt(0, "seed of the task split, the model's initialization, the data order and sampling")
    device: str = _opt("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    dtype: str = _opt("float32", "compute dtype of the model body and the fused ops (master weights stay float32)",
                      choices=DTYPES)
    backend: str = _opt("auto", "lvrpo_fast backend of the fused ops", choices=dispatch.BACKENDS)
    batch_invariant: bool = _opt(False, "the fused ops' batch-invariant mode: a token's log-probability has the same "
                                        "bits in the old-policy pass and in the loss, whatever the batch around it, "
                                        "so the first update's ratio is exactly 1 (triton and cpp backends; on the "
                                        "CPU the fused ops took 0-19%% longer, see the README)")
    cpu_threads: int = _opt(1, "torch threads per process on the CPU: the embedded model's matmuls are too small "
                               "to gain from more, and on a shared machine oversubscribed threads cost up to 5x")
    # the embedded model and task
    tasks: str = _opt(",".join(DEFAULT_TASKS), "the tasks trained and evaluated, comma-separated, of "
                      + ", ".join(TASKS) + " (interleaved: a story of 2-3 scenes, each a caption and its image)")
    hidden_size: int = _opt(128, "embedded model: hidden size")
    num_layers: int = _opt(2, "embedded model: transformer blocks")
    num_heads: int = _opt(4, "embedded model: attention heads")
    train_scenes: int = _opt(4000, "scenes in the training split (one prompt of each task per scene)")
    eval_scenes: int = _opt(256, "scenes in the held-out split, used only for evaluation")
    # supervised warm-up
    warmup_steps: int = _opt(400, "supervised warm-up steps before GRPO")
    warmup_reading_steps: Optional[int] = _opt(None, "the first N warm-up steps train the understanding task only "
                                                     "(read first); None: one eighth of --warmup-steps")
    warmup_understanding_share: float = _opt(0.125, "after the reading steps, the share of each warm-up batch "
                                                   "from the understanding task (the rest: generation)")
    warmup_fraction: float = _opt(0.05, "fraction of the training split the warm-up sees")
    warmup_batch_size: int = _opt(64, "warm-up examples per step")
    warmup_lr: float = _opt(1e-3, "warm-up learning rate (AdamW)")
    # GRPO
    steps: int = _opt(200, "GRPO steps")
    prompts_per_step: int = _opt(32, "prompts per step and process")
    understanding_share: float = _opt(0.25, "share of each step's prompts from the understanding task (the rest: "
                                            "generation, the slower learner)")
    interleaved_share: float = _opt(0.25, "with the interleaved task and another, the share of each warm-up batch "
                                          "and GRPO step from it (the rest: as --understanding-share says)")
    group_size: int = _opt(8, "completions sampled per prompt (G)")
    max_new_tokens: Optional[int] = _opt(None, "completion budget in tokens; None: the longest reference "
                                               "completion under the tokenizer, plus its end token")
    temperature: float = _opt(1.0, "sampling temperature (the loss divides the logits by it too)")
    learning_rate: float = _opt(3e-4, "GRPO learning rate (AdamW)")
    beta: float = _opt(0.02, "KL coefficient to the frozen reference (the model at the end of the warm-up)")
    kl_estimator: str = _opt("k3", "KL estimator", choices=KL_ESTIMATORS)
    epsilon_low: float = _opt(0.2, "lower clip range: ratio >= 1 - epsilon_low")
    epsilon_high: Optional[float] = _opt(None, "upper clip range: ratio <= 1 + epsilon_high; None: epsilon_low")
    loss_type: str = _opt("grpo", "loss aggregation / policy term", choices=LOSS_TYPES)
    importance_sampling_level: str = _opt("token", "importance ratio per token or per sequence (GSPO)",
                                          choices=IS_LEVELS)
    num_iterations: int = _opt(2, "policy updates per generated batch (mu); > 1 makes the old-policy ratio bite")
    advantage_scale: str = _opt("group", "advantage normalization", choices=ADVANTAGE_SCALES)
    process_rewards: bool = _opt(False, "step-wise guidance: each scene of a story is scored as it is written, "
                                        "lvrpo_fast.process_advantages turns the step rewards into per-token "
                                        "advantages (mixed with the outcome advantage, --outcome-weight); other "
                                        "completions count as one step at their end")
    outcome_weight: float = _opt(0.5, "with --process-rewards, the weight w of the outcome advantage in "
                                      "(1 - w) * process + w * outcome, in [0, 1]")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    # evaluation, checkpoints, checks
    eval_every: int = _opt(25, "evaluate on the held-out split every N GRPO steps (0: only at the ends)")
    eval_temperature: Optional[float] = _opt(None, "held-out sampling temperature; None: --temperature, so the "
                                                   "held-out reward is the policy's expected reward; 0: greedy")
    save_every: int = _opt(50, "write a checkpoint every N steps (warm-up and GRPO steps counted together)")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk (the newest ones)")
    check_every: int = _opt(0, "every K GRPO steps compare the fused loss and its gradients with "
                               "lvrpo_fast.reference on the live batch, by the test suite's rule; stops the "
                               "run on a failure, else summarizes the largest differences at the end (0: off)")
    stop_after: Optional[int] = _opt(None, "stop after this many steps of this process, as if interrupted "
                                           "(for testing --resume)")
    progress: bool = _opt(True, "show a progress bar per phase (warm-up, GRPO), and transformers' own bars")

    @property
    def heldout_temperature(self) -> float:
        return self.temperature if self.eval_temperature is None else self.eval_temperature

    @property
    def task_list(self):
        """The selected tasks, in the world's batch order (lvrpo_fast.train.task.TASKS)."""
        named = [t.strip() for t in self.tasks.split(",")] if isinstance(self.tasks, str) else []
        return tuple(t for t in TASKS if t in named)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    def grpo_options(self) -> GRPOOptions:
        return GRPOOptions(loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                           beta=self.beta, kl_estimator=self.kl_estimator,
                           importance_sampling_level=self.importance_sampling_level,
                           max_completion_length=self.max_new_tokens if self.loss_type == "dr_grpo" else None)

    def validate(self) -> "TrainConfig":
        """Raises ValueError naming the flag of the first bad value; fills in the defaults that follow
        other flags (--warmup-reading-steps); returns self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"--{_flag(f.name)} must be one of {list(choices)}, got {value!r}")
        positive = ["cpu_threads", "hidden_size", "num_layers", "num_heads", "train_scenes", "eval_scenes",
                    "warmup_batch_size", "steps", "prompts_per_step", "num_iterations", "keep_checkpoints"]
        non_negative = ["warmup_steps", "eval_every", "save_every", "check_every"]
        for name in positive:
            _integer(name, getattr(self, name), 1)
        for name in non_negative:
            _integer(name, getattr(self, name), 0)
        if self.warmup_reading_steps is None:
            self.warmup_reading_steps = self.warmup_steps // READING_SHARE
        _integer("warmup_reading_steps", self.warmup_reading_steps, 0)
        _integer("group_size", self.group_size, 2, why=" (a group needs a baseline)")
        if self.max_new_tokens is not None:
            _integer("max_new_tokens", self.max_new_tokens, 1)
        if self.stop_after is not None:
            _integer("stop_after", self.stop_after, 1)
        named = [t.strip() for t in self.tasks.split(",")] if isinstance(self.tasks, str) else [self.tasks]
        unknown = [t for t in named if t not in TASKS]
        if unknown or len(set(named)) != len(named):
            raise ValueError(f"--tasks must name each of {list(TASKS)} at most once, comma-separated, got "
                             f"{self.tasks!r}")
        if len(self.task_list) > 1 and self.prompts_per_step < len(self.task_list):
            raise ValueError(f"--prompts-per-step must be >= {len(self.task_list)} (prompts of every task), "
                             f"got {self.prompts_per_step}")
        if self.warmup_reading_steps > self.warmup_steps:
            raise ValueError(f"--warmup-reading-steps {self.warmup_reading_steps} must be <= --warmup-steps "
                             f"{self.warmup_steps}: lower it too, or leave it out to read for one eighth of "
                             f"the warm-up ({self.warmup_steps // READING_SHARE} steps)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"--hidden-size {self.hidden_size} must be divisible by --num-heads {self.num_heads}")
        _number("temperature", self.temperature, strict=True)
        if self.eval_temperature is not None:
            _number("eval_temperature", self.eval_temperature)
        _number("learning_rate", self.learning_rate, strict=True)
        _number("warmup_lr", self.warmup_lr, strict=True)
        _number("max_grad_norm", self.max_grad_norm)
        _number("warmup_fraction", self.warmup_fraction, strict=True)
        _number("outcome_weight", self.outcome_weight)
        if self.outcome_weight > 1:
            raise ValueError(f"--outcome-weight must be in [0, 1], got {self.outcome_weight}")
        for name in ("warmup_understanding_share", "understanding_share", "interleaved_share"):
            _number(name, getattr(self, name))
            if getattr(self, name) > 1:
                raise ValueError(f"--{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_fraction > 1:
            raise ValueError(f"--warmup-fraction must be in (0, 1], got {self.warmup_fraction}")
        try:
            self.grpo_options()
        except (ValueError, TypeError) as exc:  # the loss options name their argument: say it as a flag
            message = str(exc)
            for name in ("epsilon_low", "epsilon_high", "beta", "kl_estimator", "loss_type",
                         "importance_sampling_level"):
                message = message.replace(f"{name}=", f"--{_flag(name)} ").replace(name, f"--{_flag(name)}")
            raise ValueError(message) from None
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
        if self.model is not None and not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"--model {self.model!r} is not a local Hugging Face model folder (no config.json)")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        problem = output_dir_problem(self.output_dir)
        if problem is not None:
            raise ValueError(f"--output-dir {problem}")
        return self


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _integer(name, value, minimum, why=""):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"--{_flag(name)} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"--{_flag(name)} must be >= {minimum}{why}, got {value}")


def _number(name, value, strict=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"--{_flag(name)} must be a finite number, got {value!r}")
    if value < 0 or (strict and value == 0):
        raise ValueError(f"--{_flag(name)} must be {'>' if strict else '>='} 0, got {value}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag; the epilog's table kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lvrpo_fast.train", usage="%(prog)s [options]  (every option: --help)",
        description="Language-visual GRPO end to end: a supervised warm-up, then GRPO through lvrpo_fast's\n"
                    "fused log-probability and loss ops, on an embedded task and model (or --model PATH).\n"
                    "Nothing is downloaded: the task, tokenizer and model are built locally.",
        epilog=EPILOG, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        base = inner[0] if inner else kind
        kwargs = {"default": f.default, "help": f.metadata["help"]}
        if base is bool:
            parser.add_argument(f"--{_flag(f.name)}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        if "choices" not in kwargs:
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(f"--{_flag(f.name)}", type=base, **kwargs)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    """Parses and validates the command line; exits with status 2 and the reason on a bad value."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config = TrainConfig(**vars(args))
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return config
