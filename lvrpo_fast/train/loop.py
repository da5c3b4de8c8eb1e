"""The training loop: supervised warm-up, GRPO through lvrpo_fast, evaluation, checkpoints, metrics.

One GRPO step, per process (torch.distributed ranks each take different prompts):
    1. P prompts (half understanding, half generation) from the checkpointed data order, each
       repeated G times; G completions each sampled at the temperature from the current policy.
    2. Rule-based rewards -> lvrpo_fast.group_advantages.
    3. Old-policy and reference log-probabilities: the body's hidden states of prompt + completion,
       then lvrpo_fast.fused_linear_logprobs under torch.no_grad (forward-only fused path).
    4. num_iterations policy updates: hidden states with grad -> lvrpo_fast.fused_linear_grpo_loss
       with the LM head's weight (gradients reach both), the KL to the frozen reference, AdamW.
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
import glob
import json
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

import lvrpo_fast
from .. import dispatch, reference
from . import model as M
from . import task as T
from .config import TrainConfig, parse_args

# Wall-clock fields: everything else in metrics.jsonl is reproducible bit for bit on the CPU.
TIMING_KEYS = ("step_time_s", "tokens_per_s", "loss_time_s", "logprob_time_s", "sample_time_s", "eval_time_s")
# Config fields a resumed run may change; the others must match the checkpoint.
RESUMABLE_CHANGES = ("cpu_threads", "resume", "overwrite", "stop_after", "progress", "check_every", "device",
                     "backend", "steps", "eval_every", "save_every", "keep_checkpoints", "output_dir")
# The check mode's error bound, the rule of the test suite (tests/tolerances.py):
# |fused - float64| <= REF_FACTOR * max|reference - float64| + atol + rtol * |float64|.
CHECK_REF_FACTOR = 2.0
CHECK_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
EVAL_BATCH = 256


class FusedCheckError(RuntimeError):
    """--check-every found the fused loss or a gradient past the tolerance; the message is the report."""


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------
class Processes:
    """This process's rank in torch.distributed (torchrun sets WORLD_SIZE > 1), or a lone process."""

    def __init__(self, requested_device: str, cpu_threads: int):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if requested_device == "auto":
            requested_device = "cuda" if torch.cuda.is_available() else "cpu"
        if requested_device == "cuda":
            requested_device = f"cuda:{local_rank}"
        self.device = torch.device(requested_device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        """Mean over ranks of each value (all ranks pass the same keys)."""
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def sum(self, values: List[float]) -> List[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def average_gradients(self, parameters) -> None:
        if self.world == 1:
            return
        grads = []
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_parameters(self, model) -> None:
        if self.world == 1:
            return
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a reader (or a
    resume after a crash) sees the old file or the whole new one, never a torn one."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_paths(folder: str) -> List[str]:
    """Checkpoints in `folder`, newest (highest step) first."""
    found = []
    for path in glob.glob(os.path.join(folder, "step_*.pt")):
        match = re.fullmatch(r"step_(\d+)\.pt", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def rng_state(device: torch.device) -> Dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: TrainConfig):
        self.cfg = config
        self.procs = Processes(config.device, config.cpu_threads)
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
        self.run_dir = config.output_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self._prepare_run_dir()

        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.data = T.build_task(config.seed, config.train_scenes, config.eval_scenes)
        if config.model is not None:
            self.model, self.tokenizer = M.load_pretrained(config.model, self.device, self.dtype)
        else:
            self.tokenizer = M.build_tokenizer()
        self.eos_id, self.pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self._encode()
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

        n_warm = {t: max(1, math.ceil(config.warmup_fraction * len(self.data.train[t]))) for t in T.TASKS}
        self.streams = {}
        for i, t in enumerate(T.TASKS):
            self.streams[f"warmup_{t}"] = T.DataStream(n_warm[t], config.seed, 2 * i)
            self.streams[f"grpo_{t}"] = T.DataStream(len(self.data.train[t]), config.seed, 2 * i + 1)
        self.step = 0
        self.history: List[Dict] = []
        self.warmup_eval: Optional[Dict] = None
        self.elapsed_before = 0.0
        if config.resume:
            self._resume()

    # -- setup -----------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        cfg = self.cfg
        if self.procs.main:
            existing = os.path.isdir(self.run_dir) and any(
                os.path.exists(os.path.join(self.run_dir, n)) for n in ("metrics.jsonl", "checkpoints", "summary.json"))
            if existing and not (cfg.resume or cfg.overwrite):
                raise ValueError(f"--output-dir {self.run_dir} holds a previous run; pass --resume to continue it "
                                 f"or --overwrite to start afresh")
            if existing and cfg.overwrite:
                for name in ("metrics.jsonl", "summary.json", "curves.png", "check_failure.txt"):
                    path = os.path.join(self.run_dir, name)
                    if os.path.exists(path):
                        os.remove(path)
                for path in checkpoint_paths(self.ckpt_dir):
                    os.remove(path)
            os.makedirs(self.ckpt_dir, exist_ok=True)
        self.procs.barrier()

    def _encode(self) -> None:
        """Token ids of every prompt (with the tokenizer's bos, if any) and reference completion."""
        tok = self.tokenizer
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]

        def encode(text):
            return tok(text, add_special_tokens=False)["input_ids"]

        self.prompt_ids = {}
        self.target_ids = {}
        for split, examples in (("train", self.data.train), ("heldout", self.data.heldout)):
            for t in T.TASKS:
                self.prompt_ids[split, t] = [bos + encode(e.prompt) for e in examples[t]]
                # The leading space keeps byte-level BPE tokenizers on their usual word boundary.
                self.target_ids[split, t] = [encode(" " + e.target) + [self.eos_id] for e in examples[t]]
        self.max_prompt = max(len(p) for p in (x for v in self.prompt_ids.values() for x in v))
        longest_target = max(len(p) for p in (x for v in self.target_ids.values() for x in v))
        self.max_new_tokens = self.cfg.max_new_tokens or longest_target

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

    @staticmethod
    def _split(n: int, understanding_share: float) -> Dict[str, int]:
        """n items -> per-task counts; a share strictly between 0 and 1 gives each task at least one."""
        n_read = round(n * understanding_share)
        if 0 < understanding_share < 1:
            n_read = min(n - 1, max(1, n_read))
        return {"understanding": n_read, "generation": n - n_read}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- warm-up ---------------------------------------------------------------------------------
    def warmup_step(self) -> Dict:
        cfg = self.cfg
        start = time.perf_counter()
        prompts, targets = [], []
        # Read first: a small model that learns to draw first is slow to learn to read (the two tasks
        # compete for its few attention heads); afterwards both, mostly drawing, the slower skill.
        reading = self.step < cfg.warmup_reading_steps
        counts = self._split(cfg.warmup_batch_size, 1.0 if reading else cfg.warmup_understanding_share)
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
                                                backend=cfg.backend)
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
        cfg, G = self.cfg, self.cfg.group_size
        start = time.perf_counter()
        examples, prompts = [], []
        for t, n in self._split(cfg.prompts_per_step, cfg.understanding_share).items():
            for i in self._local(f"grpo_{t}", n):
                examples += [self.data.train[t][i]] * G
                prompts += [self.prompt_ids["train", t][i]] * G
        batch = M.sample(self.model, prompts, self.max_new_tokens, cfg.temperature, self.eos_id, self.pad_id,
                         self.device, self.autocast_dtype)
        self._sync()
        sample_time = time.perf_counter() - start
        scores = self._score(examples, batch)
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32, device=self.device)
        advantages = lvrpo_fast.group_advantages(rewards, G, scale=cfg.advantage_scale, backend=cfg.backend)

        targets, mask = batch.completion_ids, batch.completion_mask
        t0 = time.perf_counter()
        logp_ref = None
        if cfg.beta > 0:
            with torch.no_grad():
                ref_weight, ref_bias = self._head(self.ref_model)
                logp_ref = lvrpo_fast.fused_linear_logprobs(self._hidden(self.ref_model, batch), ref_weight, targets,
                                                            bias=ref_bias, mask=mask, temperature=cfg.temperature,
                                                            backend=cfg.backend)
        self._sync()
        logprob_time = time.perf_counter() - t0

        loss_time, sums, logp_old = 0.0, {}, None
        grpo_index = self.step - cfg.warmup_steps + 1
        for iteration in range(cfg.num_iterations):
            hidden = self._hidden(self.model, batch)
            weight, bias = self._head(self.model)
            if logp_old is None:
                # The first update's forward pass is the old policy's: its log-probabilities come from
                # the same hidden states through the forward-only path, without a second body pass.
                self._sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    logp_old = lvrpo_fast.fused_linear_logprobs(hidden.detach(), weight.detach(), targets,
                                                                bias=None if bias is None else bias.detach(),
                                                                mask=mask, temperature=cfg.temperature,
                                                                backend=cfg.backend)
                self._sync()
                logprob_time += time.perf_counter() - t0
            if iteration == 0 and cfg.check_every and grpo_index % cfg.check_every == 0:
                sums.update(self.check_fused(hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref))
            self._sync()
            t0 = time.perf_counter()
            loss, metrics = lvrpo_fast.fused_linear_grpo_loss(
                hidden, weight, targets, mask, advantages, bias=bias, logp_old=logp_old, logp_ref=logp_ref,
                temperature=cfg.temperature, return_entropy=True, backend=cfg.backend,
                **_options_kwargs(self.options))
            self._sync()
            loss_time += time.perf_counter() - t0
            loss.backward()
            self._update(cfg.learning_rate)
            named = {"loss": loss, **metrics}
            # One device-to-host copy for all the scalars, not one per metric.
            for k, v in zip(named, torch.stack([v.detach().float() for v in named.values()]).tolist()):
                sums[k] = sums.get(k, 0.0) + v / cfg.num_iterations
        self._sync()
        elapsed = time.perf_counter() - start

        record = {"phase": "grpo", "reward": float(rewards.mean())}
        for t in T.TASKS:
            part = [s for s, e in zip(scores, examples) if e.task == t]
            record[f"reward_{t}"] = sum(s["reward"] for s in part) / max(1, len(part))
        gen = [s for s in scores if "alignment" in s]
        record["generation_alignment"] = sum(s["alignment"] for s in gen) / max(1, len(gen))
        record["generation_structure"] = sum(s["structure"] for s in gen) / max(1, len(gen))
        record["completion_tokens"] = float(mask.sum(1).float().mean())
        record["stopped"] = float(batch.stopped.float().mean())
        record.update(sums)
        record = {"phase": "grpo", **self.procs.mean({k: v for k, v in record.items() if k != "phase"})}
        n_tokens = self.procs.sum([float(mask.sum())])[0]
        record.update(step_time_s=elapsed, tokens_per_s=n_tokens / elapsed, loss_time_s=loss_time,
                      logprob_time_s=logprob_time, sample_time_s=sample_time)
        return record

    def check_fused(self, hidden, weight, bias, targets, mask, advantages, logp_old, logp_ref) -> Dict[str, float]:
        """Compares the fused loss and its gradients (hidden, weight, bias) on the live batch with
        lvrpo_fast.reference at the working dtype and in float64; raises FusedCheckError past the bound."""
        cfg = self.cfg
        kwargs = dict(temperature=cfg.temperature, **_options_kwargs(self.options))

        def run(fn, dtype, **extra):
            """The loss and its gradients from detached copies of the live inputs in `dtype` (the
            float64 truth also takes the per-token float32 inputs in float64)."""
            leaves = {"grad_hidden": hidden, "grad_weight": weight, "grad_bias": bias}
            leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items() if v is not None}
            side = {"advantages": advantages, "logp_old": logp_old, "logp_ref": logp_ref}
            side = {k: None if v is None else v.detach().to(torch.float64 if dtype == torch.float64 else v.dtype)
                    for k, v in side.items()}
            loss, _ = fn(leaves["grad_hidden"], leaves["grad_weight"], targets, mask, side.pop("advantages"),
                         bias=leaves.get("grad_bias"), **side, **kwargs, **extra)
            grads = torch.autograd.grad(loss, list(leaves.values()))
            return {"loss": loss.detach(), **dict(zip(leaves, grads))}

        fused = run(lvrpo_fast.fused_linear_grpo_loss, self.dtype, backend=cfg.backend)
        ref = run(reference.fused_linear_grpo_loss, self.dtype)
        truth = run(reference.fused_linear_grpo_loss, torch.float64)
        atol, rtol = CHECK_TOLERANCES[self.dtype]
        lines, failed, out = [], False, {}
        for name in fused:
            f, r, t = fused[name].double(), ref[name].double(), truth[name]
            err = (f - t).abs()
            ref_err = float((r - t).abs().max())
            excess = err - (CHECK_REF_FACTOR * ref_err + atol + rtol * t.abs())
            i = int(excess.reshape(-1).argmax())
            diff_ref = float((f - r).abs().max())
            bad = bool((excess > 0).any()) or not bool(torch.isfinite(f).all())
            failed |= bad
            out[f"check_{name}_max_diff"] = diff_ref
            lines.append(f"  {name:12s} {'FAIL' if bad else 'ok  '} max|fused - reference| {diff_ref:.3e}  "
                         f"max|fused - float64| {float(err.max()):.3e} (reference's own {ref_err:.3e})  "
                         f"worst at flat index {i}: fused {f.reshape(-1)[i].item():.6g}, "
                         f"float64 {t.reshape(-1)[i].item():.6g}")
        if failed:
            report = (f"--check-every: the fused loss (backend {self.backend_name}, {self.cfg.dtype}) left the "
                      f"tolerance at step {self.step} (bound {CHECK_REF_FACTOR} x reference error + {atol:g} + "
                      f"{rtol:g} x |float64|), shapes hidden {tuple(hidden.shape)} weight {tuple(weight.shape)}:\n"
                      + "\n".join(lines))
            raise FusedCheckError(report)
        return out

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, tag: str) -> Dict:
        """Mean held-out reward per task (each rank decodes its share; sums are all-reduced).

        The RNG is forked so that evaluating never shifts the training draws."""
        cfg = self.cfg
        start = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        # Sums and counts under fixed keys, so that ranks all-reduce one vector.
        keys = ["understanding", "generation", "generation_alignment", "generation_structure"]
        keys += [f"understanding_{kind}" for kind in T.QUESTION_KINDS]
        sums, counts = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed + 7 * self.step + 3)
            for t in T.TASKS:
                examples = self.data.heldout[t][self.procs.rank::self.procs.world]
                prompts = self.prompt_ids["heldout", t][self.procs.rank::self.procs.world]
                for s in range(0, len(examples), EVAL_BATCH):
                    batch = M.sample(self.model, prompts[s:s + EVAL_BATCH], self.max_new_tokens, cfg.heldout_temperature,
                                     self.eos_id, self.pad_id, self.device, self.autocast_dtype)
                    for e, score in zip(examples[s:s + EVAL_BATCH], self._score(examples[s:s + EVAL_BATCH], batch)):
                        parts = {t: score["reward"]}
                        if t == "generation":
                            parts.update(generation_alignment=score["alignment"],
                                         generation_structure=score["structure"])
                        else:
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
        from tqdm import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not (self.procs.main and cfg.progress),
                   desc="lvrpo", dynamic_ncols=True, file=sys.stderr)
        done_here = 0
        while self.step < cfg.total_steps:
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
            bar.update(1)
            postfix = {"phase": record["phase"], "tok/s": f"{record['tokens_per_s']:.0f}"}
            if grpo:
                postfix.update(u=f"{record['reward_understanding']:.2f}", g=f"{record['reward_generation']:.2f}")
            else:
                postfix["loss"] = f"{record['sft_loss']:.3f}"
            bar.set_postfix(postfix)
            if cfg.stop_after is not None and done_here >= cfg.stop_after and self.step < cfg.total_steps:
                bar.close()
                return {"interrupted_at": self.step}
        bar.close()
        if self.ref_model is None:  # no GRPO steps were left to run
            self.begin_grpo()
        final = self.evaluate("final")
        self.save(t_start)
        return self.finish(final, t_start)

    def _log(self, record: Dict) -> None:
        self.history.append(record)
        if self.procs.main:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, t_start: float) -> None:
        states = self.procs.gather(rng_state(self.device))
        if self.procs.main:
            state = {
                "format": 1,
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
            }
            atomic_save(state, os.path.join(self.ckpt_dir, f"step_{self.step:06d}.pt"))
            for old in checkpoint_paths(self.ckpt_dir)[self.cfg.keep_checkpoints:]:
                os.remove(old)
        self.procs.barrier()

    def _resume(self) -> None:
        paths = checkpoint_paths(self.ckpt_dir)
        state, errors = None, []
        for path in paths:
            try:
                state = torch.load(path, map_location=self.device, weights_only=False)
                break
            except Exception as exc:  # a damaged file: fall back to the one before it
                errors.append(f"{path}: {exc}")
        if state is None:
            if self.procs.main:
                print(f"lvrpo_fast.train: no checkpoint in {self.ckpt_dir}; starting from the beginning"
                      + (f" ({'; '.join(errors)})" if errors else ""), file=sys.stderr)
            return
        saved = state["config"]
        for key, value in dataclasses.asdict(self.cfg).items():
            if key not in RESUMABLE_CHANGES and saved.get(key) != value:
                raise ValueError(f"--resume: the checkpoint was written with --{key.replace('_', '-')} "
                                 f"{saved.get(key)!r}, this run has {value!r}")
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
        set_rng_state(rngs[self.procs.rank], self.device)
        self.history = state["history"]
        self.warmup_eval = state["warmup_eval"]
        self.elapsed_before = state["elapsed_s"]
        if self.procs.main:  # metrics written after the checkpoint are produced again
            atomic_write_text("".join(json.dumps(r) + "\n" for r in self.history),
                              os.path.join(self.run_dir, "metrics.jsonl"))
        self.procs.barrier()

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, final: Dict, t_start: float) -> Dict:
        cfg = self.cfg
        grpo = [r for r in self.history if r.get("phase") == "grpo"]
        wall = self.elapsed_before + time.perf_counter() - t_start
        summary = {
            "command": "python -m lvrpo_fast.train " + " ".join(sys.argv[1:]),
            "config": dataclasses.asdict(cfg),
            "device": str(self.device),
            "dtype": cfg.dtype,
            "backend": self.backend_name,
            "world_size": self.procs.world,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "max_new_tokens": self.max_new_tokens,
            "wall_time_s": wall,
            "heldout_decoding": ("greedy" if cfg.heldout_temperature == 0
                                 else f"sampled at temperature {cfg.heldout_temperature:g}"),
            "heldout_prompts_per_task": len(self.data.heldout["understanding"]),
            "warmup": {t: self.warmup_eval[f"heldout_{t}"] for t in T.TASKS},
            "final": {t: final[f"heldout_{t}"] for t in T.TASKS},
            "tokens_per_s_mean": _mean([r["tokens_per_s"] for r in grpo]),
            "loss_time_s_mean": _mean([r["loss_time_s"] for r in grpo]),
        }
        summary["improvement"] = {t: summary["final"][t] - summary["warmup"][t] for t in T.TASKS}
        if self.procs.main:
            atomic_write_text(json.dumps(summary, indent=2) + "\n", os.path.join(self.run_dir, "summary.json"))
            plot_curves(self.history, os.path.join(self.run_dir, "curves.png"))
            M.save_pretrained(self.model, self.tokenizer, os.path.join(self.run_dir, "model"))
            print(format_summary(summary))
        self.procs.barrier()
        return summary


def _options_kwargs(options) -> Dict:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def _mean(values) -> Optional[float]:
    return sum(values) / len(values) if values else None


def format_summary(summary: Dict) -> str:
    cfg = summary["config"]
    lines = [f"lvrpo_fast.train: {cfg['warmup_steps']} warm-up + {cfg['steps']} GRPO steps in "
             f"{summary['wall_time_s']:.1f} s on {summary['device']} ({summary['world_size']} process(es)), "
             f"backend {summary['backend']}, {summary['parameters']} parameters",
             f"held-out mean reward ({summary['heldout_decoding']}, {summary['heldout_prompts_per_task']} prompts "
             f"per task), after warm-up -> after GRPO:"]
    for t in T.TASKS:
        lines.append(f"  {t:14s} {summary['warmup'][t]:.3f} -> {summary['final'][t]:.3f} "
                     f"({summary['improvement'][t]:+.3f})")
    lines.append(f"run directory: {cfg['output_dir']}")
    return "\n".join(lines)


def plot_curves(history: List[Dict], path: str) -> None:
    """The per-step curves as one PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grpo = [r for r in history if r.get("phase") == "grpo"]
    warm = [r for r in history if r.get("phase") == "warmup"]
    evals = [r for r in history if r.get("phase") == "eval"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))

    def curve(ax, rows, key, label=None, **kw):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label or key, **kw)

    ax = axes[0, 0]
    for t in T.TASKS:
        curve(ax, grpo, f"reward_{t}", f"train {t}", alpha=0.6)
        curve(ax, evals, f"heldout_{t}", f"held-out {t}", marker="o")
    ax.set_title("reward")
    ax = axes[0, 1]
    curve(ax, grpo, "kl")
    ax.set_title("KL to the reference")
    ax = axes[0, 2]
    for key in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        curve(ax, grpo, key)
    ax.set_title("clip ratios")
    ax = axes[1, 0]
    curve(ax, grpo, "entropy")
    ax.set_title("entropy (nats / token)")
    ax = axes[1, 1]
    curve(ax, warm + grpo, "tokens_per_s")
    ax.set_title("completion tokens / s")
    ax = axes[1, 2]
    curve(ax, grpo, "loss_time_s", "fused loss")
    curve(ax, grpo, "logprob_time_s", "old + ref log-probs")
    curve(ax, warm, "sft_loss", "warm-up loss (nats)")
    ax.set_title("time in the loss (s) / warm-up loss")
    for ax in axes.flat:
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    config = parse_args(argv)
    trainer = None
    try:
        try:
            trainer = Trainer(config)
        except ValueError as exc:  # bad values found while setting up, before any training
            print(f"python -m lvrpo_fast.train: error: {exc}", file=sys.stderr)
            return 2
        trainer.run()
    except FusedCheckError as exc:
        if trainer.procs.main:
            atomic_write_text(str(exc) + "\n", os.path.join(trainer.run_dir, "check_failure.txt"))
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.procs.close()
    return 0
