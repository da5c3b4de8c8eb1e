"""TRL: ``trl.GRPOTrainer`` computing its loss and log-probabilities with lvrpo_fast.

The one-line switch (TRL 1.x; checked with trl 1.16.0):

    from lvrpo_fast.integrations.trl import LVRPOGRPOTrainer as GRPOTrainer

Everything else (GRPOConfig, generation, rewards, advantages, logging) stays TRL's. The subclass
replaces two methods of the trainer:
    _get_per_token_logps_and_entropies  the old-policy and reference log-probabilities, through
                                        lvrpo_fast.fused_linear_logprobs;
    _compute_loss                       the policy pass and the loss, through
                                        lvrpo_fast.fused_linear_grpo_loss (one pass forms the loss and
                                        the gradients of the hidden states and the LM head).
Both call the model through its (DDP / PEFT) wrapper, with an extra keyword that makes the patched
forward return the LM head's inputs (lvrpo_fast.integrations.hf) instead of logits, so distributed
data parallelism sees an ordinary forward.

GRPOConfig options and where they are honoured:
    loss_type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo), epsilon, epsilon_high, delta, beta
        (with TRL's k3 estimator), use_bias_correction_kl, importance_sampling_level, temperature,
        max_completion_length, sapo_temperature_pos/neg, gradient accumulation and
        num_items_in_batch                              -> the loss, here
    vLLM importance-sampling correction (vllm_importance_sampling_correction and its mode / clip
        options)                                        -> TRL computes the ratio; it is passed here as
                                                           the rollout weights (the policy term only)
    scale_rewards, multi_objective_aggregation, mask_truncated_completions, num_generations,
        reward_weights, num_iterations, steps_per_generation, cast_lm_head_to_fp32
                                                        -> TRL's own code, unchanged
Refused with a ValueError (they would change the numbers if ignored): loss_type="vespo",
off_policy_mask_threshold, top_entropy_quantile < 1, entropy_coef != 0 and use_adaptive_entropy
(TRL's entropy bonus is a token mean outside the loss type's normalizer), a MoE router auxiliary
loss (router_aux_loss_coef != 0 on a model with output_router_logits), and final-logit soft-capping.
Logged metrics: kl, entropy, clip_ratio/{low,high,region}_mean (cispo: cispo_clip_ratio); TRL's
clip_ratio/low_min and high_max per-sequence extremes are not logged, and for sequence-level importance
sampling the clip ratios are token means where TRL takes sequence means. Multimodal inputs pass
through to the model in the policy pass; the old / reference log-probabilities of multimodal batches
fall back to TRL's own fused head (its per-chunk image slicing lives there).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..linear_grpo_loss import fused_linear_grpo_loss
from ..logprobs import fused_linear_logprobs
from .hf import _logit_scale, completion_hidden_states

try:
    from trl import GRPOTrainer as _GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("lvrpo_fast.integrations.trl needs TRL (pip install 'trl>=1.16')") from exc

__all__ = ["LVRPOGRPOTrainer", "check_supported", "SUPPORTED_LOSS_TYPES"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
_HEAD_KEYWORD = "lvrpo_logits_to_keep"
# Model inputs of TRL's multimodal batches, passed to the backbone unchanged in the policy pass.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


def check_supported(args) -> None:
    """Raises a ValueError naming each GRPOConfig option this integration cannot honour."""
    problems = []
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        problems.append(f"loss_type={args.loss_type!r} (supported: {SUPPORTED_LOSS_TYPES})")
    if getattr(args, "off_policy_mask_threshold", None) is not None:
        problems.append(f"off_policy_mask_threshold={args.off_policy_mask_threshold} (the off-policy sequence mask)")
    if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        problems.append(f"top_entropy_quantile={args.top_entropy_quantile} (the high-entropy token mask)")
    if getattr(args, "entropy_coef", 0.0) != 0.0 or getattr(args, "use_adaptive_entropy", False):
        problems.append("entropy_coef / use_adaptive_entropy (TRL's entropy bonus is a token mean outside the loss "
                        "type's normalizer, which lvrpo_fast's entropy_coef is not)")
    if problems:
        raise ValueError("LVRPOGRPOTrainer does not support " + "; ".join(problems)
                         + ": use trl.GRPOTrainer for these, or leave them at their defaults")


def _add_head_inputs_forward(model) -> None:
    """Patches model.forward: with lvrpo_logits_to_keep=K it returns (hidden, weight, bias) of the last K
    tokens (lvrpo_fast.integrations.hf) instead of calling the original forward."""
    if getattr(model, "_lvrpo_head_inputs", False):
        return
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        logits_to_keep = kwargs.pop(_HEAD_KEYWORD, None)
        if logits_to_keep is None:
            return original(*args, **kwargs)
        heads = completion_hidden_states(model, kwargs.pop("input_ids"), kwargs.pop("attention_mask", None),
                                         logits_to_keep, **kwargs)
        return heads.hidden, heads.weight, heads.bias  # a tuple, which DDP walks for its tensors

    model.forward = forward
    model._lvrpo_head_inputs = True


class LVRPOGRPOTrainer(_GRPOTrainer):
    """trl.GRPOTrainer whose log-probabilities and loss come from lvrpo_fast (see the module docstring).

    Takes exactly GRPOTrainer's arguments. The lvrpo_fast backend follows LVRPO_BACKEND ("auto" by default).
    """

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if config is None and len(args) > 2:
            config = args[2]
        if config is not None:
            check_supported(config)
        super().__init__(*args, **kwargs)
        check_supported(self.args)
        if self.aux_loss_enabled:
            raise ValueError("LVRPOGRPOTrainer does not support the MoE router auxiliary loss "
                             f"(router_aux_loss_coef={self.router_aux_loss_coef}); set it to 0 or use trl.GRPOTrainer")
        _logit_scale(self.model.config)  # soft-capping refused now, not at the first step
        from accelerate.utils import is_peft_model

        for model in (self.model, self.ref_model):
            if model is not None:
                inner = self.accelerator.unwrap_model(model)
                _add_head_inputs_forward(inner.get_base_model() if is_peft_model(inner) else inner)

    # ------------------------------------------------------------------------------------------
    def _head_inputs(self, model, input_ids, attention_mask, logits_to_keep, **model_inputs):
        """(hidden [B, K, D], weight [V, D], bias) through the wrapped model, in the head's compute dtype."""
        with self.accelerator.autocast():
            hidden, weight, bias = model(input_ids=input_ids, attention_mask=attention_mask,
                                         **{_HEAD_KEYWORD: logits_to_keep}, **model_inputs)
            device = hidden.device.type
            if not self.args.cast_lm_head_to_fp32 and torch.is_autocast_enabled(device):
                # Under autocast the model's own head would multiply in the autocast dtype; so do we.
                dtype = torch.get_autocast_dtype(device)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
        return hidden, weight, bias

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if compute_aux_loss or any(value is not None for value in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            mask = attention_mask[start:start + batch_size]
            hidden, weight, bias = self._head_inputs(model, ids, mask, logits_to_keep)
            out = fused_linear_logprobs(hidden, weight, ids[:, -logits_to_keep:], bias=bias,
                                        temperature=self.temperature, return_entropy=compute_entropy,
                                        mask=mask[:, -logits_to_keep:])
            logp, entropy = out if compute_entropy else (out, None)
            logps.append(logp)
            entropies.append(entropy)
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        model_inputs = {k: inputs[k] for k in _MULTIMODAL_KEYS if inputs.get(k) is not None}
        hidden, weight, bias = self._head_inputs(model, input_ids, attention_mask, logits_to_keep, **model_inputs)

        advantages = inputs["advantages"]
        if advantages.dim() == 2:
            if advantages.shape[1] != 1:
                raise ValueError(f"advantages of shape {tuple(advantages.shape)}: lvrpo_fast takes one advantage per "
                                 "sequence, [B] or [B, 1]")
            advantages = advantages[:, 0]
        rollout_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            rollout_weights = inputs["importance_sampling_ratio"]
            if rollout_weights.dim() == 2 and rollout_weights.shape[1] == 1:
                rollout_weights = rollout_weights[:, 0]

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items: Optional[torch.Tensor] = None
        if self.loss_type in ("dapo", "cispo"):
            # TRL's normalizer is num_items_in_batch / processes, rescaled to one accumulation window;
            # lvrpo_fast divides by the world size itself.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0)
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation
        loss, metrics = fused_linear_grpo_loss(
            hidden, weight, completion_ids, mask, advantages, bias=bias,
            logp_old=inputs.get("old_per_token_logps"),
            logp_ref=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            rollout_weights=rollout_weights, temperature=self.temperature, return_entropy=True,
            loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=self.args.delta, beta=self.beta, kl_estimator="k3",
            use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length if self.loss_type == "dr_grpo" else None,
            num_items_in_batch=num_items, sapo_temperature_pos=self.args.sapo_temperature_pos,
            sapo_temperature_neg=self.args.sapo_temperature_neg)
        if num_items is None:
            loss = loss / accumulation  # TRL scales every other loss type for gradient accumulation
        self._log_lvrpo_metrics(mode, metrics)
        return loss

    def _log_lvrpo_metrics(self, mode, metrics):
        def mean_over_processes(value):
            return self.accelerator.gather(value.reshape(1)).nanmean().item()

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(mean_over_processes(metrics["kl"]))
        self._metrics[mode]["entropy"].append(mean_over_processes(metrics["entropy"]))
        if self.loss_type == "cispo":
            self._metrics[mode]["cispo_clip_ratio"].append(mean_over_processes(metrics["clip_ratio_high"]))
        elif self.loss_type != "sapo":
            for name in ("low", "high", "region"):
                self._metrics[mode][f"clip_ratio/{name}_mean"].append(
                    mean_over_processes(metrics[f"clip_ratio_{name}"]))
