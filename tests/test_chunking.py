"""lvrpo_fast.chunking: which rows each chunk of the fused ops computes.

The plans decide which rows of hidden reach the LM head; a wrong plan drops or repeats tokens, so
the plans are checked here on their own, against a plain Python recomputation, on random masks."""
import pytest
import torch

from lvrpo_fast.chunking import row_chunks, sequence_chunks


def _rows(chunks, n):
    """Every computed row index, in order, and the per-chunk row lists."""
    per_chunk = []
    for c in chunks:
        rows = list(range(c.start, c.end)) if c.live is None else c.live.tolist()
        assert len(rows) == c.size
        assert all(c.start <= r < c.end for r in rows)
        per_chunk.append(rows)
    return [r for rows in per_chunk for r in rows], per_chunk


@pytest.mark.parametrize("n,budget", [(0, 3), (1, 1), (13, 4), (13, 13), (13, 100)])
@pytest.mark.parametrize("density", [None, 0.0, 0.4, 1.0])
def test_row_chunks_cover_exactly_the_unmasked_rows(n, budget, density):
    gen = torch.Generator().manual_seed(n * 1000 + budget)
    mask = None if density is None else torch.rand(n, generator=gen) < density
    chunks = row_chunks(n, budget, mask)
    rows, per_chunk = _rows(chunks, n)
    expected = list(range(n)) if mask is None else mask.nonzero().squeeze(1).tolist()
    assert rows == expected
    assert all(0 < len(r) <= budget for r in per_chunk)
    if mask is None or bool(mask.all()):
        assert all(c.live is None for c in chunks)  # nothing to skip: views, no gathers


@pytest.mark.parametrize("B,T,budget", [(1, 5, 1), (6, 7, 1), (6, 7, 9), (6, 7, 20), (9, 4, 100)])
@pytest.mark.parametrize("density", [0.0, 0.5, 0.9, 1.0])
def test_sequence_chunks_hold_whole_sequences_and_only_their_unmasked_rows(B, T, budget, density):
    gen = torch.Generator().manual_seed(B * 100 + T * 10 + budget)
    mask = torch.rand(B, T, generator=gen) < density
    if B > 2:
        mask[1] = False  # a fully masked sequence
    chunks = sequence_chunks(mask, budget)
    rows, per_chunk = _rows(chunks, B * T)
    assert rows == mask.reshape(-1).nonzero().squeeze(1).tolist()
    assert chunks[0].start == 0 and chunks[-1].end == B * T
    counts = mask.sum(1).tolist()
    for prev, c in zip(chunks, chunks[1:]):
        assert prev.end == c.start  # consecutive, nothing skipped or repeated
    for c in chunks:
        assert c.start % T == 0 and c.end % T == 0 and c.end > c.start  # whole sequences
        seqs = range(c.start // T, c.end // T)
        assert c.size == sum(counts[s] for s in seqs)
        # at most the budget, unless it is a single sequence; greedy: the next sequence did not fit
        assert c.size <= budget or len(seqs) == 1
        if c.end // T < B:
            assert c.size + counts[c.end // T] > budget
        assert (c.live is None) == (c.size == len(seqs) * T)


def test_wave_rows_fill_the_gradient_gemms_waves():
    """The GPU chunk rule (chunking.wave_rows): at the headline shape on 132 SMs the 1766 rows of the
    512 MiB budget (1.70 waves of 128 x 256 tiles, run as 2) become 1024 (0.97 of one wave); a budget
    too small for a tile is kept; every choice is a multiple of 128 within the budget."""
    from lvrpo_fast.chunking import wave_efficiency, wave_rows

    assert abs(wave_efficiency(1766, 4096, 132) - 224 / 264) < 1e-12
    assert wave_rows(1766, 4096, 132) == 1024
    assert wave_rows(100, 4096, 132) == 100
    for max_rows in (128, 700, 1766, 3533, 9000):
        for hidden in (1536, 3584, 4096, 8192):
            rows = wave_rows(max_rows, hidden, 132)
            assert rows % 128 == 0 and rows <= max_rows
            best = max(wave_efficiency(r, hidden, 132) for r in range(128, max_rows + 1, 128))
            assert wave_efficiency(rows, hidden, 132) >= best - 0.01
