"""Process-reward advantages (docs/math.md section 11): packed step rewards -> per-token advantages [B, T] float32.

Inputs: B = N / T sequences in groups of G, each with 1 to 8 steps (uniform) ending at distinct random
tokens, step rewards ~ U(0, 1) (no group all equal by chance). Options: scale="group", the default. A
memory-bound op: min_bytes = 12 S + 8 (B + 1) (read the rewards, the ends and the offsets) + 4 B T (write
the advantages), and extra_info records the GB/s achieved. Implementations: the eager reference (segment
sums by index_add and a reverse cumulative sum over [B, T + 1]), the Triton and C++ backends. torch.compile
of the reference is left out: its packing check reads the offsets on the host and repeat_interleave's
output size depends on them, so the graph breaks where the work is. The peers have no such op.
"""
import pytest
import torch

import lvrpo_fast

import harness

IMPLS = ("reference", "triton", "cpp")
MAX_STEPS = 8


def make_set(shape, device):
    B, T, G = shape.B, shape.T, shape.G
    counts = torch.randint(1, min(T, MAX_STEPS) + 1, (B,))
    # The first counts[b] of a random permutation of row b's tokens, sorted: distinct increasing ends.
    first = torch.rand(B, T).argsort(dim=1)[:, :min(T, MAX_STEPS)]
    keep = torch.arange(first.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    ends = torch.where(keep, first, T).sort(dim=1).values[keep]  # the kept ends first in each sorted row
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return {"step_rewards": torch.rand(int(offsets[-1]), device=device), "step_ends": ends.to(device),
            "step_offsets": offsets.to(device)}


def advantages_fn(impl, shape):
    return lambda s: lvrpo_fast.process_advantages(s["step_rewards"], s["step_ends"], s["step_offsets"], shape.G,
                                                   shape.T, backend=impl)


@pytest.mark.bench_op("process_advantages", impls=IMPLS)
def test_process_advantages(bench, shape, impl):
    if impl in ("triton", "cpp"):
        harness.lvrpo_backend(impl, torch.float32)
    fn = advantages_fn(impl, shape)
    reference_fn = advantages_fn("reference", shape)
    S_per_row = (1 + min(shape.T, MAX_STEPS)) / 2  # the mean number of steps per sequence
    bench.run(
        case=f"process_advantages G={shape.G}", op="process_advantages", impl=impl, shape=shape, dtype=torch.float32,
        make_set=lambda: make_set(shape, bench.device),
        call=lambda s: {"advantages": fn(s)},
        reference_call=lambda s: {"advantages": reference_fn(s)},
        checked=("advantages",), min_bytes=12 * S_per_row * shape.B + 8 * (shape.B + 1) + 4 * shape.N)


def test_process_advantages_paired(bench):
    """The kernel backend of this set (C++ on the CPU, Triton on a GPU) against the eager reference, called
    alternately on the same inputs (Bench.paired): the median of the per-pair time ratios, which a
    shared machine's drift moves far less than the ratio of two medians. 51 pairs: each call takes
    milliseconds, and a call preempted by another process spoils only its own pair."""
    impl = "triton" if bench.device.type == "cuda" else "cpp"
    harness.lvrpo_backend(impl, torch.float32)
    shape = harness.SHAPES[bench.shape_set]["process_advantages"][-1]

    def case(name):
        fn = advantages_fn(name, shape)
        return harness.Case(case=f"process_advantages G={shape.G}", op="process_advantages", impl=name, shape=shape,
                            dtype=torch.float32, make_set=lambda: make_set(shape, bench.device),
                            call=lambda s: {"advantages": fn(s)},
                            reference_call=lambda s: {"advantages": advantages_fn("reference", shape)(s)},
                            checked=("advantages",))

    bench.paired({"reference": case("reference"), impl: case(impl)}, name="process_advantages paired", min_pairs=51)
