"""nn.Module wrappers: :class:`FusedLinearGRPOLoss`, a drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss``.

Switching a Liger user is one line::

    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss   # before
    from lvrpo_fast.modules import FusedLinearGRPOLoss as LigerFusedLinearGRPOLoss   # after

The constructor takes Liger's options in Liger's order with Liger's defaults (beta=0.04,
loss_type="dapo", use_ref_model=True, ...), forward takes Liger's arguments in Liger's order, and the
result is Liger's structure: ``(loss, (kl, clip_ratio))`` with ``kl`` present only when beta != 0.
Checked against liger-kernel 0.8.5 (tests/test_modules.py).

What is not supported, and why (each raises a ValueError rather than silently changing the numbers):
    loss_type="vespo" with vllm_is_ratio:
                           Liger adds the log of every position's ratio to VESPO's sequence weight,
                           padding included; lvrpo_fast sums unmasked tokens only (docs/math.md section 10).
                           vespo without vllm_is_ratio is supported and equal.
    loss_type cispo, sapo or vespo with importance_sampling_level="sequence": Liger refuses them (TRL
                           and lvrpo_fast.fused_linear_grpo_loss take them).
    loss_type="luspo" with token-level ratios, beta != 0 (with a reference) or per-token vllm_is_ratio:
                           Liger then averages the loss over all B x T positions, padding included,
                           so the result depends on log-probabilities at padded positions; lvrpo_fast
                           sums unmasked tokens only (docs/math.md section 10). Sequence-level luspo with
                           beta = 0 (the LUSPO recipe) is supported and equal.
    delta <= 1 + epsilon_high: Liger counts a token as clipped by its ratio before delta, lvrpo_fast
                           (as TRL) after it; the two clip ratios agree only for delta > 1 + epsilon_high.
Beyond Liger (keyword-only): forward's cu_seqlens takes packed sequences, the constructor's
vocab_parallel a vocabulary-sharded (tensor-parallel) head; both as fused_linear_grpo_loss takes them.
Accepted and ignored because they do not change the numbers: ``compiled`` (Liger's torch.compile of
the loss math; the kernels are compiled already) and ``chunk_size`` (Liger's rows per chunk; lvrpo_fast
picks its chunk from LVRPO_CHUNK_BYTES). The vespo_* options only matter for loss_type="vespo".
Differences below the tolerance of the tests: lvrpo_fast clamps the log-ratio to [-20, 20] (verl's
guard) where Liger does not, and adds the LM head bias in the input dtype where Liger adds it in
float32. Like Liger, a weight whose dtype differs from the hidden states' is cast to theirs.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from torch import nn

from . import dispatch, validate
from .linear_grpo_loss import fused_linear_grpo_loss
from .logprobs import fused_linear_logprobs
from .options import GRPOOptions, replicated, world_size
from .vocab_parallel import VocabParallel

__all__ = ["FusedLinearGRPOLoss"]


class FusedLinearGRPOLoss(nn.Module):
    """The GRPO loss from hidden states and the LM head, with the interface of Liger's LigerFusedLinearGRPOLoss.

    Args (Liger's names, order and defaults; see the module docstring for the unsupported values):
        beta: KL coefficient (k3 estimator, as Liger and TRL). Default 0.04.
        compiled: accepted for compatibility, no effect.
        use_ref_model: use ref_per_token_logps (or ref_input / ref_weight) for the KL term; when
            False the reference is the current policy (KL 0), exactly as Liger.
        chunk_size: accepted for compatibility, no effect.
        epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high]; for cispo,
            epsilon_high is the absolute cap of the ratio.
        loss_type: "grpo", "bnpo", "dr_grpo", "dapo" (default), "cispo", "sapo", "luspo" or "vespo".
        max_completion_length: normalizer of dr_grpo (required there).
        importance_sampling_level: "token" or "sequence" (GSPO).
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures.
        temperature: divides the logits of the policy and of the reference alike.
        delta: optional upper bound of the un-clipped ratio (two-sided clip), > 1 + epsilon_high.
        use_bias_correction_kl: multiply the KL by the importance ratio (DeepSeek-V3.2).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma weight.
        backend (keyword only, not in Liger): "auto", "triton", "cpp" or "reference".
        batch_invariant (keyword only, not in Liger): the batch-invariant mode of the fused ops (also
            for the reference's log-probabilities from ref_input); None: LVRPO_BATCH_INVARIANT.
        vocab_parallel (keyword only, not in Liger): a lvrpo_fast.VocabParallel when lin_weight / bias
            (and ref_weight / ref_bias) are this rank's vocabulary shards of a tensor-parallel head, or
            a DTensor head sharded with (Shard(0),) over a 1-D mesh; passed to fused_linear_grpo_loss
            and to the reference's fused_linear_logprobs (see there). Every rank of the group calls
            forward with the same inputs but the head. None: the whole head on every process.
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: Optional[int] = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: Optional[float] = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, *,
                 backend: Optional[str] = None, batch_invariant: Optional[bool] = None,
                 vocab_parallel: Optional[VocabParallel] = None):
        super().__init__()
        if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
            raise ValueError(f"loss_type={loss_type!r} with importance_sampling_level='sequence': Liger refuses it "
                             "(use lvrpo_fast.fused_linear_grpo_loss, which takes it as TRL does)")
        if delta is not None and delta <= 1.0 + (epsilon_low if epsilon_high is None else epsilon_high):
            raise ValueError(f"delta={delta} <= 1 + epsilon_high: Liger's clip ratio then counts tokens by their ratio "
                             "before delta, lvrpo_fast's (as TRL's) after it; use delta > 1 + epsilon_high")
        if loss_type == "luspo" and importance_sampling_level != "sequence":
            raise ValueError("loss_type='luspo' is supported with importance_sampling_level='sequence' only: with "
                             "token-level ratios Liger averages the loss over padded positions too, which "
                             "lvrpo_fast does not reproduce (docs/math.md section 10)")
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        self.backend = backend
        self.batch_invariant = batch_invariant
        if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallel):
            raise TypeError(f"vocab_parallel must be a lvrpo_fast.VocabParallel or None, got "
                            f"{type(vocab_parallel).__name__}")
        self.vocab_parallel = vocab_parallel
        # Every option error at construction, not at the first batch.
        self.temperature = validate.check_temperature(temperature)
        if backend is not None:
            dispatch.requested(backend)
        if batch_invariant is not None:
            dispatch.batch_invariant(batch_invariant)
        self._options(beta)

    def _options(self, beta, num_items_in_batch=None) -> GRPOOptions:
        return GRPOOptions(loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                           delta=self.delta, beta=beta, kl_estimator="k3",
                           use_bias_correction_kl=self.use_bias_correction_kl,
                           importance_sampling_level=self.importance_sampling_level,
                           max_completion_length=self.max_completion_length, num_items_in_batch=num_items_in_batch,
                           sapo_temperature_pos=self.sapo_temperature_pos,
                           sapo_temperature_neg=self.sapo_temperature_neg, vespo_k_pos=self.vespo_k_pos,
                           vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
                           vespo_lambda_neg=self.vespo_lambda_neg)

    def _reference_logps(self, ref_per_token_logps, ref_input, ref_weight, ref_bias, selected_token_ids, mask,
                         cu_seqlens=None):
        """The reference log-probabilities Liger would use, or None when the KL term vanishes."""
        if not self.use_ref_model:
            return None  # Liger then takes the policy itself as the reference: KL and its gradient are 0
        if ref_per_token_logps is None and ref_input is None:
            raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input (with ref_weight)")
        if ref_per_token_logps is not None:
            if ref_input is not None:
                warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.",
                              stacklevel=3)
            return ref_per_token_logps
        if ref_weight is None:
            raise ValueError("ref_input needs ref_weight (the reference model's LM head weight)")
        if ref_weight.dtype != ref_input.dtype:
            ref_weight = ref_weight.to(ref_input.dtype)
        if ref_bias is not None and ref_bias.dtype != ref_input.dtype:
            ref_bias = ref_bias.to(ref_input.dtype)
        # Liger scores the reference under no_grad with the policy's temperature; so do we.
        if cu_seqlens is not None:
            ref_input = _packed_rows(ref_input)
        with torch.no_grad():
            return fused_linear_logprobs(ref_input, ref_weight, selected_token_ids, bias=ref_bias,
                                         temperature=self.temperature, mask=mask, backend=self.backend,
                                         batch_invariant=self.batch_invariant, cu_seqlens=cu_seqlens,
                                         vocab_parallel=self.vocab_parallel)

    def _dapo_normalizer(self, attention_mask, num_items_in_batch):
        """num_items_in_batch for lvrpo_fast (which divides it by the world size) reproducing Liger's
        normalizer max(n / world_size, 1), with n the all-reduced token count when not given; with a
        vocab-parallel head, world_size and n count the tensor-parallel group as one replica."""
        if self.loss_type not in ("dapo", "cispo", "vespo"):
            return None
        import torch.distributed as dist

        # A vocab-parallel head's group holds the same tokens: one data-parallel replica (options.replicated).
        tp_size = tp_rank = None
        if self.vocab_parallel is not None and dist.is_available() and dist.is_initialized():
            tp_size, tp_rank = dist.get_world_size(self.vocab_parallel.group), dist.get_rank(self.vocab_parallel.group)
        with contextlib.nullcontext() if tp_size is None else replicated(tp_rank, tp_size):
            ws = world_size()
        if num_items_in_batch is None:
            if ws == 1:
                return None  # the local count, clamped at 1: Liger's normalizer on one process
            num_items_in_batch = attention_mask.sum(dtype=torch.float32)
            dist.all_reduce(num_items_in_batch, op=dist.ReduceOp.SUM)
            if tp_size is not None:
                num_items_in_batch = num_items_in_batch / tp_size  # each replica's tokens counted once
        if isinstance(num_items_in_batch, torch.Tensor):
            return num_items_in_batch.to(device=attention_mask.device, dtype=torch.float32).clamp(min=float(ws))
        return max(float(num_items_in_batch), float(ws))

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None, *, cu_seqlens=None):
        """
        Args:
            _input: [B, T, D] hidden states predicting selected_token_ids (float16/bfloat16/float32/float64);
                with cu_seqlens, packed [N, D] (or verl's [1, N, D]).
            lin_weight: [V, D] LM head weight (cast to _input's dtype if it differs); bias: [V] or None.
            selected_token_ids: [B, T] integer ids of the sampled completion tokens.
            attention_mask: [B, T] 0/1 completion mask, or None: every token counts.
            advantages: [B] float.
            ref_per_token_logps, old_per_token_logps: [B, T] float or None.
            ref_input: [B, T, D] reference-model hidden states; ref_weight [V, D]; ref_bias [V].
            vllm_is_ratio: rollout correction weights, [B], [B, 1] or [B, T], multiplying the policy term.
            num_items_in_batch: token count of the whole generation batch (dapo / cispo normalizer).
            cu_seqlens (keyword only, not in Liger): [B + 1] int32 / int64 bounds of packed sequences
                (fused_linear_grpo_loss's cu_seqlens): _input [N, D] or [1, N, D], N = cu_seqlens[-1];
                selected_token_ids, attention_mask, old / ref_per_token_logps and a per-token
                vllm_is_ratio [N] (or [1, N]); ref_input like _input; advantages [B] (or [N], one
                per token); a per-sequence vllm_is_ratio [B] or [B, 1]. The result equals forward's on
                the same batch padded to [B, T] (the gradient w.r.t. _input is packed like it).

        Returns:
            (loss, metrics): loss a 0-dim float32 tensor differentiable w.r.t. _input, lin_weight and
            bias; metrics a tuple of detached 0-dim tensors, (kl, clip_ratio) when beta != 0 else
            (clip_ratio,), as Liger: kl the masked mean of the (bias-corrected) k3 estimate,
            clip_ratio the fraction of clipped tokens (cispo: capped with A > 0; sapo: 0, no clipping).
        """
        if cu_seqlens is not None:
            _input = _packed_rows(_input)
            if not isinstance(_input, torch.Tensor) or _input.dim() != 2:
                got = tuple(_input.shape) if isinstance(_input, torch.Tensor) else type(_input).__name__
                raise ValueError(f"_input must be a tensor [N, D] (or [1, N, D]) with cu_seqlens, got {got}")
            selected_token_ids, attention_mask, old_per_token_logps, ref_per_token_logps = (
                _packed_rows(t, trailing=0)
                for t in (selected_token_ids, attention_mask, old_per_token_logps, ref_per_token_logps))
        elif not isinstance(_input, torch.Tensor) or _input.dim() != 3:
            got = tuple(_input.shape) if isinstance(_input, torch.Tensor) else type(_input).__name__
            raise ValueError(f"_input must be a 3-D tensor [B, T, D], got {got}")
        weight = lin_weight if lin_weight.dtype == _input.dtype else lin_weight.to(_input.dtype)
        if bias is not None and bias.dtype != _input.dtype:
            bias = bias.to(_input.dtype)
        if attention_mask is None:
            if not isinstance(selected_token_ids, torch.Tensor):
                raise TypeError(f"selected_token_ids must be a torch.Tensor, got {type(selected_token_ids).__name__}")
            attention_mask = torch.ones(selected_token_ids.shape, dtype=torch.bool, device=selected_token_ids.device)
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        logp_ref = self._reference_logps(ref_per_token_logps, ref_input, ref_weight, ref_bias, selected_token_ids,
                                         mask, cu_seqlens)
        beta = self.beta if logp_ref is not None else 0.0
        rollout_weights = vllm_is_ratio
        if rollout_weights is not None and rollout_weights.dim() == 2 and rollout_weights.shape[1] == 1:
            rollout_weights = rollout_weights[:, 0]
        if cu_seqlens is None:
            per_token_weights = rollout_weights is not None and rollout_weights.dim() == 2
        else:  # [B]: one per sequence; [N] or [1, N]: one per token (a malformed cu_seqlens raises in the op)
            per_token_weights = (rollout_weights is not None and isinstance(cu_seqlens, torch.Tensor) and
                                 tuple(rollout_weights.shape) != (cu_seqlens.shape[0] - 1,))
        if self.loss_type == "vespo" and rollout_weights is not None:
            raise ValueError("loss_type='vespo' with vllm_is_ratio is not supported: Liger adds every position's "
                             "log-ratio to VESPO's weight, padding included, lvrpo_fast unmasked tokens only "
                             "(docs/math.md section 10)")
        if self.loss_type == "luspo":
            if beta != 0:
                raise ValueError("loss_type='luspo' with beta != 0 and a reference model is not supported: Liger "
                                 "then averages the KL over padded positions too (docs/math.md section 10)")
            if per_token_weights:
                raise ValueError("loss_type='luspo' takes a per-sequence vllm_is_ratio ([B] or [B, 1]) only: with "
                                 "a per-token one Liger averages over padded positions too (docs/math.md section 10)")
        options = self._options(beta, self._dapo_normalizer(mask, num_items_in_batch))
        loss, metrics = fused_linear_grpo_loss(
            _input, weight, selected_token_ids, mask, advantages, bias=bias, logp_old=old_per_token_logps,
            logp_ref=logp_ref, rollout_weights=rollout_weights, temperature=self.temperature, backend=self.backend,
            batch_invariant=self.batch_invariant, cu_seqlens=cu_seqlens, vocab_parallel=self.vocab_parallel,
            **{f: getattr(options, f) for f in _OPTION_FIELDS})
        if self.loss_type == "cispo":
            clip_ratio = metrics["clip_ratio_high"]
        elif self.loss_type in ("sapo", "vespo"):  # Liger logs no clipping for either
            clip_ratio = torch.zeros_like(metrics["clip_ratio_region"])
        else:
            clip_ratio = metrics["clip_ratio_region"]
        if self.beta != 0:
            kl = metrics["kl"] if "kl" in metrics else torch.zeros_like(clip_ratio)
            return loss, (kl, clip_ratio)
        return loss, (clip_ratio,)

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, epsilon_low={self.epsilon_low}, "
                f"epsilon_high={self.epsilon_high}, importance_sampling_level={self.importance_sampling_level!r}, "
                f"temperature={self.temperature}")


def _packed_rows(t, trailing=1):
    """A packed input as fused_linear_grpo_loss takes it: [N, ...] as it is, verl's [1, N, ...] without its
    leading 1 (a view: the gradient flows back to it); None stays None. Other shapes are left for the
    op's checks, which name them."""
    if isinstance(t, torch.Tensor) and t.dim() == 2 + trailing and t.shape[0] == 1:
        return t[0]
    return t


_OPTION_FIELDS = ("loss_type", "epsilon_low", "epsilon_high", "delta", "beta", "kl_estimator",
                  "use_bias_correction_kl", "importance_sampling_level", "max_completion_length",
                  "num_items_in_batch", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                  "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
