"""Every Triton kernel compiles for an H100 (sm_90) on a machine without a GPU.

The interpreter (the rest of tests/ on a CPU) executes the kernels' Python with numpy and forgives
what the compiler refuses: a scalar where a block is needed, a constexpr branch whose two sides
differ in type, a dtype cast the backend lacks. This file runs Triton's real pipeline (TTIR, TTGIR,
LLVM, PTX, and ptxas from the Triton wheel to a cubin) for sm_90 on the launch configurations the
launchers use, so such an error shows up in CI, not first on a lent GPU. It checks compilation only:
the numbers of the compiled kernels are checked by the same tests as the interpreted ones, on a GPU.

The compiler needs the kernels as @triton.jit functions, which they are not in a process with
TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU), so one child process, started without
it, compiles every variant (`python tests/test_sm90_compile.py` prints the JSON) and the tests read
its report. The log-prob kernels are also checked for register spills (their launch defaults in
kernels/autotune.py assume the per-lane sums stay in registers) and for the absence of fused
multiply-adds (enable_fp_fusion=False, see kernels/logprobs.py).
"""
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

from lvrpo_fast.contract import KL_KINDS as CONTRACT_KL_KINDS
from lvrpo_fast.contract import NSTATS, POLICY_KINDS
from lvrpo_fast.kernels import advantages as A
from lvrpo_fast.kernels import autotune as AT
from lvrpo_fast.kernels import grpo_loss as G
from lvrpo_fast.kernels import linear_grpo_loss as S
from lvrpo_fast.kernels import logprobs as L
from lvrpo_fast.kernels import process_advantages as P

F32 = "*fp32"
GRPO_SIGNATURE = {
    "logp_ptr": F32, "old_ptr": F32, "ref_ptr": F32, "sampling_ptr": F32, "adv_ptr": F32, "mask_ptr": "*u8",
    "weight_ptr": F32, "entropy_ptr": F32, "threshold_ptr": F32, "scale_ptr": F32, "stats_ptr": F32,
    "grad_ptr": F32, "T": "i32", "eps_low": "fp32", "eps_high": "fp32", "delta": "fp32", "clip_c": "fp32",
    "beta": "fp32", "sapo_pos": "fp32", "sapo_neg": "fp32", "vk_pos": "fp32", "vl_pos": "fp32", "vk_neg": "fp32",
    "vl_neg": "fp32", "drift_threshold": "fp32",
}
_TOGGLES = ("HAS_DELTA", "DUAL_CLIP", "HAS_OLD", "HAS_SAMPLING", "HAS_WEIGHTS", "HAS_ENTROPY", "ENTROPY_MASK",
            "OFF_POLICY_MASK", "POLICY_MASKED", "NEED_GRAD", "ADV_PER_TOKEN")
# The kernels' own tables, so a new loss kind, estimator or tile dtype is compiled here too.
LOSS_KINDS = tuple(POLICY_KINDS)
KL_KINDS = (0, *CONTRACT_KL_KINDS.values())  # 0: no KL term
TILE_DTYPES = tuple({torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[d] for d in L.TILE_DTYPES)
ADVANTAGE_SCALES = tuple(A.SCALES)

# Every loss kind and KL estimator with every toggle on and with every toggle off, and the sequence
# level: a constexpr flag prunes code, so these are the distinct programs the launcher builds.
GRPO_VARIANTS = ([f"grpo_loss-{loss}-kl{kl}-tok-{flags}" for loss in LOSS_KINDS for kl in KL_KINDS
                  for flags in ("on", "off")] + [f"grpo_loss-{loss}-kl{kl}-seq-on" for loss in LOSS_KINDS
                                                 for kl in (0, 3)]
                 + [f"grpo_loss-{loss}-kl3-seq-pertoken" for loss in LOSS_KINDS])
# "hinted": compiled with the divisibility-by-16 hints a real launch gets for 16-byte aligned pointers
# and sizes (V = 151936, a multiple of 16, as in the headline): the variant that runs on the GPU.
LOGPROB_VARIANTS = [f"{kernel}-{dtype}-{'entropy' if ent else 'plain'}{'-hinted' if hinted else ''}"
                    for kernel in ("logits_stats", "logits_grad") for dtype in TILE_DTYPES for ent in (False, True)
                    for hinted in (False, True)]
ADVANTAGE_VARIANTS = [f"advantages-{scale}" for scale in ADVANTAGE_SCALES] + ["batch_std"]
SCALE_VARIANTS = [f"scale-{dtype}" for dtype in TILE_DTYPES]
PROCESS_VARIANTS = ([f"process_steps-{scale}-{loo}" for scale in ADVANTAGE_SCALES for loo in ("loo", "plain")]
                    + [f"process_tokens-{mix}" for mix in ("outcome", "plain")])
VARIANTS = LOGPROB_VARIANTS + GRPO_VARIANTS + ADVANTAGE_VARIANTS + SCALE_VARIANTS + PROCESS_VARIANTS


def _compile_all():
    """In the child process: {variant: {"error": str | None, "local_ops": int, "fma": int}}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lvrpo_fast.kernels import autotune

    target = GPUTarget("cuda", 90, 32)

    def build(kernel, signature, constexprs, hinted=(), **options):
        sig = dict(signature)
        sig.update({name: "constexpr" for name in constexprs})
        missing = set(kernel.arg_names) - set(sig)
        if missing:
            raise AssertionError(f"the test's signature of {kernel.fn.__name__} lacks {sorted(missing)}")
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in hinted}
        return triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target, options=options)

    def logprob(name):
        kernel_name, dtype, mode = name.split("-")[:3]
        entropy = mode == "entropy"
        cfg = autotune.DEFAULTS[kernel_name]
        scalars = {"V": "i32", "stride_row": "i32", "inv_temperature": "fp32"}
        tile = "*" + dtype
        if kernel_name == "logits_stats":
            sig = {"logits_ptr": tile, "targets_ptr": "*i64", "logp_ptr": F32, "lse_ptr": F32, "entropy_ptr": F32}
            kernel, flag = L._logits_stats_kernel, "WITH_ENTROPY"
        else:
            sig = {"logits_ptr": tile, "targets_ptr": "*i64", "lse_ptr": F32, "entropy_ptr": F32,
                   "grad_logp_ptr": F32, "grad_entropy_ptr": F32}
            kernel, flag = L._logits_grad_kernel, "HAS_ENTROPY"
        hinted = [n for n, t in {**sig, **scalars}.items() if t.startswith("*") or n in ("V", "stride_row")] \
            if name.endswith("-hinted") else []
        return build(kernel, {**sig, **scalars}, {flag: entropy, "BLOCK_V": cfg.block_v}, hinted,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)

    def grpo(name):
        _, loss, kl, level, flags = name.split("-")
        kl = int(kl[2:])
        constexprs = {t: flags in ("on", "pertoken") for t in _TOGGLES}
        block, warps = AT.grpo_loss_config(AT.GRPO_LOSS_MAX_BLOCK_T)
        constexprs.update(LOSS_KIND=POLICY_KINDS[loss], SEQUENCE_LEVEL=level == "seq", KL_KIND=kl,
                          BIAS_CORRECTED=flags != "off" and kl != 0, ADV_PER_TOKEN=flags == "pertoken",
                          N_STATS=NSTATS, STATS_BLOCK=triton.next_power_of_2(NSTATS), BLOCK_T=block)
        return build(G._grpo_loss_kernel, GRPO_SIGNATURE, constexprs, num_warps=warps)

    def scale(name):
        cfg = AT.SCALE
        return build(S._scale_kernel, {"x_ptr": "*" + name.split("-")[1], "factor_ptr": F32, "n": "i64"},
                     {"BLOCK": cfg.block_v}, num_warps=cfg.num_warps)

    def advantages(name):
        if name == "batch_std":
            return build(A._batch_std_kernel, {"rewards_ptr": F32, "std_ptr": F32, "B": "i32"},
                         {"BLOCK": AT.ADVANTAGES_BLOCK_BATCH})
        scale = name.split("-")[1]
        return build(A._group_advantages_kernel, {"rewards_ptr": F32, "std_ptr": F32, "out_ptr": F32, "G": "i32",
                                                  "eps": "fp32", "loo_factor": "fp32"},
                     {"SCALE": A.SCALES[scale], "BLOCK": 8})

    def process(name):
        kind, variant = name.split("-")[0], name.split("-")[1:]
        if kind == "process_steps":
            return build(P._normalize_steps_kernel, {"rewards_ptr": F32, "offsets_ptr": "*i64", "std_ptr": F32,
                                                     "out_ptr": F32, "G": "i32", "eps": "fp32"},
                         {"LEAVE_ONE_OUT": variant[1] == "loo", "SCALE": A.SCALES[variant[0]],
                          "BLOCK": AT.PROCESS_ADVANTAGES_BLOCK_STEPS})
        return build(P._token_advantages_kernel, {"normalized_ptr": F32, "ends_ptr": "*i64", "offsets_ptr": "*i64",
                                                  "outcome_ptr": F32, "out_ptr": F32, "T": "i32",
                                                  "outcome_weight": "fp32"},
                     {"HAS_OUTCOME": variant[0] == "outcome", "BLOCK_T": AT.PROCESS_ADVANTAGES_MAX_BLOCK_T})

    report = {}
    for name in VARIANTS:
        builder = {"logits": logprob, "grpo": grpo, "scale": scale, "process": process}.get(
            name.split("_")[0].split("-")[0], advantages)
        try:
            compiled = builder(name)
            ptx = compiled.asm["ptx"]
            if not compiled.asm.get("cubin"):
                raise AssertionError("no cubin")
            report[name] = {"error": None, "local_ops": ptx.count("ld.local") + ptx.count("st.local"),
                            "fma": ptx.count("fma.rn.f32"), "vector_loads": ptx.count("ld.global.v4"),
                            "compare64": ptx.count("setp.eq.b64") + ptx.count("setp.eq.s64"),
                            "ex2": ptx.count("ex2.approx.f32"), "ex2_ftz": ptx.count("ex2.approx.ftz.f32")}
        except Exception:  # reported per variant, read by the parent's tests
            report[name] = {"error": traceback.format_exc(limit=3)}
    return report


def _ptxas_available():
    try:
        import triton
        from triton.backends import backends
    except ImportError as exc:
        return f"Triton without an offline-compile API: {exc}"
    if "nvidia" not in backends:
        return "this Triton build has no NVIDIA backend"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        return "no ptxas in the Triton wheel (nor TRITON_PTXAS_PATH)"
    return None


@pytest.fixture(scope="module")
def compiled():
    why = _ptxas_available()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"the compiling process failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", LOGPROB_VARIANTS)
def test_logprob_kernels_compile_without_spills_or_fma(compiled, variant):
    result = compiled[variant]
    assert result["error"] is None, result["error"]
    assert result["local_ops"] == 0, f"{variant}: registers spill to local memory ({result['local_ops']} ops)"
    assert result["fma"] == 0, f"{variant}: enable_fp_fusion=False did not reach the PTX ({result['fma']} fma)"


@pytest.mark.parametrize("variant", [v for v in LOGPROB_VARIANTS if v.endswith("-hinted")])
def test_logprob_kernels_use_vector_loads_int32_compares_and_exp2(compiled, variant):
    """What the SASS review asked for, read off the PTX of the variant a real launch compiles: 128-bit
    loads of the tile, the target compared as int32 (no 64-bit setp per logit), and in the statistics
    kernel one ex2.approx.ftz per logit with log2(e) / T folded into one scale (tl.exp would emit the
    non-flush-to-zero ex2 after a second multiply)."""
    result = compiled[variant]
    assert result["error"] is None, result["error"]
    assert result["vector_loads"] > 0, f"{variant}: no ld.global.v4 in the PTX"
    assert result["compare64"] == 0, f"{variant}: {result['compare64']} 64-bit compares"
    if variant.startswith("logits_stats"):
        assert result["ex2"] == 0 and result["ex2_ftz"] > 0, result


@pytest.mark.parametrize("variant", GRPO_VARIANTS + ADVANTAGE_VARIANTS + SCALE_VARIANTS + PROCESS_VARIANTS)
def test_kernels_compile(compiled, variant):
    result = compiled[variant]
    assert result["error"] is None, result["error"]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the compiler needs @triton.jit kernels")
    print(json.dumps(_compile_all()))
