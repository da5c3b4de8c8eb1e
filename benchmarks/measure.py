"""Measurement: peak extra memory, the matmul ceiling, timing rounds, rotating input sets, the gross check.

Used by the pytest harness (harness.py) and the GPU first-light script (first_light.py) alike, so both
count, time and check the same way.
"""
from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
import zlib
from typing import Callable, Dict, List, Sequence, Tuple

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MiB = float(1 << 20)

# Input sets are cycled so that the inputs of one call are evicted from the caches by the next ones:
# together they span at least ROTATE_BYTES (more than an H100/H200's 50-60 MB L2 and this CPU's L3),
# two sets at least, MAX_SETS at most (for inputs of a few KB the op is launch-bound anyway).
ROTATE_BYTES = 256 << 20
MAX_SETS = 64

# Rounds: enough to fill target seconds of timed calls, within [min, max] rounds, per shape set.
Rounds = Tuple[float, int, int]
ROUNDS: Dict[str, Rounds] = {"tiny": (0.2, 1, 5), "cpu": (4.0, 3, 100), "gpu": (2.0, 10, 200)}


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


# ----------------------------------------------------------------------------------------------
# Peak extra memory
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def rounds_for(seconds_per_call: float, rounds: Rounds) -> int:
    """How many timed rounds fill the target time, within [min, max]."""
    target, lo, hi = rounds
    return int(min(hi, max(lo, math.ceil(target / max(seconds_per_call, 1e-6)))))


def time_rounds(timed: Callable, sets: Sequence[dict], rounds: int) -> dict:
    """Times `rounds` calls of timed(inputs), cycling the input sets, with the host clock (timed
    synchronizes the device before it returns). Returns the median and the spread, in seconds."""
    times: List[float] = []
    for i in range(rounds):
        inputs = sets[i % len(sets)]
        start = time.perf_counter()
        timed(inputs)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def best_time(fn: Callable[[], object], rounds: Rounds) -> float:
    """The best wall time of fn() (device synchronized) after one warm-up call: at least max(min, 5)
    runs, more until the target time or the max is reached. The best, not the median: for a ceiling,
    what the hardware can do; on a shared machine other processes only ever slow a run down."""
    target, lo, hi = rounds
    fn()
    synchronize()
    times = []
    while len(times) < max(lo, 5) or (sum(times) < target and len(times) < hi):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


CEILINGS: Dict[tuple, float] = {}


def matmul_ceiling(M: int, K: int, N: int, dtype: torch.dtype, rounds: Rounds) -> float:
    """FLOP/s of torch.mm [M, K] x [K, N] -> [M, N] (the LM head's layout: hidden @ weight.T), measured
    once per size in this process (best_time): cuBLAS on a GPU, ATen's CPU BLAS on the CPU. Output
    preallocated, inputs random (never zeros, which multiply faster)."""
    key = (M, K, N, dtype)
    if key not in CEILINGS:
        a = torch.randn(M, K, device=DEVICE).to(dtype)
        b = torch.randn(N, K, device=DEVICE).to(dtype)
        out = torch.empty(M, N, device=DEVICE, dtype=dtype)
        CEILINGS[key] = 2.0 * M * K * N / best_time(lambda: torch.mm(a, b.t(), out=out), rounds)
        del a, b, out
    return CEILINGS[key]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def stable_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


class InputCache:
    """The rotating input sets of the current (op, shape, dtype), shared by the implementations that
    follow one another, so they all see the same inputs. One entry at a time."""

    def __init__(self):
        self.key = None
        self.sets = None

    def get(self, key, make_set: Callable[[], dict], rotate: bool = True):
        if key != self.key or (rotate and len(self.sets) < 2):
            self.clear()
            sets = []
            torch.manual_seed(stable_seed(key, 0))
            sets.append(make_set())
            count = min(MAX_SETS, max(2, math.ceil(ROTATE_BYTES / max(1, tensor_bytes(sets[0]))))) if rotate else 1
            for i in range(1, count):
                torch.manual_seed(stable_seed(key, i))
                sets.append(make_set())
            synchronize()
            self.key, self.sets = key, sets
        return self.sets

    def clear(self) -> None:
        self.key, self.sets = None, None
        release_memory()


def release_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The gross check against the eager reference
# ----------------------------------------------------------------------------------------------
# Agreement with the eager reference before timing: a gross check (wrong sign, temperature, target,
# normalizer), not the kernel tests (tests/ hold those, with the tolerance table). Error relative to
# the largest magnitude of the reference's result.
CHECK_RTOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def kept(result: dict) -> dict:
    """The reference's result as kept for the checks that follow: float32, detached, on the device
    it was computed on (on a GPU the comparison of a [V, D] gradient then takes milliseconds, not
    the seconds of a copy to the host)."""
    return {k: v.detach().float() for k, v in result.items() if isinstance(v, torch.Tensor)}


def compare(got: dict, want: dict, names, dtype) -> str:
    """Max error of each named result relative to max|reference|; raises AssertionError past CHECK_RTOL."""
    rtol = CHECK_RTOL[dtype]
    lines = []
    for name in names:
        if name not in got or name not in want:
            continue
        w = want[name]
        g = got[name].detach().float().to(w.device)
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
