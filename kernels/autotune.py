"""Every launch configuration of every Triton kernel of lvrpo_fast, in one place.

The log-prob kernels (kernels/logprobs.py) stream a [C, V] tile and have three regimes, chosen per
launch:
    TRITON_INTERPRET=1     INTERPRETER: a small block, so the CPU test suite stays fast and the
                           V loop still runs several iterations with a ragged last block.
    LVRPO_AUTOTUNE=1       triton.autotune over SEARCH[kernel] (GPU only), keyed on V and the
                           entropy flag; the tuning runs once per key and process.
    otherwise (default)    DEFAULTS[kernel]: one fixed config, no tuning cost on the first call.

The defaults below were chosen by reasoning about an H100/H200 and a 151,936-token vocabulary, not
by measurement: LVRPO_AUTOTUNE=1 is the way to check them on a given GPU.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import triton


@dataclass(frozen=True)
class LaunchConfig:
    """block_v: logits per row handled per loop iteration (a power of two, as tl.arange needs)."""

    block_v: int
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> Dict[str, int]:
        return {"BLOCK_V": self.block_v, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def triton_config(self) -> "triton.Config":
        return triton.Config({"BLOCK_V": self.block_v}, num_warps=self.num_warps, num_stages=self.num_stages)


# Both kernels run one program per row (token) and stream the row's V logits through a loop, so a
# config is the width of one step of that loop and the threads that share it.
#
# logits_stats: 4096 logits per step with 8 warps is 16 logits per thread: two 16-byte vector loads
#   for bf16/fp16 (four for fp32; the sm_90 PTX shows ld.global.v4 when rows are 16-byte aligned,
#   i.e. V a multiple of 8 for bf16 as 151,936 is), enough independent loads in flight per thread
#   to cover DRAM latency. Each step ends with a block-wide max (a shared-memory exchange and a
#   barrier); 4096 keeps that to 38 steps for a 151,936-token row, and the per-lane sums (two
#   vectors of 16 fp32 registers per thread) leave room for several resident rows per SM, which is
#   what hides memory latency here.
# logits_grad: the same width and warps for the same vector loads and stores; the loop has no
#   reduction, only one read and one in-place write per logit, so the width matters less.
# num_stages: Triton's software pipeliner stages loads that feed tl.dot or tensor descriptors, not
#   these streaming loops: the sm_90 PTX of the statistics kernel is identical for 1, 2 and 4
#   stages (checked with triton 3.9). 1 says so; the search keeps one deeper variant in case a
#   Triton version starts pipelining them.
DEFAULTS: Dict[str, LaunchConfig] = {
    "logits_stats": LaunchConfig(block_v=4096, num_warps=8, num_stages=1),
    "logits_grad": LaunchConfig(block_v=4096, num_warps=8, num_stages=1),
}

# Under the interpreter every tl op costs a few hundred microseconds of Python per program whatever
# its width, so time grows with the number of loop steps (measured on 2 CPU cores, 4099 logits per
# row, statistics + gradient: 160 ms per row with 256, 90 ms with 512, 55 ms with 1024). 512 keeps
# the tests' odd vocabularies multi-step with a ragged, masked last block (V = 1023: 512 + 511;
# V = 4099: 8 x 512 + 3) at about half the cost of 256. Warps and stages are ignored there.
INTERPRETER = LaunchConfig(block_v=512, num_warps=1, num_stages=1)

# The autotuning search: around the default, wider and narrower steps with the warps that keep 8 to
# 16 logits per thread, and one deeper pipeline.
_SEARCH = (
    LaunchConfig(1024, 4, 1),
    LaunchConfig(2048, 4, 1),
    LaunchConfig(2048, 8, 1),
    LaunchConfig(4096, 8, 1),
    LaunchConfig(4096, 8, 3),
    LaunchConfig(4096, 16, 1),
    LaunchConfig(8192, 16, 1),
    LaunchConfig(8192, 32, 1),
)
SEARCH: Dict[str, Tuple[LaunchConfig, ...]] = {"logits_stats": _SEARCH, "logits_grad": _SEARCH}

# The argument names that key the tuning cache of each kernel (the dtype of tensor arguments is
# added by triton.autotune itself).
KEYS: Dict[str, Tuple[str, ...]] = {
    "logits_stats": ("V", "WITH_ENTROPY"),
    "logits_grad": ("V", "HAS_ENTROPY"),
}

# Kernels that overwrite an input in place: autotuning launches each config on the same arguments,
# so the input must be restored between trials (at the cost of one copy of it while tuning).
RESTORE: Dict[str, Tuple[str, ...]] = {"logits_grad": ("logits_ptr",)}

_tuned: Dict[str, Callable] = {}


# --- the per-sequence GRPO loss (kernels/grpo_loss.py) --------------------------------------------------
# Sequences are short (T ~ 1e2..1e4) and the work per token is a few dozen flops on ~7 loaded values: a
# block of up to 1024 tokens keeps each program's loop short. Warps scale with the block so that each
# thread holds 4 tokens of each of the 9 accumulators: compiled for sm_90 (triton 3.9, cuobjdump
# -res-usage, the everything-on GSPO variant) that is 106 registers and no spills at 1024 tokens / 8
# warps, against 230 registers at 4 warps.
GRPO_LOSS_MAX_BLOCK_T = 1024
GRPO_LOSS_TOKENS_PER_THREAD = 4
GRPO_LOSS_MAX_WARPS = 8


def grpo_loss_config(T: int) -> Tuple[int, int]:
    """(BLOCK_T, num_warps) of the GRPO loss kernel for sequences of T tokens."""
    block = min(triton.next_power_of_2(max(T, 1)), GRPO_LOSS_MAX_BLOCK_T)
    return block, max(1, min(GRPO_LOSS_MAX_WARPS, block // (32 * GRPO_LOSS_TOKENS_PER_THREAD)))


# --- group advantages (kernels/advantages.py) -------------------------------------------------------------
# Rewards are few (B ~ 1e2..1e4): one program per group with a block of the group's size rounded up to
# a power of two (at most 1024, the loops cover larger groups), and one 1024-wide program for the batch
# standard deviation. Default warps (4): the work is negligible next to the launch.
ADVANTAGES_MAX_BLOCK_GROUP = 1024
ADVANTAGES_BLOCK_BATCH = 1024


def advantages_block(group_size: int) -> int:
    return min(triton.next_power_of_2(group_size), ADVANTAGES_MAX_BLOCK_GROUP)


# --- process-reward advantages (kernels/process_advantages.py) ---------------------------------------------
# Steps are few per group (tens): a block of 64 steps per loop iteration in the normalizing kernel. The
# token kernel writes a block of up to 1024 tokens of one sequence per program (T ~ 1e2..1e4), looping
# over the sequence's steps; default warps, the work per token being one compare-and-add per step.
PROCESS_ADVANTAGES_BLOCK_STEPS = 64
PROCESS_ADVANTAGES_MAX_BLOCK_T = 1024


def process_advantages_block_t(T: int) -> int:
    return min(triton.next_power_of_2(max(T, 1)), PROCESS_ADVANTAGES_MAX_BLOCK_T)


# --- in-place scaling of the fused loss's stored gradients (kernels/linear_grpo_loss.py) ------------------
# A pure streaming kernel over [V, D] (1.2 GB in bf16 at V = 151936, D = 4096): 4096 elements per program
# and 8 warps give 16 contiguous elements (two 16-byte vectors in bf16) per thread, as the log-prob
# kernels. When the factor is exactly 1 each program returns after one scalar load.
SCALE = LaunchConfig(block_v=4096, num_warps=8, num_stages=1)
SCALE_INTERPRETER = LaunchConfig(block_v=1 << 16, num_warps=1, num_stages=1)


def scale_config() -> LaunchConfig:
    return SCALE_INTERPRETER if interpreted() else SCALE


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotuning() -> bool:
    """LVRPO_AUTOTUNE=1 asks for full autotuning; never under the interpreter (nothing to time)."""
    return os.environ.get("LVRPO_AUTOTUNE") == "1" and not interpreted()


def config_for(name: str) -> LaunchConfig:
    """The fixed config a launch of kernel `name` uses when not autotuning."""
    if name not in DEFAULTS:
        raise KeyError(f"no launch configuration for kernel {name!r}; known: {sorted(DEFAULTS)}")
    return INTERPRETER if interpreted() else DEFAULTS[name]


def kernel_and_meta(name: str, kernel, tune: bool = True) -> Tuple[Callable, Dict[str, int]]:
    """Returns (launchable kernel, meta keyword arguments) for the @triton.jit `kernel` named `name`.

    Launch as ``launchable[grid](*args, **constexpr_flags, **meta)``: meta is empty when autotuning
    (the autotuner supplies BLOCK_V, num_warps and num_stages), the fixed config otherwise. The
    environment is read at each launch, so a test or a script may switch regimes at run time.
    tune=False: the fixed config even when autotuning (the batch-invariant mode's launches).
    """
    if tune and autotuning():
        if name not in _tuned:
            _tuned[name] = triton.autotune(
                configs=[c.triton_config() for c in SEARCH[name]],
                key=list(KEYS[name]),
                restore_value=list(RESTORE.get(name, ())),
            )(kernel)
        return _tuned[name], {}
    return kernel, config_for(name).launch_kwargs()


def on_device(tensor: "torch.Tensor"):
    """Launch on the tensor's GPU, not the current one (a model on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
