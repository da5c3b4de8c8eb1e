"""The C++ CPU backend: the primitives of lvrpo_fast.contract, compiled from csrc/ on first use.

Runs on CPU tensors of float16, bfloat16 and float32 (float64 stays with the reference, see
lvrpo_fast.dispatch). The LM-head matmuls stay in ATen's BLAS (the shared chunk loop); the C++ code
does the row-wise work, rows (or sequences) in parallel with at::parallel_for, i.e. on torch's
intra-op threads (torch.set_num_threads applies).

Build: the first call of :func:`available` (or of a primitive) compiles csrc/*.cpp with ninja through
torch.utils.cpp_extension and caches the library under LVRPO_BUILD_DIR, else TORCH_EXTENSIONS_DIR,
else torch's extension cache (~/.cache/torch_extensions). The library's name carries a hash of the
sources, the flags, the compiler (CXX), torch and Python, so an edit rebuilds and a cached library is
loaded directly, without ninja. No -march flag: the cache may be shared between CPUs, and the hot
loops pick their ISA at load time instead (csrc/common.h). One line goes to stderr while it compiles.
A failed build (no compiler, no ninja, a compile error) is remembered for the process: available()
returns (False, reason) and "auto" dispatch falls back to the reference with a warning naming it.
Importing this module never raises and never compiles.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..contract import LOG_RATIO_CLAMP, STAT_COLUMNS, VESPO_LOG_W_MIN, token_loss_params
from ..options import GRPOOptions

try:  # the sources' package (csrc/ in an editable install, lvrpo_fast/csrc in a wheel); an empty __init__
    from .. import csrc as _csrc_package
except ImportError:  # run from a source tree without the install mapping: found next to this file below
    _csrc_package = None

name = "cpp"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SOURCES = ("logprobs.cpp", "grpo_loss.cpp", "advantages.cpp", "process_advantages.cpp", "bindings.cpp")
HEADERS = ("common.h",)
COMPILING_MESSAGE = "lvrpo_fast: compiling the C++ CPU backend (once, ~1-2 min)..."

_lock = threading.Lock()
_state: Optional[Tuple[object, str]] = None  # (extension module or None, reason it is unavailable)


# ----------------------------------------------------------------------------------------------
# Build and cache
# ----------------------------------------------------------------------------------------------
def source_dir() -> Path:
    """The directory of the C++ sources: the package lvrpo_fast.csrc (csrc/ of the repository in an
    editable install, lvrpo_fast/csrc in a wheel), else found next to this file."""
    candidates = [Path(p) for p in _csrc_package.__path__] if _csrc_package is not None else []
    here = Path(__file__).resolve()
    candidates += [here.parents[1] / "csrc", here.parents[2] / "csrc"]
    for candidate in candidates:
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"cannot find the C++ sources (bindings.cpp) in {[str(c) for c in candidates]}")


def compile_flags() -> Tuple[list, list]:
    """(cflags, ldflags). FMA contraction on (the exponentials are ~1.5x faster with it); the one product
    that must keep its rounding is fenced in the source (lvrpo::rounded). -Wno-psabi: the 64-byte
    vector helpers are inlined, no vector crosses a call boundary whose ABI could differ. at::parallel_for is inline OpenMP when torch uses OpenMP: without -fopenmp it
    would compile to a serial loop. The extension then shares torch's libgomp (same soname, already
    loaded), so torch.set_num_threads governs its threads too."""
    cflags, ldflags = ["-O3", "-ffp-contract=fast", "-Wno-psabi"], []
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def extension_name(files, cflags, ldflags) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for item in (cflags, ldflags, os.environ.get("CXX", ""), torch.__version__, sys.version, platform.machine()):
        digest.update(repr(item).encode())
    return f"lvrpo_fast_cpp_{digest.hexdigest()[:16]}"


def build_root() -> Path:
    root = os.environ.get("LVRPO_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _import_library(module_name: str, library: Path):
    spec = importlib.util.spec_from_file_location(module_name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_toolchain():
    """Raises a one-line RuntimeError when ninja or the C++ compiler torch would use is missing, before
    torch's build prints pages about it."""
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")  # the compiler torch.utils.cpp_extension invokes
    if shutil.which(compiler.split()[0] if compiler.strip() else "c++") is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} not found (install g++ or set CXX)")


def build():
    """Returns the extension module, compiling it if no cached library matches; raises on failure."""
    from torch.utils.cpp_extension import LIB_EXT, load

    src = source_dir()
    sources = [src / f for f in SOURCES]
    cflags, ldflags = compile_flags()
    module_name = extension_name(sources + [src / f for f in HEADERS], cflags, ldflags)
    directory = build_root() / module_name
    library = directory / f"{module_name}{LIB_EXT}"
    module = None
    if library.is_file():
        try:
            module = _import_library(module_name, library)
        except ImportError:  # half-written by a concurrent build: let ninja (and its lock) decide
            module = None
    if module is None:
        check_toolchain()
        print(COMPILING_MESSAGE, file=sys.stderr, flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        module = load(name=module_name, sources=[str(s) for s in sources], extra_cflags=cflags,
                      extra_ldflags=ldflags, extra_include_paths=[str(src)], build_directory=str(directory),
                      verbose=False)
    check_contract(module)
    return module


def check_contract(module) -> None:
    """Raises when the compiled library and lvrpo_fast.contract disagree (a stale or edited csrc/)."""
    if tuple(module.STAT_COLUMNS) != STAT_COLUMNS:
        raise RuntimeError(f"csrc/common.h stat columns {tuple(module.STAT_COLUMNS)} differ from "
                           f"lvrpo_fast.contract {STAT_COLUMNS}")
    if module.LOG_RATIO_CLAMP != LOG_RATIO_CLAMP:
        raise RuntimeError(f"csrc/common.h kLogRatioClamp {module.LOG_RATIO_CLAMP} differs from "
                           f"lvrpo_fast.contract.LOG_RATIO_CLAMP {LOG_RATIO_CLAMP}")
    if module.VESPO_LOG_W_MIN != VESPO_LOG_W_MIN:
        raise RuntimeError(f"csrc/common.h kVespoLogWMin {module.VESPO_LOG_W_MIN} differs from "
                           f"lvrpo_fast.contract.VESPO_LOG_W_MIN {VESPO_LOG_W_MIN}")
    python_fields = tuple(_PARAM_FIELDS)
    if tuple(module.LOSS_PARAM_FIELDS) != python_fields:
        raise RuntimeError(f"csrc/common.h LVRPO_LOSS_PARAMS {tuple(module.LOSS_PARAM_FIELDS)} differ from "
                           f"lvrpo_fast.contract.token_loss_params {python_fields}")


def failure_reason(exc: BaseException) -> str:
    """One line saying why the build failed: the compiler's first error line when there is one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, RuntimeError) and len(lines) == 1 and "Error building" not in lines[0]:
        return f"the C++ extension cannot be built: {lines[0][:300]}"
    for marker in ("error:", "fatal:", "not found", "No such file"):
        for line in lines:
            if marker in line and not line.startswith(("FAILED:", "[")):
                return f"the C++ extension failed to build: {line[:300]}"
    first = lines[0][:300] if lines else ""
    return f"the C++ extension failed to build: {type(exc).__name__}: {first}"


def load_extension():
    """(module, "") once built, (None, reason) if the build failed; either is cached for the process."""
    global _state
    with _lock:
        if _state is None:
            try:
                _state = (build(), "")
            except Exception as exc:  # any build failure means "unavailable", never an import error
                _state = (None, failure_reason(exc))
        return _state


def available(device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the C++ backend runs on CPU tensors, got {device}"
    if dtype not in DTYPES:
        return False, f"the C++ backend takes {', '.join(map(str, DTYPES))}, not {dtype}"
    module, why = load_extension()
    return module is not None, why


def _extension():
    module, why = load_extension()
    if module is None:
        raise RuntimeError(f"the C++ backend is unavailable: {why}")
    return module


# ----------------------------------------------------------------------------------------------
# Primitives (contract: lvrpo_fast/contract.py)
# ----------------------------------------------------------------------------------------------
def logits_stats(logits, targets, temperature, with_entropy, batch_invariant=False):
    """logits [C, V] fp16/bf16/fp32 (rows may be strided, V contiguous), targets [C] int64 -> (logp, lse,
    entropy or None), float32 [C].
    batch_invariant needs nothing here: a row is one task, its blocks of V summed in order, whatever
    the row count, the row's place or the thread count (csrc/logprobs.cpp)."""
    logp, lse, entropy = _extension().logits_stats(logits, targets, float(temperature), bool(with_entropy))
    return logp, lse, entropy


def logits_grad_(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature):
    """Overwrites logits [C, V] with d(loss)/d(logits); entropy, grad_entropy [C] float32 or both None."""
    _extension().logits_grad_(logits, targets, lse, entropy, grad_logp, grad_entropy, float(temperature))


# The parameter names of the contract, in its order (the C++ struct must list the same).
_PARAM_FIELDS = tuple(token_loss_params(GRPOOptions()))


def loss_params(module, params):
    """contract.token_loss_params(options) -> the extension's LossParams, field by field."""
    struct = module.LossParams()
    for key, value in params.items():
        setattr(struct, key, value)
    return struct


def grpo_token_loss(logp, logp_old, logp_ref, logp_sampling, advantages, mask, rollout_weights, entropy,
                    entropy_threshold, row_scale, params, need_grad,
                    batch_invariant=False):
    """[B, T] float32 per-token inputs, advantages [B] or [B, T] and row_scale [B] float32, mask [B, T]
    bool, entropy_threshold 0-dim float32 or None, params from contract.token_loss_params
    -> (stats [B, NSTATS] float32, grad_logp [B, T] float32 or None). batch_invariant needs nothing here:
    a sequence is one task summing its unmasked tokens in order."""
    module = _extension()
    stats, grad_logp = module.grpo_token_loss(logp, logp_old, logp_ref, logp_sampling, advantages, mask,
                                              rollout_weights, entropy, entropy_threshold, row_scale,
                                              loss_params(module, params), bool(need_grad))
    return stats, grad_logp


def scale_(tensors, factor):
    """Multiplies each tensor in place by the 0-dim factor; nothing when it is exactly 1 (a CPU tensor:
    reading it costs nothing)."""
    value = float(factor)
    if value == 1.0:
        return
    for t in tensors:
        t.mul_(value)


def group_advantages(rewards, group_size, scale, eps, leave_one_out):
    """rewards [B] float32 -> [B] float32 (docs/math.md section 2)."""
    return _extension().group_advantages(rewards, int(group_size), str(scale), float(eps), bool(leave_one_out))


def process_advantages(step_rewards, step_ends, step_offsets, group_size, seq_len, scale, eps, leave_one_out,
                       outcome_advantages, outcome_weight):
    """step_rewards [S] float32, step_ends [S] / step_offsets [B + 1] int64, outcome_advantages [B] float32
    or None -> [B, seq_len] float32 (docs/math.md section 11)."""
    return _extension().process_advantages(step_rewards, step_ends, step_offsets, int(group_size), int(seq_len),
                                           str(scale), float(eps), bool(leave_one_out), outcome_advantages,
                                           float(outcome_weight))
