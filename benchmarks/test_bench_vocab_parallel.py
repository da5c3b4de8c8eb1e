"""Vocab-parallel heads (issue 17 item 5): fused_linear_grpo_loss forward + backward per rank, on gloo.

Each run is a fresh torch.distributed.run launch of benchmarks/vocab_parallel_run.py (one process per
rank, so each rank's resident high-water mark is its own), for three implementations:
    single         one process, the C++ backend on the whole [V, D] head
    fused          W processes, lvrpo_fast's vocab-parallel path (C++ backend, [V / W, D] per rank)
    gather_logits  W processes, the shards' logits all-gathered into [N, V] on every rank and the loss
                   computed on them eagerly (what a user without a vocab-parallel loss does)
Recorded per run (extra_info and the summary at the end): the median time of a round (a barrier starts
each round, so it is the slowest rank's), the peak extra memory of one call, the largest over the
ranks, and the loss (equal on every rank and to the single process's; checked here).

Shape set "cpu": B = 8, T = 256 (N = 2048 positions, ~3/4 of them live), D = 512, V = 32000, W = 2;
"tiny" (CI): B = 2, T = 8, D = 32, V = 515, W = 2, one round, to notice a broken launch. A CPU with
2 cores timed with 2 ranks shares them, so time per rank is not the point there; the memory is.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import harness

HERE = Path(__file__).parent
RUNS = {  # shape set -> (batch, seq, hidden, vocab, world, rounds)
    "tiny": (2, 8, 32, 515, 2, 1),
    "cpu": (8, 256, 512, 32000, 2, 5),
}


def _run(impl, tmp_path):
    if harness.SHAPE_SET not in RUNS:
        pytest.skip(f"the vocab-parallel runs use gloo on the CPU; this is the {harness.SHAPE_SET} set")
    batch, seq, hidden, vocab, world, rounds = RUNS[harness.SHAPE_SET]
    world = 1 if impl == "single" else world
    out = tmp_path / impl
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(HERE / "vocab_parallel_run.py"), "--impl", impl, "--batch", str(batch), "--seq", str(seq),
               "--hidden", str(hidden), "--vocab", str(vocab), "--rounds", str(rounds), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


_LOSSES = {}


@pytest.mark.parametrize("impl", ["single", "fused", "gather_logits"])
def test_vocab_parallel(benchmark, impl, tmp_path):
    ranks = []
    benchmark.pedantic(lambda: ranks.extend(_run(impl, tmp_path)), rounds=1, iterations=1)
    losses = {r["loss"] for r in ranks}
    assert len(losses) == 1, f"the ranks disagree on the loss: {[r['loss'] for r in ranks]}"
    _LOSSES[impl] = losses.pop()
    if "single" in _LOSSES and impl != "single":
        assert abs(_LOSSES[impl] - _LOSSES["single"]) <= 1e-5 * (1 + abs(_LOSSES["single"])), _LOSSES
    row = {"vocab_parallel": True, "impl": impl, "world": ranks[0]["world"], "tokens": ranks[0]["tokens"],
           "hidden": ranks[0]["hidden"], "vocab": ranks[0]["vocab"], "local_vocab": max(r["local_vocab"] for r in ranks),
           "median_s": max(r["median_s"] for r in ranks),
           "peak_extra_bytes": max(r["peak_extra_bytes"] or 0 for r in ranks), "loss": ranks[0]["loss"],
           "load_average": ranks[0]["load_average"]}
    benchmark.extra_info.update(row)
    harness.SESSION.setdefault("vocab_parallel", []).append(row)
