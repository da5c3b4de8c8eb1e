"""The scalar options of the GRPO loss (docs/math.md sections 3 to 6 and 9), validated once.

Every backend receives a frozen :class:`GRPOOptions` instead of a dozen positional arguments, so a
new option is added in one place. Tensor-valued inputs (rollout weights, log-probabilities) are not
options: they travel as arguments and are checked in :mod:`lvrpo_fast.validate`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from .contract import (ADVANTAGE_SCALES, CLIP_FAMILY, ENTROPY_AGGS, IS_LEVELS, KL_ESTIMATORS,  # noqa: F401 (re-exported)
                       LOSS_TYPES)


@dataclass(frozen=True)
class GRPOOptions:
    """Scalar options of the GRPO loss, with the defaults of TRL's GRPOConfig where it has one.

    loss_type: aggregation and policy term, one of LOSS_TYPES (docs/math.md section 6).
    epsilon_low / epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high], both >= 0 (an
        epsilon_low >= 1 leaves no lower bound); epsilon_high defaults to epsilon_low. For cispo,
        epsilon_high is the absolute cap of the ratio.
    delta: optional upper bound of the un-clipped ratio (two-sided clip), any finite number.
    clip_ratio_c: optional dual-clip constant c > 1 (verl clip_ratio_c).
    beta: KL coefficient; beta > 0 needs logp_ref.
    kl_estimator: "k1", "k2" or "k3" (default, TRL and verl low_var_kl).
    use_bias_correction_kl: multiply the KL by the un-clipped importance ratio (TRL).
    importance_sampling_level: "token" or "sequence" (GSPO).
    entropy_coef: coefficient of the entropy bonus (needs the entropy).
    entropy_agg: how the bonus is normalized, "loss_type" (as the policy term, verl) or "token_mean"
        (the mean over the tokens the policy term keeps, whatever the loss type: TRL).
    max_completion_length: normalizer of dr_grpo (required there).
    num_items_in_batch: normalizer of dapo / cispo (default: the local count of unmasked tokens);
        divided by the world size under torch.distributed, as TRL and Liger do.
    sapo_temperature_pos / sapo_temperature_neg: SAPO gate temperatures for A > 0 / A <= 0.
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma weight for A >= 0 / A < 0.
    off_policy_mask_threshold: when set, the policy term of a sequence with A < 0 whose mean
        logp_sampling - logp exceeds it is dropped (DeepSeek-V3.2's off-policy sequence mask).
    top_entropy_quantile: in [0, 1]; below 1 the policy term keeps only the tokens whose entropy is
        at least the 1 - top_entropy_quantile quantile of the batch's (every process's) unmasked
        entropies (needs the entropy).
    """

    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    clip_ratio_c: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = False
    importance_sampling_level: str = "token"
    entropy_coef: float = 0.0
    max_completion_length: Optional[int] = None
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: Optional[float] = None
    top_entropy_quantile: float = 1.0
    entropy_agg: str = "loss_type"

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}"
            )
        if self.entropy_agg not in ENTROPY_AGGS:
            raise ValueError(f"entropy_agg must be one of {ENTROPY_AGGS}, got {self.entropy_agg!r}")
        # Numbers are stored as Python floats (numpy scalars and ints accepted), so every backend and the
        # custom ops' schemas see one type.
        self._set("epsilon_low", _check_number("epsilon_low", self.epsilon_low, minimum=0.0))
        if self.epsilon_high is None:
            self._set("epsilon_high", self.epsilon_low)
        self._set("epsilon_high", _check_number("epsilon_high", self.epsilon_high, minimum=0.0))
        if self.delta is not None:
            self._set("delta", _check_number("delta", self.delta))
        if self.clip_ratio_c is not None:
            self._set("clip_ratio_c", _check_number("clip_ratio_c", self.clip_ratio_c))
            if self.clip_ratio_c <= 1.0:
                raise ValueError(f"clip_ratio_c must be > 1 when set, got {self.clip_ratio_c}")
        self._set("beta", _check_number("beta", self.beta, minimum=0.0))
        self._set("entropy_coef", _check_number("entropy_coef", self.entropy_coef))
        self._set("sapo_temperature_pos",
                  _check_number("sapo_temperature_pos", self.sapo_temperature_pos, minimum=0.0, strict=True))
        self._set("sapo_temperature_neg",
                  _check_number("sapo_temperature_neg", self.sapo_temperature_neg, minimum=0.0, strict=True))
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            self._set(name, _check_number(name, getattr(self, name)))
        if self.off_policy_mask_threshold is not None:
            self._set("off_policy_mask_threshold",
                      _check_number("off_policy_mask_threshold", self.off_policy_mask_threshold))
        self._set("top_entropy_quantile", _check_number("top_entropy_quantile", self.top_entropy_quantile, minimum=0.0))
        if self.top_entropy_quantile > 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be a bool, got {type(self.use_bias_correction_kl).__name__}")
        if self.loss_type == "dr_grpo":
            if self.max_completion_length is None:
                raise ValueError("loss_type='dr_grpo' needs max_completion_length (its normalizer)")
        if self.max_completion_length is not None:
            value = self.max_completion_length
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"max_completion_length must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"max_completion_length must be >= 1, got {value}")
            self._set("max_completion_length", int(value))
        n = self.num_items_in_batch
        if n is not None:
            if isinstance(n, torch.Tensor):
                # Its value (finite, > 0) is checked where the loss reads it, inside the op: reading a
                # GPU tensor here would synchronize the host at every call (validate.num_items_value).
                if n.numel() != 1 or n.dim() > 1:
                    raise ValueError(f"num_items_in_batch must be a scalar (a 0-dim or one-element tensor), got a "
                                     f"tensor of shape {tuple(n.shape)}")
                if n.dtype == torch.bool or n.is_complex():
                    raise TypeError(f"num_items_in_batch must be a real number, got a tensor of dtype {n.dtype}")
            else:
                self._set("num_items_in_batch",
                          _check_number("num_items_in_batch", n, minimum=0.0, strict=True))

    def _set(self, name, value):
        object.__setattr__(self, name, value)

    @property
    def is_clip_family(self) -> bool:
        return self.loss_type in CLIP_FAMILY

    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"

    @property
    def entropy_masked(self) -> bool:
        """Whether the policy term keeps only the high-entropy tokens (top_entropy_quantile < 1)."""
        return self.top_entropy_quantile < 1.0

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss itself reads the entropy (the bonus or the high-entropy mask)."""
        return self.entropy_coef != 0 or self.entropy_masked

    @classmethod
    def from_kwargs(cls, **options) -> "GRPOOptions":
        """Builds options from keyword arguments, refusing unknown names with a TypeError."""
        unknown = sorted(set(options) - set(OPTION_FIELDS))
        if unknown:
            raise TypeError(f"unknown GRPO option(s) {unknown}; known options: {sorted(OPTION_FIELDS)}")
        return cls(**options)

    def as_dict(self):
        """The options as {field: value}, in field order (what the fused ops pass on)."""
        return {name: getattr(self, name) for name in OPTION_FIELDS}


# The field names, computed once: torch.compile traces the ops' Python code, and dataclasses.fields()
# inside a traced function is not supported by dynamo, while a tuple of names is.
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(GRPOOptions))


def _check_number(name, value, minimum=None, strict=False) -> float:
    """value as a float: a real number (Python or numpy scalar, not a bool), finite, above `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {value}")
    return value


# (index, size) of the running op's tensor-parallel group: its ranks hold the same tokens (a
# vocab-parallel head's shards), so they are one data-parallel replica, not several. Set by
# :func:`replicated`.
_REPLICATED = contextvars.ContextVar("lvrpo_fast_replicated", default=None)


@contextlib.contextmanager
def replicated(index: int, size: int):
    """Within the block, this process is the index-th of `size` processes holding the same tokens (the
    ranks of a tensor-parallel group, which the vocab-parallel ops set from their partition): they count
    as one process in :func:`world_size` (dapo / cispo / vespo's num_items_in_batch is divided by the
    number of data-parallel replicas) and in :func:`entropy_threshold` (their entropies are gathered
    once, from index 0), so a vocab-parallel step has the numbers of the same step with the whole head."""
    token = _REPLICATED.set((int(index), int(size)))
    try:
        yield
    finally:
        _REPLICATED.reset(token)


def _processes() -> int:
    """The torch.distributed world size, 1 when it is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def world_size() -> int:
    """The number of processes holding different tokens (dapo / cispo / vespo normalizer): the
    torch.distributed world size (1 when it is not initialized) over the size of the tensor-parallel
    group a vocab-parallel op runs in (:func:`replicated`)."""
    world, group = _processes(), _REPLICATED.get()
    if group is None or group[1] <= 1:
        return world
    if world % group[1]:
        raise ValueError(f"the world size {world} is not a multiple of the tensor-parallel group's size {group[1]}: "
                         "the data-parallel replicas that num_items_in_batch and top_entropy_quantile count are "
                         "not defined")
    return world // group[1]


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """The high-entropy mask's threshold (docs/math.md section 4): the 1 - top_entropy_quantile quantile
    (torch.quantile's linear interpolation) of the unmasked entropies of the batch, gathered from every
    process when torch.distributed is initialized, as TRL 1.16 does, the ranks of a tensor-parallel group
    counted once (:func:`replicated`). Every process must call it.

    entropy [B, T] float, mask [B, T] bool -> a 0-dim tensor of entropy's dtype on its device, +inf when
    no process has an unmasked token (the mask then keeps nothing)."""
    values = entropy.detach()[mask]
    group = _REPLICATED.get()
    if group is not None and group[0] != 0:
        values = values[:0]  # a replica of index 0's tokens: gathered once, from there
    if _processes() > 1:
        # Processes hold different token counts: all_gather needs equal shapes, so each pads its
        # values to the longest and the counts say which entries are real.
        count = torch.tensor([values.numel()], device=values.device)
        counts = [torch.zeros_like(count) for _ in range(_processes())]
        dist.all_gather(counts, count)
        longest = int(max(c.item() for c in counts))
        padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
        padded[: values.numel()] = values
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded)
        values = torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)])
    if values.numel() == 0:
        return torch.full((), float("inf"), dtype=entropy.dtype, device=entropy.device)
    return torch.quantile(values, 1.0 - top_entropy_quantile)
