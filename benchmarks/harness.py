"""The bench harness: which implementations can run here, one benchmark Case, and its measurement.

measure(case, ...) makes one implementation's row: the input sets, a first call checked against the
eager reference's result on the same inputs, the peak extra memory of one call, the timed rounds, and
the FLOPs, TFLOP/s and fraction of the matmul ceiling. The pytest suite times the rounds with
pytest-benchmark (Bench, the `bench` fixture of conftest.py); the GPU first-light script with a plain
loop (measure.time_rounds). An implementation that cannot run here raises pytest's Skipped with the
reason (pytest.skip), which the script records as a skipped row.

Per row (pytest: extra_info of --benchmark-json):
    median_s            median of the timed rounds; the device is synchronized inside the timed call
                        (the first-light script's loop adds min_s and max_s)
    first_call_s        the first call: warm-up, compilation, autotuning, loading, and one run
    check               agreement with the eager reference's result on the same inputs
    peak_extra_bytes    memory allocated beyond the inputs, the outputs and the input gradients
                        (CUDA: the allocator's peak; CPU: growth of the process's resident high-water
                        mark over one call, see measure.peak_extra_memory)
    flops               the FLOPs of the operation on all N tokens (what the reference executes)
    executed_flops      the FLOPs this implementation executes, mean over the input sets: fewer than
                        flops where it skips masked tokens (the kernel backends on a padded batch)
    tflops              executed_flops / median_s: the rate the hardware achieved
    ceiling_tflops      torch.mm at the same (M, K, N) and dtype, measured in this process
    roofline_fraction   tflops / ceiling_tflops (so skipping work never inflates it)
    min_bytes, gbps     for the memory-bound ops (no matmul): bytes that must move, and the rate
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

from lvrpo_fast import dispatch

import measure
import provenance
from measure import DEVICE, ROUNDS
from shapes import DTYPES, ISSUE5_SHAPE, SHAPES, Shape, truthy

SHAPE_SET = "cpu"  # set by configure()
_ROUNDS = ROUNDS[SHAPE_SET]


def configure(shape_set: str, rounds: Optional[measure.Rounds] = None) -> None:
    """Chooses the shape set (and with it the rounds, unless given) for this process.

    Only the tiny set runs the Triton kernels on the CPU, under the interpreter: interpreted they
    are far too slow to be worth timing. The choice must precede the kernels' import (triton.jit
    reads it when a kernel is defined); lvrpo_fast imports its backends lazily."""
    global SHAPE_SET, _ROUNDS
    SHAPE_SET = shape_set
    _ROUNDS = rounds or ROUNDS[shape_set]
    if shape_set == "tiny" and DEVICE.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    SESSION["load_start"] = provenance.load_average()
    SESSION["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")


def rounds() -> measure.Rounds:
    return _ROUNDS


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
    """Skips unless torch.compile (dynamo + inductor) works here; the probe compiles once per process."""
    if SHAPE_SET == "tiny" and not truthy(os.environ.get("LVRPO_BENCH_COMPILE")):
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
    """torch.compile of one of lvrpo_fast.reference's functions, compiled once per process.

    The validation stays eager outside (see the callers): its device->host check of the target ids
    would break the graph. Dynamic shapes: a GRPO step's token count varies from batch to batch, and
    one graph per variant, not per size, keeps the compile time bounded (inductor takes 20-50 s a
    graph on 2 CPU cores; the gpu set has ten sizes). Static graphs ran within the noise of these
    on the CPU."""
    require_compile()
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


PEERS = ("liger", "cce", "flash_attn", "trl")


def trl_chunked_logprobs():
    """TRL 1.16's chunked LM head (the one its GRPOTrainer's log-probabilities go through): a function
    (hidden [n, D], weight [V, D], targets [n], entropy) -> (logp [n], entropy [n] or None), with TRL's own
    vocabulary chunk; skips when TRL is not installed."""
    chunked = require_module("trl.kernels.chunked_logprob")
    chunk = require_module("trl.trainer.utils")._CHUNKED_LOGPROB_CHUNK_SIZE

    def fn(hidden, weight, targets, entropy):
        outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
        logp, ent, *_ = chunked.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, chunk, None, 1.0,
                                                             outputs)
        return logp, ent
    return fn


def require_module(module: str):
    """Imports a peer's module or skips with the reason."""
    try:
        return importlib.import_module(module)
    except Exception as exc:
        pytest.skip(f"{module} cannot be imported ({type(exc).__name__}: {exc})")


def require_cuda(peer: str) -> None:
    if DEVICE.type != "cuda":
        pytest.skip(f"{peer} is a Triton kernel that needs a CUDA device; this run is on {DEVICE}")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def dtype() -> torch.dtype:
    """The floating dtype of the current shape set's linear ops."""
    return DTYPES[SHAPE_SET]


def issue5_shape() -> Optional[Shape]:
    """The shape of issue 5's paired check: its acceptance shape in the cpu set, a smoke-sized one in
    the tiny set, none on the GPU (the C++ backend takes CPU tensors)."""
    return {"cpu": ISSUE5_SHAPE, "tiny": SHAPES["tiny"]["linear_grpo_loss"][0]}.get(SHAPE_SET)


# ----------------------------------------------------------------------------------------------
# One benchmark and its measurement
# ----------------------------------------------------------------------------------------------
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


INPUTS = measure.InputCache()
_REFERENCE: Dict[str, object] = {"key": None, "result": None}
SESSION: Dict[str, object] = {"results": [], "skipped": [], "paired": []}


def release() -> None:
    """Frees the input sets and the kept reference result (and, on a GPU, the allocator's cache)."""
    INPUTS.clear()
    _REFERENCE.update(key=None, result=None)
    measure.release_memory()


def _reference_key(case: Case) -> tuple:
    return case.case, case.shape, case.dtype, str(DEVICE)


def input_sets(case: Case, rotate: bool = True):
    return INPUTS.get((case.op, case.shape, case.dtype, str(DEVICE)), case.make_set, rotate=rotate)


def timed_call(case: Case) -> Callable[[dict], dict]:
    def timed(inputs):
        out = case.call(inputs)
        measure.synchronize()  # the clocks are the host's: wait for the device inside the call
        return out
    return timed


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


def _check(case: Case, first: dict, inputs, strict: bool) -> str:
    """Compares the first call's result with the reference's on the same inputs (the reference's
    own run, just before, or one made here when it was deselected). A disagreement raises
    AssertionError when strict, else it is returned as "FAILED: ..." and the row is still measured."""
    key = _reference_key(case)
    if case.impl == "reference":
        _REFERENCE.update(key=key, result=measure.kept(first))
    elif _REFERENCE["key"] != key:
        _REFERENCE.update(key=None, result=None)
        try:
            _REFERENCE.update(key=key, result=measure.kept(case.reference_call(inputs)))
        except Exception as exc:
            if not is_oom(exc):
                raise
            _REFERENCE.update(key=key, result=None)
            measure.release_memory()
    if _REFERENCE["result"] is None:
        return "not checked: the reference ran out of memory"
    if not case.checked:
        return "not checked"
    try:
        return measure.compare(first, _REFERENCE["result"], case.checked, case.dtype)
    except AssertionError as exc:
        if strict:
            raise
        return f"FAILED: {exc}"


# timer(timed, sets, rounds) -> {"median_s": ..., ...}: how the rounds are timed.
Timer = Callable[[Callable, list, int], dict]


def measure_case(case: Case, timer: Optional[Timer], once: Callable[[Callable[[], None]], None] = lambda f: f(),
                 strict: bool = True) -> dict:
    """One implementation's row (see the module docstring for its fields).

    timer None: the untimed smoke run, one call (made through `once`) on one input set, memory-measured
    and checked. strict: a result that disagrees with the reference raises (pytest) rather than being
    recorded in the row's "check" (the first-light script, which keeps the timing of such a row).
    Running out of device memory skips the row with the reason (and, for the reference, leaves the
    others unchecked rather than retrying it)."""
    try:
        return _measure(case, timer, once, strict)
    except Exception as exc:
        if not is_oom(exc):
            raise
        if case.impl == "reference":
            _REFERENCE.update(key=_reference_key(case), result=None)
        measure.release_memory()
        pytest.skip(f"{case.impl} ran out of memory on {DEVICE} at {case.shape.id}: {str(exc).splitlines()[0]}")


def _measure(case: Case, timer: Optional[Timer], once, strict: bool) -> dict:
    sets = input_sets(case, rotate=timer is not None)  # one call needs one input set
    timed = timed_call(case)
    if timer is None:
        measured = []
        once(lambda: measured.append(measure.peak_extra_memory(lambda x: _first_call(case, timed, x), sets[0])))
        peak, method, first_s, first = measured[0]
    else:
        # First call: warm-up (compilation, autotuning, library loading) and the check.
        start = time.perf_counter()
        first = _first_call(case, timed, sets[0])
        first_s = time.perf_counter() - start
    check = _check(case, first, sets[0], strict)
    del first

    n_rounds, timing = 0, {"median_s": None}
    if timer is not None:
        peak, method, seconds, _ = measure.peak_extra_memory(timed, sets[1 % len(sets)])
        n_rounds = measure.rounds_for(seconds, _ROUNDS)
        timing = timer(timed, sets, n_rounds)
    median = timing["median_s"]
    info = {
        "case": case.case, "op": case.op, "impl": case.impl, "shape": case.shape.id,
        "N": case.shape.N, "D": case.shape.D, "V": case.shape.V, "T": case.shape.T, "G": case.shape.G,
        "B": case.shape.B, "dtype": str(case.dtype).replace("torch.", ""), "device": str(DEVICE),
        "shape_set": SHAPE_SET, **timing, "rounds": n_rounds,
        "input_sets": len(sets), "input_set_bytes": measure.tensor_bytes(sets[0]),
        "peak_extra_bytes": peak, "memory_method": method, "check": check, "first_call_s": first_s,
        "flops": case.flops, "min_bytes": case.min_bytes,
    }
    executed = case.flops
    if case.flops and case.executed_flops is not None:
        timed_sets = sets if n_rounds else sets[:1]
        executed = sum(case.executed_flops(s) for s in timed_sets) / len(timed_sets)
    info["executed_flops"] = executed
    if executed and median:
        info["tflops"] = executed / median / 1e12
        if case.mm is not None:
            ceiling = measure.matmul_ceiling(*case.mm, case.dtype, _ROUNDS)
            info["ceiling"] = (f"torch.mm {tuple(case.mm)} {info['dtype']} "
                               f"({'cuBLAS' if DEVICE.type == 'cuda' else 'ATen CPU BLAS'})")
            info["ceiling_tflops"] = ceiling / 1e12
            info["roofline_fraction"] = executed / median / ceiling
    if case.min_bytes and median:
        info["gbps"] = case.min_bytes / median / 1e9
    return info


class Bench:
    """The `bench` fixture: runs one Case under pytest-benchmark and records everything in extra_info."""

    def __init__(self, benchmark, request):
        self.benchmark = benchmark
        self.request = request
        self.device = DEVICE
        self.shape_set = SHAPE_SET
        self.dtype = dtype()
        self.issue5_shape = issue5_shape()

    def run(self, **fields) -> None:
        """Builds a Case from the keyword fields and measures it."""
        case = Case(**fields)
        self.benchmark.group = f"{case.case} | {case.shape.id} | {str(case.dtype).replace('torch.', '')}"
        if self.benchmark.disabled:
            # --benchmark-disable (the CI smoke run): one call through the fixture, memory-measured and
            # checked, no timing.
            info = measure_case(case, None, once=self.benchmark.pedantic)
        else:
            info = measure_case(case, self._timer)
        self.benchmark.extra_info.update(info)
        SESSION["results"].append(info)

    def _timer(self, timed, sets, n_rounds) -> dict:
        cycle = iter(range(10**9))

        def setup():
            return (sets[next(cycle) % len(sets)],), {}

        self.benchmark.pedantic(timed, setup=setup, rounds=n_rounds, iterations=1, warmup_rounds=0)
        stats = getattr(self.benchmark, "stats", None)
        return {"median_s": stats.stats.median if stats is not None else None}

    def paired(self, cases: Dict[str, Case], name: str, target: Optional[float] = None, min_pairs: int = 5) -> None:
        """Times two implementations of one case call by call, alternately, on the same input sets.

        On a shared machine the speed of the whole machine drifts by a factor of 2-3 within minutes
        (other processes), so the ratio of two medians taken minutes apart is mostly that drift.
        Within a pair the two calls see the same conditions: the median of the per-pair ratios is the
        robust speed-up, judged against `target` (a minimum) when given. Each pair is one
        pytest-benchmark round; the order alternates between pairs."""
        (first_impl, first), (second_impl, second) = cases.items()
        sets = input_sets(first)
        timers = {}
        for impl, case in cases.items():
            timers[impl] = timed_call(case)
            timers[impl](sets[0])  # warm-up
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
            "load_average": provenance.load_average(), "target_speedup": target,
        }
        self.benchmark.extra_info.update(info)
        SESSION["paired"].append(info)
