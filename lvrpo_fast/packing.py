"""Packed sequences: B sequences laid end to end without padding, as flash-attn's varlen kernels, verl's
remove-padding path and other packed trainers hold them.

Sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1]) of the packed tensors (hidden [N, D], the
per-token vectors [N]), N = cu_seqlens[B] tokens in all; a repeated bound is an empty sequence.

The ops map a packed batch onto the padded one it stands for: sequence b's token t at position
(b, t) of a [B, T] batch, T the longest sequence, the positions past a sequence's end masked out. Only
the O(N) per-token vectors (targets, mask, log-probabilities, advantages...) are ever laid out that
way; the hidden states stay packed, and a chunk of whole sequences reads its rows of them in place
(:meth:`Packing.rows`). Every aggregation then sees exactly the padded batch: no normalizer of the loss
reads T (dr_grpo divides by max_completion_length, an option), so the result does not depend on it.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .chunking import Chunk


class Packing:
    """The layout of a packed batch (cu_seqlens checked by lvrpo_fast.validate.check_cu_seqlens).

    cu_seqlens [B + 1] int64 on the data's device; bounds: the same B + 1 ints on the host; max_len: T,
    the padded length (the longest sequence; 0 for a batch of empty sequences)."""

    def __init__(self, cu_seqlens: torch.Tensor, bounds: List[int]):
        self.cu_seqlens = cu_seqlens.to(torch.long)
        self.bounds = bounds
        self.batch = len(bounds) - 1
        self.total = bounds[-1]
        self.max_len = max((bounds[b + 1] - bounds[b] for b in range(self.batch)), default=0)
        lengths = self.cu_seqlens.diff()
        device = self.cu_seqlens.device
        sequence = torch.repeat_interleave(torch.arange(self.batch, device=device), lengths, output_size=self.total)
        # The padded position b * T + t of each packed row cu_seqlens[b] + t.
        self.index = (sequence * self.max_len + torch.arange(self.total, device=device)
                      - self.cu_seqlens[sequence])

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor) -> "Packing":
        """The layout of a checked cu_seqlens (one host sync to read its bounds)."""
        return cls(cu_seqlens, [int(x) for x in cu_seqlens.tolist()])

    @property
    def padded_shape(self):
        return (self.batch, self.max_len)

    def pad(self, packed: Optional[torch.Tensor], fill=0) -> Optional[torch.Tensor]:
        """packed [N, ...] -> [B, T, ...], `fill` past each sequence's end; differentiable (None stays None)."""
        if packed is None:
            return None
        out = packed.new_full((self.batch * self.max_len, *packed.shape[1:]), fill)
        return out.index_put((self.index,), packed).view(*self.padded_shape, *packed.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """padded [B, T, ...] -> packed [N, ...] (the inverse of :meth:`pad`)."""
        return padded.reshape(self.batch * self.max_len, *padded.shape[2:]).index_select(0, self.index)

    def rows(self, chunk: Chunk) -> Chunk:
        """The packed rows of a chunk of whole sequences of the padded [B, T] batch (sequence_chunks):
        the contiguous range of its sequences, read in place when every one of their tokens is computed,
        else the computed rows in the same order as the padded chunk's."""
        T = self.max_len
        start, end = self.bounds[chunk.start // T], self.bounds[chunk.end // T]
        if chunk.size == end - start:
            return Chunk(start, end, chunk.size, None)
        live = chunk.live
        return Chunk(start, end, chunk.size, self.cu_seqlens[live // T] + live % T)
