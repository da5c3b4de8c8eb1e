"""verl (0.9.1): one setting puts the actor's log-probabilities, entropy and policy loss on lvrpo_fast.

verl computes losses and log-probabilities in its Ray worker processes, so the switch must be imported
there. verl imports a module into every worker that builds the model config (its ``external_lib``):

    actor_rollout_ref.model.external_lib=lvrpo_fast.integrations.verl

(or, for code that does not build the model config in the worker, the environment variable
``VERL_USE_EXTERNAL_MODULES=lvrpo_fast.integrations.verl``, which ``import verl`` honours in every
process). Importing this module calls :func:`install` (idempotent), which, in that process:

1. registers lvrpo_fast's "vanilla", "gspo", "cispo" and "sapo" in verl's policy-loss registry and
   makes verl's ``ppo_loss`` use lvrpo_fast's ``agg_loss`` and ``kl_penalty`` (lvrpo_fast.integrations.
   verl_losses: verl's numbers, float64 kept in float64);
2. puts :func:`linear_cross_entropy` in verl's fused-kernel slot (``verl.utils.kernel.
   linear_cross_entropy``), which the patched forward of verl's models calls with the hidden states
   and the LM head's weight instead of computing the logits;
3. makes verl's FSDP actor/reference engine (``FSDPEngineWithLMHead``) take that fused path whatever
   ``use_fused_kernels`` says: its models get verl's fused forward, its micro-batches the fused
   flag. The ``[tokens, vocabulary]`` logits are then never formed, in training and in
   ``compute_log_prob`` alike; the entropy is computed only where verl asks for it.

What the fused path cannot reproduce is refused with a ValueError when the engine is built or the
micro-batch is run, never computed with verl's logits instead: an engine other than verl's FSDP one
for a language model (fsdp_turbo, megatron, veomni, torchtitan, automodel), final-logit soft-capping or
logit scaling, an LM head with a bias, a LoRA adapter or an FSDP unit of its own, a per-sample
temperature, ``calculate_sum_pi_squared`` (needs the full distribution) and top-k distillation. A
value-head (critic) engine is left alone.

An untied LM head: verl's FSDP2 wrapping gives it a unit of its own, gathered only inside its module's
forward, which the fused forward never calls (it reads the weight, a sharded DTensor there, and FSDP2's
backward then trips over the never-gathered unit under mixed precision). The switch keeps the head in
the root unit instead, so FSDP gathers, casts, accumulates and reduces it like any root parameter, and
refuses a wrap policy that still gives it a unit of its own. A DTensor weight that reaches
:func:`linear_cross_entropy` by another way is gathered there, with a gradient averaged across the mesh
and scattered back to the shards.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.tensor import DTensor, Partial

from .. import fused_linear_logprobs
from .verl_losses import (POLICY_LOSSES, agg_loss, compute_policy_loss_cispo, compute_policy_loss_gspo,
                          compute_policy_loss_sapo, compute_policy_loss_vanilla, kl_penalty, sequence_weights)

try:
    import verl.utils.kernel.linear_cross_entropy  # noqa: F401  (the slot's module; the package exports no function)
    import verl.utils.fsdp_utils as verl_fsdp_utils
    import verl.workers.utils.losses as verl_ppo_losses
    from verl.models.transformers.monkey_patch import patch_forward_with_backends
    from verl.trainer.ppo import core_algos
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead
except ImportError as exc:  # the switch must reach the log-probabilities, not the losses alone
    raise ImportError("lvrpo_fast's verl switch needs verl's FSDP engine (pip install --no-deps verl==0.9.1 and "
                      f"pip install 'lvrpo-fast[verl]'): {exc}") from exc

__all__ = ["install", "linear_cross_entropy", "agg_loss", "sequence_weights", "kl_penalty",
           "compute_policy_loss_vanilla", "compute_policy_loss_gspo", "compute_policy_loss_cispo",
           "compute_policy_loss_sapo", "POLICY_LOSSES"]

# Set by the engine around each micro-batch: whether verl reads the entropy (calculate_entropy).
# linear_cross_entropy called outside the engine always returns it, as verl's does.
_ENTROPY_NEEDED = contextvars.ContextVar("lvrpo_fast_verl_entropy_needed", default=True)
_MARK = "__lvrpo_fast__"


# ----------------------------------------------------------------------------------------------
# The fused-kernel slot
# ----------------------------------------------------------------------------------------------
def _gathered(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A DTensor weight (a sharded head that reaches the slot ungathered) as the full [V, D] tensor,
    differentiably.

    The gradient of the full tensor differs per rank (each rank's own tokens), so it is declared
    Partial("avg") on every mesh dimension: backward then reduce-scatters it as the mean over ranks,
    as FSDP reduces its own gradients (verl scales each rank's loss by the data-parallel size); a plain
    full_tensor() would leave each rank the slice of its own gradient."""
    if not isinstance(weight, DTensor):
        return weight
    if weight.device != device:  # a shard offloaded to the host
        weight = weight.to(device)
    return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None):
    """verl's ``linear_cross_entropy``: per-token log-probabilities and entropy without the logits.

    hidden [..., D] (verl passes [1, total_nnz, D] for packed batches, [B, T, D] for padded ones),
    weight [V, D] (a tensor, or FSDP2's DTensor shard of it), labels [...] = hidden.shape[:-1] in
    [0, V), temperature > 0. Returns (logprobs, entropy), float32 (float64 for float64 inputs):
    logprobs of labels' shape for reduction "none", else their sum or mean (0-dim); entropy of labels'
    shape, or None inside verl's engine when the micro-batch does not ask for it. Differentiable
    w.r.t. hidden and weight through both. Under autocast the head runs in hidden's dtype, as the
    autocast matmul of verl's unfused head would. dist_process_group (a vocabulary-parallel head) is
    not supported.
    """
    if dist_process_group is not None:
        raise NotImplementedError("dist_process_group (a vocabulary-parallel LM head) is not supported")
    if not isinstance(reduction, str) or reduction.lower() not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    weight = _gathered(weight, hidden.device)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    need_entropy = _ENTROPY_NEEDED.get()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        out = fused_linear_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=need_entropy)
    logprobs, entropy = out if need_entropy else (out, None)
    reduction = reduction.lower()
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


# ----------------------------------------------------------------------------------------------
# verl's FSDP engine on the fused path
# ----------------------------------------------------------------------------------------------
def _is_value_engine(engine) -> bool:
    return isinstance(engine, FSDPEngineWithValueHead)


def check_model_config(hf_config) -> None:
    """Refuses a model whose logits are not ``hidden @ weight.T`` (verl's fused forward assumes it)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    model_type = getattr(hf_config, "model_type", "?")
    if model_type == "kimi_vl":
        raise ValueError("model_type kimi_vl: verl 0.9.1 has no fused forward for it, so lvrpo_fast's verl "
                         "switch cannot run its LM head")
    if getattr(text, "final_logit_softcapping", None) is not None:
        raise ValueError(f"{model_type}: final_logit_softcapping={text.final_logit_softcapping} is not linear in "
                         "the hidden states; verl's fused forward (which lvrpo_fast's switch uses) ignores it")
    for name in ("logit_scale", "logits_scaling", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None and float(value) != 1.0:
            raise ValueError(f"{model_type}: {name}={value} scales the logits; verl's fused forward (which "
                             "lvrpo_fast's switch uses) ignores it")


def check_lm_head(module) -> None:
    """Refuses an LM head that is not one [V, D] weight: a bias, or a (LoRA) adapter around it."""
    head = module.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(module).__name__} has no output embedding; lvrpo_fast's verl switch needs an LM head")
    if hasattr(head, "base_layer"):
        raise ValueError("the LM head carries an adapter (LoRA target_modules include lm_head); verl's fused forward "
                         "reads only its base weight. Leave lm_head out of target_modules")
    if getattr(head, "bias", None) is not None:
        raise ValueError("the LM head has a bias; verl's fused forward (which lvrpo_fast's switch uses) ignores it")


def _build_module(original):
    @functools.wraps(original)
    def build_module(self):
        module = original(self)
        if _is_value_engine(self):
            return module
        check_model_config(module.config)
        check_lm_head(module)
        # verl's own fused forward, whatever use_fused_kernels / impl_backend say: "triton" is the
        # backend whose forward calls the linear_cross_entropy slot, which now holds ours.
        patch_forward_with_backends(module, use_fused_kernels=True, fused_kernels_backend="triton")
        return module

    return build_module


def _build_lora_module(original):
    @functools.wraps(original)
    def build_lora_module(self, module):
        module = original(self, module)
        if not _is_value_engine(self):
            check_lm_head(module)
        return module

    return build_lora_module


@contextlib.contextmanager
def _head_in_root_unit():
    """FSDP2 wraps an untied LM head in a unit of its own, whose parameters FSDP gathers only inside that
    module's forward; verl's fused forward reads the head's weight without calling the module, and FSDP2
    then trips over the never-gathered unit in backward (mixed precision with gradient accumulation).
    Left in the root unit, the head is gathered, cast, accumulated and reduced by FSDP like the root's
    other parameters."""
    select = verl_fsdp_utils._select_fsdp2_wrap_targets

    def without_head(model, classes):
        head = model.get_output_embeddings()
        return [module for module in select(model, classes) if module is not head]

    verl_fsdp_utils._select_fsdp2_wrap_targets = without_head
    try:
        yield
    finally:
        verl_fsdp_utils._select_fsdp2_wrap_targets = select


def _build_fsdp_module(original):
    @functools.wraps(original)
    def build_fsdp_module(self, module):
        if _is_value_engine(self):
            return original(self, module)
        with _head_in_root_unit():
            wrapped = original(self, module)
        if isinstance(wrapped.get_output_embeddings(), (FSDP, FSDPModule)):
            raise ValueError("the FSDP wrap policy (wrap_policy.min_num_params?) gives the LM head an FSDP unit of its "
                             "own, which verl's fused forward reads outside that unit's forward; use the default "
                             "wrap policy (transformer layers)")
        return wrapped

    return build_fsdp_module


def check_micro_batch(micro_batch) -> None:
    """Refuses what the fused path cannot compute (named after verl's micro-batch keys)."""
    if isinstance(micro_batch.get("temperature", None), torch.Tensor):  # verl: "not supported yet"
        raise ValueError("temperature: a per-sample temperature tensor is not supported by verl's fused forward "
                         "(which lvrpo_fast's switch uses); give one float")
    if tu.get_non_tensor_data(data=micro_batch, key="calculate_sum_pi_squared", default=False):
        raise ValueError("calculate_sum_pi_squared=True needs the full [tokens, vocabulary] distribution, which "
                         "lvrpo_fast's verl switch never forms")
    if tu.get_non_tensor_data(data=micro_batch, key="distillation_use_topk", default=False):
        raise ValueError("distillation_use_topk=True (top-k distillation) is not supported by lvrpo_fast's verl switch")


def _forward_step(original):
    @functools.wraps(original)
    def forward_step(self, micro_batch, loss_function, forward_only):
        if _is_value_engine(self):
            return original(self, micro_batch, loss_function, forward_only)
        check_micro_batch(micro_batch)
        tu.assign_non_tensor(micro_batch, use_fused_kernels=True)
        calculate_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
        token = _ENTROPY_NEEDED.set(bool(calculate_entropy))
        try:
            return original(self, micro_batch, loss_function, forward_only)
        finally:
            _ENTROPY_NEEDED.reset(token)

    return forward_step


def _engine_new(original):
    @functools.wraps(original)
    def new(cls, model_type, backend, *args, **kwargs):
        if model_type == "language_model":
            engine_cls = cls.get_engine_cls(model_type, backend)
            patched = (issubclass(engine_cls, FSDPEngineWithLMHead)
                       and getattr(engine_cls.forward_step, _MARK, False)
                       and getattr(engine_cls._build_module, _MARK, False))
            if not patched:
                raise ValueError(f"strategy {backend!r} builds {engine_cls.__name__}, which lvrpo_fast's verl switch "
                                 "does not cover (it covers verl's FSDP engine: strategy 'fsdp' or 'fsdp2'); "
                                 f"remove {__name__} from external_lib to use verl's own path")
        return original(cls, model_type, backend, *args, **kwargs)

    return new


# ----------------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------------
def _replace(owner, name: str, wrap) -> None:
    """owner.name = wrap(current) (current possibly inherited), once: a second install leaves an
    installed replacement alone."""
    current = inspect.getattr_static(owner, name)
    function = current.__func__ if isinstance(current, classmethod) else current
    if getattr(function, _MARK, False):
        return
    replacement = wrap(function)
    replacement.__module__ = __name__  # functools.wraps copied verl's; the code is ours
    setattr(replacement, _MARK, True)
    setattr(owner, name, classmethod(replacement) if isinstance(current, classmethod) else replacement)


def install() -> None:
    """Puts lvrpo_fast under verl in this process (see the module docstring). Idempotent; called on import."""
    for name, fn in POLICY_LOSSES.items():
        core_algos.POLICY_LOSS_REGISTRY[name] = fn
    for name, fn in (("agg_loss", agg_loss), ("kl_penalty", kl_penalty)):  # ppo_loss's module bound verl's at import
        setattr(verl_ppo_losses, name, fn)
    slot = sys.modules["verl.utils.kernel.linear_cross_entropy"]
    slot.linear_cross_entropy = linear_cross_entropy
    # On the LM-head class (over FSDPEngine's methods): the value-head subclass inherits the wrappers,
    # which recognise it and step aside.
    _replace(FSDPEngineWithLMHead, "_build_module", _build_module)
    _replace(FSDPEngineWithLMHead, "_build_lora_module", _build_lora_module)
    _replace(FSDPEngineWithLMHead, "_build_fsdp_module", _build_fsdp_module)
    _replace(FSDPEngineWithLMHead, "forward_step", _forward_step)
    _replace(EngineRegistry, "new", _engine_new)


install()
