"""TRL: ``trl.GRPOTrainer`` computing its loss and log-probabilities with lvrpo_fast.

The one-line switch (TRL 1.x; checked with trl 1.16.0):

    from lvrpo_fast.integrations.trl import LVRPOGRPOTrainer as GRPOTrainer

Everything else (GRPOConfig, generation, rewards, advantages, logging) stays TRL's. The subclass
replaces two methods of the trainer:
    _get_per_token_logps_and_entropies  the old-policy and reference log-probabilities, through
                                        lvrpo_fast.fused_linear_logprobs;
    _compute_loss                       the policy pass, the loss and its metrics, through
                                        lvrpo_fast.fused_linear_grpo_loss (one pass forms the loss and
                                        the gradients of the hidden states and the LM head).
Both call the model through its (DDP / PEFT) wrapper, with an extra keyword that makes the patched
forward return the LM head's inputs (lvrpo_fast.integrations.hf) instead of logits, so distributed
data parallelism sees an ordinary forward.

Every GRPOConfig option TRL 1.16's _compute_loss reads is honoured with TRL's numbers:
    loss_type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo with vespo_k/lambda_pos/neg),
        epsilon, epsilon_high, delta, beta (TRL's k3 estimator), use_bias_correction_kl,
        importance_sampling_level (every loss type), temperature, max_completion_length,
        sapo_temperature_pos/neg, off_policy_mask_threshold, top_entropy_quantile, entropy_coef (TRL's
        token-mean bonus), use_adaptive_entropy and its entropy_coef_min/max/delta and entropy_target,
        gradient accumulation and num_items_in_batch               -> the loss, here
    the vLLM importance-sampling correction (vllm_importance_sampling_correction, its mode and clip
        options)                         -> TRL computes the ratio; it is passed here as the rollout
                                            weights (the policy term; vespo's sequence weight)
    bf16 / fp16 autocast and cast_lm_head_to_fp32
                                         -> the head runs in the precision TRL's chunked head uses:
                                            logits in the autocast (or the model's) dtype, statistics in
                                            float32, gradients accumulated in float32 (head_dtype)
    scale_rewards, multi_objective_aggregation, mask_truncated_completions, num_generations,
        reward_weights, num_iterations, steps_per_generation, PEFT adapters
                                         -> TRL's own code, unchanged
Refused when the trainer is constructed, each naming the GRPOConfig option (they would change the
numbers or fail later): a MoE router auxiliary loss (router_aux_loss_coef != 0 on a model with
output_router_logits), final-logit soft-capping, parameters sharded by FSDP or DeepSpeed ZeRO-3
(untested: accelerate runs FSDP only on accelerators, with use_cpu it trains with DDP), vespo with a
vLLM clip range excluding 1 (TRL then adds padding positions' clipped ratios to VESPO's weight), and
any option value lvrpo_fast's GRPOOptions refuses (negative epsilons, a top_entropy_quantile outside
[0, 1], ...).
Logged metrics: TRL's own, with TRL's values on any number of processes (the per-sequence statistics
of the loss are reduced across processes exactly as TRL reduces its tensors): kl, entropy,
clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max} (sequence means at the sequence
level), cispo_clip_ratio, vespo/phi_seq_mean, policy_loss and entropy_coef (with an entropy bonus).
Multimodal inputs pass through to the model in the policy pass; the old / reference log-probabilities
of multimodal batches fall back to TRL's own fused head (its per-chunk image slicing lives there).
Known difference: with a completion length of 1 and a fully masked completion, TRL counts the masked
position in its metrics' denominators; lvrpo_fast never computes masked positions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from ..linear_grpo_loss import fused_linear_grpo_loss
from ..logprobs import fused_linear_logprobs
from ..options import GRPOOptions
from .hf import _logit_scale, completion_hidden_states, inside_root_forward

try:
    from trl import GRPOTrainer as _GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("lvrpo_fast.integrations.trl needs TRL (pip install 'trl>=1.16')") from exc

__all__ = ["LVRPOGRPOTrainer", "check_supported", "SUPPORTED_LOSS_TYPES", "grpo_options"]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# Loss types whose normalizer is num_items_in_batch (TRL scales every other one for accumulation).
_TOKEN_COUNT_NORMALIZED = ("dapo", "cispo", "vespo")
_CLIP_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_HEAD_KEYWORD = "lvrpo_logits_to_keep"
# Model inputs of TRL's multimodal batches, passed to the backbone unchanged in the policy pass.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")
# GRPOOptions' names of GRPOConfig's options where they differ.
_CONFIG_NAMES = {"epsilon_low": "epsilon"}


def grpo_options(source, args, **overrides) -> GRPOOptions:
    """The GRPOOptions of a GRPOConfig `args`, with the values TRL 1.16's _compute_loss reads from the
    trainer taken from `source` (the trainer, or the config itself before the trainer exists); the ones
    that change per call (num_items_in_batch, the adaptive entropy coefficient) as `overrides`. A value
    GRPOOptions refuses raises a ValueError naming GRPOConfig's option."""
    def trainer_value(attribute, config_name=None):
        if source is args:
            return getattr(args, config_name or attribute)
        return getattr(source, attribute)

    epsilon_low = trainer_value("epsilon_low", "epsilon")
    epsilon_high = trainer_value("epsilon_high")
    loss_type = trainer_value("loss_type")
    options = dict(
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_low if epsilon_high is None else epsilon_high,
        delta=args.delta, beta=trainer_value("beta"), kl_estimator="k3",
        use_bias_correction_kl=bool(args.use_bias_correction_kl),
        importance_sampling_level=trainer_value("importance_sampling_level"),
        max_completion_length=trainer_value("max_completion_length") if loss_type == "dr_grpo" else None,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg, off_policy_mask_threshold=trainer_value("off_policy_mask_threshold"),
        top_entropy_quantile=trainer_value("top_entropy_quantile"), entropy_coef=trainer_value("entropy_coef"),
        entropy_agg="token_mean")
    options.update(overrides)
    try:
        return GRPOOptions(**options)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        for ours, theirs in _CONFIG_NAMES.items():
            message = message.replace(ours, theirs)
        raise type(exc)(f"LVRPOGRPOTrainer cannot run this GRPOConfig: {message}") from exc


def check_supported(args) -> None:
    """Raises a ValueError naming each GRPOConfig option this integration cannot honour."""
    problems = []
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        problems.append(f"loss_type={args.loss_type!r} (supported: {SUPPORTED_LOSS_TYPES})")
    if (args.loss_type == "vespo" and args.use_vllm and args.vllm_importance_sampling_correction
            and not _clip_range_holds_one(args)):
        problems.append(
            f"loss_type='vespo' with vllm_importance_sampling_clip_min={args.vllm_importance_sampling_clip_min} / "
            f"vllm_importance_sampling_clip_max={args.vllm_importance_sampling_clip_max}: TRL adds the clipped ratio "
            "of every padding position (1 before clipping) to VESPO's weight, lvrpo_fast unmasked tokens only; the "
            "two agree when the clip range holds 1")
    if problems:
        raise ValueError("LVRPOGRPOTrainer does not support " + "; ".join(problems)
                         + ": use trl.GRPOTrainer for these, or leave them at their defaults")
    grpo_options(args, args, num_items_in_batch=None)


def sharded_parameters(trainer) -> str:
    """The option that shards the model's parameters across processes (FSDP, DeepSpeed ZeRO-3), or ""."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return f"FSDP (fsdp={trainer.args.fsdp!r})"
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        return "DeepSpeed ZeRO-3 (deepspeed)"
    return ""


def _clip_range_holds_one(args) -> bool:
    low, high = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    return (low is None or low <= 1.0) and (high is None or high >= 1.0)


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
        with inside_root_forward():  # this is the model's forward: FSDP2 has gathered its root unit
            heads = completion_hidden_states(model, kwargs.pop("input_ids"), kwargs.pop("attention_mask", None),
                                             logits_to_keep, **kwargs)
        return heads.hidden, heads.weight, heads.bias  # a tuple, which DDP walks for its tensors

    model.forward = forward
    model._lvrpo_head_inputs = True


@dataclasses.dataclass
class _HeadInputs:
    """The LM head's inputs of a batch and the dtype TRL's chunked head forms its logits in."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    head_dtype: torch.dtype

    def narrow(self):
        """(hidden, weight, bias) in the head's dtype: what the forward-only log-probabilities take."""
        cast = [None if t is None else t.to(self.head_dtype) for t in (self.hidden, self.weight, self.bias)]
        return cast[0], cast[1], cast[2]

    def wide(self):
        """(hidden, weight, bias) in float32 and the head_dtype to round them to (None: float32 itself):
        the loss then forms its gradients in float32, as TRL's chunked head accumulates them."""
        cast = [None if t is None else t.float() for t in (self.hidden, self.weight, self.bias)]
        return cast[0], cast[1], cast[2], (None if self.head_dtype == torch.float32 else self.head_dtype)


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
        sharded = sharded_parameters(self)
        if sharded:
            raise ValueError(f"LVRPOGRPOTrainer does not support {sharded}: untested. lvrpo_fast.integrations.hf "
                             "gathers an FSDP2 model's LM head (tested on CPU processes), but accelerate runs FSDP "
                             "only on accelerators (with use_cpu it ignores the FSDP plugin and trains with DDP), so "
                             "this trainer has not been run with sharded parameters; use DDP, or trl.GRPOTrainer")
        _logit_scale(self.model.config)  # soft-capping refused now, not at the first step
        from accelerate.utils import is_peft_model

        for model in (self.model, self.ref_model):
            if model is not None:
                inner = self.accelerator.unwrap_model(model)
                _add_head_inputs_forward(inner.get_base_model() if is_peft_model(inner) else inner)

    # ------------------------------------------------------------------------------------------
    def _head_inputs(self, model, input_ids, attention_mask, logits_to_keep, **model_inputs) -> _HeadInputs:
        """The LM head's inputs through the wrapped model, and the dtype of TRL's chunked head: float32 with
        cast_lm_head_to_fp32, else autocast's dtype under autocast, else the model's."""
        with self.accelerator.autocast():
            hidden, weight, bias = model(input_ids=input_ids, attention_mask=attention_mask,
                                         **{_HEAD_KEYWORD: logits_to_keep}, **model_inputs)
            device = hidden.device.type
            autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if self.args.cast_lm_head_to_fp32:
            head_dtype = torch.float32
        else:
            head_dtype = autocast if autocast is not None else hidden.dtype
        return _HeadInputs(hidden, weight, bias, head_dtype)

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
            head = self._head_inputs(model, ids, mask, logits_to_keep)
            hidden, weight, bias = head.narrow()
            with torch.autocast(hidden.device.type, enabled=False):  # the dtypes above are the head's
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
        head = self._head_inputs(model, input_ids, attention_mask, logits_to_keep, **model_inputs)

        advantages = inputs["advantages"]
        if advantages.dim() == 2 and advantages.shape[1] == 1:
            advantages = advantages[:, 0]  # one per sequence; [B, T] ones (subclasses) stay per token
        rollout_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            rollout_weights = inputs["importance_sampling_ratio"]
            if rollout_weights.dim() == 2 and rollout_weights.shape[1] == 1:
                rollout_weights = rollout_weights[:, 0]

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items: Optional[torch.Tensor] = None
        if self.loss_type in _TOKEN_COUNT_NORMALIZED:
            # TRL's normalizer is num_items_in_batch / processes, rescaled to one accumulation window;
            # lvrpo_fast divides by the world size itself.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0)
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation
        # TRL's entropy bonus: a token mean over the kept tokens, scaled for accumulation only; the loss
        # of the other loss types is divided by the accumulation below, so their coefficient is not.
        entropy_coef = 0.0
        if self._entropy_bonus_enabled:
            entropy_coef = self.entropy_coef
            if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
                entropy_coef = 0.0
            if num_items is not None:
                entropy_coef = entropy_coef / accumulation
        options = grpo_options(self, self.args, num_items_in_batch=num_items, entropy_coef=entropy_coef)
        hidden, weight, bias, head_dtype = head.wide()
        logp_sampling = inputs.get("sampling_per_token_logps") if options.off_policy_mask_threshold is not None else None
        with torch.autocast(hidden.device.type, enabled=False):  # the precision is head_dtype's, as TRL's
            loss, _, stats = fused_linear_grpo_loss(
                hidden, weight, completion_ids, mask, advantages, bias=bias,
                logp_old=inputs.get("old_per_token_logps"),
                logp_ref=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                logp_sampling=logp_sampling, rollout_weights=rollout_weights, temperature=self.temperature,
                return_entropy=True, head_dtype=head_dtype, return_sequence_stats=True,
                **{f.name: getattr(options, f.name) for f in dataclasses.fields(options)})
        if num_items is None:
            loss = loss / accumulation  # TRL scales every other loss type for gradient accumulation
        self._log_lvrpo_metrics(mode, stats, advantages)
        return loss

    # ------------------------------------------------------------------------------------------
    def _log_lvrpo_metrics(self, mode, stats, advantages):
        """TRL 1.16's metrics of _compute_loss, from the per-sequence statistics, reduced across processes
        as TRL reduces its tensors (token sums and counts summed, per-sequence values gathered)."""
        metrics = self._metrics[mode]

        def global_mean(total, count):
            totals = self.accelerator.reduce(torch.stack([total.sum(), count.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        sequences = torch.ones_like(stats.count)  # TRL's count when its tensor holds one value per sequence
        if self._entropy_bonus_enabled:
            # the policy and KL terms without the bonus, before TRL's accumulation scaling
            policy_loss = stats.loss.sum()
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                window = torch.stack([stats.entropy_kept.sum(), stats.kept.sum()])
                self._entropy_window_stats = window if self._entropy_window_stats is None \
                    else self._entropy_window_stats + window
                if self.accelerator.sync_gradients:
                    self._adapt_entropy_coef()
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        if self.beta != 0.0:
            metrics["kl"].append(global_mean(stats.kl, stats.count))
        metrics["entropy"].append(global_mean(stats.entropy, stats.count))
        # TRL's indicators hold one value per sequence at the sequence level with per-sequence advantages
        per_sequence = self.importance_sampling_level == "sequence" and advantages.dim() == 1
        if self.loss_type in _CLIP_FAMILY:
            if per_sequence:
                low, high = stats.seq_clip_low, stats.seq_clip_high
                metrics["clip_ratio/low_mean"].append(global_mean(low, sequences))
                metrics["clip_ratio/high_mean"].append(global_mean(high, sequences))
                metrics["clip_ratio/region_mean"].append(global_mean(low + high, sequences))
            else:
                low, high = stats.clip_low / stats.count, stats.clip_high / stats.count  # NaN when empty, as TRL
                metrics["clip_ratio/low_mean"].append(global_mean(stats.clip_low, stats.count))
                metrics["clip_ratio/high_mean"].append(global_mean(stats.clip_high, stats.count))
                metrics["clip_ratio/region_mean"].append(global_mean(stats.clip_region, stats.count))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(low)).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(high)).item())
        elif self.loss_type == "cispo":
            if per_sequence:
                metrics["cispo_clip_ratio"].append(global_mean(stats.seq_clip_high, sequences))
            else:
                metrics["cispo_clip_ratio"].append(global_mean(stats.clip_high, stats.count))
        elif self.loss_type == "vespo":
            if advantages.dim() == 1:
                metrics["vespo/phi_seq_mean"].append(global_mean(stats.seq_weight, sequences))
            else:
                metrics["vespo/phi_seq_mean"].append(global_mean(stats.weight, stats.count))

    def _adapt_entropy_coef(self):
        """TRL's adaptive entropy controller at an optimizer step: the window's entropy over every process
        moves the coefficient by entropy_coef_delta toward entropy_target, within its bounds."""
        window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
        if world_entropy <= self.args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None
