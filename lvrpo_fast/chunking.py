"""How many rows of logits the kernel backends hold at once.

The fused ops never allocate the full [N, V] logits: they walk the rows in chunks of C rows and hold
one [C, V] tile of logits (in the input dtype; its gradient overwrites it in place). C is chosen so
that the tile takes at most LVRPO_CHUNK_BYTES bytes (default 512 MiB on CUDA, which keeps the peak
extra memory of the 151,936-token vocabularies under 1 GB, and 64 MiB on the CPU, where a smaller
tile stays closer to the caches and costs nothing in BLAS efficiency).

Rows that a mask excludes (padding after a completion, prompt tokens) get log-probability 0 and no
gradient, so their logits are never needed: the chunk plans below list the *live* rows of each chunk,
the ops gather those rows of the hidden states (a [C, D] copy per chunk) and run the LM head on them
alone. With GRPO's variable completion lengths this skips the padding's share of the 2-6 N V D FLOPs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

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


# Rows per chunk on a GPU: filling whole waves of the gradient GEMM, not only the memory budget.
#
# Of the three GEMMs per chunk, two have huge outputs (the [C, V] logits, the [V, D] weight gradient)
# and keep every SM busy whatever C is. The third, grad_hidden [C, D] = dlogits [C, V] @ W [V, D], has
# a small output and a long K: cuBLAS covers [C, D] with output tiles (128 x 256 for its large-K bf16
# kernels on sm_90, the assumption here) and runs them in waves of one tile per SM. Its time goes by
# the number of waves, so a C whose tiles fill the last wave wastes nothing, and one that spills a
# few tiles into a new wave pays for a whole one: at D = 4096 on an H200 (132 SMs, 16 tile columns),
# C = 1766 (the 512 MiB budget at V = 151,936) makes 14 x 16 = 224 tiles, 1.70 waves run as 2
# (efficiency 0.85), while C = 1024 makes 128 tiles, 0.97 of one wave. The rule: among the multiples
# of 128 rows within the memory budget, take the one whose tiles fill their waves best, the largest
# of those within 1% of the best (fewer chunks). Whole-sequence chunks of the GRPO loss pack sequences
# up to that count. The prediction (benchmarks/README.md, "Chunk rows") is ~13% less grad_hidden time
# per row at the headline shape for the log-prob backward and padded GRPO batches, ~4% of the total,
# and nothing if cuBLAS splits K itself (stream-K): first light times the three GEMMs at C = 1024,
# 1536, 1766, 2048 and 3072 to settle it. On the CPU there are no waves: the budget alone decides.
WAVE_TILE_ROWS = 128
WAVE_TILE_COLS = 256
_SMS = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def wave_efficiency(rows: int, hidden_size: int, sms: int) -> float:
    """The fraction of the launched waves of the [rows, hidden_size] output GEMM that does work."""
    tiles = -(-rows // WAVE_TILE_ROWS) * -(-hidden_size // WAVE_TILE_COLS)
    return tiles / (-(-tiles // sms) * sms)


def wave_rows(max_rows: int, hidden_size: int, sms: int) -> int:
    """The chunk row count <= max_rows that fills the gradient GEMM's waves best (see the note above)."""
    if max_rows < WAVE_TILE_ROWS:
        return max_rows
    candidates = range(WAVE_TILE_ROWS, max_rows + 1, WAVE_TILE_ROWS)
    best = max(wave_efficiency(r, hidden_size, sms) for r in candidates)
    return max(r for r in candidates if wave_efficiency(r, hidden_size, sms) >= best - 0.01)


def rows_per_chunk(vocab_size: int, element_size: int, device: torch.device, hidden_size: Optional[int] = None) -> int:
    """Rows per chunk (at least 1): the memory budget's rows, on a GPU rounded to fill the gradient
    GEMM's waves when the hidden size is given (wave_rows)."""
    rows = max(1, chunk_bytes(device) // max(1, vocab_size * element_size))
    if device.type == "cuda" and hidden_size:
        rows = wave_rows(rows, hidden_size, _sm_count(device))
    return rows


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


def skips_rows(chunks: List["Chunk"], n_rows: int) -> bool:
    """Whether some of the n_rows rows is never computed (outputs must then be zero-initialized for it):
    a masked row, or every row when the plan is empty (all masked)."""
    return sum(c.size for c in chunks) < n_rows


class HeadGrads:
    """The gradients of the LM head's inputs, accumulated chunk by chunk (:meth:`add_`).

    grad_hidden [N, D] (rows a chunk computes are written, never accumulated; the other rows are 0),
    grad_weight [V, D] in weight's dtype and grad_bias [V] in float32 (sums over chunks); any of the
    three is None when that input needs no gradient. The first chunk *writes* the weight and bias
    gradients (a matmul with beta = 0) instead of adding to zeros: no zero-fill pass over [V, D]
    (1.2 GB of writes in bf16 at V = 151,936, D = 4,096) before the first chunk."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, need_h: bool, need_w: bool, need_b: bool,
                 chunks: List["Chunk"]):
        n_rows = hidden.shape[0] if hidden.dim() == 2 else hidden.shape[0] * hidden.shape[1]
        any_rows = any(c.size for c in chunks)
        self.hidden = None
        if need_h:
            self.hidden = (torch.zeros_like if skips_rows(chunks, n_rows) else torch.empty_like)(hidden)
        # Without a computed row the sums are 0; otherwise the first computed chunk writes them.
        make = torch.empty_like if any_rows else torch.zeros_like
        self.weight = make(weight) if need_w else None
        self.bias = None
        if need_b:
            self.bias = (torch.empty if any_rows else torch.zeros)(weight.shape[0], dtype=torch.float32,
                                                                    device=weight.device)
        self._first = True

    def add_(self, chunk: "Chunk", dlogits: torch.Tensor, hidden_rows: torch.Tensor, weight: torch.Tensor) -> None:
        """Takes one chunk's d(loss)/d(logits) [C, V] back through the LM head (4 C V D FLOPs):
        grad_hidden[chunk rows] = dlogits @ weight, grad_weight += dlogits^T @ hidden_rows,
        grad_bias += dlogits summed over rows. Chunks that compute no row must not be passed."""
        if self.hidden is not None:
            flat = self.hidden.view(-1, self.hidden.shape[-1])
            if chunk.live is None:
                torch.mm(dlogits, weight, out=flat[chunk.start:chunk.end])
            else:
                chunk.put_(flat, torch.mm(dlogits, weight))
        if self.weight is not None:
            if self._first:
                torch.mm(dlogits.t(), hidden_rows, out=self.weight)
            else:
                self.weight.addmm_(dlogits.t(), hidden_rows)
        if self.bias is not None:
            if self._first:
                torch.sum(dlogits, 0, dtype=torch.float32, out=self.bias)
            else:
                self.bias += dlogits.sum(0, dtype=torch.float32)
        self._first = False

    def result(self, bias: Optional[torch.Tensor]):
        """(grad_hidden, grad_weight, grad_bias in bias's dtype), None where not needed."""
        grad_bias = None if self.bias is None else self.bias.to(bias.dtype)
        return self.hidden, self.weight, grad_bias


@dataclass(frozen=True)
class Chunk:
    """Rows [start, end) of a flattened [N, ...] batch, of which `size` are computed: all of them when
    `live` is None, else the rows whose absolute indices `live` (int64, ascending) holds."""
    start: int
    end: int
    size: int
    live: Optional[torch.Tensor] = None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The computed rows of t [N, ...]: a view when all rows are live, else a gathered copy."""
        return t[self.start:self.end] if self.live is None else t.index_select(0, self.live)

    def put_(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst[computed rows] = src (dst [N, ...]); the other rows of dst are left as they are."""
        if self.live is None:
            dst[self.start:self.end] = src
        else:
            dst.index_copy_(0, self.live, src)

    def relative(self) -> "Chunk":
        """The same rows indexed from the chunk's start: take / put_ on chunk-local tensors [end - start, ...]."""
        live = None if self.live is None else self.live - self.start
        return Chunk(0, self.end - self.start, self.size, live)


def row_chunks(n_rows: int, budget: int, mask: Optional[torch.Tensor]) -> List[Chunk]:
    """Chunks of at most `budget` computed rows over n_rows rows; with a mask [n_rows] bool, only its
    true rows are computed (one host sync to find them)."""
    live = None
    if mask is not None:
        live = mask.nonzero().squeeze(1)
        if live.numel() == n_rows:
            live = None
    if live is None:
        return [Chunk(s, min(s + budget, n_rows), min(s + budget, n_rows) - s) for s in range(0, n_rows, budget)]
    n_live = live.numel()
    firsts = list(range(0, n_live, budget))
    lasts = [min(i + budget, n_live) - 1 for i in firsts]
    # Only each chunk's first and last row index come to the host, not all of them.
    bounds = live[torch.tensor(firsts + lasts, dtype=torch.long, device=live.device)].tolist() if firsts else []
    return [Chunk(bounds[k], bounds[len(firsts) + k] + 1, last - first + 1, live[first:last + 1])
            for k, (first, last) in enumerate(zip(firsts, lasts))]


def sequence_chunks(mask: torch.Tensor, budget: int) -> List[Chunk]:
    """Chunks of whole sequences of mask [B, T] bool, each with at most `budget` true (computed) rows
    or a single sequence; row indices are those of the flattened [B * T] batch (one host sync)."""
    B, T = mask.shape
    counts = mask.sum(1).tolist()
    padded = sum(counts) < B * T
    live = mask.reshape(-1).nonzero().squeeze(1) if padded else None
    chunks, s0, offset = [], 0, 0
    while s0 < B:
        s1, size = s0 + 1, counts[s0]
        while s1 < B and size + counts[s1] <= budget:
            size += counts[s1]
            s1 += 1
        full = size == (s1 - s0) * T
        chunks.append(Chunk(s0 * T, s1 * T, size, None if full else live[offset:offset + size]))
        s0, offset = s1, offset + size
    return chunks
