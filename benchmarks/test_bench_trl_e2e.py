"""End to end: a few steps of TRL's own GRPOTrainer, plain against switched to lvrpo_fast (issue 16 item 6).

Each run is a fresh process (benchmarks/trl_e2e.py: a Qwen2-shaped model from a config, tied
embeddings, float32 on the CPU), so its resident high-water mark is its own. Recorded per run, in
extra_info and in the summary at the end: the median step time over the steps after the first (TRL's
step_time: generation, scoring and the training step), the part of it spent generating and scoring
(the same code in both), and the peak resident memory, absolute and above the process's size before
the first step. What differs between the two is the training step: TRL 1.16's chunked LM head (on the
CPU it scores every position of prompt and completion, and recomputes the logits in its backward)
against lvrpo_fast's fused loss (the completion tokens only, the gradient formed in the forward).

Shape set: "cpu": V = 151,936 (Qwen2.5's vocabulary), hidden 256, 4 / 8 / 16 sequences per micro-batch,
completions of 32 tokens, 3 steps; "tiny" (CI): V = 515, one step, to notice a broken run. The cpu set
also times the C++ backend's first build in a fresh cache (test_cpp_first_build): what the first step
of a switched trainer costs once per machine and torch version.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness

HERE = Path(__file__).parent
RUNS = {  # shape set -> (vocab, hidden, batches, steps, completion length)
    "tiny": (515, 32, (4,), 1, 8),
    "cpu": (151936, 256, (4, 8, 16), 3, 32),
}


def _settings():
    if harness.SHAPE_SET not in RUNS:
        pytest.skip(f"the end-to-end runs are CPU runs; this is the {harness.SHAPE_SET} set")
    return RUNS[harness.SHAPE_SET]


def _run(impl, vocab, hidden, batch, steps, length, tmp_path):
    out = tmp_path / f"{impl}-{batch}.json"
    command = [sys.executable, str(HERE / "trl_e2e.py"), "--impl", impl, "--vocab", str(vocab), "--hidden",
               str(hidden), "--batch", str(batch), "--steps", str(steps), "--completion-length", str(length), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("impl", ["trl", "lvrpo"])
@pytest.mark.parametrize("batch", [4, 8, 16])
def test_trl_e2e(benchmark, impl, batch, tmp_path):
    vocab, hidden, batches, steps, length = _settings()
    if batch not in batches:
        pytest.skip(f"{batch} sequences per micro-batch are not in the {harness.SHAPE_SET} set")
    result = {}
    benchmark.pedantic(lambda: result.update(_run(impl, vocab, hidden, batch, steps, length, tmp_path)),
                       rounds=1, iterations=1)
    later = result["step_s"][1:] or result["step_s"]
    row = {"e2e": True, "impl": impl, "batch": batch, "vocab": vocab, "hidden": hidden, "completion_length": length,
           "step_s": statistics.median(later),
           "train_s": statistics.median(s - g for s, g in zip(result["step_s"][1:] or result["step_s"],
                                                               result["generate_s"][1:] or result["generate_s"])),
           "peak_rss_bytes": result["peak_rss_bytes"],
           "peak_over_start_bytes": result["peak_rss_bytes"] - result["rss_before_bytes"],
           "first_step_s": result["step_s"][0]}
    benchmark.extra_info.update(row)
    harness.SESSION.setdefault("e2e", []).append(row)


def test_cpp_first_build(benchmark, tmp_path):
    """The C++ backend compiled in an empty cache (LVRPO_BUILD_DIR), as on a machine's first switched step."""
    if harness.SHAPE_SET != "cpu":
        pytest.skip("the first build takes minutes: timed in the cpu set only")
    code = ("import time, lvrpo_fast.backends.cpp as cpp; t = time.perf_counter(); module, why = cpp.load_extension(); "
            "assert module is not None, why; print(time.perf_counter() - t)")
    seconds = []

    def build():
        env = {**os.environ, "LVRPO_BUILD_DIR": str(tmp_path / f"build{len(seconds)}")}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-4000:]
        seconds.append(float(done.stdout.strip().splitlines()[-1]))
        return time.perf_counter() - start

    benchmark.pedantic(build, rounds=1, iterations=1)
    benchmark.extra_info.update(e2e=True, build_s=seconds[0])
    harness.SESSION.setdefault("e2e", []).append({"e2e": True, "build_s": seconds[0]})
