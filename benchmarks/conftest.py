"""The benchmark harness: shape sets, the implementations side by side, timing, peak memory, the matmul ceiling.

Run `pytest benchmarks/ --benchmark-only` (see benchmarks/README.md). Every test declares its op with
`@pytest.mark.bench_op(op, impls=..., variants=...)`; pytest_generate_tests below crosses the shape
set of that op with the variants and the implementations, reference first, so each implementation is
checked against the eager reference's result on the same inputs before it is timed.

Shape set: LVRPO_BENCH_SHAPES = "tiny" | "cpu" | "gpu". Default: "tiny" when CI is true or under
--benchmark-disable (the smoke run that notices a broken benchmark; on a machine without a GPU the
Triton kernels run under the interpreter), "gpu" when torch sees a CUDA device, "cpu" otherwise.

Per benchmark, in extra_info (pytest --benchmark-json):
    median_s            median of the timed rounds; the device is synchronized inside the timed call
    peak_extra_bytes    memory allocated beyond the inputs, the outputs and the input gradients
                        (CUDA: the allocator's peak; CPU: growth of the process's resident high-water
                        mark over one call, see peak_extra_memory)
    flops               the FLOPs of the operation on all N tokens (what the reference executes)
    executed_flops      the FLOPs this implementation executes, mean over the input sets: fewer than
                        flops where it skips masked tokens (the kernel backends on a padded batch)
    tflops              executed_flops / median_s: the rate the hardware achieved
    ceiling_tflops      torch.mm at the same (M, K, N) and dtype, measured in this session
    roofline_fraction   tflops / ceiling_tflops (so skipping work never inflates it)
    min_bytes, gbps     for the memory-bound ops (no matmul): bytes that must move, and the rate
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import subprocess
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, Optional, Tuple

SHAPE_SETS = ("tiny", "cpu", "gpu")


def _truthy(value: Optional[str]) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


SHAPE_SET = "cpu"  # chosen in pytest_configure, once the command line is known

import pytest  # noqa: E402
import torch  # noqa: E402

from lvrpo_fast import dispatch  # noqa: E402

import report  # noqa: E402  benchmarks/report.py beside this file: ratios, formats and targets, written once

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MiB = float(1 << 20)

# Input sets are cycled so that the inputs of one call are evicted from the caches by the next ones:
# together they span at least ROTATE_BYTES (more than an H100/H200's 50-60 MB L2 and this CPU's L3),
# two sets at least, MAX_SETS at most (for inputs of a few KB the op is launch-bound anyway).
ROTATE_BYTES = 256 << 20
MAX_SETS = 64

# Rounds: enough to fill TARGET_S seconds of timed calls, within [MIN_ROUNDS, MAX_ROUNDS].
ROUNDS = {"tiny": (0.2, 1, 5), "cpu": (4.0, 3, 100), "gpu": (2.0, 10, 200)}


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """N tokens (N = B * T for the batch ops), head D x V, sequence length T, group size G."""

    N: int
    D: Optional[int] = None
    V: Optional[int] = None
    T: Optional[int] = None
    G: Optional[int] = None

    @property
    def B(self) -> int:
        return self.N // self.T if self.T else self.N

    @property
    def id(self) -> str:
        parts = [f"N{self.N}"]
        parts += [f"{k}{v}" for k, v in (("D", self.D), ("V", self.V), ("T", self.T), ("G", self.G)) if v]
        return "-".join(parts)


GPU_HEADS = ((1536, 151936), (3584, 152064), (4096, 128256))  # Qwen2.5-1.5B, Qwen2.5-7B, Llama-3-8B
GPU_TOKENS = (2048, 8192, 16384)
GPU_HEADLINE = Shape(8192, 4096, 151936)
GPU_T = 1024


def _gpu_linear(T=None):
    shapes = [Shape(n, d, v, T) for d, v in GPU_HEADS for n in GPU_TOKENS]
    return shapes + [Shape(GPU_HEADLINE.N, GPU_HEADLINE.D, GPU_HEADLINE.V, T)]


SHAPES: Dict[str, Dict[str, list]] = {
    # Odd sizes on purpose (V = 515: a ragged last block), and few rows: the interpreted Triton
    # kernels cost tens of milliseconds per row.
    "tiny": {
        "logprobs": [Shape(13, 40, 515), Shape(24, 40, 515)],
        "linear_grpo_loss": [Shape(15, 40, 515, 5), Shape(24, 40, 515, 6)],
        "linear_grpo_loss_full": [Shape(15, 40, 515, 5)],
        "grpo_loss": [Shape(15, T=5), Shape(24, T=6)],
        "advantages": [Shape(16, G=4), Shape(48, G=4)],
    },
    # A few minutes on 2 cores. N = 2048, D = 512, V = 32000, fp32 is issue 5's acceptance shape.
    "cpu": {
        "logprobs": [Shape(128, 512, 32000), Shape(512, 512, 32000)],
        "linear_grpo_loss": [Shape(512, 512, 32000, 256), Shape(2048, 512, 32000, 256)],
        "linear_grpo_loss_full": [Shape(2048, 512, 32000, 256)],
        "grpo_loss": [Shape(2048, T=256), Shape(65536, T=256)],
        "advantages": [Shape(1024, G=8), Shape(65536, G=8)],
    },
    "gpu": {
        "logprobs": _gpu_linear(),
        "linear_grpo_loss": _gpu_linear(GPU_T),
        "linear_grpo_loss_full": [Shape(GPU_HEADLINE.N, GPU_HEADLINE.D, GPU_HEADLINE.V, GPU_T)],
        "grpo_loss": [Shape(n, T=GPU_T) for n in GPU_TOKENS + (131072,)],
        "advantages": [Shape(b, G=16) for b in (512, 8192, 131072)],
    },
}

DTYPES = {"tiny": torch.float32, "cpu": torch.float32, "gpu": torch.bfloat16}
# Issue 5's acceptance shape: the C++ fused loss against the eager reference.
ISSUE5_SHAPE = Shape(2048, 512, 32000, 256)
GB = 1e9


def _target(name, case, shape, dtype, impl, *checks):
    return {"name": name, "case": case, "N": shape.N, "D": shape.D, "V": shape.V,
            "dtype": str(dtype).replace("torch.", ""), "impl": impl, "checks": list(checks)}


# The acceptance targets of the issues, judged in the terminal summary and by report.py
# (report.evaluate_targets) from the results of the run.
_LOSS_TARGETS = [
    {"metric": "speedup", "vs": "reference", "min": 1.5},
    {"metric": "speedup", "vs": "compiled"},
    {"metric": "speedup", "vs": "liger", "min": 3.0},
    {"metric": "memory_ratio", "vs": "reference", "max": 0.1},
    {"metric": "roofline_fraction", "min": 0.8},
]
TARGETS = {
    "cpu": [_target(f"issue 5{suffix}", f"linear_grpo_loss fwd+bwd{suffix}", ISSUE5_SHAPE, torch.float32, "cpp",
                    {"metric": "speedup", "vs": "reference", "min": 1.5},
                    {"metric": "memory_ratio", "vs": "reference", "max": 1 / 8})
            for suffix in ("", ", no padding")],
    "gpu": [
        _target("issue 3, forward only", "logprobs fwd", GPU_HEADLINE, torch.bfloat16, "triton",
                {"metric": "roofline_fraction", "min": 0.75}, {"metric": "peak_extra_bytes", "max": GB}),
        _target("issue 3, forward + backward", "logprobs fwd+bwd", GPU_HEADLINE, torch.bfloat16, "triton",
                {"metric": "roofline_fraction", "min": 0.70}, {"metric": "peak_extra_bytes", "max": GB}),
        _target("issue 4 / issue 9", "linear_grpo_loss fwd+bwd, no padding", GPU_HEADLINE, torch.bfloat16, "triton",
                *_LOSS_TARGETS),
        _target("issue 4, padded batch", "linear_grpo_loss fwd+bwd", GPU_HEADLINE, torch.bfloat16, "triton",
                *_LOSS_TARGETS),
    ],
}


def choose_shape_set(config) -> str:
    chosen = os.environ.get("LVRPO_BENCH_SHAPES")
    if chosen is None:
        smoke = _truthy(os.environ.get("CI")) or bool(config.getoption("benchmark_disable", False))
        chosen = "tiny" if smoke else ("gpu" if DEVICE.type == "cuda" else "cpu")
    if chosen not in SHAPE_SETS:
        raise pytest.UsageError(f"LVRPO_BENCH_SHAPES must be one of {SHAPE_SETS}, got {chosen!r}")
    if chosen == "gpu" and DEVICE.type != "cuda":
        raise pytest.UsageError("LVRPO_BENCH_SHAPES=gpu needs a CUDA device; torch sees none")
    return chosen


def pytest_configure(config):
    global SHAPE_SET
    config.addinivalue_line("markers", "bench_op(op, impls, variants): a benchmark of one op (benchmarks/conftest.py)")
    SHAPE_SET = choose_shape_set(config)
    # Only the tiny set runs the Triton kernels on the CPU, under the interpreter: interpreted they
    # are far too slow to be worth timing. The choice must precede the kernels' import (triton.jit
    # reads it when a kernel is defined); lvrpo_fast imports its backends lazily.
    if SHAPE_SET == "tiny" and DEVICE.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _SESSION["load_start"] = _load_average()
    _SESSION["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench_op")
    if marker is None:
        return
    op = marker.args[0]
    impls = marker.kwargs["impls"]
    variants = marker.kwargs.get("variants", [{}])
    names = ["shape", "impl"] + list(variants[0])
    params = []
    for shape in SHAPES[SHAPE_SET][op]:
        for variant in variants:
            for impl in impls:
                values = [shape, impl] + [variant[k] for k in variants[0]]
                vid = "-".join(str(v) for v in variant.values())
                params.append(pytest.param(*values, id="-".join(p for p in (shape.id, vid, impl) if p)))
    metafunc.parametrize(names, params)


# ----------------------------------------------------------------------------------------------
# Implementations: which can run here, and why not
# ----------------------------------------------------------------------------------------------
def lvrpo_backend(name: str, dtype: torch.dtype) -> None:
    """Skips unless lvrpo_fast's backend `name` runs on DEVICE with `dtype` in this shape set."""
    if name == "triton" and DEVICE.type == "cpu" and SHAPE_SET != "tiny":
        pytest.skip("Triton on the CPU runs only under the interpreter, which only the tiny (CI) set uses: "
                    "interpreted kernels are not worth timing; run the gpu set on a GPU")
    if name == "cpp" and DEVICE.type != "cpu":
        pytest.skip(f"the C++ backend takes CPU tensors; this {SHAPE_SET} set runs on {DEVICE} (use the cpu set)")
    try:
        dispatch.select(name, DEVICE, dtype)
    except RuntimeError as exc:
        pytest.skip(str(exc))


_COMPILE_STATE: Dict[str, object] = {}


def require_compile() -> None:
    """Skips unless torch.compile (dynamo + inductor) works here; the probe compiles once per session."""
    if SHAPE_SET == "tiny" and not _truthy(os.environ.get("LVRPO_BENCH_COMPILE")):
        pytest.skip("torch.compile costs ~10 s a graph on a CPU: not in the tiny (CI) set unless "
                    "LVRPO_BENCH_COMPILE=1")
    if "reason" not in _COMPILE_STATE:
        try:
            probe = torch.compile(lambda x: torch.logsumexp(x * 2.0, dim=-1), dynamic=False)
            probe(torch.randn(4, 8, device=DEVICE))
            _COMPILE_STATE["reason"] = ""
        except Exception as exc:  # no C++ compiler, no triton for inductor, ...
            _COMPILE_STATE["reason"] = f"torch.compile cannot run here: {type(exc).__name__}: {exc}"
        # One graph per (shape, variant) below; dynamo's default limit of 8 recompiles per function
        # would otherwise silently fall back to eager in the middle of the GPU set.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
    if _COMPILE_STATE["reason"]:
        pytest.skip(_COMPILE_STATE["reason"])


_COMPILED: Dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile of one of lvrpo_fast.reference's functions, compiled once per session.

    The validation stays eager outside (see the callers): its device->host check of the target ids
    would break the graph. Dynamic shapes: a GRPO step's token count varies from batch to batch, and
    one graph per variant, not per size, keeps the compile time bounded (inductor takes 20-50 s a
    graph on 2 CPU cores; the gpu set has ten sizes). Static graphs ran within the noise of these
    on the CPU."""
    require_compile()
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


PEERS = ("liger", "cce", "flash_attn")


def require_module(module: str):
    """Imports a peer's module or skips with the reason."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:
        pytest.skip(f"{module} cannot be imported ({type(exc).__name__}: {exc})")


def require_cuda(peer: str) -> None:
    if DEVICE.type != "cuda":
        pytest.skip(f"{peer} is a Triton kernel that needs a CUDA device; this run is on {DEVICE}")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


def tensor_bytes(obj) -> int:
    """Bytes of the distinct storages held by the tensors in obj (views counted once)."""
    seen, total = set(), 0
    for t in tensors_in(obj):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: no malloc_trim
    _LIBC = None


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cpu_peak_method() -> Tuple[bool, str]:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status("VmHWM")
        return True, "cpu: VmHWM - VmRSS over one call after malloc_trim(0) and a VmHWM reset (/proc/self/clear_refs)"
    except OSError as exc:
        return False, f"cpu peak RSS unavailable here ({exc})"


def peak_extra_memory(call: Callable, inputs):
    """One call of `call(inputs)`; returns (peak bytes beyond inputs, outputs and input gradients or None,
    the method, the call's seconds, its result).

    CUDA: the caching allocator's peak of allocated bytes over the call, minus what was allocated
    before it (the inputs) and the bytes of the results it returns (outputs and input gradients).
    CPU: torch's CPU allocator keeps no peak, so the process's resident set is measured instead.
    malloc_trim(0) first hands freed heap pages back to the OS, so that the resident set before the
    call is close to the live data; writing 5 to /proc/self/clear_refs resets the kernel's
    high-water mark VmHWM to it; after the call VmHWM - VmRSS_before is the peak growth of physical
    memory, from which the results' bytes are subtracted. Pages are counted when touched, which is
    when the kernels write them; resolution ~ a few pages of malloc slack.
    """
    gc.collect()
    if DEVICE.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        start = time.perf_counter()
        result = call(inputs)
        synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(DEVICE)
        return max(0, peak - before - tensor_bytes(result)), "cuda: torch.cuda.max_memory_allocated", seconds, result
    ok, method = _cpu_peak_method()
    if not ok:
        start = time.perf_counter()
        result = call(inputs)
        return None, method, time.perf_counter() - start, result
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    before = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    result = call(inputs)
    seconds = time.perf_counter() - start
    peak = _proc_status("VmHWM")
    return max(0, peak - before - tensor_bytes(result)), method, seconds, result


_CEILINGS: Dict[tuple, float] = {}


def matmul_ceiling(M: int, K: int, N: int, dtype: torch.dtype) -> float:
    """FLOP/s of torch.mm [M, K] x [K, N] -> [M, N] (the LM head's layout: hidden @ weight.T), measured
    once per size in this session: cuBLAS on a GPU, ATen's CPU BLAS on the CPU. Output preallocated.

    The best of the runs, not their median: a ceiling is what the hardware can do, and on a shared
    machine other processes only ever slow a run down."""
    key = (M, K, N, dtype)
    if key not in _CEILINGS:
        a = torch.randn(M, K, device=DEVICE).to(dtype)
        b = torch.randn(N, K, device=DEVICE).to(dtype)
        out = torch.empty(M, N, device=DEVICE, dtype=dtype)
        target, lo, hi = ROUNDS[SHAPE_SET]
        torch.mm(a, b.t(), out=out)
        synchronize()
        times = []
        while len(times) < max(lo, 5) or (sum(times) < target and len(times) < hi):
            start = time.perf_counter()
            torch.mm(a, b.t(), out=out)
            synchronize()
            times.append(time.perf_counter() - start)
        _CEILINGS[key] = 2.0 * M * K * N / min(times)
        del a, b, out
    return _CEILINGS[key]


def _stable_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


class InputCache:
    """The rotating input sets of the current (op, shape, dtype), shared by the implementations that
    follow one another in the parametrization, so they all see the same inputs. One entry at a time."""

    def __init__(self):
        self.key = None
        self.sets = None

    def get(self, key, make_set: Callable[[], dict], rotate: bool = True):
        if key != self.key or (rotate and len(self.sets) < 2):
            self.key, self.sets = None, None
            gc.collect()
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            sets = []
            torch.manual_seed(_stable_seed(key, 0))
            sets.append(make_set())
            count = min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / max(1, tensor_bytes(sets[0]))))) if rotate else 1
            for i in range(1, count):
                torch.manual_seed(_stable_seed(key, i))
                sets.append(make_set())
            synchronize()
            self.key, self.sets = key, sets
        return self.sets


_INPUTS = InputCache()
_REFERENCE: Dict[str, object] = {"key": None, "result": None}
_SESSION: Dict[str, object] = {"results": [], "skipped": [], "paired": []}

# Agreement with the eager reference before timing: a gross check (wrong sign, temperature, target,
# normalizer), not the kernel tests (tests/ hold those, with the tolerance table). Error relative to
# the largest magnitude of the reference's result.
CHECK_RTOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _reference_key(case) -> tuple:
    return case.case, case.shape, case.dtype, str(DEVICE)


def _to_host(result: dict) -> dict:
    return {k: v.detach().float().cpu() for k, v in result.items() if isinstance(v, torch.Tensor)}


def _compare(got: dict, want: dict, names, dtype) -> str:
    rtol = CHECK_RTOL[dtype]
    lines = []
    for name in names:
        if name not in got or name not in want:
            continue
        g, w = got[name].detach().float().cpu(), want[name]
        if g.shape != w.shape:
            raise AssertionError(f"{name}: shape {tuple(g.shape)} != reference {tuple(w.shape)}")
        if not torch.isfinite(g).all():
            raise AssertionError(f"{name}: non-finite values")
        scale = float(w.abs().max()) if w.numel() else 0.0
        err = float((g - w).abs().max()) if w.numel() else 0.0
        if err > rtol * scale + 1e-12:
            raise AssertionError(f"{name}: max error {err:.3e} against the eager reference exceeds "
                                 f"{rtol:g} x max|reference| = {rtol * scale:.3e}")
        lines.append(f"{name} {err / scale if scale else 0.0:.1e}")
    return "max rel err vs reference: " + ", ".join(lines) if lines else "no common outputs with the reference"


@dataclass
class Case:
    """One benchmark: `case` names the op and variant (e.g. "logprobs fwd+bwd entropy"), `call` runs it
    on one input set and returns a dict of result tensors (outputs and input gradients)."""

    case: str
    impl: str
    shape: Shape
    dtype: torch.dtype
    make_set: Callable[[], dict]
    call: Callable[[dict], dict]
    reference_call: Callable[[dict], dict]
    checked: Tuple[str, ...] = ()
    flops: Optional[float] = None
    # FLOPs this implementation executes on one input set, when not `flops` (skipped masked tokens).
    executed_flops: Optional[Callable[[dict], float]] = None
    mm: Optional[Tuple[int, int, int]] = None
    min_bytes: Optional[float] = None
    op: str = ""


class Bench:
    """The `bench` fixture: runs one Case under pytest-benchmark and records everything in extra_info."""

    def __init__(self, benchmark, request):
        self.benchmark = benchmark
        self.request = request
        self.device = DEVICE
        self.shape_set = SHAPE_SET
        self.dtype = DTYPES[SHAPE_SET]
        # The shape of issue 5's paired check: its acceptance shape in the cpu set, a smoke-sized one in
        # the tiny set, none on the GPU (the C++ backend takes CPU tensors).
        self.issue5_shape = {"cpu": ISSUE5_SHAPE, "tiny": SHAPES["tiny"]["linear_grpo_loss"][0]}.get(SHAPE_SET)

    # The helpers reach the test modules through the fixture: a test module importing `conftest`
    # would get whichever conftest.py pytest loaded last (tests/ has one too).
    @staticmethod
    def backend(name: str, dtype: torch.dtype) -> None:
        lvrpo_backend(name, dtype)

    @staticmethod
    def compiled(fn: Callable) -> Callable:
        return compiled(fn)

    @staticmethod
    def require_compile() -> None:
        require_compile()

    @staticmethod
    def module(name: str):
        return require_module(name)

    @staticmethod
    def require_cuda(peer: str) -> None:
        require_cuda(peer)

    @staticmethod
    def case(**fields) -> Case:
        return Case(**fields)

    def run(self, **fields) -> None:
        """Builds a Case from the keyword fields and measures it."""
        case = Case(**fields)
        try:
            self._run(case)
        except Exception as exc:
            if not is_oom(exc):
                raise
            if case.impl == "reference":  # the others then run unchecked instead of retrying it
                _REFERENCE.update(key=_reference_key(case), result=None)
            gc.collect()
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            pytest.skip(f"{case.impl} ran out of memory on {DEVICE} at {case.shape.id}: {str(exc).splitlines()[0]}")

    @staticmethod
    def _first_call(case: Case, timed: Callable, inputs) -> dict:
        """The first call; a peer that fails in it (an API or a version it does not support here) is
        skipped with the error as the reason. A wrong result from a peer still fails, in the check."""
        if case.impl not in PEERS:
            return timed(inputs)
        try:
            return timed(inputs)
        except Exception as exc:
            if is_oom(exc):
                raise
            pytest.skip(f"{case.impl} failed on its first call here: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}")

    @staticmethod
    def _check(case: Case, first: dict, inputs) -> str:
        """Compares the first call's result with the reference's on the same inputs (the reference's
        own run, just before, or one made here when it was deselected)."""
        key = _reference_key(case)
        if case.impl == "reference":
            _REFERENCE.update(key=key, result=_to_host(first))
        elif _REFERENCE["key"] != key:
            _REFERENCE.update(key=None, result=None)
            try:
                _REFERENCE.update(key=key, result=_to_host(case.reference_call(inputs)))
            except Exception as exc:
                if not is_oom(exc):
                    raise
                _REFERENCE.update(key=key, result=None)
                gc.collect()
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
        if _REFERENCE["result"] is None:
            return "not checked: the reference ran out of memory"
        return _compare(first, _REFERENCE["result"], case.checked, case.dtype) if case.checked else "not checked"

    def paired(self, cases: Dict[str, Case], name: str, target: Optional[float] = None, min_pairs: int = 5) -> None:
        """Times two implementations of one case call by call, alternately, on the same input sets.

        On a shared machine the speed of the whole machine drifts by a factor of 2-3 within minutes
        (other processes), so the ratio of two medians taken minutes apart is mostly that drift.
        Within a pair the two calls see the same conditions: the median of the per-pair ratios is the
        robust speed-up, judged against `target` (a minimum) when given. Each pair is one
        pytest-benchmark round; the order alternates between pairs."""
        (first_impl, first), (second_impl, second) = cases.items()
        sets = _INPUTS.get((first.op, first.shape, first.dtype, str(DEVICE)), first.make_set)
        timers = {}
        for impl, case in cases.items():
            def timed(inputs, case=case):
                out = case.call(inputs)
                synchronize()
                return out
            timers[impl] = timed
            timed(sets[0])  # warm-up
        times: Dict[str, list] = {first_impl: [], second_impl: []}
        counter = iter(range(10**9))

        def setup():
            i = next(counter)
            return (i, sets[i % len(sets)]), {}

        def pair(i, inputs):
            order = (first_impl, second_impl) if i % 2 == 0 else (second_impl, first_impl)
            for impl in order:
                start = time.perf_counter()
                timers[impl](inputs)
                times[impl].append(time.perf_counter() - start)

        self.benchmark.group = f"{name} | {first.shape.id} | {str(first.dtype).replace('torch.', '')}"
        if self.benchmark.disabled:
            self.benchmark.pedantic(pair, args=(0, sets[0]))
            return
        self.benchmark.pedantic(pair, setup=setup, rounds=min_pairs, iterations=1, warmup_rounds=0)
        ratios = sorted(a / b for a, b in zip(times[first_impl], times[second_impl]))
        info = {
            "paired": True, "case": first.case, "op": first.op, "impl": f"{first_impl} / {second_impl}",
            "shape": first.shape.id, "N": first.shape.N, "D": first.shape.D, "V": first.shape.V,
            "T": first.shape.T, "dtype": str(first.dtype).replace("torch.", ""), "device": str(DEVICE),
            "shape_set": SHAPE_SET, "pairs": len(ratios), "numerator": first_impl, "denominator": second_impl,
            "times_s": {k: v for k, v in times.items()}, "ratios": ratios,
            "median_ratio": ratios[len(ratios) // 2] if len(ratios) % 2 else
            0.5 * (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]),
            "load_average": _load_average(), "target_speedup": target,
        }
        self.benchmark.extra_info.update(info)
        _SESSION["paired"].append(info)

    def _run(self, case: Case) -> None:
        # The smoke run (--benchmark-disable) makes one call: one input set is enough.
        sets = _INPUTS.get((case.op, case.shape, case.dtype, str(DEVICE)), case.make_set,
                           rotate=not self.benchmark.disabled)

        def timed(inputs):
            out = case.call(inputs)
            synchronize()  # pytest-benchmark's clock is the host's: wait for the device inside the call
            return out

        self.benchmark.group = f"{case.case} | {case.shape.id} | {str(case.dtype).replace('torch.', '')}"
        if self.benchmark.disabled:
            # --benchmark-disable (the CI smoke run): one call through the fixture, memory-measured and
            # checked, no timing.
            measured = []
            self.benchmark.pedantic(
                lambda s: measured.append(peak_extra_memory(lambda x: self._first_call(case, timed, x), s)),
                args=(sets[0],))
            peak, method, _, first = measured[0]
        else:
            # First call: warm-up (compilation, autotuning, library loading) and the check.
            first = self._first_call(case, timed, sets[0])
        check = self._check(case, first, sets[0])
        del first

        rounds = 0
        if not self.benchmark.disabled:
            peak, method, seconds, _ = peak_extra_memory(timed, sets[1 % len(sets)])
            target, lo, hi = ROUNDS[SHAPE_SET]
            rounds = int(min(hi, max(lo, math.ceil(target / max(seconds, 1e-6)))))
            cycle = iter(range(10**9))

            def setup():
                return (sets[next(cycle) % len(sets)],), {}

            self.benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)

        stats = getattr(self.benchmark, "stats", None)
        median = stats.stats.median if stats is not None else None
        info = {
            "case": case.case, "op": case.op, "impl": case.impl, "shape": case.shape.id,
            "N": case.shape.N, "D": case.shape.D, "V": case.shape.V, "T": case.shape.T, "G": case.shape.G,
            "B": case.shape.B, "dtype": str(case.dtype).replace("torch.", ""), "device": str(DEVICE),
            "shape_set": SHAPE_SET, "median_s": median, "rounds": rounds,
            "input_sets": len(sets), "input_set_bytes": tensor_bytes(sets[0]),
            "peak_extra_bytes": peak, "memory_method": method, "check": check,
            "flops": case.flops, "min_bytes": case.min_bytes,
        }
        executed = case.flops
        if case.flops and case.executed_flops is not None:
            timed_sets = sets if rounds else sets[:1]
            executed = sum(case.executed_flops(s) for s in timed_sets) / len(timed_sets)
        info["executed_flops"] = executed
        if executed and median:
            info["tflops"] = executed / median / 1e12
            if case.mm is not None:
                ceiling = matmul_ceiling(*case.mm, case.dtype)
                info["ceiling"] = (f"torch.mm {tuple(case.mm)} {info['dtype']} "
                                   f"({'cuBLAS' if DEVICE.type == 'cuda' else 'ATen CPU BLAS'})")
                info["ceiling_tflops"] = ceiling / 1e12
                info["roofline_fraction"] = executed / median / ceiling
        if case.min_bytes and median:
            info["gbps"] = case.min_bytes / median / 1e9
        self.benchmark.extra_info.update(info)
        _SESSION["results"].append(info)


@pytest.fixture
def bench(benchmark, request):
    return Bench(benchmark, request)


# ----------------------------------------------------------------------------------------------
# Provenance (machine_info / the JSON) and the terminal summary
# ----------------------------------------------------------------------------------------------
def _load_average() -> Optional[str]:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def _version(module: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _git(*args) -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no") or ""
    info = {
        "shape_set": SHAPE_SET,
        "device": str(DEVICE),
        "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in (
            "torch", "triton", "lvrpo-fast", "liger-kernel", "cut-cross-entropy", "flash-attn", "pytest-benchmark")},
        "cuda": torch.version.cuda,
        "commit": _git("rev-parse", "HEAD"),
        # The code measured is the working tree's: name the tracked files that differ from the commit.
        "commit_dirty_files": [line.split(maxsplit=1)[-1] for line in status.splitlines() if line.strip()],
        "started_utc": _SESSION.get("started"),
        "load_average_start": _SESSION.get("load_start"),
        "env": {k: os.environ.get(k) for k in ("LVRPO_CHUNK_BYTES", "TRITON_INTERPRET", "CI", "OMP_NUM_THREADS")},
    }
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lvrpo"] = provenance()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    extra = output_json["machine_info"].setdefault("lvrpo", provenance())
    extra["load_average_end"] = _load_average()
    extra["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    extra["matmul_ceilings_tflops"] = {f"{m}x{k}x{n} {str(dt).replace('torch.', '')}": v / 1e12
                                       for (m, k, n, dt), v in _CEILINGS.items()}
    output_json["lvrpo_skipped"] = list(_SESSION["skipped"])
    output_json["lvrpo_targets"] = TARGETS.get(SHAPE_SET, [])


def pytest_runtest_logreport(report):
    if report.skipped and "benchmarks" in report.nodeid.replace("\\", "/"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SESSION["skipped"].append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def _ratios(results):
    """{(case, shape, dtype): {impl: info}} and per entry the speed-up and memory ratio vs reference."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for info in results:
        groups.setdefault((info["case"], info["shape"], info["dtype"]), {})[info["impl"]] = info
    return groups


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = _SESSION["results"]
    if not results and not _SESSION["paired"]:
        return
    tr = terminalreporter
    tr.section(f"lvrpo_fast benchmarks ({SHAPE_SET} set on {DEVICE}): against the eager reference")
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
    for line in report.evaluate_targets(TARGETS.get(SHAPE_SET, []), results) + report.paired_lines(_SESSION["paired"]):
        tr.write_line(line)
