"""lvrpo_fast: fused GRPO inner-loop kernels (log-probabilities, advantages, the clipped KL-regularized loss).

Public API (each takes `backend=` "auto" | "triton" | "cpp" | "reference"; see lvrpo_fast.dispatch):
    fused_linear_logprobs   hidden states + LM head -> per-token log-probabilities (and entropy)
    group_advantages        rewards -> group-normalized advantages
    process_advantages      step-wise (process) rewards -> per-token advantages [B, T]
    grpo_loss               per-token log-probabilities -> (loss, metrics)
    fused_linear_grpo_loss  hidden states + LM head -> (loss, metrics), gradients w.r.t. both
    FusedLinearGRPOLoss     the same as an nn.Module, with Liger-Kernel's interface
    GRPOOptions             the loss options, validated
    SequenceStats           the per-sequence statistics behind the metrics (return_sequence_stats=True)
    VocabParallel           a head split over the vocabulary across tensor-parallel ranks (vocab_parallel=)
The eager PyTorch reference of the same math is lvrpo_fast.reference; the math is docs/math.md and
the layers of the package are described in docs/architecture.md.
"""
from . import reference
from .advantages import group_advantages
from .contract import SequenceStats
from .grpo_loss import grpo_loss
from .linear_grpo_loss import fused_linear_grpo_loss
from .logprobs import fused_linear_logprobs
from .modules import FusedLinearGRPOLoss
from .options import GRPOOptions
from .process_advantages import process_advantages
from .vocab_parallel import VocabParallel

__version__ = "0.1.0"

__all__ = [
    "fused_linear_logprobs",
    "group_advantages",
    "grpo_loss",
    "fused_linear_grpo_loss",
    "FusedLinearGRPOLoss",
    "GRPOOptions",
    "process_advantages",
    "SequenceStats",
    "VocabParallel",
    "reference",
]
