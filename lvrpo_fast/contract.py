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

from typing import Dict, Optional, Protocol, Tuple, runtime_checkable

import torch

# --- the options' vocabularies (docs/math.md sections 2 to 6) ---------------------------------------
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "seq_mean_token_sum", "cispo", "sapo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")
# Loss types whose policy term is the PPO-style clipped surrogate.
CLIP_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "seq_mean_token_sum")
BACKENDS = ("auto", "triton", "cpp", "reference")

# --- numerical constants shared by every backend ------------------------------------------------------
# The log-ratio logp - logp_old is clamped to [-20, 20] before exp (verl's guard: exp overflow times a
# zero mask would otherwise give inf * 0 = NaN).
LOG_RATIO_CLAMP = 20.0

# --- columns of the per-sequence statistics of the GRPO loss primitive -------------------------------
# Sums over the sequence's unmasked tokens; the loss column is already multiplied by the row scale.
STAT_LOSS = 0
STAT_COUNT = 1
STAT_KL = 2
STAT_CLIP_LOW = 3
STAT_CLIP_HIGH = 4
STAT_CLIP_REGION = 5
STAT_RATIO = 6
STAT_ENTROPY = 7
NSTATS = 8
STAT_COLUMNS = (STAT_LOSS, STAT_COUNT, STAT_KL, STAT_CLIP_LOW, STAT_CLIP_HIGH, STAT_CLIP_REGION, STAT_RATIO,
                STAT_ENTROPY, NSTATS)

# --- the per-token loss parameters a kernel receives ---------------------------------------------------
# Aggregation is not among them: it arrives folded into a per-sequence row scale (fused/grpo_loss.py).
POLICY_KINDS = {"clip": 0, "cispo": 1, "sapo": 2}
KL_KINDS = {"k1": 1, "k2": 2, "k3": 3}  # 0: no KL term (beta == 0)


def token_loss_params(options) -> Dict[str, object]:
    """The scalar parameters of the per-token GRPO math, from a GRPOOptions: the one list both kernel
    backends read (the Triton launcher as arguments, the C++ LossParams struct field by field, checked
    against the struct's own field list when the extension loads).

    Keys and types: policy (int, POLICY_KINDS), epsilon_low, epsilon_high (float), has_delta (bool),
    delta (float), has_clip_ratio_c (bool), clip_ratio_c, beta (float), kl_estimator (int, KL_KINDS; 0
    when beta == 0), use_bias_correction_kl, sequence_level (bool), entropy_coef, sapo_temperature_pos,
    sapo_temperature_neg (float)."""
    beta = float(options.beta)
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
        "entropy_coef": float(options.entropy_coef),
        "sapo_temperature_pos": float(options.sapo_temperature_pos),
        "sapo_temperature_neg": float(options.sapo_temperature_neg),
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
        temperature), targets [C] int64 in [0, V). Returns float32 [C] tensors (logp, lse, entropy or
        None): logp = z[target] - lse, lse = logsumexp(z), entropy = lse - sum softmax(z) z, z = logits / T,
        computed blockwise over V with an online max so nothing of size [C, V] is allocated. A NaN or
        inf logit gives a non-finite row, never a finite wrong one. A row's results depend on that row
        alone (not on C, its place or the thread count) and logp does not depend on with_entropy;
        batch_invariant=True also fixes whatever could differ between calls or processes (a tuned
        launch configuration)."""

    def logits_grad_(self, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                     entropy: Optional[torch.Tensor], grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                     temperature: float) -> None:
        """Overwrites logits [C, V] in place with d(loss)/d(logits) =
        (grad_logp * (onehot(target) - p) - grad_entropy * p * (log p + entropy)) / T, p = softmax(z).
        entropy and grad_entropy are None together when the entropy gets no gradient."""

    def grpo_token_loss(self, logp: torch.Tensor, logp_old: Optional[torch.Tensor], logp_ref: Optional[torch.Tensor],
                        advantages: torch.Tensor, mask: torch.Tensor, rollout_weights: Optional[torch.Tensor],
                        entropy: Optional[torch.Tensor], row_scale: torch.Tensor, params: Dict[str, object],
                        need_grad: bool, batch_invariant: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """logp, logp_old, logp_ref, entropy, rollout_weights [B, T] float32 (the last four may be None),
        advantages [B] or [B, T] float32 (per sequence or per token), mask [B, T] bool, row_scale [B] float32 (the aggregation weight of each
        sequence), params from :func:`token_loss_params`. Rows are whole sequences. Returns stats
        [B, NSTATS] float32 (the STAT_* columns) and, if need_grad, grad_logp [B, T] float32 =
        d(loss)/d(logp) including the row scale and the mask (0 at masked tokens). Values at masked
        tokens are never read into a result; a NaN or inf at an unmasked token reaches the loss column.
        The entropy bonus's gradient w.r.t. the entropy is the constant -entropy_coef * mask * row_scale,
        formed by the caller. batch_invariant=True: a sequence's stats row depends on that sequence's
        unmasked tokens and row_scale alone, not on B, its place or the padded length T."""

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
    "LOSS_TYPES", "KL_ESTIMATORS", "IS_LEVELS", "ADVANTAGE_SCALES", "CLIP_FAMILY", "BACKENDS", "LOG_RATIO_CLAMP",
    "STAT_LOSS", "STAT_COUNT", "STAT_KL", "STAT_CLIP_LOW", "STAT_CLIP_HIGH", "STAT_CLIP_REGION", "STAT_RATIO",
    "STAT_ENTROPY", "NSTATS", "STAT_COLUMNS", "POLICY_KINDS", "KL_KINDS", "token_loss_params", "Primitives",
]
