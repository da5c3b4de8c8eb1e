"""benchmarks/gpu_session.sh, the first-light command of a GPU loan, run here as its CPU dry run.

The GPU run cannot be tried before the loan it is for, so the same script runs here at tiny sizes
(LVRPO_FIRST_LIGHT=dry: Triton interpreted, the same stages, rows and files), as the GPU machine sees
it: no .git (the commit from LVRPO_COMMIT), results only in $OUT. And a GPU run without the pinned
peers' wheels must refuse to start, saying how to fetch them.
"""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
FILES = {"00-device.json", "01-ceiling.jsonl", "02-headline.jsonl", "03-logprobs.jsonl", "04-tests.json",
         "05-compiled.jsonl", "report.md", "logs.tar.gz"}
MEASURED = ("median_s", "tflops", "ceiling_tflops", "roofline_fraction", "peak_extra_bytes", "first_call_s")


def run_script(out: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=600)


def jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def outcomes(rows):
    """{row: its final record}; every row that started has one, and the stage ended."""
    assert rows[-1]["status"] == "done"
    final = {r["row"]: r for r in rows if r["status"] != "started" and "row" in r}
    started = {r["row"] for r in rows if r["status"] == "started"}
    assert started <= set(final)
    return final


def test_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "out"
    done = run_script(out, LVRPO_FIRST_LIGHT="dry", LVRPO_COMMIT="0123abcd", GIT_DIR=str(tmp_path / "no-git"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == FILES  # the device tool brings back at most 8 files

    device = json.loads((out / "00-device.json").read_text())
    assert (device["mode"], device["commit"], device["commit_source"]) == ("dry", "0123abcd", "LVRPO_COMMIT")
    assert len(device["source_sha256"]) == 64 and device["versions"]["torch"]

    ceiling = outcomes(jsonl(out / "01-ceiling.jsonl"))
    assert all(r["status"] == "ok" for r in ceiling.values()), ceiling
    assert ceiling["mm 24x40x515 float32"]["tflops"] > 0 and ceiling["copy"]["gbps"] > 0
    assert sum(row.startswith("chunk C=") for row in ceiling) == 8

    headline = outcomes(jsonl(out / "02-headline.jsonl"))
    for case in ("linear_grpo_loss fwd+bwd, no padding", "linear_grpo_loss fwd+bwd"):
        for impl in ("reference", "triton", "liger"):
            row = headline[f"{case} {impl}"]
            assert row["status"] == "ok", row
            assert row["check"].startswith("max rel err vs reference"), row
            assert all(row[key] is not None and row[key] >= 0 for key in MEASURED), row
    # The kernel backend computes the unmasked tokens only; the roofline counts what it executes.
    padded = headline["linear_grpo_loss fwd+bwd triton"]
    assert padded["executed_flops"] < padded["flops"]

    logprobs = outcomes(jsonl(out / "03-logprobs.jsonl"))
    for mode in ("fwd", "fwd+bwd"):
        assert logprobs[f"logprobs {mode} reference"]["status"] == "ok"
        assert logprobs[f"logprobs {mode} triton"]["status"] == "ok"
        for peer in ("liger", "cce"):  # CUDA kernels / torch.compile: skipped on the CPU, with the reason
            assert logprobs[f"logprobs {mode} {peer}"]["status"] == "skipped"
            assert logprobs[f"logprobs {mode} {peer}"]["reason"]

    tests = json.loads((out / "04-tests.json").read_text())
    assert tests["status"] == "passed" and tests["counts"]["passed"] >= 1, tests
    assert "-k" in tests["command"] and "not cpp" in tests["command"]

    compiled = outcomes(jsonl(out / "05-compiled.jsonl"))
    assert all(r["status"] == "skipped" and "torch.compile" in r["reason"] for r in compiled.values())

    report = (out / "report.md").read_text()
    assert "## Acceptance targets" in report and "## linear_grpo_loss fwd+bwd, no padding" in report
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"first_light.log", "tests.log", "tests.xml"} <= set(tar.getnames())


def test_gpu_run_refuses_without_the_wheels(tmp_path):
    out = tmp_path / "out"
    done = run_script(out, LVRPO_FIRST_LIGHT="gpu", LVRPO_WHEELS=str(tmp_path / "no-wheels"))
    assert done.returncode == 3
    assert "liger_kernel-0.8.5 cut_cross_entropy-25.1.1" in done.stderr
    assert ("pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform "
            "manylinux2014_x86_64 -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1") in done.stderr
    assert not any(out.iterdir())  # refused before installing or measuring anything
