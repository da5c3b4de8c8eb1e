"""Hugging Face transformers models: the LM head's inputs instead of its logits.

A causal LM (or a vision-language model) computes ``logits = lm_head(norm(backbone(...)))``. The
fused ops of lvrpo_fast take the two inputs of that last matmul instead of its [B, L, V] output:

    heads = completion_hidden_states(model, input_ids, attention_mask, logits_to_keep=K,
                                     pixel_values=...)        # any extra model input passes through
    loss, metrics = lvrpo_fast.fused_linear_grpo_loss(heads.hidden, heads.weight, input_ids[:, -K:],
                                                      completion_mask, advantages, bias=heads.bias, ...)

The backbone is ``model.base_model`` (the decoder with its final norm; for a vision-language model the
multimodal model that merges the image features), so the logits are never formed. Tied embeddings
need nothing special: the head's weight is then the embedding matrix, and its gradient reaches it.

Supported logit transforms: a multiplicative logit scale (Cohere's ``logit_scale``, Granite's
``logits_scaling`` divisor, Falcon-H1's ``lm_head_multiplier``) is folded into the returned hidden
states and bias, so ``hidden @ weight.T + bias`` equals the model's logits. Not supported: final-logit
soft-capping (Gemma 2), which is not linear in the hidden states: a ValueError, never wrong numbers.

FSDP2 (``fully_shard``): a sharded model holds each parameter as a DTensor shard outside its FSDP unit's
forward. Called outside the root's forward, :func:`completion_hidden_states` runs its work *inside* it
(through the root module's call, its forward swapped for that one call), so FSDP2 gathers the root
unit's parameters (the embeddings, the final norm, an LM head left in the root unit) as in any forward
and registers its backward hooks; the root unit keeps its parameters gathered from its forward to its
backward, which reduce-scatters their gradients. An LM head with an FSDP2 unit of its own
(``fully_shard(model.lm_head)`` before ``fully_shard(model)``, or a unit grouping it with the input
embedding, ``fully_shard([model.model.embed_tokens, model.lm_head])`` for tied weights) is gathered by
that unit's ``unshard()`` and, like the root, stays gathered until its post-backward, which FSDP2 runs
at the end of the backward (its root's final callback) and which reduce-scatters its gradient. Either
way the returned weight (and bias) is the gathered ``[V, D]`` tensor, as an alias (no copy) whose
gradient reaches FSDP2's unsharded parameter. Inside a root forward that lvrpo_fast runs itself (the
root call above, or a patched forward run within :func:`inside_root_forward`, as
lvrpo_fast.integrations.trl's is) it reads the gathered parameters directly. A head with an FSDP2 unit
in a model that is not itself an FSDP2 module is refused with a ValueError.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Optional

import torch

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: nothing is sharded (isinstance(x, ()) is False)
    FSDPModule = DTensor = ()

from ..logprobs import fused_linear_logprobs
from ..vocab_parallel import VocabParallel

__all__ = ["LMHeadInputs", "lm_head_parameters", "completion_hidden_states", "completion_logprobs"]


@dataclass
class LMHeadInputs:
    """hidden [B, K, D] (the hidden states predicting the K scored tokens), weight [V, D], bias [V] or None.

    ``hidden @ weight.T + bias`` are the model's logits at those positions; hidden has the weight's dtype."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def _unwrap(model):
    """The transformers model under a PEFT wrapper (whose adapters stay active)."""
    if any(cls.__name__ == "PeftModel" for cls in type(model).__mro__):
        return model.get_base_model()
    return model


def _logit_scale(config) -> float:
    """The factor the model multiplies its logits by (1.0 for almost every model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None) is not None:
        raise ValueError(f"{text.model_type}: final_logit_softcapping={text.final_logit_softcapping} is not linear in "
                         "the hidden states, so the fused LM head cannot reproduce this model's logits")
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(text.logit_scale)
    if getattr(text, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(text.logits_scaling)
    if getattr(text, "lm_head_multiplier", None) is not None:  # Falcon-H1: logits * lm_head_multiplier
        scale *= float(text.lm_head_multiplier)
    return scale


def lm_head_parameters(model):
    """(weight [V, D], bias [V] or None) of the model's output embedding, the parameters themselves
    (so gradients reach them, and the input embedding when the two are tied)."""
    head = _unwrap(model).get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None); "
                         "a causal LM head is needed")
    if hasattr(head, "base_layer"):
        raise ValueError("the LM head carries a PEFT adapter; its low-rank update is not part of one [V, D] weight, "
                         "so the fused head cannot reproduce the logits (leave lm_head out of target_modules)")
    return head.weight, getattr(head, "bias", None)


# Set inside an FSDP2 root's forward that lvrpo_fast runs itself, and by inside_root_forward().
_IN_ROOT_FORWARD = contextvars.ContextVar("lvrpo_fast_hf_in_root_forward", default=False)


@contextlib.contextmanager
def inside_root_forward():
    """Marks code running inside the FSDP2 root's forward (a patched forward, as lvrpo_fast.integrations.trl
    has): completion_hidden_states then reads the parameters the root has gathered instead of calling it."""
    token = _IN_ROOT_FORWARD.set(True)
    try:
        yield
    finally:
        _IN_ROOT_FORWARD.reset(token)


def _is_fsdp2(model) -> bool:
    """Whether FSDP2 manages the model or its LM head (fully_shard made one of them an FSDPModule)."""
    inner = _unwrap(model)
    return any(isinstance(m, FSDPModule) for m in (model, inner, inner.get_output_embeddings()))


def _fsdp2_root(model):
    """The FSDP2 root module (model, or the transformers model under its PEFT wrapper) to run the work
    inside, or None (no FSDP2, or already inside the root's forward). Raises for an LM head with an FSDP2
    unit in a model that is not itself an FSDP2 module."""
    if _IN_ROOT_FORWARD.get():
        return None
    for candidate in (model, _unwrap(model)):
        if isinstance(candidate, FSDPModule):
            return candidate
    if isinstance(_unwrap(model).get_output_embeddings(), FSDPModule):
        raise ValueError(f"the LM head has an FSDP2 unit but {type(model).__name__} is not an FSDP2 module: "
                         "lvrpo_fast runs the backbone and gathers the head inside the model's root unit's forward, "
                         "so fully_shard the model itself too (after its decoder layers and the head), or call from "
                         "inside your FSDP2 root's forward within lvrpo_fast.integrations.hf.inside_root_forward()")
    return None


class _Alias(torch.autograd.Function):
    """x itself (the same storage, no copy) as a new autograd node whose gradient is passed through.

    FSDP2 hooks its pre-backward on the tensors a unit's forward returns; on the gathered parameter itself
    (a leaf FSDP2 reuses in every step) that hook would stay and pile up, one more each step."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _alias(t):
    return None if t is None else _Alias.apply(t)


def _gathered_head(model):
    """(weight [V, D], bias [V] or None) of the LM head, whole; called inside the root's forward (see the
    module docstring). A head with an FSDP2 unit is gathered by that unit's unshard() (a no-op when it is
    already), which keeps it gathered until the unit's post-backward reduce-scatters its gradients. Under
    FSDP2, aliases of the gathered parameters; otherwise the parameters themselves."""
    head = _unwrap(model).get_output_embeddings()
    if isinstance(head, FSDPModule):
        head.unshard()
    weight, bias = lm_head_parameters(model)
    if not _is_fsdp2(model):
        return weight, bias
    return _alias(weight), _alias(bias)


def _run_inside_root_forward(root, model, compute):
    """compute() run as root's forward (one call through root's __call__, so FSDP2's hooks gather the root
    unit's parameters before it and register the gradients' reduction after it)."""
    def forward(*args, **kwargs):
        with inside_root_forward():
            heads = compute()
        # Tensors FSDP2 hooks its backward onto; hidden is a slice of the backbone's output, copied so
        # that no view of a hooked output escapes (an in-place op on one would drop FSDP2's hook).
        return heads.hidden.clone(), heads.weight, heads.bias

    had_own = "forward" in root.__dict__
    previous = root.__dict__.get("forward")
    root.forward = forward
    try:
        hidden, weight, bias = root()
    finally:
        if had_own:
            root.forward = previous
        else:
            del root.forward
    head = _unwrap(model).get_output_embeddings()
    if isinstance(head, FSDPModule):
        # A unit grouping the head with a module the backbone ran (the tied input embedding) has its
        # forward completed by the root's post-forward, which reshards it: gathered again (the alias
        # shares its storage), a no-op for a head with a unit of its own, still gathered.
        head.unshard()
    return LMHeadInputs(hidden, weight, bias)


def completion_hidden_states(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                             logits_to_keep: Optional[int] = None, **model_kwargs) -> LMHeadInputs:
    """The LM head's inputs for the tokens of `input_ids` a model would score, without the logits.

    Args:
        model: a transformers causal LM or vision-language model (optionally PEFT-wrapped).
        input_ids: [B, L] token ids (prompt and completion).
        attention_mask: [B, L] 0/1 or None.
        logits_to_keep: K, score the last K tokens input_ids[:, -K:] (the completion); None scores
            input_ids[:, 1:] (K = L - 1).
        **model_kwargs: passed to the backbone unchanged (pixel_values, image_grid_thw, position_ids, ...).

    Returns:
        LMHeadInputs with hidden [B, K, D] = the final-norm hidden states at positions L-K-1 .. L-2
        (each predicting the next token), in the head weight's dtype, times the model's logit scale.
        Under FSDP2 the weight is the head's gathered [V, D] weight (see the module docstring).
    """
    root = _fsdp2_root(model)
    if root is not None:
        return _run_inside_root_forward(root, model, lambda: completion_hidden_states(
            model, input_ids, attention_mask, logits_to_keep, **model_kwargs))
    inner = _unwrap(model)
    backbone = getattr(inner, "base_model", None)
    if backbone is None or backbone is inner:
        raise ValueError(f"{type(inner).__name__} exposes no backbone (base_model_prefix "
                         f"{getattr(inner, 'base_model_prefix', None)!r} names no submodule)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [B, L], got shape {tuple(input_ids.shape)}")
    L = input_ids.shape[1]
    if logits_to_keep is None:
        logits_to_keep = L - 1
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or not 1 <= logits_to_keep < L:
        raise ValueError(f"logits_to_keep must be an int in [1, L={L}), got {logits_to_keep!r}")
    model_kwargs.setdefault("use_cache", False)
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    last = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    hidden = last[:, L - logits_to_keep - 1: L - 1]
    weight, bias = _gathered_head(model)
    hidden = hidden.to(device=weight.device, dtype=weight.dtype)
    scale = _logit_scale(inner.config)
    if scale != 1.0:
        # W (s h) + s b = s (W h + b): the scale rides on the hidden states, the head stays shared
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return LMHeadInputs(hidden, weight, bias)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        logits_to_keep: Optional[int] = None, *, temperature: float = 1.0,
                        completion_mask: Optional[torch.Tensor] = None, return_entropy: bool = False,
                        backend: Optional[str] = None, vocab_parallel: Optional[VocabParallel] = None,
                        **model_kwargs):
    """Per-token log-probabilities (and entropy) of input_ids[:, -K:] under the model, through
    lvrpo_fast.fused_linear_logprobs: never the [B, K, V] logits.

    vocab_parallel: for an LM head split over the vocabulary across a tensor-parallel group (its weight
    a DTensor sharded (Shard(0),) over a 1-D mesh, as torch's ColwiseParallel leaves it: pass
    lvrpo_fast.VocabParallel()), passed to fused_linear_logprobs; every rank of the group calls this
    with the same inputs. A DTensor head without it is refused (an FSDP2 shard has the same layout).

    Returns logp [B, K] float32 (and entropy [B, K]); 0 where completion_mask [B, K] is 0.
    Differentiable w.r.t. the model's parameters when called with gradients enabled."""
    heads = completion_hidden_states(model, input_ids, attention_mask, logits_to_keep, **model_kwargs)
    K = heads.hidden.shape[1]
    targets = input_ids[:, input_ids.shape[1] - K:].to(heads.hidden.device)
    return fused_linear_logprobs(heads.hidden, heads.weight, targets, bias=heads.bias, temperature=temperature,
                                 return_entropy=return_entropy, mask=completion_mask, backend=backend,
                                 vocab_parallel=vocab_parallel)
