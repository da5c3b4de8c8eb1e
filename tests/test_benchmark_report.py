"""benchmarks/report.py's judgement of the acceptance targets, on made-up results.

The GPU targets of issues 3, 4 and 9 are judged by this code from a run nobody can repeat without a
GPU, so the verdicts are checked here: each metric, each bound, a missing implementation."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import report  # noqa: E402

MiB = 1 << 20


def row(impl, median_s, peak_mib, roofline=None, case="loss", N=8192):
    return {"case": case, "impl": impl, "N": N, "D": 4096, "V": 151936, "T": 1024, "dtype": "bfloat16",
            "median_s": median_s, "peak_extra_bytes": peak_mib * MiB, "roofline_fraction": roofline}


ROWS = [row("reference", 0.30, 20000), row("compiled", 0.24, 9000), row("triton", 0.15, 1500, 0.85),
        row("liger", 0.50, 900), row("triton", 0.9, 1, 0.1, N=2048)]


def target(impl="triton", *checks):
    return {"name": "t", "case": "loss", "N": 8192, "D": 4096, "V": 151936, "dtype": "bfloat16", "impl": impl,
            "checks": list(checks)}


@pytest.mark.parametrize("check,expected", [
    ({"metric": "speedup", "vs": "reference", "min": 1.5}, "speed-up vs reference 2.00x (target >= 1.50x: met)"),
    ({"metric": "speedup", "vs": "liger", "min": 3.0}, "speed-up vs liger 3.33x (target >= 3.00x: met)"),
    ({"metric": "speedup", "vs": "compiled", "min": 1.7}, "speed-up vs compiled 1.60x (target >= 1.70x: NOT met)"),
    ({"metric": "speedup", "vs": "compiled"}, "speed-up vs compiled 1.60x"),
    ({"metric": "memory_ratio", "vs": "reference", "max": 0.1},
     "peak extra memory / reference's 0.075 (target <= 0.100: met)"),
    ({"metric": "memory_ratio", "vs": "reference", "max": 0.05},
     "peak extra memory / reference's 0.075 (target <= 0.050: NOT met)"),
    ({"metric": "roofline_fraction", "min": 0.8}, "roofline fraction 85% (target >= 80%: met)"),
    ({"metric": "roofline_fraction", "min": 0.9}, "roofline fraction 85% (target >= 90%: NOT met)"),
    ({"metric": "peak_extra_bytes", "max": 1e9}, "peak extra memory 1500 MiB (target <= 954 MiB: NOT met)"),
    ({"metric": "speedup", "vs": "cce", "min": 1.0}, "speed-up vs cce not measured (target >= 1.00x: NOT met)"),
])
def test_each_check(check, expected):
    (line,) = report.evaluate_targets([target("triton", check)], ROWS)
    assert line == f"- t: loss, N=8192, D=4096, V=151936, bfloat16, triton: {expected}"


def test_missing_implementation_or_shape():
    assert report.evaluate_targets([target("cpp", {"metric": "roofline_fraction"})], ROWS)[0].endswith(
        "not measured in this run")
    other_shape = dict(target("triton", {"metric": "roofline_fraction"}), N=16384)
    assert report.evaluate_targets([other_shape], ROWS)[0].endswith("not measured in this run")
