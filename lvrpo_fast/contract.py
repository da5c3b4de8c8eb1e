"""The contract between the layers: shared constants and the interface every kernel backend implements.

This module imports nothing of the package, so that every layer may depend on it: the Triton kernels
(kernels/), the C++ backend's Python side (backends/cpp.py), the fused autograd (fused/), the
reference and the public ops. The math itself is written in docs/math.md.

Primitives. The Triton backend (``lvrpo_fast.backends.triton``, kernels in ``kernels/``) and the C++
CPU backend (``lvrpo_fast.backends.cpp``, sources in ``csrc/``) export the same functions, described by
:class:`Primitives` below. The chunked autograd in ``lvrpo_fast/fused/`` is written once against
them, so both backends share one chunking scheme, one gradient formula and one set of saved tensors;
only the row-wise work differs. All tensors passed to a primitive are contiguous and on one device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Tuple, runtime_checkable

import torch

# --- the options' vocabularies (docs/math.md sections 2 to 6) ---------------------------------------
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "seq_mean_token_sum", "cispo", "sapo", "vespo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")
# How the entropy bonus is normalized: like the loss type's policy term (verl's entropy_coeff), or as
# the mean over the batch's tokens whatever the loss type (TRL's entropy_coef).
ENTROPY_AGGS = ("loss_type", "token_mean")
# Loss types whose policy term is the PPO-style clipped surrogate.
CLIP_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "seq_mean_token_sum")
BACKENDS = ("auto", "triton", "cpp", "reference")

# --- numerical constants shared by every backend ------------------------------------------------------
# The log-ratio logp - logp_old is clamped to [-20, 20] before exp (verl's guard: exp overflow times a
# zero mask would otherwise give inf * 0 = NaN).
LOG_RATIO_CLAMP = 20.0
# vespo (docs/math.md section 4): the log of its sequence weight is clamped to [log(1e-8), 20] and its
# lambdas to at least 1e-4, as TRL 1.16 does.
VESPO_LOG_W_MIN = -18.420680743952367  # math.log(1e-8)
VESPO_LAMBDA_MIN = 1e-4

# --- columns of the per-sequence statistics of the GRPO loss primitive -------------------------------
# Columns 0-9 and 13 are sums over the sequence's unmasked tokens; the loss column (the policy and KL
# terms, not the entropy bonus, which the caller adds) is already multiplied by the row scale. Columns
# 10-12 are values of the sequence itself (docs/math.md section 7): the clip indicators of its
# sequence-level ratio and vespo's weight, for per-sequence advantages (0 otherwise).
STAT_LOSS = 0
STAT_COUNT = 1
STAT_KL = 2
STAT_CLIP_LOW = 3
STAT_CLIP_HIGH = 4
STAT_CLIP_REGION = 5
STAT_RATIO = 6
STAT_ENTROPY = 7
STAT_KEPT = 8  # tokens the high-entropy mask keeps (all unmasked tokens without it)
STAT_ENTROPY_KEPT = 9  # the entropy summed over those tokens
STAT_SEQ_CLIP_LOW = 10
STAT_SEQ_CLIP_HIGH = 11
STAT_SEQ_WEIGHT = 12  # vespo's phi of the sequence
STAT_WEIGHT = 13  # vespo's phi summed over the unmasked tokens
NSTATS = 14
STAT_COLUMNS = (STAT_LOSS, STAT_COUNT, STAT_KL, STAT_CLIP_LOW, STAT_CLIP_HIGH, STAT_CLIP_REGION, STAT_RATIO,
                STAT_ENTROPY, STAT_KEPT, STAT_ENTROPY_KEPT, STAT_SEQ_CLIP_LOW, STAT_SEQ_CLIP_HIGH, STAT_SEQ_WEIGHT,
                STAT_WEIGHT, NSTATS)


@dataclass(frozen=True)
class SequenceStats:
    """Per-sequence statistics of a GRPO loss call: each field a detached [B] float32 tensor.

    What the scalar metrics are made of, exposed so that a caller can reduce them itself, e.g. across
    processes (a token mean over every process is sum(entropy) / sum(count) over all of them, not a
    mean of per-process means) or per sequence (TRL's clip_ratio/low_min). docs/math.md section 7.

    loss:          the sequence's policy and KL terms, summed over its unmasked tokens and multiplied by
                   its aggregation weight (their sum over b is the loss without the entropy bonus)
    count:         its unmasked tokens
    kl, ratio, entropy: sums over the unmasked tokens (kl is 0 when beta == 0; entropy when computed)
    clip_low, clip_high, clip_region: the clipped unmasked tokens (each a count)
    kept, entropy_kept: the unmasked tokens the high-entropy mask keeps, and their entropy's sum
    seq_clip_low, seq_clip_high: 1.0 where the sequence-level ratio is clipped low / high (every
                   sequence, an empty one with ratio 1 included); with per-sequence advantages and the
                   sequence level only, 0 otherwise
    seq_weight:    vespo's weight phi of the sequence (per-sequence advantages), 0 for other loss types
    weight:        vespo's phi summed over the unmasked tokens, 0 for other loss types
    """

    loss: torch.Tensor
    count: torch.Tensor
    kl: torch.Tensor
    clip_low: torch.Tensor
    clip_high: torch.Tensor
    clip_region: torch.Tensor
    ratio: torch.Tensor
    entropy: torch.Tensor
    kept: torch.Tensor
    entropy_kept: torch.Tensor
    seq_clip_low: torch.Tensor
    seq_clip_high: torch.Tensor
    seq_weight: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def from_columns(cls, stats: torch.Tensor) -> "SequenceStats":
        """From the [B, NSTATS] statistics of the primitive (fields in column order)."""
        stats = stats.detach()
        return cls(*(stats[:, column] for column in range(NSTATS)))

    def columns(self) -> torch.Tensor:
        """The [B, NSTATS] tensor again."""
        return torch.stack([getattr(self, f.name) for f in dataclasses.fields(self)], dim=1)


# --- the per-token loss parameters a kernel receives ---------------------------------------------------
# Aggregation is not among them: it arrives folded into a per-sequence row scale (fused/grpo_loss.py).
POLICY_KINDS = {"clip": 0, "cispo": 1, "sapo": 2, "vespo": 3}
KL_KINDS = {"k1": 1, "k2": 2, "k3": 3}  # 0: no KL term (beta == 0)


def token_loss_params(options) -> Dict[str, object]:
    """The scalar parameters of the per-token GRPO math, from a GRPOOptions: the one list both kernel
    backends read (the Triton launcher as arguments, the C++ LossParams struct field by field, checked
    against the struct's own field list when the extension loads).

    Keys and types: policy (int, POLICY_KINDS), epsilon_low, epsilon_high (float), has_delta (bool),
    delta (float), has_clip_ratio_c (bool), clip_ratio_c, beta (float), kl_estimator (int, KL_KINDS; 0
    when beta == 0), use_bias_correction_kl, sequence_level (bool), sapo_temperature_pos,
    sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg (float; the
    lambdas already raised to VESPO_LAMBDA_MIN), has_off_policy_mask (bool), off_policy_mask_threshold
    (float). The entropy bonus is not a kernel parameter: it is linear in the entropy, and the caller
    forms its value and gradient (fused/grpo_loss.py)."""
    beta = float(options.beta)
    threshold = options.off_policy_mask_threshold
    return {
        "policy": POLICY_KINDS.get(options.loss_type, POLICY_KINDS["clip"]),
        "epsilon_low": float(options.epsilon_low),
        "epsilon_high": float(options.epsilon_high),
        "has_delta": options.delta is not None,
        "delta": float(options.delta) if options.delta is not None else 0.0,
        "has_clip_ratio_c": options.clip_ratio_c is not None,
        "clip_ratio_c": float(options.clip_ratio_c) if options.clip_ratio_c is not None else 0.0,
        "beta": beta,
        "kl_estimator": KL_KINDS[options.kl_estimator] if beta > 0 else 0,
        "use_bias_correction_kl": bool(options.use_bias_correction_kl) and beta > 0,
        "sequence_level": options.importance_sampling_level == "sequence",
        "sapo_temperature_pos": float(options.sapo_temperature_pos),
        "sapo_temperature_neg": float(options.sapo_temperature_neg),
        "vespo_k_pos": float(options.vespo_k_pos),
        "vespo_lambda_pos": max(float(options.vespo_lambda_pos), VESPO_LAMBDA_MIN),
        "vespo_k_neg": float(options.vespo_k_neg),
        "vespo_lambda_neg": max(float(options.vespo_lambda_neg), VESPO_LAMBDA_MIN),
        "has_off_policy_mask": threshold is not None,
        "off_policy_mask_threshold": float(threshold) if threshold is not None else 0.0,
    }


@runtime_checkable
class Primitives(Protocol):
    """What a kernel backend module exports (lvrpo_fast.backends.triton, lvrpo_fast.backends.cpp)."""

    name: str

    def available(self, device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
        """(True, "") when the backend runs tensors of `dtype` on `device`, else (False, the reason)."""

    def logits_stats(self, logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                     batch_invariant: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """logits [C, V] float16/bfloat16/float32 (the LM head's output, bias included, before the
        temperature; rows may be strided, V contiguous: a block of a wider tile's columns), targets [C] int64 in [0, V), or -1 where the row's target is not in this tile
        (a vocab-parallel shard that does not hold it: that row's logp is NaN, its lse and entropy are
        the tile's). Returns float32 [C] tensors (logp, lse, entropy or None): logp = z[target] - lse, lse = logsumexp(z), entropy = lse - sum softmax(z) z, z = logits / T,
        computed blockwise over V with an online max so nothing of size [C, V] is allocated. A NaN or
        inf logit gives a non-finite row, never a finite wrong one. A row's results depend on that row
        alone (not on C, its place or the thread count) and logp does not depend on with_entropy;
        batch_invariant=True also fixes whatever could differ between calls or processes (a tuned
        launch configuration)."""

    def logits_grad_(self, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                     entropy: Optional[torch.Tensor], grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                     temperature: float) -> None:
        """Overwrites logits [C, V] in place with d(loss)/d(logits) =
        (grad_logp * (onehot(target) - p) - grad_entropy * p * (log p + entropy)) / T, p = softmax(z)
        (target -1: no one-hot term; lse and entropy may be those of a wider row than the tile's, the
        vocab-parallel case, where p = exp(z - lse) sums to less than 1 over the tile).
        entropy and grad_entropy are None together when the entropy gets no gradient."""

    def grpo_token_loss(self, logp: torch.Tensor, logp_old: Optional[torch.Tensor], logp_ref: Optional[torch.Tensor],
                        logp_sampling: Optional[torch.Tensor], advantages: torch.Tensor, mask: torch.Tensor,
                        rollout_weights: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
                        entropy_threshold: Optional[torch.Tensor], row_scale: torch.Tensor, params: Dict[str, object],
                        need_grad: bool, batch_invariant: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """logp, logp_old, logp_ref, logp_sampling, entropy, rollout_weights [B, T] float32 (all but logp
        may be None), advantages [B] or [B, T] float32 (per sequence or per token), mask [B, T] bool,
        entropy_threshold a 0-dim float32 tensor or None (the high-entropy mask: the policy term is kept
        where entropy >= threshold; needs entropy), row_scale [B] float32 (the aggregation weight of each
        sequence), params from :func:`token_loss_params`. logp_sampling is read by the off-policy mask
        only, and defaults to logp_old (itself defaulting to logp). Rows are whole sequences. Returns
        stats [B, NSTATS] float32 (the STAT_* columns) and, if need_grad, grad_logp [B, T] float32 =
        d(loss)/d(logp) including the row scale and the mask (0 at masked tokens). Values at masked
        tokens are never read into a result; a NaN or inf at an unmasked token reaches the loss column.
        The entropy bonus (value and gradient) is formed by the caller from the entropy-kept columns.
        batch_invariant=True: a sequence's stats row depends on that sequence's unmasked tokens,
        row_scale and the threshold alone, not on B, its place or the padded length T."""

    def group_advantages(self, rewards: torch.Tensor, group_size: int, scale: str, eps: float,
                         leave_one_out: bool) -> torch.Tensor:
        """rewards [B] float32 -> advantages [B] float32 (docs/math.md section 2). A NaN reward makes its
        whole group NaN (never 0)."""

    def process_advantages(self, step_rewards: torch.Tensor, step_ends: torch.Tensor, step_offsets: torch.Tensor,
                           group_size: int, seq_len: int, scale: str, eps: float, leave_one_out: bool,
                           outcome_advantages: Optional[torch.Tensor], outcome_weight: float) -> torch.Tensor:
        """step_rewards [S] float32, step_ends [S] int64, step_offsets [B + 1] int64 (the packed steps,
        already validated), outcome_advantages [B] float32 or None (then outcome_weight is ignored) ->
        advantages [B, seq_len] float32 (docs/math.md section 11), every element written. A NaN step
        reward makes its group's steps NaN (never 0)."""

    def scale_(self, tensors, factor: torch.Tensor) -> None:
        """Multiplies each tensor in place by the 0-dim float32 `factor`, and does nothing at all when
        the factor is exactly 1 (the usual loss.backward()), without a host synchronization on a GPU."""


__all__ = [
    "LOSS_TYPES", "KL_ESTIMATORS", "IS_LEVELS", "ADVANTAGE_SCALES", "ENTROPY_AGGS", "CLIP_FAMILY", "BACKENDS",
    "LOG_RATIO_CLAMP", "VESPO_LOG_W_MIN", "VESPO_LAMBDA_MIN", "STAT_LOSS", "STAT_COUNT", "STAT_KL", "STAT_CLIP_LOW",
    "STAT_CLIP_HIGH", "STAT_CLIP_REGION", "STAT_RATIO", "STAT_ENTROPY", "STAT_KEPT", "STAT_ENTROPY_KEPT",
    "STAT_SEQ_CLIP_LOW", "STAT_SEQ_CLIP_HIGH", "STAT_SEQ_WEIGHT", "STAT_WEIGHT", "NSTATS", "STAT_COLUMNS",
    "SequenceStats", "POLICY_KINDS", "KL_KINDS", "token_loss_params", "Primitives",
]
