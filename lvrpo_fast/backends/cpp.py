"""The C++ CPU backend: the primitives of lvrpo_fast.backends, compiled from csrc/ on first use.

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

from . import (NSTATS, STAT_CLIP_HIGH, STAT_CLIP_LOW, STAT_CLIP_REGION, STAT_COUNT, STAT_ENTROPY, STAT_KL,
               STAT_LOSS, STAT_RATIO)

name = "cpp"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SOURCES = ("logprobs.cpp", "grpo_loss.cpp", "advantages.cpp", "bindings.cpp")
HEADERS = ("common.h",)
COMPILING_MESSAGE = "lvrpo_fast: compiling the C++ CPU backend (once, ~1-2 min)..."
_STAT_COLUMNS = (STAT_LOSS, STAT_COUNT, STAT_KL, STAT_CLIP_LOW, STAT_CLIP_HIGH, STAT_CLIP_REGION, STAT_RATIO,
                 STAT_ENTROPY, NSTATS)

_lock = threading.Lock()
_state: Optional[Tuple[object, str]] = None  # (extension module or None, reason it is unavailable)


# ----------------------------------------------------------------------------------------------
# Build and cache
# ----------------------------------------------------------------------------------------------
def source_dir() -> Path:
    """The directory of the C++ sources: the package lvrpo_fast.csrc (csrc/ of the repository in an
    editable install, lvrpo_fast/csrc in a wheel), else found next to this file."""
    candidates = []
    try:
        import lvrpo_fast.csrc as package

        candidates += [Path(p) for p in package.__path__]
    except ImportError:
        pass
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
    if tuple(module.STAT_COLUMNS) != _STAT_COLUMNS:
        raise RuntimeError(f"csrc/common.h stat columns {tuple(module.STAT_COLUMNS)} differ from "
                           f"lvrpo_fast.backends {_STAT_COLUMNS}")
    return module


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
# Primitives (contract: lvrpo_fast/backends/__init__.py)
# ----------------------------------------------------------------------------------------------
def logits_stats(logits, targets, temperature, with_entropy):
    """logits [C, V] fp16/bf16/fp32, targets [C] int64 -> (logp, lse, entropy or None), float32 [C]."""
    logp, lse, entropy = _extension().logits_stats(logits, targets, float(temperature), bool(with_entropy))
    return logp, lse, entropy


def logits_grad_(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature):
    """Overwrites logits [C, V] with d(loss)/d(logits); entropy, grad_entropy [C] float32 or both None."""
    _extension().logits_grad_(logits, targets, lse, entropy, grad_logp, grad_entropy, float(temperature))


def loss_params(module, options):
    """GRPOOptions -> the extension's LossParams (plain scalars; aggregation travels as row_scale)."""
    params = module.LossParams()
    params.policy = {"cispo": module.POLICY_CISPO, "sapo": module.POLICY_SAPO}.get(options.loss_type,
                                                                                   module.POLICY_CLIP)
    params.epsilon_low = float(options.epsilon_low)
    params.epsilon_high = float(options.epsilon_high)
    params.has_delta = options.delta is not None
    params.delta = float(options.delta) if options.delta is not None else 0.0
    params.has_clip_ratio_c = options.clip_ratio_c is not None
    params.clip_ratio_c = float(options.clip_ratio_c) if options.clip_ratio_c is not None else 0.0
    params.beta = float(options.beta)
    params.kl_estimator = int(options.kl_estimator[1:])
    params.use_bias_correction_kl = bool(options.use_bias_correction_kl)
    params.sequence_level = options.importance_sampling_level == "sequence"
    params.entropy_coef = float(options.entropy_coef)
    params.sapo_temperature_pos = float(options.sapo_temperature_pos)
    params.sapo_temperature_neg = float(options.sapo_temperature_neg)
    return params


def grpo_token_loss(logp, logp_old, logp_ref, advantages, mask, rollout_weights, entropy, row_scale, options,
                    need_grad):
    """[B, T] float32 per-token inputs, advantages / row_scale [B] float32, mask [B, T] bool ->
    (stats [B, NSTATS] float32, grad_logp [B, T] float32 or None)."""
    module = _extension()
    stats, grad_logp = module.grpo_token_loss(logp, logp_old, logp_ref, advantages, mask, rollout_weights, entropy,
                                              row_scale, loss_params(module, options), bool(need_grad))
    return stats, grad_logp


def group_advantages(rewards, group_size, scale, eps, leave_one_out):
    """rewards [B] float32 -> [B] float32 (SPEC section 2)."""
    return _extension().group_advantages(rewards, int(group_size), str(scale), float(eps), bool(leave_one_out))
