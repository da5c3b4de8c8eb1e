"""The training loop: supervised warm-up, GRPO through lvrpo_fast, evaluation, checkpoints, metrics.

One GRPO step (:meth:`Trainer.grpo_step`), per process (torch.distributed ranks take different prompts):
    1. rollout: P prompts (of the tasks of --tasks, in the shares of --understanding-share and
       --interleaved-share) from the checkpointed data order, each repeated G times; G completions each
       sampled at the temperature from the current policy; rule-based rewards ->
       lvrpo_fast.group_advantages, and with --process-rewards the step rewards (each scene of a story;
       one step at the end of any other completion) -> lvrpo_fast.process_advantages, per token [B, T].
    2. log-probs: the reference's, from the frozen reference model's hidden states of prompt +
       completion through lvrpo_fast.fused_linear_logprobs under torch.no_grad (the forward-only
       fused path); the old policy's, likewise, from the first update's own forward pass. With
       --batch-invariant a token's log-probability there has the bits it gets inside the loss, so
       the first update's ratio is exactly 1.
    3. update: num_iterations policy updates: hidden states with grad -> lvrpo_fast.fused_linear_grpo_loss
       with the LM head's weight (gradients reach both), the KL to the frozen reference, AdamW.
    4. record: the step's metrics row, averaged over ranks.
All fused ops go through the package's dispatch (--backend, "auto" by default).

Reproducibility: the data order is a pure function of (seed, epoch) and the checkpoints hold its
cursor, the weights, the optimizer, the reference weights, the metrics so far and each rank's
torch / python / numpy RNG state, so an interrupted and resumed run on the CPU ends with the same
weights and metrics (timings aside) as an uninterrupted one. Dropout is kept off (model.eval()):
the importance ratio must compare the same function of the weights.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

import lvrpo_fast
from .. import dispatch
from . import checkpoints as C
from . import model as M
from . import report
from . import task as T
from .check import check_fused
from .config import TrainConfig
from .processes import Processes
from .rundir import RunDir

# Wall-clock fields: everything else in metrics.jsonl is reproducible bit for bit on the CPU.
TIMING_KEYS = ("step_time_s", "tokens_per_s", "loss_time_s", "logprob_time_s", "sample_time_s", "eval_time_s")
# Config fields a resumed run may change; the others must match the checkpoint.
RESUMABLE_CHANGES = ("cpu_threads", "resume", "overwrite", "stop_after", "progress", "check_every", "device",
                     "backend", "steps", "eval_every", "save_every", "keep_checkpoints", "output_dir")
EVAL_BATCH = 256
# The parts of a task's reward recorded beside it (train rows and held-out evaluations).
PARTS = {"generation": ("alignment", "structure"), "interleaved": ("relevance", "alignment", "structure")}


def _note(text: str) -> None:
    print(text, file=sys.stderr)


@dataclass
class Rollout:
    """The sampled side of a GRPO step: B = prompts x G completions."""

    examples: List[T.Example]       # [B] the prompt's example, repeated G times
    batch: M.Batch                  # prompts and completions, [B, Lp] and [B, T]
    scores: List[Dict[str, float]]  # [B] reward parts of each completion
    rewards: torch.Tensor           # [B] float32
    advantages: torch.Tensor        # [B] float32, or [B, T] with --process-rewards


class NoStop:
    """The stop request of a trainer run without signal handlers (see cli.StopRequest)."""

    signum: Optional[int] = None


class Trainer:
    """A run: built from a validated TrainConfig; :meth:`run` trains, evaluates and writes the run
    directory; :meth:`close` releases it (the lock, the process group)."""

    def __init__(self, config: TrainConfig, command: str = "python -m lvrpo_fast.train", stop=None):
        self.cfg = config.validate()
        self.command = command
        self.stop = stop if stop is not None else NoStop()
        self.procs = Processes(config.device, config.cpu_threads)
        self.run_dir = RunDir(config.output_dir) if self.procs.main else None
        self.ckpts = C.CheckpointFolder(os.path.join(config.output_dir, "checkpoints"), config.keep_checkpoints)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config = self.cfg
        self.device = self.procs.device
        self.dtype = getattr(torch, config.dtype)
        # Master weights stay float32; a lower dtype runs the body under autocast and the fused ops
        # on hidden states and a head weight cast to it (the cast is differentiable).
        self.autocast_dtype = None if self.dtype == torch.float32 else self.dtype
        self.options = config.grpo_options()
        try:
            self.backend_name = dispatch.select(config.backend, self.device, self.dtype).name
        except RuntimeError as exc:
            raise ValueError(f"--backend {config.backend}: {exc}") from None
        self._open_run_dir()
        checkpoint = self._choose_checkpoint() if config.resume else None

        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.tasks = config.task_list
        self.data = T.build_task(config.seed, config.train_scenes, config.eval_scenes, self.tasks)
        if config.model is not None:
            self.model, self.tokenizer = M.load_pretrained(config.model, self.device, self.dtype)
        else:
            self.tokenizer = M.build_tokenizer(self.tasks)
        self.eos_id, self.pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self._encode()
        self.scene_close_id = self._scene_close_id() if config.process_rewards else None
        if config.model is None:
            self.model = M.build_default_model(self.tokenizer, config.hidden_size, config.num_layers,
                                               config.num_heads, self.max_prompt + self.max_new_tokens + 8)
            M.maybe_flash_attention(self.model, self.device, self.dtype)
        self.model.to(device=self.device, dtype=torch.float32).eval()
        self.procs.broadcast_parameters(self.model)
        self.ref_model = None
        self.optimizer = self._optimizer(config.warmup_lr if config.warmup_steps > 0 else config.learning_rate)
        # Sampling draws differ per rank; the model initialization above did not.
        torch.manual_seed(config.seed * 1_000_003 + 17 + self.procs.rank)

        n_warm = {t: max(1, math.ceil(config.warmup_fraction * len(self.data.train[t]))) for t in self.tasks}
        self.streams = {}
        for i, t in enumerate(T.TASKS):  # a task's streams do not depend on which others are selected
            if t not in self.tasks:
                continue
            self.streams[f"warmup_{t}"] = T.DataStream(n_warm[t], config.seed, 2 * i)
            self.streams[f"grpo_{t}"] = T.DataStream(len(self.data.train[t]), config.seed, 2 * i + 1)
        self.step = 0
        self.saved_step: Optional[int] = None
        self.history: List[Dict] = []
        self.warmup_eval: Optional[Dict] = None
        self.elapsed_before = 0.0
        if checkpoint is not None:
            self._resume(checkpoint)
        elif config.resume and self.procs.main:  # nothing to resume: rows of an earlier start are stale
            C.atomic_write_text("", self.run_dir.file("metrics.jsonl"))
        self.procs.barrier()

    def close(self) -> None:
        if self.run_dir is not None:
            self.run_dir.close()
        self.procs.close()

    # -- setup -----------------------------------------------------------------------------------
    def _open_run_dir(self) -> None:
        """Rank 0 prepares the run directory (see rundir.RunDir.open); every rank gets its verdict."""
        problem = None
        if self.procs.main:
            try:
                notes = self.run_dir.open(self.command, self.cfg.resume, self.cfg.overwrite, self.ckpts.remove_all)
                for note in notes:
                    _note(note)
            except ValueError as exc:
                problem = str(exc)
        problem = self.procs.broadcast_object(problem)
        if problem is not None:
            raise ValueError(problem)

    def _choose_checkpoint(self) -> Optional[str]:
        """--resume: rank 0 picks the newest checkpoint that loads (moving the others aside and saying
        why); None when the folder holds none at all. Raises ValueError when all are damaged."""
        choice = None
        if self.procs.main:
            moved = self.ckpts.scan(warn=_note)
            newest = self.ckpts.newest()
            if newest is None and moved:
                choice = ("error", f"--resume: no checkpoint in {self.ckpts.folder} can be loaded ("
                          + "; ".join(f"{name}: {why}" for name, why in moved)
                          + f"; moved to {os.path.join(self.ckpts.folder, C.UNLOADABLE)}); nothing to resume from: "
                            "start afresh with --overwrite")
            elif newest is None:
                _note(f"lvrpo_fast.train: --resume: no checkpoint in {self.ckpts.folder}; starting from the beginning")
            else:
                newer = [name for name, _ in moved if _step_of(name) is not None and _step_of(name) >= newest.step]
                if newer:
                    _note(f"lvrpo_fast.train: falling back to {newest.path}, the newest checkpoint that loads "
                          f"({', '.join(newer)} did not: see above)")
                choice = ("path", newest.path)
        choice = self.procs.broadcast_object(choice)
        if choice is not None and choice[0] == "error":
            raise ValueError(choice[1])
        return None if choice is None else choice[1]

    def _encode(self) -> None:
        """Token ids of every prompt (with the tokenizer's bos, if any) and reference completion."""
        tok = self.tokenizer
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]

        def encode(text):
            return tok(text, add_special_tokens=False)["input_ids"]

        self.prompt_ids = {}
        self.target_ids = {}
        for split, examples in (("train", self.data.train), ("heldout", self.data.heldout)):
            for t in self.tasks:
                self.prompt_ids[split, t] = [bos + encode(e.prompt) for e in examples[t]]
                # The leading space keeps byte-level BPE tokenizers on their usual word boundary.
                self.target_ids[split, t] = [encode(" " + e.target) + [self.eos_id] for e in examples[t]]
        self.max_prompt = max(len(p) for p in (x for v in self.prompt_ids.values() for x in v))
        longest_target = max(len(p) for p in (x for v in self.target_ids.values() for x in v))
        self.max_new_tokens = self.cfg.max_new_tokens or longest_target

    def _scene_close_id(self) -> int:
        """The token id of </img>, where a story's scene (a step of --process-rewards) ends; the steps are
        found by it, so it must be one token of its own."""
        ids = self.tokenizer(T.IMG_CLOSE, add_special_tokens=False)["input_ids"]
        spaced = self.tokenizer(" " + T.IMG_CLOSE, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or spaced[-1:] != ids:
            raise ValueError(f"--process-rewards: the tokenizer must encode {T.IMG_CLOSE} as one token (it ends "
                             f"each scene, a step), got {ids} and {spaced} with a space before")
        return ids[0]

    def _optimizer(self, lr: float):
        return torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)

    # -- model pieces --------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _hidden(self, model, batch: M.Batch) -> torch.Tensor:
        """Hidden states predicting the completion tokens: [B, T, D] in the compute dtype."""
        ids, mask, pos = batch.full()
        with self._autocast():
            hidden = M.body_of(model)(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        Lp, T_ = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
        return hidden[:, Lp - 1:Lp - 1 + T_].to(self.dtype)

    def _head(self, model):
        weight, bias = M.head_of(model)
        return weight.to(self.dtype), None if bias is None else bias.to(self.dtype)

    def _local(self, stream: str, per_rank: int) -> List[int]:
        """This rank's slice of the next global batch (every rank advances the stream alike)."""
        indices = self.streams[stream].take(per_rank * self.procs.world)
        return indices[self.procs.rank * per_rank:(self.procs.rank + 1) * per_rank]

    def _split(self, n: int, understanding_share: float, reading: bool = False) -> Dict[str, int]:
        """n items -> per-task counts of the selected tasks: the interleaved task's share first (all of
        them when it is the only task), then the rest between understanding and generation; a share
        strictly between 0 and 1 gives each task at least one. reading: understanding only."""
        if reading:
            return {"understanding": n}
        counts = {}
        n_story = 0
        if "interleaved" in self.tasks:
            share = 1.0 if len(self.tasks) == 1 else self.cfg.interleaved_share
            n_story = round(n * share)
            if 0 < share < 1:
                n_story = min(n - 1, max(1, n_story))
        rest = n - n_story
        if "understanding" in self.tasks and "generation" in self.tasks:
            n_read = round(rest * understanding_share)
            if 0 < understanding_share < 1:
                n_read = min(rest - 1, max(1, n_read))
            counts = {"understanding": n_read, "generation": rest - n_read}
        elif "understanding" in self.tasks or "generation" in self.tasks:
            counts = {"understanding" if "understanding" in self.tasks else "generation": rest}
        if "interleaved" in self.tasks:
            counts["interleaved"] = n_story
        return counts

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _loss_kwargs(self) -> Dict:
        return {"temperature": self.cfg.temperature,
                **{f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}}

    # -- warm-up ---------------------------------------------------------------------------------
    def warmup_step(self) -> Dict:
        cfg = self.cfg
        start = time.perf_counter()
        prompts, targets = [], []
        # Read first: a small model that learns to draw first is slow to learn to read (the two tasks
        # compete for its few attention heads); afterwards both, mostly drawing, the slower skill.
        reading = self.step < cfg.warmup_reading_steps and "understanding" in self.tasks
        counts = self._split(cfg.warmup_batch_size, cfg.warmup_understanding_share, reading)
        for t, n in counts.items():
            for i in self._local(f"warmup_{t}", n):
                prompts.append(self.prompt_ids["train", t][i])
                targets.append(self.target_ids["train", t][i])
        prompt_ids, prompt_mask = M.left_pad(prompts, self.pad_id, self.device)
        completion_ids, completion_mask = M.right_pad(targets, self.pad_id, self.device)
        batch = M.Batch(prompt_ids, prompt_mask, completion_ids, completion_mask, completion_mask.any(1))
        hidden = self._hidden(self.model, batch)
        weight, bias = self._head(self.model)
        logp = lvrpo_fast.fused_linear_logprobs(hidden, weight, completion_ids, bias=bias, mask=completion_mask,
                                                backend=cfg.backend, batch_invariant=cfg.batch_invariant)
        tokens = completion_mask.sum()
        # Every sequence weighs the same (as in the GRPO loss): a token mean would give the 2-token
        # answers of the understanding task a seventh of the weight of the 12-token images.
        loss = -(logp.sum(1) / completion_mask.sum(1).clamp(min=1)).mean()
        loss.backward()
        # A short linear ramp of the learning rate keeps the first Adam steps of a fresh model tame.
        ramp = max(1, cfg.warmup_steps // 10)
        self._update(cfg.warmup_lr * min(1.0, (self.step + 1) / ramp))
        self._sync()
        elapsed = time.perf_counter() - start
        n_tokens = self.procs.sum([float(tokens)])[0]
        return {"phase": "warmup", **self.procs.mean({"sft_loss": loss.item()}),
                "step_time_s": elapsed, "tokens_per_s": n_tokens / elapsed}

    def _update(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.procs.average_gradients(self.model.parameters())
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- GRPO ------------------------------------------------------------------------------------
    def begin_grpo(self) -> None:
        """The end of the warm-up: held-out evaluation, the frozen reference, the GRPO optimizer."""
        self.warmup_eval = self.evaluate("warmup")
        self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = self._optimizer(self.cfg.learning_rate)

    def _score(self, examples: List[T.Example], batch: M.Batch) -> List[Dict[str, float]]:
        texts = M.decode_completions(self.tokenizer, batch, self.eos_id)
        stopped = batch.stopped.tolist()
        return [T.reward(e, text, s) for e, text, s in zip(examples, texts, stopped)]

    def grpo_step(self) -> Dict:
        """One GRPO step: rollout, log-probs, update, record (the module docstring's 1-4)."""
        start = time.perf_counter()
        timings: Dict[str, float] = {}
        rollout = self.rollout(start, timings)
        logp_ref = self.reference_logprobs(rollout.batch, timings)
        sums = self.update(rollout, logp_ref, timings)
        self._sync()
        timings["step_time_s"] = time.perf_counter() - start
        return self.record(rollout, sums, timings)

    def rollout(self, start: float, timings: Dict[str, float]) -> Rollout:
        """Step 1: this rank's prompts, G sampled completions each, their rewards and advantages."""
        cfg, G = self.cfg, self.cfg.group_size
        examples, prompts = [], []
        for t, n in self._split(cfg.prompts_per_step, cfg.understanding_share).items():
            for i in self._local(f"grpo_{t}", n):
                examples += [self.data.train[t][i]] * G
                prompts += [self.prompt_ids["train", t][i]] * G
        batch = M.sample(self.model, prompts, self.max_new_tokens, cfg.temperature, self.eos_id, self.pad_id,
                         self.device, self.autocast_dtype)
        self._sync()
        timings["sample_time_s"] = time.perf_counter() - start
        scores = self._score(examples, batch)
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32, device=self.device)
        advantages = lvrpo_fast.group_advantages(rewards, G, scale=cfg.advantage_scale, backend=cfg.backend)
        if cfg.process_rewards:
            step_rewards, step_ends, step_offsets = self._steps(scores, batch)
            advantages = lvrpo_fast.process_advantages(
                step_rewards, step_ends, step_offsets, G, batch.completion_ids.shape[1], scale=cfg.advantage_scale,
                outcome_advantages=advantages, outcome_weight=cfg.outcome_weight, backend=cfg.backend)
        return Rollout(examples, batch, scores, rewards, advantages)

    def _steps(self, scores: List[Dict], batch: M.Batch):
        """The packed steps of process_advantages: each scene of a story, ending at its </img> token, with
        its step reward; any other completion (and a story that closes no scene) one step at its last
        token with its reward (0 for such a story). Returns (step_rewards [S], step_ends [S], step_offsets
        [B + 1]) on the device."""
        ids, mask = batch.completion_ids.tolist(), batch.completion_mask.tolist()
        rewards, ends, offsets = [], [], [0]
        for score, row, live in zip(scores, ids, mask):
            last = max(0, sum(live) - 1)
            if "steps" in score and score["steps"]:
                closes = [t for t, (token, m) in enumerate(zip(row, live)) if m and token == self.scene_close_id]
                # The k-th </img> word of the text is the k-th </img> token (one token: _scene_close_id).
                if len(closes) != len(score["steps"]):
                    raise RuntimeError(f"--process-rewards: {len(score['steps'])} scenes in the decoded text, "
                                       f"{len(closes)} {T.IMG_CLOSE} tokens in the completion")
                ends += closes
                rewards += [r for _, r in score["steps"]]
            else:
                ends.append(last)
                rewards.append(score["reward"] if "steps" not in score else 0.0)
            offsets.append(len(rewards))
        return (torch.tensor(rewards, dtype=torch.float32, device=self.device),
                torch.tensor(ends, dtype=torch.int64, device=self.device),
                torch.tensor(offsets, dtype=torch.int64, device=self.device))

    def reference_logprobs(self, batch: M.Batch, timings: Dict[str, float]) -> Optional[torch.Tensor]:
        """Step 2, the reference's half: log-probs [B, T] float32 of the completions under the frozen
        reference (None when beta = 0: no KL term)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        logp_ref = None
        if cfg.beta > 0:
            with torch.no_grad():
                ref_weight, ref_bias = self._head(self.ref_model)
                logp_ref = lvrpo_fast.fused_linear_logprobs(self._hidden(self.ref_model, batch), ref_weight,
                                                            batch.completion_ids, bias=ref_bias,
                                                            mask=batch.completion_mask, temperature=cfg.temperature,
                                                            backend=cfg.backend, batch_invariant=cfg.batch_invariant)
        self._sync()
        timings["logprob_time_s"] = time.perf_counter() - t0
        return logp_ref

    def old_logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     batch: M.Batch, timings: Dict[str, float]) -> torch.Tensor:
        """Step 2, the old policy's half: log-probs [B, T] float32. The first update's forward pass is
        the old policy's, so they come from its hidden states [B, T, D] through the forward-only path,
        without a second body pass."""
        self._sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            logp_old = lvrpo_fast.fused_linear_logprobs(hidden.detach(), weight.detach(), batch.completion_ids,
                                                        bias=None if bias is None else bias.detach(),
                                                        mask=batch.completion_mask, temperature=self.cfg.temperature,
                                                        backend=self.cfg.backend,
                                                        batch_invariant=self.cfg.batch_invariant)
        self._sync()
        timings["logprob_time_s"] += time.perf_counter() - t0
        return logp_old

    def update(self, rollout: Rollout, logp_ref: Optional[torch.Tensor], timings: Dict[str, float]) -> Dict[str, float]:
        """Step 3: num_iterations updates of the policy on the rollout. Returns the loss and the loss's
        metrics averaged over the updates (and the check's, on a --check-every step)."""
        cfg = self.cfg
        batch = rollout.batch
        targets, mask = batch.completion_ids, batch.completion_mask
        timings["loss_time_s"] = 0.0
        sums, logp_old = {}, None
        grpo_index = self.step - cfg.warmup_steps + 1
        for iteration in range(cfg.num_iterations):
            hidden = self._hidden(self.model, batch)
            weight, bias = self._head(self.model)
            if logp_old is None:
                logp_old = self.old_logprobs(hidden, weight, bias, batch, timings)
            if iteration == 0 and cfg.check_every and grpo_index % cfg.check_every == 0:
                sums.update(check_fused(hidden, weight, bias, targets, mask, rollout.advantages, logp_old, logp_ref,
                                        dtype=self.dtype, backend=cfg.backend, loss_kwargs=self._loss_kwargs(),
                                        backend_name=self.backend_name, step=self.step,
                                        batch_invariant=cfg.batch_invariant))
            self._sync()
            t0 = time.perf_counter()
            loss, metrics = lvrpo_fast.fused_linear_grpo_loss(
                hidden, weight, targets, mask, rollout.advantages, bias=bias, logp_old=logp_old, logp_ref=logp_ref,
                return_entropy=True, backend=cfg.backend, batch_invariant=cfg.batch_invariant, **self._loss_kwargs())
            self._sync()
            timings["loss_time_s"] += time.perf_counter() - t0
            loss.backward()
            self._update(cfg.learning_rate)
            named = {"loss": loss, **metrics}
            # One device-to-host copy for all the scalars, not one per metric.
            for k, v in zip(named, torch.stack([v.detach().float() for v in named.values()]).tolist()):
                sums[k] = sums.get(k, 0.0) + v / cfg.num_iterations
        return sums

    def record(self, rollout: Rollout, sums: Dict[str, float], timings: Dict[str, float]) -> Dict:
        """Step 4: the metrics row (rewards, completion statistics, the update's sums), averaged over ranks."""
        scores, mask = rollout.scores, rollout.batch.completion_mask
        record = {"phase": "grpo", "reward": float(rollout.rewards.mean())}
        for t in self.tasks:
            part = [s for s, e in zip(scores, rollout.examples) if e.task == t]
            record[f"reward_{t}"] = sum(s["reward"] for s in part) / max(1, len(part))
        for t, keys in PARTS.items():
            if t in self.tasks:
                part = [s for s, e in zip(scores, rollout.examples) if e.task == t]
                for k in keys:
                    record[f"{t}_{k}"] = sum(s[k] for s in part) / max(1, len(part))
        record["completion_tokens"] = float(mask.sum(1).float().mean())
        record["stopped"] = float(rollout.batch.stopped.float().mean())
        record.update(sums)
        record = {"phase": "grpo", **self.procs.mean({k: v for k, v in record.items() if k != "phase"})}
        n_tokens = self.procs.sum([float(mask.sum())])[0]
        elapsed = timings["step_time_s"]
        record.update(step_time_s=elapsed, tokens_per_s=n_tokens / elapsed, loss_time_s=timings["loss_time_s"],
                      logprob_time_s=timings["logprob_time_s"], sample_time_s=timings["sample_time_s"])
        return record

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, tag: str) -> Dict:
        """Mean held-out reward per task (each rank decodes its share; sums are all-reduced).

        The RNG is forked so that evaluating never shifts the training draws."""
        cfg = self.cfg
        start = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        # Sums and counts under fixed keys, so that ranks all-reduce one vector.
        keys = list(self.tasks) + [f"{t}_{k}" for t, parts in PARTS.items() if t in self.tasks for k in parts]
        keys += [f"understanding_{kind}" for kind in T.QUESTION_KINDS if "understanding" in self.tasks]
        sums, counts = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed + 7 * self.step + 3)
            for t in self.tasks:
                examples = self.data.heldout[t][self.procs.rank::self.procs.world]
                prompts = self.prompt_ids["heldout", t][self.procs.rank::self.procs.world]
                for s in range(0, len(examples), EVAL_BATCH):
                    batch = M.sample(self.model, prompts[s:s + EVAL_BATCH], self.max_new_tokens, cfg.heldout_temperature,
                                     self.eos_id, self.pad_id, self.device, self.autocast_dtype)
                    for e, score in zip(examples[s:s + EVAL_BATCH], self._score(examples[s:s + EVAL_BATCH], batch)):
                        parts = {t: score["reward"], **{f"{t}_{k}": score[k] for k in PARTS.get(t, ())}}
                        if t == "understanding":
                            parts[f"understanding_{e.question[0]}"] = score["reward"]
                        for k, v in parts.items():
                            sums[k] += v
                            counts[k] += 1
        totals = self.procs.sum([sums[k] for k in keys] + [counts[k] for k in keys])
        result = {"phase": "eval", "tag": tag}
        for j, k in enumerate(keys):
            if totals[len(keys) + j] > 0:
                result[f"heldout_{k}"] = totals[j] / totals[len(keys) + j]
        result["eval_time_s"] = time.perf_counter() - start
        self._log({"step": self.step, **result})
        return result

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> Dict:
        """Trains to the last step, evaluates, writes the summary. Returns the summary, or
        {"stopped_by": signal number, "step": ...} / {"interrupted_at": step} when it stopped early."""
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.step > cfg.total_steps:
            raise ValueError(f"--resume: the checkpoint is at step {self.step}, past this run's "
                             f"{cfg.total_steps} steps (--warmup-steps + --steps)")
        final = self._final_evaluation()
        if final is not None:
            return self._already_finished(final, t_start)
        progress = report.Progress(cfg.warmup_steps, cfg.steps, self.step, self.procs.main and cfg.progress)
        done_here = 0
        while True:
            if self.procs.any(self.stop.signum is not None):
                progress.close()
                if self.saved_step != self.step:
                    self.save(t_start)
                return {"stopped_by": self.stop.signum, "step": self.step}
            if self.step >= cfg.total_steps:
                break
            if self.step == cfg.warmup_steps and self.ref_model is None:
                self.begin_grpo()
                self.save(t_start)
            grpo = self.step >= cfg.warmup_steps
            record = self.grpo_step() if grpo else self.warmup_step()
            self.step += 1
            done_here += 1
            self._log({"step": self.step, **record})
            grpo_done = self.step - cfg.warmup_steps
            if grpo and cfg.eval_every and grpo_done % cfg.eval_every == 0 and self.step < cfg.total_steps:
                self.evaluate("grpo")
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save(t_start)
            progress.update(record)
            if cfg.stop_after is not None and done_here >= cfg.stop_after and self.step < cfg.total_steps:
                progress.close()
                return {"interrupted_at": self.step}
        progress.close()
        if self.ref_model is None:  # no GRPO steps were left to run
            self.begin_grpo()
        final = self.evaluate("final")
        self.save(t_start)
        return self.finish(final, t_start)

    def _final_evaluation(self) -> Optional[Dict]:
        """The final evaluation's row when the run (resumed from its last checkpoint) has finished."""
        last = self.history[-1] if self.history else None
        if self.step == self.cfg.total_steps and last is not None and last.get("tag") == "final":
            return last
        return None

    def _already_finished(self, final: Dict, t_start: float) -> Dict:
        """--resume of a finished run: no step, no evaluation, no row is added; the summary is written
        only if it is missing (the run was stopped between its last checkpoint and the summary)."""
        path = os.path.join(self.cfg.output_dir, "summary.json")
        if not os.path.exists(path):
            return self.finish(final, t_start)
        with open(path) as f:
            summary = json.load(f)
        if self.procs.main:
            _note(f"lvrpo_fast.train: the run in {self.cfg.output_dir} finished at step {self.step} already; "
                  f"nothing to do. Its summary:")
            print(report.format_summary(summary))
        return summary

    def _log(self, record: Dict) -> None:
        self.history.append(record)
        if self.procs.main:
            self.run_dir.append_metrics(record)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, t_start: float) -> None:
        states = self.procs.gather(C.rng_state(self.device))
        if self.procs.main:
            self.ckpts.save({
                "step": self.step,
                "config": dataclasses.asdict(self.cfg),
                "model": self.model.state_dict(),
                "ref_model": None if self.ref_model is None else self.ref_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "streams": {k: s.state_dict() for k, s in self.streams.items()},
                "rng": states,
                "history": self.history,
                "warmup_eval": self.warmup_eval,
                "elapsed_s": self.elapsed_before + time.perf_counter() - t_start,
            })
        self.saved_step = self.step
        self.procs.barrier()

    def _resume(self, path: str) -> None:
        state = C.load(path)
        saved = state["config"]
        # A flag newer than the checkpoint had its default when the checkpoint was written.
        defaults = {f.name: f.default for f in dataclasses.fields(self.cfg)}
        for key, value in dataclasses.asdict(self.cfg).items():
            if key not in RESUMABLE_CHANGES and saved.get(key, defaults[key]) != value:
                raise ValueError(f"--resume: the checkpoint was written with --{key.replace('_', '-')} "
                                 f"{saved.get(key, defaults[key])!r}, this run has {value!r}")
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        if state["ref_model"] is not None:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.ref_model.load_state_dict(state["ref_model"])
            self.optimizer = self._optimizer(self.cfg.learning_rate)
        self.optimizer.load_state_dict(state["optimizer"])
        for k, s in self.streams.items():
            s.load_state_dict(state["streams"][k])
        rngs = state["rng"]
        if len(rngs) != self.procs.world:
            raise ValueError(f"--resume: the checkpoint holds {len(rngs)} ranks' RNG states, this run has "
                             f"{self.procs.world} processes")
        C.set_rng_state(rngs[self.procs.rank], self.device)
        self.history = state["history"]
        self.warmup_eval = state["warmup_eval"]
        self.elapsed_before = state["elapsed_s"]
        self.saved_step = self.step
        if self.procs.main:  # metrics written after the checkpoint are produced again
            C.atomic_write_text("".join(json.dumps(r) + "\n" for r in self.history), self.run_dir.file("metrics.jsonl"))
            _note(f"lvrpo_fast.train: resuming from step {self.step} of {self.cfg.total_steps} ({path})")

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, final: Dict, t_start: float) -> Dict:
        summary = report.build_summary(
            command=self.command, config=dataclasses.asdict(self.cfg), device=str(self.device),
            backend=self.backend_name, world_size=self.procs.world,
            parameters=sum(p.numel() for p in self.model.parameters()), max_new_tokens=self.max_new_tokens,
            wall_time_s=self.elapsed_before + time.perf_counter() - t_start,
            heldout_prompts_per_task=len(self.data.heldout[self.tasks[0]]), history=self.history,
            warmup_eval=self.warmup_eval, final=final)
        if self.procs.main:
            C.atomic_write_text(json.dumps(summary, indent=2) + "\n", self.run_dir.file("summary.json"))
            report.plot_curves(self.history, self.cfg.warmup_steps, self.run_dir.file("curves.png"))
            C.atomic_write_folder(lambda path: M.save_pretrained(self.model, self.tokenizer, path),
                                  self.run_dir.file("model"), M.size_in_bytes(self.model))
            print(report.format_summary(summary))
        self.procs.barrier()
        return summary


def _step_of(name: str) -> Optional[int]:
    match = C.PATTERN.fullmatch(name) or C.LEGACY.fullmatch(name)
    return int(match.group(1)) if match else None
