"""The fused linear GRPO loss: hidden states and LM head -> scalar loss, forward plus backward.

hidden [B, T, D] ~ N(0, 1), weight [V, D] with logits of standard deviation ~3, targets uniform,
a completion mask with a random length per sequence (padding at the end), advantages ~ N(0, 1),
logp_old and logp_ref near the current log-probabilities (computed once per input set), so that
ratios, clipping and the KL term behave as in a real step. Options: loss_type="dapo", beta=0.04 (k3),
epsilon 0.2, temperature 1: TRL's and Liger's defaults with a KL term. Gradients w.r.t. hidden and weight.

FLOPs counted (`flops`), what each design needs on all N = B * T tokens: 6 N V D (logits, grad hidden,
grad weight), 8 N V D for Liger, whose backward recomputes the logits. The kernel backends skip masked
tokens, so on a padded batch they execute 6 N_live V D (`executed_flops`, from which the TFLOP/s and
the roofline fraction are computed). Issue 5's acceptance shape is N = 2048, D = 512,
V = 32000, fp32 in the cpu set (C++ backend vs the eager reference).

The kernel backends never compute masked tokens (lvrpo_fast.chunking): on this mask, about a quarter
fewer rows reach the LM head than in the reference and the peers. test_linear_grpo_loss_no_padding
(the headline shape: issue 5's on the CPU, N = 8192, D = 4096, V = 151936 on a GPU) and
test_issue5_paired[no_padding] time the same inputs with every token unmasked, where all do the same work.

Implementations: the eager reference, torch.compile of lvrpo_fast.reference.linear_grpo_loss_impl, the
Triton and C++ backends, Liger-Kernel's LigerFusedLinearGRPOLoss (chunked PyTorch; its loss math
under torch.compile on a GPU, eager with compiled=False on the CPU; its default chunk of one sequence),
and TRL 1.16's current path ("trl"): the log-probabilities and entropies of its chunked LM head
(trl.kernels.chunked_logprob, as its GRPOTrainer requests them) then the same loss math in eager
PyTorch on the [B, T] log-probabilities (lvrpo_fast.reference.grpo_loss; TRL's _compute_loss does
these element-wise operations itself). Like TRL's trainer it scores only the unmasked rows on CUDA
(its Triton path) and every row on the CPU (its torch path); its backward recomputes the logits:
8 N V D.

The high-entropy mask (test_linear_grpo_loss_entropy_mask, TRL's top_entropy_quantile=0.2 with its
token-mean entropy bonus): the kernel backends' fused op needs every token's entropy before it can
form a gradient, so it walks the chunks twice, executing 8 N V D - 2 C_last V D (C_last: the rows of
the chunk left in the tile; `executed_flops` counts them from the op's own chunk plan); TRL's path
costs the same as without the mask (its gradient is formed in a backward pass anyway).

Batch-invariant mode (issue 19): the Triton and C++ backends with batch_invariant=True, as rows of
their own (test_linear_grpo_loss_batch_invariant, padded batch) and as the mode's cost, each call timed
alternately with the default mode's on the same inputs (test_linear_grpo_loss_batch_invariant_cost:
the median of the per-pair time ratios, invariant / default, padded and unpadded).

Packed sequences (issue 17, test_linear_grpo_loss_packed): the same input sets without their padding,
hidden [N_live, D] with cu_seqlens (each sequence's completion, whose mask is a prefix), against the
padded op on the padded batch; both compute the same N_live rows (6 N_live V D). The padded rows'
call returns its hidden-state gradient at the live rows (an N_live D copy, as a packed trainer would
take it), so the two results are compared with the reference's packed run. test_packed_paired times
the kernel backend of the set packed against padded, call by call on the same input sets.
"""
import pytest
import torch

import lvrpo_fast
from lvrpo_fast import chunking, reference, validate
from lvrpo_fast.options import GRPOOptions

import harness

IMPLS = ("reference", "compiled", "triton", "cpp", "liger", "trl")
KERNEL_IMPLS = ("triton", "cpp")
# Pairs of the mode's cost rows: a cost of ~5% is within one pair's noise on a shared machine.
COST_PAIRS = 9
OPTIONS = {"loss_type": "dapo", "beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.2}
# TRL's high-entropy mask (its paper's 0.2) and its entropy bonus, a token mean over the kept tokens.
ENTROPY_MASK = {"top_entropy_quantile": 0.2, "entropy_coef": 0.01, "entropy_agg": "token_mean"}
LOGIT_STD = 3.0


def completion_mask(B, T, device):
    """[B, T] bool: each sequence keeps a random length in [T/2, T], the rest is padding."""
    lengths = torch.randint(T // 2 + 1, T + 1, (B, 1), device=device)
    return torch.arange(T, device=device).unsqueeze(0) < lengths


@torch.no_grad()
def current_logprobs(hidden, weight, targets, rows=1024):
    """The log-probabilities under (hidden, weight) by the reference, a few rows at a time."""
    D = hidden.shape[-1]
    flat_h, flat_t = hidden.reshape(-1, D), targets.reshape(-1)
    parts = [lvrpo_fast.fused_linear_logprobs(flat_h[i:i + rows], weight, flat_t[i:i + rows], backend="reference")
             for i in range(0, flat_h.shape[0], rows)]
    return torch.cat(parts).view(targets.shape)


def make_set(shape, dtype, device):
    B, T, D, V = shape.B, shape.T, shape.D, shape.V
    hidden = torch.randn(B, T, D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) * (LOGIT_STD / D ** 0.5)).to(dtype)
    targets = torch.randint(0, V, (B, T), device=device)
    logp = current_logprobs(hidden, weight, targets)
    return {
        "hidden": hidden, "weight": weight, "targets": targets,
        "mask": completion_mask(B, T, device),
        "advantages": torch.randn(B, device=device),
        "logp_old": logp + 0.1 * torch.randn(B, T, device=device),
        "logp_ref": logp + 0.2 * torch.randn(B, T, device=device),
    }


def loss_fn(impl, device, invariant=False, options=OPTIONS):
    """(hidden, weight, inputs) -> scalar loss of one implementation on `device` (invariant: the kernel
    backends' batch-invariant mode)."""
    if impl in ("reference", "triton", "cpp"):
        mode = {"batch_invariant": invariant} if impl != "reference" else {}
        return lambda h, w, s: lvrpo_fast.fused_linear_grpo_loss(
            h, w, s["targets"], s["mask"], s["advantages"], logp_old=s["logp_old"], logp_ref=s["logp_ref"],
            backend=impl, **mode, **options)[0]
    if impl == "compiled":
        impl_fn = harness.compiled(reference.linear_grpo_loss_impl)
        opts = GRPOOptions(**options)

        def fn(h, w, s):
            mask, temperature = validate.check_linear_inputs(h, w, s["targets"], mask=s["mask"])
            validate.check_grpo_inputs(s["targets"], s["advantages"], mask, logp_old=s["logp_old"],
                                       logp_ref=s["logp_ref"], options=opts, need_logp=False)
            return impl_fn(h, w, s["targets"], mask, s["advantages"], None, s["logp_old"], s["logp_ref"], None,
                           temperature, False, opts)[0]
        return fn
    if impl == "liger":
        if options is not OPTIONS:
            pytest.skip("Liger's GRPO loss has no high-entropy mask")
        grpo = harness.require_module("liger_kernel.chunked_loss")
        on_gpu = device.type == "cuda"
        loss = grpo.LigerFusedLinearGRPOLoss(
            beta=options["beta"], compiled=on_gpu, use_ref_model=True, epsilon_low=options["epsilon_low"],
            epsilon_high=options["epsilon_high"], loss_type=options["loss_type"], temperature=1.0)
        return lambda h, w, s: loss(h, w, s["targets"], s["mask_float"], s["advantages"],
                                    ref_per_token_logps=s["logp_ref"], old_per_token_logps=s["logp_old"])[0]
    if impl == "trl":
        trl_head = harness.trl_chunked_logprobs()

        def fn(h, w, s):
            B, T, D = h.shape
            rows, flat_t = h.reshape(B * T, D), s["targets"].reshape(B * T)
            if device.type == "cuda":  # TRL's Triton path: the unmasked rows only
                live = s["mask"].reshape(-1)
                logp_live, ent_live = trl_head(rows[live], w, flat_t[live], True)
                logp = logp_live.new_zeros(B * T).masked_scatter(live, logp_live)
                entropy = ent_live.new_zeros(B * T).masked_scatter(live, ent_live)
            else:  # its torch path: every row
                logp, entropy = trl_head(rows, w, flat_t, True)
            return reference.grpo_loss(logp.view(B, T), s["advantages"], s["mask"], logp_old=s["logp_old"],
                                       logp_ref=s["logp_ref"], entropy=entropy.view(B, T), **options)[0]
        return fn
    raise ValueError(f"unknown implementation {impl!r}")


def make_call(fn, padded=True):
    """One forward plus backward; padded=False replaces the completion mask by an all-true one."""
    def call(s):
        if not padded:
            s = {**s, "mask": s["mask_full"], "mask_float": s["mask_full"].float()}
        hidden = s["hidden"].detach().requires_grad_()
        weight = s["weight"].detach().requires_grad_()
        loss = fn(hidden, weight, s)
        loss.backward()
        return {"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}
    return call


def _resident_rows(mask, shape, dtype, device):
    """The rows of the chunk the fused op leaves in its tile after the high-entropy mask's first pass
    (its last chunk with a computed row), from the op's own chunk plan."""
    budget = chunking.rows_per_chunk(shape.V, torch.empty(0, dtype=dtype).element_size(), device, shape.D)
    sizes = [c.size for c in chunking.sequence_chunks(mask, budget) if c.size]
    return sizes[-1] if sizes else 0


def case_fields(shape, impl, dtype, device, padded=True, invariant=False, per_token=None, options=OPTIONS):
    """The harness.Case fields of one implementation at one shape. padded=False: the same inputs with
    every token unmasked (the kernel backends skip the padding's rows, the reference and the peers
    compute them; without padding there is nothing to skip). invariant: the batch-invariant mode.
    per_token (the op linear_grpo_loss_per_token, whose input sets also hold advantages [B, T] ~ N(0, 1)):
    True passes those, False the same sets' advantages [B]; None: the plain op. options:
    ENTROPY_MASK's case adds TRL's high-entropy mask."""
    if impl in ("triton", "cpp"):
        harness.lvrpo_backend(impl, dtype)
    entropy_mask = options is not OPTIONS

    def inputs():
        s = make_set(shape, dtype, device)
        s["mask_float"] = s["mask"].float()  # Liger multiplies by the mask
        s["mask_full"] = torch.ones_like(s["mask"])
        if per_token is not None:  # step-wise advantages, one per token, as process_advantages gives them
            s["advantages_per_token"] = torch.randn(shape.B, shape.T, device=device)
        return s

    flops_per = 8 if impl in ("liger", "trl") else 6  # per token and head weight
    nvd = shape.V * shape.D

    def executed(s):
        mask = s["mask"] if padded else s["mask_full"]
        live = int(mask.sum())
        if impl == "trl":
            return 8 * (live if device.type == "cuda" else shape.N) * nvd
        if impl in ("triton", "cpp"):
            # the kernel backends compute the unmasked tokens only; the entropy mask's second pass
            # recomputes every chunk's logits but the one left in the tile (all of them in the
            # batch-invariant mode)
            extra = 0
            if entropy_mask:
                extra = 2 * (live - (0 if invariant else _resident_rows(mask, shape, dtype, device))) * nvd
            return 6 * live * nvd + extra
        return flops_per * shape.N * nvd

    def with_advantages(fn):
        if not per_token:
            return fn
        return lambda h, w, s: fn(h, w, {**s, "advantages": s["advantages_per_token"]})

    case = ("linear_grpo_loss fwd+bwd" + ("" if padded else ", no padding") + (", entropy mask" if entropy_mask else "")
            + (" batch-invariant" if invariant else ""))
    if per_token is not None:
        case += ", advantages [B, T]" if per_token else ", advantages [B]"
    return dict(
        case=case, op="linear_grpo_loss" if per_token is None else "linear_grpo_loss_per_token", impl=impl,
        shape=shape, dtype=dtype, make_set=inputs,
        call=make_call(with_advantages(loss_fn(impl, device, invariant, options)), padded),
        reference_call=make_call(with_advantages(loss_fn("reference", device, options=options)), padded),
        checked=("loss", "grad_hidden", "grad_weight"), flops=flops_per * shape.N * nvd,
        executed_flops=executed if impl in ("triton", "cpp", "trl") else None, mm=(shape.N, shape.D, shape.V))


@pytest.mark.bench_op("linear_grpo_loss", impls=IMPLS)
def test_linear_grpo_loss(bench, shape, impl):
    bench.run(**case_fields(shape, impl, bench.dtype, bench.device))


@pytest.mark.bench_op("linear_grpo_loss", impls=KERNEL_IMPLS)
def test_linear_grpo_loss_batch_invariant(bench, shape, impl):
    bench.run(**case_fields(shape, impl, bench.dtype, bench.device, invariant=True))


@pytest.mark.bench_op("linear_grpo_loss", impls=KERNEL_IMPLS,
                      variants=[{"layout": "padded"}, {"layout": "no_padding"}])
def test_linear_grpo_loss_batch_invariant_cost(bench, shape, impl, layout):
    """The mode's time over the default mode's, call by call on the same inputs (Bench.paired)."""
    padded = layout == "padded"
    cases = {label: harness.Case(**case_fields(shape, impl, bench.dtype, bench.device, padded, invariant))
             for label, invariant in (("batch_invariant", True), ("default", False))}
    bench.paired(cases, name="linear_grpo_loss fwd+bwd" + ("" if padded else ", no padding")
                 + f" batch-invariant cost ({impl})", min_pairs=COST_PAIRS)


@pytest.mark.bench_op("linear_grpo_loss_full", impls=IMPLS)
def test_linear_grpo_loss_no_padding(bench, shape, impl):
    """The headline shape with every token unmasked: every implementation does the same work, so the
    speed-ups and roofline fractions measure the kernels alone."""
    bench.run(**case_fields(shape, impl, bench.dtype, bench.device, padded=False))


@pytest.mark.bench_op("linear_grpo_loss_entropy_mask", impls=("reference", "triton", "cpp", "trl"))
def test_linear_grpo_loss_entropy_mask(bench, shape, impl):
    """TRL's high-entropy mask: the fused op's second walk over the chunks, measured (see the module
    docstring), against the reference and TRL's own path with the same mask."""
    bench.run(**case_fields(shape, impl, bench.dtype, bench.device, options={**OPTIONS, **ENTROPY_MASK}))


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "no_padding"])
def test_issue5_paired(bench, padded):
    """Issue 5's speed-up measured robustly: the reference and the C++ backend called alternately, on
    the same inputs, the speed-up the median of the per-pair time ratios (see Bench.paired). Measured
    on the benchmark's completion mask (about a quarter of padding, which the C++ backend never
    computes) and, to show what the kernels alone give, with every token unmasked."""
    if bench.issue5_shape is None:
        pytest.skip(f"issue 5 compares the C++ backend on CPU tensors; this {bench.shape_set} set runs on {bench.device}")
    harness.lvrpo_backend("cpp", bench.dtype)
    bench.paired({impl: harness.Case(**case_fields(bench.issue5_shape, impl, bench.dtype, bench.device, padded))
                  for impl in ("reference", "cpp")},
                 name="issue 5 paired" + ("" if padded else ", no padding"), target=1.5)


class _ZeroFilledHeadGrads(chunking.HeadGrads):
    """The weight gradient as it was before issue 18 item 4: zero-filled, then every chunk accumulated."""

    def __init__(self, *args):
        super().__init__(*args)
        if self.weight is not None:
            self.weight.zero_()
        if self.bias is not None:
            self.bias.zero_()
        self._first = False


def _with_removed_passes(call):
    """call, plus the two [V, D] passes issue 18 item 4 removed: the zero-fill of the weight gradient
    before the first chunk, and the backward's multiplication of every stored gradient by an incoming
    gradient of exactly 1."""
    from lvrpo_fast.fused import linear_grpo_loss as fused

    def legacy(s):
        fused.HeadGrads = _ZeroFilledHeadGrads
        try:
            out = call(s)
        finally:
            fused.HeadGrads = chunking.HeadGrads
        one = torch.ones((), device=out["grad_weight"].device)
        out["grad_weight"].mul_(one)
        out["grad_hidden"].mul_(one)
        return out
    return legacy


def test_removed_head_passes_paired(bench):
    """Issue 18 item 4's gain, measured: the kernel backend of this set called alternately as it is and
    with the two [V, D] passes it no longer makes put back (a zero-fill of grad_weight, V D s bytes of
    writes; and the backward's in-place scaling of grad_weight and grad_hidden by 1.0, 2 (V + N) D s
    bytes), on the same inputs, every token unmasked; the median of the per-pair time ratios
    (Bench.paired), with-passes / as-is, is the speed-up the change gave. Expected: the passes' bytes
    over the memory bandwidth against the op's 6 N V D FLOPs over the GEMM rate; about 1.02 at the GPU
    headline shape, under 1.01 at the CPU set's (benchmarks/README.md, "Chunk rows, and the [V, D]
    passes removed")."""
    impl = "triton" if bench.device.type == "cuda" else "cpp"
    shape = bench.issue5_shape or harness.SHAPES[bench.shape_set]["linear_grpo_loss"][-1]
    harness.lvrpo_backend(impl, bench.dtype)
    now = case_fields(shape, impl, bench.dtype, bench.device, padded=False)
    before = dict(now, call=_with_removed_passes(now["call"]))
    bench.paired({f"{impl} with the removed passes": harness.Case(**before), impl: harness.Case(**now)},
                 name="removed [V, D] passes paired", min_pairs=15)


@pytest.mark.bench_op("linear_grpo_loss_per_token", impls=("reference", "triton", "cpp"))
def test_linear_grpo_loss_per_token(bench, shape, impl):
    """Per-token advantages [B, T] (process rewards, GAE): the same loss with one advantage per token.
    Liger's loss takes advantages [B] only; torch.compile is left out (its cost, one graph per variant)."""
    bench.run(**case_fields(shape, impl, bench.dtype, bench.device, per_token=True))


def test_per_token_advantages_paired(bench):
    """What per-token advantages cost against per-sequence ones: the kernel backend of this set (C++ on
    the CPU, Triton on a GPU) called alternately with advantages [B, T] and [B] on the same input sets,
    the median of the per-pair time ratios (Bench.paired). The forward reads B T more floats and the
    per-token loss kernel one more load per token; the LM head's 6 N V D FLOPs are unchanged."""
    impl = "triton" if bench.device.type == "cuda" else "cpp"
    shape = harness.SHAPES[bench.shape_set]["linear_grpo_loss_per_token"][0]
    harness.lvrpo_backend(impl, bench.dtype)
    bench.paired({f"{impl} [B, T]": harness.Case(**case_fields(shape, impl, bench.dtype, bench.device,
                                                               per_token=True)),
                  f"{impl} [B]": harness.Case(**case_fields(shape, impl, bench.dtype, bench.device,
                                                            per_token=False))},
                 name="per-token advantages paired")


def packed_case_fields(shape, impl, dtype, device, packed=True):
    """The harness.Case fields of fused_linear_grpo_loss on the set's batch packed (cu_seqlens, hidden
    [N_live, D]) or padded ([B, T, D] with its completion mask): the same live rows either way."""
    if impl in ("triton", "cpp"):
        harness.lvrpo_backend(impl, dtype)

    def inputs():
        s = make_set(shape, dtype, device)
        live = s["mask"]  # a prefix of each row: the completion, then padding
        s["cu_seqlens"] = torch.nn.functional.pad(live.sum(1).cumsum(0), (1, 0))
        s["packed"] = {key: s[key][live] for key in ("hidden", "targets", "logp_old", "logp_ref")}
        return s

    def call_with(name, as_packed):
        def call(s):
            source = s["packed"] if as_packed else s
            hidden = source["hidden"].detach().requires_grad_()
            weight = s["weight"].detach().requires_grad_()
            loss = lvrpo_fast.fused_linear_grpo_loss(
                hidden, weight, source["targets"], None if as_packed else s["mask"], s["advantages"],
                logp_old=source["logp_old"], logp_ref=source["logp_ref"], backend=name,
                cu_seqlens=s["cu_seqlens"] if as_packed else None, **OPTIONS)[0]
            loss.backward()
            grad_hidden = hidden.grad if as_packed else hidden.grad[s["mask"]]
            return {"loss": loss.detach(), "grad_hidden": grad_hidden, "grad_weight": weight.grad}
        return call

    nvd = shape.V * shape.D
    return dict(
        case="linear_grpo_loss fwd+bwd, " + ("packed" if packed else "padded, as packed"),
        op="linear_grpo_loss_packed", impl=impl, shape=shape, dtype=dtype, make_set=inputs,
        call=call_with(impl, packed), reference_call=call_with("reference", True),
        checked=("loss", "grad_hidden", "grad_weight"), flops=6 * shape.N * nvd,
        executed_flops=lambda s: 6 * int(s["mask"].sum()) * nvd, mm=(shape.N, shape.D, shape.V))


@pytest.mark.bench_op("linear_grpo_loss_packed", impls=("reference", "triton", "cpp"),
                      variants=[{"layout": "packed"}, {"layout": "padded"}])
def test_linear_grpo_loss_packed(bench, shape, impl, layout):
    """Packed sequences against the padded op on the same data: time and peak extra memory."""
    bench.run(**packed_case_fields(shape, impl, bench.dtype, bench.device, packed=layout == "packed"))


def test_packed_paired(bench):
    """Packed over padded, call by call on the same input sets (Bench.paired), on the set's kernel backend."""
    impl = "triton" if bench.device.type == "cuda" else "cpp"
    shape = harness.SHAPES[bench.shape_set]["linear_grpo_loss_packed"][0]
    harness.lvrpo_backend(impl, bench.dtype)
    bench.paired({f"{impl} packed": harness.Case(**packed_case_fields(shape, impl, bench.dtype, bench.device, True)),
                  f"{impl} padded": harness.Case(**packed_case_fields(shape, impl, bench.dtype, bench.device, False))},
                 name="packed over padded paired")
