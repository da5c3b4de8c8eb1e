"""How many rows of logits the kernel backends hold at once.

The fused ops never allocate the full [N, V] logits: they walk the rows in chunks of C rows and hold
one [C, V] tile of logits (in the input dtype; its gradient overwrites it in place). C is chosen so
that the tile takes at most LVRPO_CHUNK_BYTES bytes (default 512 MiB on CUDA, which keeps the peak
extra memory of the 151,936-token vocabularies under 1 GB, and 64 MiB on the CPU, where a smaller
tile stays closer to the caches and costs nothing in BLAS efficiency).
"""
from __future__ import annotations

import os

import torch

DEFAULT_CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 64 << 20}


def chunk_bytes(device: torch.device) -> int:
    value = os.environ.get("LVRPO_CHUNK_BYTES")
    if value is not None:
        try:
            parsed = int(value)
        except ValueError:
            raise ValueError(f"LVRPO_CHUNK_BYTES must be an integer number of bytes, got {value!r}") from None
        if parsed <= 0:
            raise ValueError(f"LVRPO_CHUNK_BYTES must be > 0, got {parsed}")
        return parsed
    return DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])


def rows_per_chunk(vocab_size: int, element_size: int, device: torch.device, multiple: int = 1) -> int:
    """Rows per chunk: a multiple of `multiple` (whole sequences of that length), at least one multiple."""
    rows = chunk_bytes(device) // max(1, vocab_size * element_size)
    return max(multiple, rows // multiple * multiple)


def logits_tile(rows: int, vocab_size: int, like: torch.Tensor) -> torch.Tensor:
    """The one [rows, V] buffer an op reuses for every chunk. On the CPU a fresh 64 MiB tensor per
    chunk is a fresh mmap, paying page faults and zeroing each time (measured: 61 ms to allocate
    and fill a tile vs 26 ms to refill one); CUDA's caching allocator would hide that, but one
    buffer also makes the peak plain to read."""
    return torch.empty(rows, vocab_size, dtype=like.dtype, device=like.device)


def head_into(tile: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Writes hidden [C, D] @ weight[V, D]^T (+ bias) into the first C rows of tile; returns them."""
    out = tile[: hidden.shape[0]]
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)
