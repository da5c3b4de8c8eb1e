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


# Batch-invariant mode (issue 19): a row's logits, hence its log-probability and entropy, the same bits
# whatever else is in the call.
#
# BLAS libraries choose a kernel, a blocking and sometimes a split of the reduction over D by the shape
# of the call, so the head's product for one row moves in its last bits when the chunk's row count
# moves: with the torch 2.13 CPU wheel's MKL on the AMD EPYC of the test machine, a row computed in a
# 1-row call differs from the same row in a 2- or 3-row call, which differs from calls of 4 rows or
# more; cuBLAS switches kernels and split-K by M. What holds for every BLAS: one call shape gives one
# kernel and one reduction order, and each row of that call gets the same treatment wherever it sits
# (measured on that MKL for fp32, bf16 and fp16, calls of 8 to 256 rows, every position, 1 and 2
# threads, output and input rows at any alignment). So in this mode every row's logits are those of
# an [R, D] @ [D, V] GEMM with R fixed per device (INVARIANT_TILE_ROWS): the live rows of the whole
# plan are taken R at a time (on the CPU read in place where they are consecutive rows of hidden, else
# gathered), the call's last tile padded with zero rows. A tile that runs past a chunk's last row is
# kept for the next chunk (moved to the front of the buffer), so chunks of whole sequences of any
# length waste nothing; only the last tile is padded.
#
# How the tiles run (head_tiles_into): on a GPU one cuBLAS call per tile. On the CPU one call per tile
# packs W again each time (512 rows as 4 calls of 128: ~1.3-1.6x one call of 512 on 2 loaded cores),
# so the k tiles a chunk needs go through one strided batched GEMM (torch.bmm, W broadcast over the
# batch), which MKL runs at ~1.1x one call and which gives every item the bits of the single [R, D]
# call whatever k (measured for fp32, bf16 and fp16, k = 1 to 17; tests/test_batch_invariant.py checks
# it on every machine the suite runs on); a single tile is a plain call. cuBLAS chooses batched kernels
# by the batch count too, so the GPU keeps single calls.
#
# R: a power of two, so a multiple of the rows of the usual micro-kernels (8, 16, 32) and of cuBLAS's
# tiles (64, 128), in case a BLAS treats a ragged last block of rows apart (this MKL does not: 48 and
# 96 rows gave every position the same bits too). 128 on the CPU: a 128-token call is unpadded, and
# batched tiles of 64 rows cost ~1.3x one call. 256 on a GPU: a call is 2 x 594 output tiles of 128 x
# 256 at V = 151,936 (9.0 waves on 132 SMs), large enough that streaming W per call stays hidden, and
# the padding is at most 255 rows per op call (benchmarks/README.md, "Batch-invariant mode").
INVARIANT_TILE_ROWS = {"cuda": 256, "cpu": 128}

# Vocab-parallel heads with a vocab_block (lvrpo_fast/vocab_parallel.py): for a token's bits not to
# depend on the tensor-parallel degree, the logits of a block of b vocabulary columns must not depend on
# the width of the GEMM that computed them (V at degree 1, V / t on a shard). BLAS libraries pick kernels
# by N too: this MKL gives columns of a narrow call (N = 4, 8 or 9) other bits than the same columns of
# a wide one (wide calls agree: N = 128 to 8000 gave the same bits), and cuBLAS picks kernels and split-K
# by N. So with a column block each block of columns is its own [R, D] x [D, b] GEMM (the last block of
# the vocabulary narrower, the same width at every degree; tests/test_batch_invariant.py checks the
# bits), into a contiguous scratch copied into its columns of the tile: on this MKL a GEMM written
# straight into the tile's columns (leading dimension V) took ~2x the time of the same GEMM into a
# contiguous output plus the copy ([512, 512] x [512, 4000] blocks of V = 32000, 864-976 against 479-536
# ms for all 8; one unblocked GEMM: 198-404 ms, the spread is the shared machine's load).


def invariant_tile_rows(device: torch.device) -> int:
    """R, the row count of every head GEMM in batch-invariant mode on `device`."""
    return INVARIANT_TILE_ROWS.get(device.type, INVARIANT_TILE_ROWS["cuda"])


def invariant_chunk_rows(rows: int, device: torch.device) -> int:
    """A chunk budget of `rows` rows as whole tiles of R rows (at least one): chunks of whole tiles never
    carry rows to the next one, and their buffer is the chunk itself. Only the speed and the memory
    depend on it; a row's bits do not."""
    tile = invariant_tile_rows(device)
    return max(tile, rows // tile * tile)


def head_tiles_into(out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias, tile_rows: int,
                    column_block: Optional[int] = None, scratch: Optional[torch.Tensor] = None) -> None:
    """out [k R, V] = rows [k R, D] @ weight [V, D]^T (+ bias [V]), each tile of R = tile_rows rows with
    the bits of that tile's own [R, D] @ [D, V] GEMM (see the note above); out contiguous.

    column_block b: the columns in blocks of b (the last one narrower), each block the bits of its own
    [R, D] @ [D, b] GEMM, computed into a contiguous [k R, b] scratch (at least k R b elements of out's
    dtype; a fresh one if None) and copied into its columns of out: a block's bits do not depend on V,
    the vocab-parallel shard's width (vocab_parallel.VocabParallel.vocab_block)."""
    V = weight.shape[0]
    if column_block is None or column_block >= V:
        _tiles_into(out, rows, weight, bias, tile_rows)
        return
    n = rows.shape[0]
    if scratch is None:
        scratch = out.new_empty(n * column_block)
    for first in range(0, V, column_block):
        end = min(first + column_block, V)
        block = scratch[:n * (end - first)].view(n, end - first)
        _tiles_into(block, rows, weight[first:end], None if bias is None else bias[first:end], tile_rows)
        out[:, first:end].copy_(block)


def _tiles_into(out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias, tile_rows: int) -> None:
    """head_tiles_into for the whole of weight's rows (no column blocks)."""
    k, D, V = rows.shape[0] // tile_rows, rows.shape[1], weight.shape[0]
    if rows.device.type == "cpu" and k > 1:
        tiles, w = rows.view(k, tile_rows, D), weight.t().unsqueeze(0).expand(k, D, V)
        if bias is None:
            torch.bmm(tiles, w, out=out.view(k, tile_rows, V))
        else:
            torch.baddbmm(bias, tiles, w, out=out.view(k, tile_rows, V))
        return
    for i in range(0, k * tile_rows, tile_rows):
        head_into(out[i:i + tile_rows], rows[i:i + tile_rows], weight, bias)


class Logits:
    """The LM head's logits of a plan's chunks, one chunk at a time, in one reused buffer.

    hidden [N, D] (the flattened rows the chunks index), weight [V, D], bias [V] | None; the chunks of
    one plan (row_chunks or sequence_chunks). :meth:`of` returns chunk c's logits [c.size, V] in the
    input dtype, a view the caller may overwrite in place (its gradient) until the next call. Chunks
    must be asked for in plan order, each once; chunks computing no row are skipped.

    Default: one GEMM per chunk on its rows, into the first rows of a [max chunk size, V] tile.
    column_block (batch_invariant only): each block of that many columns its own [R, D] @ [D, b] GEMM
    (head_tiles_into; the vocab-parallel heads' vocab_block), through a scratch of the buffer's rows x b.
    batch_invariant: every row's logits are those of an [R, D] @ [D, V] GEMM (see the note above), in a
    buffer of at most ceil(max chunk size / R) + 1 tiles of [R, V] (the chunk's own tiles when chunks
    are whole tiles, see invariant_chunk_rows), each tile at a multiple of R rows; on the CPU the tiles
    read hidden's rows in place where they are consecutive, else they are gathered into a staging buffer."""

    def __init__(self, chunks: List["Chunk"], hidden: torch.Tensor, weight: torch.Tensor, bias,
                 batch_invariant: bool, column_block: Optional[int] = None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.invariant = batch_invariant
        # A shard of one block (or less) is one GEMM of that width already: no blocks, no scratch.
        self.column_block = column_block if column_block is not None and column_block < weight.shape[0] else None
        self.scratch = None  # the column blocks' GEMM output, allocated at the first tile
        max_rows = max((c.size for c in chunks), default=0)
        if not batch_invariant:
            self.buffer = logits_tile(max_rows, weight.shape[0], weight)
            return
        self.rows = invariant_tile_rows(hidden.device)
        live = [c for c in chunks if c.size]
        self.plan = live
        # The plan's computed rows in plan order: the stream the fixed-shape tiles are cut from.
        self.order = (torch.cat([c.live if c.live is not None else
                                 torch.arange(c.start, c.end, device=hidden.device) for c in live])
                      if live else torch.empty(0, dtype=torch.long, device=hidden.device))
        # The buffer holds the tiles of a chunk's rows, the first one perhaps computed with the previous
        # chunk: replay the plan to size it (at most ceil(size / R) + 1 tiles; exactly the chunk when
        # chunks are whole tiles).
        capacity = self.staging_rows = position = computed = 0
        self.runs = []  # (stream index, row index, length) of the stream's runs of consecutive rows
        for c in live:
            if computed < position + c.size:
                count = -(-(position + c.size - computed) // self.rows) * self.rows
                self.staging_rows, computed = max(self.staging_rows, count), computed + count
            capacity = max(capacity, computed - position // self.rows * self.rows)
            if c.live is None:
                if self.runs and self.runs[-1][0] + self.runs[-1][2] == position and \
                        self.runs[-1][1] + self.runs[-1][2] == c.start:
                    self.runs[-1] = (self.runs[-1][0], self.runs[-1][1], self.runs[-1][2] + c.size)
                else:
                    self.runs.append((position, c.start, c.size))
            position += c.size
        self.buffer = logits_tile(capacity, weight.shape[0], weight)
        self.staging = None  # allocated when a tile must be gathered
        self.next = 0      # index in self.plan of the next chunk
        self.first = 0     # stream index of the buffer's row 0, a multiple of R
        self.computed = 0  # stream rows [0, computed) have been computed, a multiple of R
        self.position = 0  # stream index of the next chunk's first row

    def of(self, chunk: "Chunk", rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """chunk's logits [chunk.size, V]; rows = chunk.take(hidden) when the caller has them already."""
        if not self.invariant:
            return head_into(self.buffer, chunk.take(self.hidden) if rows is None else rows, self.weight, self.bias)
        if self.next >= len(self.plan) or chunk is not self.plan[self.next]:
            raise RuntimeError("Logits.of: chunks must be asked for in plan order, each once")
        self.next += 1
        R, start, end = self.rows, self.position, self.position + chunk.size
        # Tiles sit at multiples of R rows in the buffer, so every GEMM writes to a tile-aligned output.
        first = start // R * R
        if first > self.first:
            if self.computed > first:  # the tile holding `start`, computed with the previous chunk
                src = self.buffer[first - self.first:first - self.first + R]
                self.buffer[:R].copy_(src.clone() if first - self.first < R else src)  # no overlap
            self.first = first
        if self.computed < end:
            self._tiles(end)
        self.position = end
        return self.buffer[start - first:end - first]

    def _tiles(self, end: int) -> None:
        """Computes whole tiles of the stream's next rows, up to at least row `end`, into the buffer
        (zero rows past the stream's end)."""
        R, begin = self.rows, self.computed
        count = -(-(end - begin) // R) * R
        n = min(count, self.order.numel() - begin)
        rows = self._consecutive(begin, count) if n == count else None
        if rows is None:  # masked rows between, or the last tile's zero padding: gather into the staging
            if self.staging is None:
                self.staging = self.hidden.new_empty(self.staging_rows, self.hidden.shape[1])
            rows = self.staging[:count]
            # index_select(out=) is ~200x slower than a gather and a copy on the CPU (4 ms for 128 x 512).
            rows[:n].copy_(self.hidden.index_select(0, self.order[begin:begin + n]))
            if n < count:
                rows[n:].zero_()
        if self.column_block is not None and self.scratch is None:
            self.scratch = self.buffer.new_empty(self.buffer.shape[0] * self.column_block)
        head_tiles_into(self.buffer[begin - self.first:begin - self.first + count], rows, self.weight, self.bias, R,
                        self.column_block, self.scratch)
        self.computed += count

    def _consecutive(self, begin: int, count: int) -> Optional[torch.Tensor]:
        """hidden's rows of stream rows [begin, begin + count) as a view when they are consecutive rows
        of hidden (no copy: the unmasked case), else None. Only on the CPU, where the rows' alignment
        does not move MKL's bits (the note above); cuBLAS picks kernels by pointer alignment too, so a
        GPU tile always reads the staging buffer, whose tiles are aligned (the copy is C D s bytes)."""
        if self.hidden.device.type != "cpu":
            return None
        for stream, row, length in self.runs:
            if stream <= begin and begin + count <= stream + length:
                return self.hidden[row + begin - stream:row + begin - stream + count]
        return None


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
