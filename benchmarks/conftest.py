"""pytest's side of the benchmarks: the shape set, the parametrization, the `bench` fixture, the JSON and
the terminal summary.

Run `pytest benchmarks/ --benchmark-only` (see benchmarks/README.md). Every test declares its op with
`@pytest.mark.bench_op(op, impls=..., variants=...)`; pytest_generate_tests below crosses the shape
set of that op with the variants and the implementations, reference first, so each implementation is
checked against the eager reference's result on the same inputs before it is timed.

Shape set: LVRPO_BENCH_SHAPES = "tiny" | "cpu" | "gpu". Default: "tiny" when CI is true or under
--benchmark-disable (the smoke run that notices a broken benchmark; on a machine without a GPU the
Triton kernels run under the interpreter), "gpu" when torch sees a CUDA device, "cpu" otherwise.

The rest lives in modules the test files import directly: shapes.py (shape sets, targets),
measure.py (peak memory, the matmul ceiling, timing, input sets, the check), harness.py (which
implementations run here, Case, one row's measurement, Bench), provenance.py (machine_info).
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Dict

import pytest

import harness
import provenance
import report  # benchmarks/report.py beside this file: ratios, formats and targets, written once
from measure import CEILINGS, DEVICE, MiB
from shapes import SHAPES, TARGETS, choose_shape_set, truthy


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_op(op, impls, variants): a benchmark of one op (benchmarks/conftest.py)")
    smoke = truthy(os.environ.get("CI")) or bool(config.getoption("benchmark_disable", False))
    try:
        shape_set = choose_shape_set(smoke, DEVICE.type == "cuda")
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    harness.configure(shape_set)


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench_op")
    if marker is None:
        return
    op = marker.args[0]
    impls = marker.kwargs["impls"]
    variants = marker.kwargs.get("variants", [{}])
    names = ["shape", "impl"] + list(variants[0])
    params = []
    for shape in SHAPES[harness.SHAPE_SET][op]:
        for variant in variants:
            for impl in impls:
                values = [shape, impl] + [variant[k] for k in variants[0]]
                vid = "-".join(str(v) for v in variant.values())
                params.append(pytest.param(*values, id="-".join(p for p in (shape.id, vid, impl) if p)))
    metafunc.parametrize(names, params)


@pytest.fixture
def bench(benchmark, request):
    return harness.Bench(benchmark, request)


# ----------------------------------------------------------------------------------------------
# Provenance (machine_info / the JSON) and the terminal summary
# ----------------------------------------------------------------------------------------------
def _provenance() -> dict:
    session = harness.SESSION
    return provenance.provenance(harness.SHAPE_SET, DEVICE, session.get("started"), session.get("load_start"))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lvrpo"] = _provenance()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    extra = output_json["machine_info"].setdefault("lvrpo", _provenance())
    extra["load_average_end"] = provenance.load_average()
    extra["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    extra["matmul_ceilings_tflops"] = {f"{m}x{k}x{n} {str(dt).replace('torch.', '')}": v / 1e12
                                       for (m, k, n, dt), v in CEILINGS.items()}
    output_json["lvrpo_skipped"] = list(harness.SESSION["skipped"])
    output_json["lvrpo_e2e"] = list(harness.SESSION.get("e2e", []))
    output_json["lvrpo_vocab_parallel"] = list(harness.SESSION.get("vocab_parallel", []))
    output_json["lvrpo_targets"] = TARGETS.get(harness.SHAPE_SET, [])


def pytest_runtest_logreport(report):
    if report.skipped and "benchmarks" in report.nodeid.replace("\\", "/"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        harness.SESSION["skipped"].append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def _ratios(results):
    """{(case, shape, dtype): {impl: info}} and per entry the speed-up and memory ratio vs reference."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for info in results:
        groups.setdefault((info["case"], info["shape"], info["dtype"]), {})[info["impl"]] = info
    return groups


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for row in harness.SESSION.get("e2e", []):
        terminalreporter.write_line("end to end: " + report.e2e_line(row))
    for row in harness.SESSION.get("vocab_parallel", []):
        terminalreporter.write_line("vocab-parallel: " + report.vocab_parallel_line(row))
    results = harness.SESSION["results"]
    if not results and not harness.SESSION["paired"]:
        return
    tr = terminalreporter
    tr.section(f"lvrpo_fast benchmarks ({harness.SHAPE_SET} set on {DEVICE}): against the eager reference")
    tr.write_line(f"{'case':34} {'shape':28} {'impl':11} {'median ms':>10} {'speed-up':>9} "
                  f"{'peak extra MiB':>15} {'mem ratio':>10} {'TFLOP/s':>8} {'of mm':>6}")
    for (case, shape, dtype), impls in _ratios(results).items():
        ref = impls.get("reference")
        for impl, info in impls.items():
            speed, ratio = report.ratios(info, ref)
            tr.write_line(
                f"{case:34} {shape + ' ' + dtype:28} {impl:11} {report.fmt(info['median_s'], '{:.2f}', 1e3):>10} "
                f"{report.fmt(speed, '{:.2f}x'):>9} {report.fmt(info['peak_extra_bytes'], '{:.1f}', 1 / MiB):>15} "
                f"{report.fmt(ratio, '{:.3f}'):>10} {report.fmt(info.get('tflops'), '{:.3g}'):>8} "
                f"{report.fmt(info.get('roofline_fraction'), '{:.0%}'):>6}")
    for line in (report.evaluate_targets(TARGETS.get(harness.SHAPE_SET, []), results)
                 + report.paired_lines(harness.SESSION["paired"])):
        tr.write_line(line)
