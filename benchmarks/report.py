"""Turns a saved benchmark JSON (pytest benchmarks/ --benchmark-only --benchmark-json=X.json) into a
markdown table and a PNG chart.

    python benchmarks/report.py X.json [--md X.md] [--png X.png] [--notes NOTES.md]

The markdown starts with where and when the numbers were taken (device, versions, commit, load), then
one table per case: for each shape and implementation the median time, the speed-up over the eager
reference (reference time / its time), the peak extra memory and its ratio to the reference's, the
TFLOP/s achieved and their fraction of the matmul ceiling measured in the same session, or GB/s for
the memory-bound ops. Then the acceptance targets (benchmarks/shapes.py TARGETS), the skipped
implementations with their reasons, and the notes file, if given, verbatim.
The chart has one row per case and LM head: time and peak extra memory against the token count N.
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

MiB = float(1 << 20)
IMPL_ORDER = ("reference", "compiled", "triton", "cpp", "trl", "liger", "cce", "flash_attn")


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench["extra_info"])
        if info.get("paired") or info.get("e2e") or info.get("vocab_parallel"):  # their own sections below
            continue
        if info.get("median_s") is None and bench.get("stats"):
            info["median_s"] = bench["stats"]["median"]
        rows.append(info)
    return data, rows


def by_case(rows):
    """{case: {(N, head, dtype): {impl: row}}} in the order the benchmarks ran."""
    cases = OrderedDict()
    for row in rows:
        key = (row["N"], head(row), row["dtype"])
        cases.setdefault(row["case"], OrderedDict()).setdefault(key, {})[row["impl"]] = row
    return cases


def head(row):
    """What stays fixed while N varies: the LM head (D, V), and T or G where they matter."""
    parts = []
    if row.get("D"):
        parts.append(f"D={row['D']} V={row['V']}")
    if row.get("T"):
        parts.append(f"T={row['T']}")
    if row.get("G"):
        parts.append(f"G={row['G']}")
    return ", ".join(parts)


def ratios(row, ref):
    speed = mem = None
    if ref is not None and ref.get("median_s") and row.get("median_s"):
        speed = ref["median_s"] / row["median_s"]
    if ref is not None and ref.get("peak_extra_bytes") and row.get("peak_extra_bytes") is not None:
        mem = row["peak_extra_bytes"] / ref["peak_extra_bytes"]
    return speed, mem


def fmt(value, spec, scale=1.0):
    return "-" if value is None else spec.format(value * scale)


def header(data):
    lv = data["machine_info"].get("lvrpo", {})
    commit = data.get("commit_info", {})
    versions = ", ".join(f"{k} {v}" for k, v in lv.get("versions", {}).items() if v)
    lines = [
        f"# lvrpo_fast benchmarks: {lv.get('shape_set', '?')} set on {lv.get('device', '?')}",
        "",
        f"- Device: {lv.get('device_name', '?')}"
        + (f" (CUDA {lv['cuda']})" if lv.get("cuda") else "")
        + f"; {lv.get('cpu_count', '?')} CPU cores"
        + (f" ({lv['cpu']})" if lv.get("cpu") and lv.get("cpu") != lv.get("device_name") else "")
        + f", torch threads {lv.get('torch_threads', '?')}",
        f"- Versions: Python {lv.get('python', '?')}, {versions}",
        f"- Commit: {lv.get('commit') or commit.get('id', '?')}"
        + (f", branch {commit['branch']}" if commit.get("branch") else "")
        + (f"; tracked files differing from it in the measured working tree: "
           f"{', '.join(lv['commit_dirty_files'])}" if lv.get("commit_dirty_files") else ""),
        f"- Run: {lv.get('started_utc', data.get('datetime', '?'))} to {lv.get('finished_utc', '?')} (UTC)",
        f"- Load average (1, 5, 15 min) at the start: {lv.get('load_average_start', '?')}; "
        f"at the end: {lv.get('load_average_end', '?')}",
    ]
    env = {k: v for k, v in lv.get("env", {}).items() if v}
    if env:
        lines.append(f"- Environment: {', '.join(f'{k}={v}' for k, v in env.items())}")
    ceilings = lv.get("matmul_ceilings_tflops", {})
    if ceilings:
        lines.append("- Matmul ceilings measured in the session (torch.mm, M x K x N): "
                     + ", ".join(f"{k}: {v:.3g} TFLOP/s" for k, v in ceilings.items()))
    methods = sorted({r.get("memory_method") for r in data_rows(data) if r.get("memory_method")})
    if methods:
        lines.append("- Peak extra memory (beyond inputs, outputs and input gradients): " + "; ".join(methods))
    lines += [
        "",
        "Speed-up: the eager reference's median time over the implementation's (higher is faster). "
        "Memory ratio: the implementation's peak extra memory over the reference's (lower is leaner). "
        "Of ceiling: achieved TFLOP/s over torch.mm's at the same sizes and dtype. "
        "Each time is the median of the timed rounds, the device synchronized inside each call, with "
        "several input sets cycled.",
        "",
    ]
    return lines


def data_rows(data):
    return [b["extra_info"] for b in data["benchmarks"] if not b["extra_info"].get("paired")]


def tables(cases):
    lines = []
    for case, shapes in cases.items():
        lines += [f"## {case}", "",
                  "| N | head | dtype | impl | median ms | speed-up | peak extra MiB | memory ratio "
                  "| TFLOP/s | of ceiling | GB/s | rounds |",
                  "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (n, hd, dtype), impls in shapes.items():
            ref = impls.get("reference")
            for impl in sorted(impls, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else len(IMPL_ORDER)):
                row = impls[impl]
                speed, mem = ratios(row, ref)
                lines.append(
                    f"| {n} | {hd or '-'} | {dtype} | {impl} | {fmt(row.get('median_s'), '{:.3f}', 1e3)} "
                    f"| {fmt(speed, '{:.2f}x')} | {fmt(row.get('peak_extra_bytes'), '{:.1f}', 1 / MiB)} "
                    f"| {fmt(mem, '{:.3f}')} | {fmt(row.get('tflops'), '{:.3g}')} "
                    f"| {fmt(row.get('roofline_fraction'), '{:.0%}')} | {fmt(row.get('gbps'), '{:.3g}')} "
                    f"| {row.get('rounds', '-')} |")
        lines.append("")
    return lines


CHECK_LABELS = {"speedup": "speed-up vs {vs}", "memory_ratio": "peak extra memory / {vs}'s",
                "roofline_fraction": "roofline fraction", "peak_extra_bytes": "peak extra memory"}


def _measure(check, impls, impl):
    """The value a check reads off one shape's results, or None when an implementation is missing."""
    row, other = impls.get(impl), impls.get(check.get("vs"))
    if row is None:
        return None
    metric = check["metric"]
    if metric in ("speedup", "memory_ratio"):
        if other is None:
            return None
        speed, mem = ratios(row, other)
        return speed if metric == "speedup" else mem
    return row.get(metric)


def _show(metric, value):
    if value is None:
        return "not measured"
    if metric == "speedup":
        return f"{value:.2f}x"
    if metric == "peak_extra_bytes":
        return f"{value / MiB:.0f} MiB"
    if metric == "roofline_fraction":
        return f"{value:.0%}"
    return f"{value:.3f}"


def evaluate_targets(targets, rows):
    """One line per acceptance target: each check's measured value and whether it holds.

    A target names a case, a shape (N, D, V), a dtype and the implementation under test; its checks are
    {"metric": "speedup" | "memory_ratio", "vs": impl, "min" | "max": bound} (against another
    implementation at the same shape) or {"metric": "roofline_fraction" | "peak_extra_bytes", ...}.
    A check without a bound is reported, not judged."""
    cases = by_case(rows)
    lines = []
    for target in targets:
        label = (f"{target['name']}: {target['case']}, N={target['N']}, D={target['D']}, V={target['V']}, "
                 f"{target['dtype']}, {target['impl']}")
        found = [impls for (n, hd, dtype), impls in cases.get(target["case"], {}).items()
                 if n == target["N"] and dtype == target["dtype"] and hd.startswith(f"D={target['D']} V={target['V']}")]
        if not found or target["impl"] not in found[0]:
            lines.append(f"- {label}: not measured in this run")
            continue
        parts = []
        for check in target["checks"]:
            metric = check["metric"]
            value = _measure(check, found[0], target["impl"])
            text = f"{CHECK_LABELS[metric].format(vs=check.get('vs'))} {_show(metric, value)}"
            for bound, op in (("min", ">="), ("max", "<=")):
                if bound in check:
                    ok = value is not None and (value >= check[bound] if bound == "min" else value <= check[bound])
                    text += f" (target {op} {_show(metric, check[bound])}: {'met' if ok else 'NOT met'})"
            parts.append(text)
        lines.append(f"- {label}: " + "; ".join(parts))
    return lines


def paired_lines(infos):
    """One line per paired measurement (harness.Bench.paired): the median per-pair ratio, its range,
    the verdict against the measurement's target when it has one, and every pair's times."""
    lines = []
    for info in infos:
        times, ratios_ = info["times_s"], info["ratios"]
        verdict = ""
        if info.get("target_speedup") is not None:
            ok = info["median_ratio"] >= info["target_speedup"]
            verdict = f" (target >= {info['target_speedup']:.2f}x: {'met' if ok else 'NOT met'})"
        lines.append(
            f"- Paired ({info['case']}, N={info['N']}, D={info['D']}, V={info['V']}, {info['dtype']}): "
            f"{info['numerator']} and {info['denominator']} called alternately on the same inputs, "
            f"{info['pairs']} pairs; {info['numerator']} time / {info['denominator']} time: median "
            f"{info['median_ratio']:.2f}x{verdict}, per pair {', '.join(f'{r:.2f}' for r in ratios_)}; "
            f"times (s) {info['numerator']} {', '.join(f'{t:.3g}' for t in times[info['numerator']])}, "
            f"{info['denominator']} {', '.join(f'{t:.3g}' for t in times[info['denominator']])}")
    return lines


def targets(data, rows):
    lines = evaluate_targets(data.get("lvrpo_targets", []), rows)
    lines += paired_lines([b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("paired")])
    return (["## Acceptance targets", ""] + lines + [""]) if lines else []


def e2e_line(row):
    """One end-to-end TRL run (benchmarks/test_bench_trl_e2e.py) or the C++ backend's first build."""
    if "build_s" in row:
        return f"C++ backend, first build in an empty cache: {row['build_s']:.0f} s"
    return (f"{row['impl']:5s} {row['batch']:2d} sequences/micro-batch, V={row['vocab']}, hidden {row['hidden']}: "
            f"step {row['step_s']:.2f} s (training part {row['train_s']:.2f} s; first step {row['first_step_s']:.2f} s), "
            f"peak RSS {row['peak_rss_bytes'] / MiB:.0f} MiB ({row['peak_over_start_bytes'] / MiB:.0f} MiB above "
            f"the start)")


def vocab_parallel_line(row):
    """One run of benchmarks/test_bench_vocab_parallel.py (the slowest rank's time, the largest peak)."""
    return (f"{row['impl']:13s} {row['world']} process(es), {row['tokens']} live tokens, D={row['hidden']}, "
            f"V={row['vocab']} ({row['local_vocab']} per rank): fwd+bwd {row['median_s'] * 1e3:.1f} ms, "
            f"peak extra {row['peak_extra_bytes'] / MiB:.1f} MiB per rank, loss {row['loss']:.6f}, "
            f"load {row['load_average'][0]:.1f}")


def e2e(data):
    rows = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("e2e")]
    return (["## TRL's GRPOTrainer end to end", ""] + [f"- {e2e_line(r)}" for r in rows] + [""]) if rows else []


def vocab_parallel(data):
    rows = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("vocab_parallel")]
    return (["## Vocab-parallel head (gloo), fused linear GRPO loss forward + backward", ""]
            + [f"- {vocab_parallel_line(r)}" for r in rows] + [""]) if rows else []


def skipped(data):
    reasons = OrderedDict()
    for entry in data.get("lvrpo_skipped", []):
        test = entry["test"].split("::")[-1]
        impl = test.rsplit("-", 1)[-1].rstrip("]")
        reasons.setdefault((impl, entry["reason"]), []).append(test)
    if not reasons:
        return []
    lines = ["## Skipped", "", "| impl | reason | tests |", "|---|---|---:|"]
    for (impl, reason), tests in reasons.items():
        lines.append(f"| {impl} | {reason.replace('|', '/')} | {len(tests)} |")
    return lines + [""]


def chart(cases, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []  # (case, head, dtype) -> {impl: [(N, time, memory)]}
    for case, shapes in cases.items():
        grouped = OrderedDict()
        for (n, hd, dtype), impls in shapes.items():
            series = grouped.setdefault((case, hd, dtype), {})
            for impl, row in impls.items():
                series.setdefault(impl, []).append((n, row.get("median_s"), row.get("peak_extra_bytes")))
        panels += list(grouped.items())
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for (title, series), (ax_t, ax_m) in zip(panels, axes):
        case, hd, dtype = title
        for impl in sorted(series, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else len(IMPL_ORDER)):
            points = sorted(series[impl])
            times = [(n, t * 1e3) for n, t, _ in points if t]
            mems = [(n, max(m / MiB, 1e-3)) for n, _, m in points if m is not None]
            style = {"marker": "o", "linewidth": 2.2 if impl == "reference" else 1.4}
            if times:
                ax_t.plot(*zip(*times), label=impl, **style)
            if mems:
                ax_m.plot(*zip(*mems), label=impl, **style)
        for ax, what in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(what)
            ax.set_title(f"{case} ({hd}, {dtype})" if hd else f"{case} ({dtype})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--md", type=Path, help="markdown output (default: the JSON's name with .md)")
    parser.add_argument("--png", type=Path, help="chart output (default: the JSON's name with .png)")
    parser.add_argument("--notes", type=Path, help="a markdown file appended verbatim as the notes")
    args = parser.parse_args(argv)
    data, rows = load(args.json)
    if not data["benchmarks"]:
        raise SystemExit(f"{args.json}: no benchmarks (was it saved with --benchmark-disable?)")
    cases = by_case(rows)
    md_path = args.md or args.json.with_suffix(".md")
    png_path = args.png or args.json.with_suffix(".png")
    lines = header(data)
    figure = [f"![time and memory by N]({png_path.name})", ""] if cases else []  # an end-to-end run has none
    lines += figure + targets(data, rows) + tables(cases) + e2e(data) + vocab_parallel(data) + skipped(data)
    if args.notes:
        lines += ["## Notes", "", args.notes.read_text().strip(), ""]
    md_path.write_text("\n".join(lines))
    chart(cases, png_path)
    print(f"wrote {md_path}" + (f" and {png_path}" if cases else ""))


if __name__ == "__main__":
    main()
