"""The benchmarks' shape sets and the issues' acceptance targets.

Shape set: LVRPO_BENCH_SHAPES = "tiny" | "cpu" | "gpu" (choose_shape_set says which by default).
"tiny": odd sizes, tens of tokens, fp32 (the CI smoke run; Triton interpreted on a CPU); "cpu": a few
minutes on 2 cores, fp32; "gpu": the LM heads of real models, bf16.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

SHAPE_SETS = ("tiny", "cpu", "gpu")
GB = 1e9


def truthy(value: Optional[str]) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Shape:
    """N tokens (N = B * T for the batch ops), head D x V, sequence length T, group size G."""

    N: int
    D: Optional[int] = None
    V: Optional[int] = None
    T: Optional[int] = None
    G: Optional[int] = None

    @property
    def B(self) -> int:
        return self.N // self.T if self.T else self.N

    @property
    def id(self) -> str:
        parts = [f"N{self.N}"]
        parts += [f"{k}{v}" for k, v in (("D", self.D), ("V", self.V), ("T", self.T), ("G", self.G)) if v]
        return "-".join(parts)


GPU_HEADS = ((1536, 151936), (3584, 152064), (4096, 128256))  # Qwen2.5-1.5B, Qwen2.5-7B, Llama-3-8B
GPU_TOKENS = (2048, 8192, 16384)
GPU_HEADLINE = Shape(8192, 4096, 151936)
GPU_T = 1024


def _gpu_linear(T=None):
    shapes = [Shape(n, d, v, T) for d, v in GPU_HEADS for n in GPU_TOKENS]
    return shapes + [Shape(GPU_HEADLINE.N, GPU_HEADLINE.D, GPU_HEADLINE.V, T)]


SHAPES: Dict[str, Dict[str, list]] = {
    # Odd sizes on purpose (V = 515: a ragged last block), and few rows: the interpreted Triton
    # kernels cost tens of milliseconds per row.
    "tiny": {
        "logprobs": [Shape(13, 40, 515), Shape(24, 40, 515)],
        "linear_grpo_loss": [Shape(15, 40, 515, 5), Shape(24, 40, 515, 6)],
        "linear_grpo_loss_full": [Shape(15, 40, 515, 5)],
        "linear_grpo_loss_entropy_mask": [Shape(15, 40, 515, 5)],
        "grpo_loss": [Shape(15, T=5), Shape(24, T=6)],
        "advantages": [Shape(16, G=4), Shape(48, G=4)],
        "process_advantages": [Shape(8 * 9, T=9, G=4), Shape(6 * 37, T=37, G=3)],
        "linear_grpo_loss_per_token": [Shape(15, 40, 515, 5)],
        "linear_grpo_loss_packed": [Shape(15, 40, 515, 5)],
    },
    # A few minutes on 2 cores. N = 2048, D = 512, V = 32000, fp32 is issue 5's acceptance shape.
    "cpu": {
        "logprobs": [Shape(128, 512, 32000), Shape(512, 512, 32000)],
        "linear_grpo_loss": [Shape(512, 512, 32000, 256), Shape(2048, 512, 32000, 256)],
        "linear_grpo_loss_full": [Shape(2048, 512, 32000, 256)],
        "linear_grpo_loss_entropy_mask": [Shape(2048, 512, 32000, 256)],
        "grpo_loss": [Shape(2048, T=256), Shape(65536, T=256)],
        "advantages": [Shape(1024, G=8), Shape(65536, G=8)],
        "process_advantages": [Shape(1024 * 256, T=256, G=8), Shape(4096 * 1024, T=1024, G=8)],
        "linear_grpo_loss_per_token": [Shape(2048, 512, 32000, 256)],
        "linear_grpo_loss_packed": [Shape(2048, 512, 32000, 256)],
    },
    "gpu": {
        "logprobs": _gpu_linear(),
        "linear_grpo_loss": _gpu_linear(GPU_T),
        "linear_grpo_loss_full": [Shape(GPU_HEADLINE.N, GPU_HEADLINE.D, GPU_HEADLINE.V, GPU_T)],
        "linear_grpo_loss_entropy_mask": [Shape(GPU_HEADLINE.N, GPU_HEADLINE.D, GPU_HEADLINE.V, GPU_T)],
        "grpo_loss": [Shape(n, T=GPU_T) for n in GPU_TOKENS + (131072,)],
        "advantages": [Shape(b, G=16) for b in (512, 8192, 131072)],
        "process_advantages": [Shape(b * GPU_T, T=GPU_T, G=16) for b in (512, 8192)],
        "linear_grpo_loss_per_token": [Shape(GPU_HEADLINE.N, GPU_HEADLINE.D, GPU_HEADLINE.V, GPU_T)],
        "linear_grpo_loss_packed": [Shape(GPU_HEADLINE.N, GPU_HEADLINE.D, GPU_HEADLINE.V, GPU_T)],
    },
}

DTYPES = {"tiny": torch.float32, "cpu": torch.float32, "gpu": torch.bfloat16}
# Issue 5's acceptance shape: the C++ fused loss against the eager reference.
ISSUE5_SHAPE = Shape(2048, 512, 32000, 256)


def _target(name, case, shape, dtype, impl, *checks):
    return {"name": name, "case": case, "N": shape.N, "D": shape.D, "V": shape.V,
            "dtype": str(dtype).replace("torch.", ""), "impl": impl, "checks": list(checks)}


# The acceptance targets of the issues, judged in the terminal summary and by report.py
# (report.evaluate_targets) from the results of the run.
_LOSS_TARGETS = [
    {"metric": "speedup", "vs": "reference", "min": 1.5},
    {"metric": "speedup", "vs": "compiled"},
    {"metric": "speedup", "vs": "liger", "min": 3.0},
    {"metric": "memory_ratio", "vs": "reference", "max": 0.1},
    {"metric": "roofline_fraction", "min": 0.8},
]
TARGETS = {
    "cpu": [_target(f"issue 5{suffix}", f"linear_grpo_loss fwd+bwd{suffix}", ISSUE5_SHAPE, torch.float32, "cpp",
                    {"metric": "speedup", "vs": "reference", "min": 1.5},
                    {"metric": "memory_ratio", "vs": "reference", "max": 1 / 8})
            for suffix in ("", ", no padding")],
    "gpu": [
        _target("issue 3, forward only", "logprobs fwd", GPU_HEADLINE, torch.bfloat16, "triton",
                {"metric": "roofline_fraction", "min": 0.75}, {"metric": "peak_extra_bytes", "max": GB}),
        _target("issue 3, forward + backward", "logprobs fwd+bwd", GPU_HEADLINE, torch.bfloat16, "triton",
                {"metric": "roofline_fraction", "min": 0.70}, {"metric": "peak_extra_bytes", "max": GB}),
        _target("issue 4 / issue 9", "linear_grpo_loss fwd+bwd, no padding", GPU_HEADLINE, torch.bfloat16, "triton",
                *_LOSS_TARGETS),
        _target("issue 4, padded batch", "linear_grpo_loss fwd+bwd", GPU_HEADLINE, torch.bfloat16, "triton",
                *_LOSS_TARGETS),
    ],
}


def choose_shape_set(smoke: bool, has_cuda: bool) -> str:
    """LVRPO_BENCH_SHAPES, else "tiny" for a smoke run (CI, --benchmark-disable), else "gpu" with a CUDA
    device and "cpu" without. Raises ValueError for an unknown set or the gpu set without CUDA."""
    chosen = os.environ.get("LVRPO_BENCH_SHAPES")
    if chosen is None:
        chosen = "tiny" if smoke else ("gpu" if has_cuda else "cpu")
    if chosen not in SHAPE_SETS:
        raise ValueError(f"LVRPO_BENCH_SHAPES must be one of {SHAPE_SETS}, got {chosen!r}")
    if chosen == "gpu" and not has_cuda:
        raise ValueError("LVRPO_BENCH_SHAPES=gpu needs a CUDA device; torch sees none")
    return chosen
