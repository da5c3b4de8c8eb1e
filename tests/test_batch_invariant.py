"""The batch-invariant mode of the log-prob ops (issue 19): bits, not tolerances.

In this mode a token's log-probability and entropy must be bitwise identical for the same hidden row,
weight, bias, target and temperature whatever else is in the call: the batch size, the row's place,
other rows (their values, NaN included, and the mask), the chunk budget (LVRPO_CHUNK_BYTES), the
padded or packed layout, the forward-only path or inside fused_linear_grpo_loss. Each backend is
compared with itself (torch.equal); the reference is exempt. The mode's results must still match the
float64 reference within lvrpo_fast.testing's rule.

The property tests draw small shapes with a bounded, derandomized number of examples (the Triton
kernels are interpreted on a CPU); on a GPU the same tests run the compiled kernels and cuBLAS.
The chunk budgets drawn go down to one row per chunk, where the default mode's head GEMM changes
shape (and, on this CPU's MKL, its bits), and the tile rows R are also patched down to 8 so that
several tiles and the rows carried between chunks are exercised on a few dozen rows.
"""
import contextlib
import itertools
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lvrpo_fast
from lvrpo_fast import backends, chunking, dispatch, reference
from test_linear_grpo_loss import CASES, check_linear
from test_linear_grpo_loss import make_inputs as loss_inputs
from test_logprobs import run_logprobs
from tolerances import assert_close_to_truth

PROPERTY = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def chunk_rows(rows, vocab, dtype):
    """LVRPO_CHUNK_BYTES set to `rows` rows of logits (None: the default budget) for the block."""
    saved = os.environ.pop("LVRPO_CHUNK_BYTES", None)
    if rows is not None:
        os.environ["LVRPO_CHUNK_BYTES"] = str(rows * vocab * torch.empty(0, dtype=dtype).element_size())
    try:
        yield
    finally:
        os.environ.pop("LVRPO_CHUNK_BYTES", None)
        if saved is not None:
            os.environ["LVRPO_CHUNK_BYTES"] = saved


@contextlib.contextmanager
def tile_rows(rows, device):
    """chunking's R patched to `rows` on `device` for the block (None: unchanged)."""
    saved = dict(chunking.INVARIANT_TILE_ROWS)
    if rows is not None:
        chunking.INVARIANT_TILE_ROWS[device.type] = rows
    try:
        yield
    finally:
        chunking.INVARIANT_TILE_ROWS.clear()
        chunking.INVARIANT_TILE_ROWS.update(saved)


def head(n, d, v, dtype, dev, generator, bias):
    """hidden [n, d], weight [v, d] (logits of standard deviation ~3), bias [v] | None, targets [n]."""
    hidden = torch.randn(n, d, generator=generator).to(dev, dtype)
    weight = (torch.randn(v, d, generator=generator) * (3 / math.sqrt(d))).to(dev, dtype)
    b = (torch.randn(v, generator=generator) * 0.5).to(dev, dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=generator).to(dev)
    return hidden, weight, b, targets


def logprobs(name, hidden, weight, targets, bias, temperature, *, mask=None, entropy=True, grad=False,
             chunk=None, invariant=True):
    """(logp, entropy or None) of fused_linear_logprobs in the given mode, chunk budget (rows) and path:
    grad=True runs the differentiable path (hidden and weight require grad)."""
    if grad:
        hidden = hidden.detach().requires_grad_()
        weight = weight.detach().requires_grad_()
    with chunk_rows(chunk, weight.shape[0], weight.dtype), torch.set_grad_enabled(grad):
        out = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                               return_entropy=entropy, mask=mask, backend=name,
                                               batch_invariant=invariant)
    logp, ent = out if entropy else (out, None)
    return logp.detach(), None if ent is None else ent.detach()


def skip_unless(name, device, dtype):
    if dispatch.usable(name, device, dtype)[0] is None:
        pytest.skip(f"{name} does not run {dtype} on {device}")


def assert_same_bits(got, expected, what):
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    if not torch.equal(got, expected):
        differ = (got != expected) & ~(got.isnan() & expected.isnan())
        raise AssertionError(f"{what}: {int(differ.sum())} of {differ.numel()} values differ in their bits, "
                             f"by up to {float((got.double() - expected.double())[differ].abs().max()):.3g}")


# ------------------------------------------------------------------------------------------------
# What the mode rests on
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_a_fixed_shape_head_gemm_gives_every_row_the_same_bits(kernel_backend, dtype):
    """The BLAS properties the mode is built on (lvrpo_fast/chunking.py), through the mode's own GEMM call
    (chunking.head_tiles_into): a row gets the same bits at every place of an [R, D] @ [D, V] tile and
    in any of the k tiles of one call whatever k, bias or not; on the CPU, where tiles read hidden's rows
    in place, also at any alignment of the input rows (D = 97). If this fails on a machine, the mode's
    guarantee does not hold there."""
    skip_unless(*kernel_backend, dtype)
    _, dev = kernel_backend
    g = torch.Generator().manual_seed(19)
    R, D, V = chunking.invariant_tile_rows(dev), 97, 1031
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).to(dev, dtype)
    bias = torch.randn(V, generator=g).to(dev, dtype)
    rows = torch.randn(3 * R, D, generator=g).to(dev, dtype)
    row = torch.randn(D, generator=g).to(dev, dtype)
    for b in (None, bias):
        expected = None
        for place, offset, k in ((0, 0, 1), (1, 3, 1), (R // 2, 1, 2), (R - 1, 13, 1), (37 % R, 5, 3),
                                 (R + 5, 0, 2), (2 * R + R // 3, 7, 3)):
            offset = offset if dev.type == "cpu" else 0
            a = torch.empty(k * R + offset, D, dtype=dtype, device=dev)[offset:]
            a.copy_(rows[:k * R])
            a[place] = row
            out = torch.empty(k * R, V, dtype=dtype, device=dev)
            chunking.head_tiles_into(out, a, weight, b, R)
            got = out[place].clone()
            expected = got if expected is None else expected
            assert_same_bits(got, expected, f"row at place {place} of {k} tiles of {R}, input offset {offset}, "
                                            f"bias {b is not None}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_a_block_of_head_columns_has_the_same_bits_in_a_shard(kernel_backend, dtype):
    """What the same bits at every tensor-parallel degree rest on (vocab_parallel.VocabParallel's
    vocab_block; lvrpo_fast/chunking.py): a block of b vocabulary columns of the mode's head GEMM, run per
    block of columns, has the same bits whether the weight is the whole head or a shard of whole blocks
    (a separate tensor, as on another rank; its ragged last block included), for 1 and 3 tiles, bias or
    not; without the column blocks (one GEMM over the shard) it does not on this MKL, whose narrow calls
    round otherwise. If this fails on a machine, the guarantee does not hold there."""
    skip_unless(*kernel_backend, dtype)
    _, dev = kernel_backend
    g = torch.Generator().manual_seed(23)
    R, D, V, block = chunking.invariant_tile_rows(dev), 97, 1031, 128
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).to(dev, dtype)
    bias = torch.randn(V, generator=g).to(dev, dtype)
    rows = torch.randn(3 * R, D, generator=g).to(dev, dtype)
    for b, k in itertools.product((None, bias), (1, 3)):
        whole = torch.empty(k * R, V, dtype=dtype, device=dev)
        chunking.head_tiles_into(whole, rows[:k * R], weight, b, R, block)
        for start, stop in ((0, 4 * block), (4 * block, V), (2 * block, 3 * block), (8 * block, V)):
            shard = torch.empty(k * R, stop - start, dtype=dtype, device=dev)
            chunking.head_tiles_into(shard, rows[:k * R], weight[start:stop].clone(),
                                     None if b is None else b[start:stop].clone(), R, block)
            assert_same_bits(shard, whole[:, start:stop], f"columns [{start}, {stop}) of {k} tiles, "
                                                         f"bias {b is not None}")


# ------------------------------------------------------------------------------------------------
# fused_linear_logprobs
# ------------------------------------------------------------------------------------------------
@settings(max_examples=12, **PROPERTY)
@given(data=st.data(), n=st.integers(1, 20), d=st.sampled_from((33, 5, 64)), v=st.sampled_from((515, 1, 130, 1031)),
       seed=st.integers(0, 2**31 - 1))
def test_logprobs_bits_do_not_depend_on_the_rest_of_the_call(kernel_backend, data, n, d, v, seed):
    """A row's logp and entropy, computed among other rows (shuffled in among extra ones that are masked
    and hold NaN or noise), in any chunk budget, on the forward-only or the differentiable path, with
    or without the entropy, alone or in a sub-batch: the bits of the canonical call."""
    name, dev = kernel_backend
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    skip_unless(name, dev, dtype)
    g = torch.Generator().manual_seed(seed)
    temperature = data.draw(st.sampled_from((1.0, 0.7)), label="temperature")
    r = data.draw(st.sampled_from((None, 8)), label="tile rows (None: the device's)")
    hidden, weight, bias, targets = head(n, d, v, dtype, dev, g, data.draw(st.booleans(), label="bias"))
    with tile_rows(r, dev):
        logp, ent = logprobs(name, hidden, weight, targets, bias, temperature)

        # The same rows shuffled in among extra masked rows, in another chunk budget and path.
        extra = data.draw(st.integers(0, 9), label="extra rows")
        poison = data.draw(st.sampled_from(("noise", "nan")), label="masked rows hold")
        filler = torch.randn(extra, d, generator=g).to(dev, dtype)
        if poison == "nan":
            filler.fill_(float("nan"))
        big = torch.cat([hidden, filler])
        big_targets = torch.cat([targets, torch.randint(0, v, (extra,), generator=g).to(dev)])
        mask = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(extra, dtype=torch.bool)]).to(dev)
        order = torch.randperm(n + extra, generator=g).to(dev)
        chunk = data.draw(st.sampled_from((1, 3, None, 2, 7)), label="chunk rows")
        grad = data.draw(st.booleans(), label="differentiable path")
        got_logp, got_ent = logprobs(name, big[order], weight, big_targets[order], bias, temperature,
                                     mask=mask[order], grad=grad, chunk=chunk)
        where = torch.argsort(order)[:n]  # the original rows' places in the shuffled batch
        assert_same_bits(got_logp[where], logp, "logp, shuffled among masked rows")
        assert_same_bits(got_ent[where], ent, "entropy, shuffled among masked rows")

        # A sub-batch alone, without the entropy.
        i = data.draw(st.integers(0, n - 1), label="sub-batch start")
        j = data.draw(st.integers(i + 1, n), label="sub-batch end")
        sub_logp, _ = logprobs(name, hidden[i:j], weight, targets[i:j], bias, temperature, entropy=False,
                               chunk=data.draw(st.sampled_from((None, 1, 4)), label="sub-batch chunk rows"))
        assert_same_bits(sub_logp, logp[i:j], "logp of a sub-batch, without the entropy")


@pytest.mark.parametrize("r", [8, None], ids=["R8", "R-device"])
def test_logprobs_across_many_tiles_and_chunk_budgets(kernel_backend, r):
    """More rows than two tiles, every chunk budget around R (rows carried from one chunk to the next),
    the [B, T, D] layout with a mask against the flat rows: the same bits."""
    name, dev = kernel_backend
    g = torch.Generator().manual_seed(7)
    with tile_rows(r, dev):
        R = chunking.invariant_tile_rows(dev)
        n, d, v = 2 * R + 9, 24, 130
        hidden, weight, bias, targets = head(n, d, v, torch.float32, dev, g, bias=True)
        logp, ent = logprobs(name, hidden, weight, targets, bias, 0.9)
        for chunk in (1, R - 1, R + 1, 2 * R + 1):
            got = logprobs(name, hidden, weight, targets, bias, 0.9, chunk=chunk)
            assert_same_bits(got[0], logp, f"logp, chunks of {chunk} rows, R = {R}")
            assert_same_bits(got[1], ent, f"entropy, chunks of {chunk} rows, R = {R}")
        # Right-padded sequences of random lengths: [B, T] with a mask, rows at other places.
        B = 5
        T = n // B
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        used = int(lengths.sum())
        mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
        padded_h = torch.randn(B, T, d, generator=g).to(dev)
        padded_t = torch.randint(0, v, (B, T), generator=g).to(dev)
        padded_h[mask.to(dev)] = hidden[:used]
        padded_t[mask.to(dev)] = targets[:used]
        got = logprobs(name, padded_h, weight, padded_t, bias, 0.9, mask=mask.to(dev), chunk=R // 2 + 3)
        assert_same_bits(got[0][mask.to(dev)], logp[:used], "logp in the padded [B, T] layout")
        assert (got[0][~mask.to(dev)] == 0).all()


def test_the_default_mode_is_unchanged(kernel_backend, monkeypatch):
    """batch_invariant=False (and the variable unset) is the default mode, chunk for chunk: the same bits
    as before the mode existed, i.e. one GEMM per chunk on the chunk's rows."""
    name, dev = kernel_backend
    g = torch.Generator().manual_seed(3)
    hidden, weight, bias, targets = head(11, 16, 130, torch.float32, dev, g, bias=True)
    monkeypatch.delenv("LVRPO_BATCH_INVARIANT", raising=False)
    for chunk in (None, 3):
        with chunk_rows(chunk, 130, torch.float32):
            default = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, bias=bias, backend=name)
            explicit = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, bias=bias, backend=name,
                                                        batch_invariant=False)
        rows = chunk or 11
        expected = []
        prims = backends.primitives(name)
        for s in range(0, 11, rows):
            logits = torch.addmm(bias, hidden[s:s + rows], weight.t())
            expected.append(prims.logits_stats(logits, targets[s:s + rows], 1.0, False)[0])
        assert_same_bits(default, torch.cat(expected), f"default mode, chunks of {rows}")
        assert_same_bits(explicit, default, "batch_invariant=False")


def test_the_switch(kernel_backend, monkeypatch):
    """The keyword wins over LVRPO_BATCH_INVARIANT; bad values are errors naming the keyword or the variable."""
    name, dev = kernel_backend
    monkeypatch.setenv("LVRPO_BATCH_INVARIANT", "1")
    assert dispatch.batch_invariant(None) is True and dispatch.batch_invariant(False) is False
    assert dispatch.select(name, dev, torch.float32, True).batch_invariant
    assert not dispatch.select(name, dev, torch.float32, False).batch_invariant
    assert dispatch.select("reference", dev, torch.float32, True) is reference  # exempt
    monkeypatch.setenv("LVRPO_BATCH_INVARIANT", "off")
    assert dispatch.batch_invariant(None) is False and dispatch.batch_invariant(True) is True
    monkeypatch.setenv("LVRPO_BATCH_INVARIANT", "maybe")
    with pytest.raises(ValueError, match="LVRPO_BATCH_INVARIANT.*'maybe'"):
        lvrpo_fast.fused_linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                                         backend=name)
    with pytest.raises(TypeError, match="batch_invariant must be a bool or None, got 'yes'"):
        lvrpo_fast.fused_linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                                         backend=name, batch_invariant="yes")
    with pytest.raises(TypeError, match="batch_invariant must be a bool or None"):
        lvrpo_fast.modules.FusedLinearGRPOLoss(batch_invariant=1)


# ------------------------------------------------------------------------------------------------
# fused_linear_grpo_loss
# ------------------------------------------------------------------------------------------------
def capture_token_loss(monkeypatch, name):
    """Records the logp and entropy [k, T] chunks the GRPO loss primitive receives; returns the list."""
    module = backends.primitives(name)
    real = module.grpo_token_loss
    seen = []

    def spy(logp, logp_old, logp_ref, logp_sampling, advantages, mask, rollout_weights, entropy, *rest):
        seen.append((logp.clone(), None if entropy is None else entropy.clone()))
        return real(logp, logp_old, logp_ref, logp_sampling, advantages, mask, rollout_weights, entropy, *rest)

    monkeypatch.setattr(module, "grpo_token_loss", spy)
    return seen


def sequences(b, t, d, v, dtype, dev, g, bias):
    """A right-padded batch [b, t] of random lengths (one sequence fully masked when b > 2)."""
    hidden, weight, bias_, _ = head(b * t, d, v, dtype, dev, g, bias)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    if b > 2:
        lengths[1] = 0
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(dev)
    targets = torch.randint(0, v, (b, t), generator=g).to(dev)
    advantages = torch.randn(b, generator=g).to(dev)
    return hidden.view(b, t, d), weight, bias_, targets, mask, advantages


@settings(max_examples=10, **PROPERTY)
@given(data=st.data(), b=st.integers(1, 6), t=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_the_loss_sees_the_forward_only_bits_first_ratio_is_exactly_one(kernel_backend, monkeypatch, data, b, t,
                                                                          seed):
    """The old policy's logp from fused_linear_logprobs (forward only, rows in another order, another
    layout and chunk budget) and the logp and entropy inside fused_linear_grpo_loss are the same bits,
    so an on-policy step has every ratio exactly 1 and clips nothing."""
    name, dev = kernel_backend
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    skip_unless(name, dev, dtype)
    g = torch.Generator().manual_seed(seed)
    d, v = data.draw(st.sampled_from((16, 7))), data.draw(st.sampled_from((130, 515)))
    hidden, weight, bias, targets, mask, advantages = sequences(b, t, d, v, dtype, dev, g,
                                                                data.draw(st.booleans(), label="bias"))
    temperature = data.draw(st.sampled_from((1.0, 0.8)), label="temperature")
    r = data.draw(st.sampled_from((None, 8)), label="tile rows")
    with tile_rows(r, dev):
        # The old policy: the unmasked tokens packed into one row, in a random order.
        live = mask.reshape(-1).nonzero().squeeze(1)
        order = live[torch.randperm(live.numel(), generator=g).to(dev)]
        flat_h, flat_t = hidden.reshape(-1, d), targets.reshape(-1)
        packed_logp, packed_ent = logprobs(name, flat_h[order].unsqueeze(0), weight, flat_t[order].unsqueeze(0),
                                           bias, temperature, chunk=data.draw(st.sampled_from((None, 1, 5))))
        logp_old = torch.zeros(b * t, device=dev)
        entropy_old = torch.zeros(b * t, device=dev)
        logp_old[order], entropy_old[order] = packed_logp[0], packed_ent[0]
        logp_old, entropy_old = logp_old.view(b, t), entropy_old.view(b, t)

        seen = capture_token_loss(monkeypatch, name)
        options = {"loss_type": data.draw(st.sampled_from(("dapo", "grpo", "bnpo"))), "beta": 0.04,
                   "kl_estimator": "k2", "epsilon_low": 0.2}
        h = hidden.detach().requires_grad_()
        with chunk_rows(data.draw(st.sampled_from((None, 2, 9)), label="loss chunk rows"), v, dtype):
            loss, metrics = lvrpo_fast.fused_linear_grpo_loss(
                h, weight, targets, mask, advantages, bias=bias, logp_old=logp_old, logp_ref=logp_old,
                temperature=temperature, return_entropy=True, backend=name, batch_invariant=True, **options)
        inner_logp = torch.cat([s[0] for s in seen])
        inner_ent = torch.cat([s[1] for s in seen])
        assert_same_bits(inner_logp[mask], logp_old[mask], "logp inside the loss vs forward only")
        assert_same_bits(inner_ent[mask], entropy_old[mask], "entropy inside the loss vs forward only")
        if mask.any():
            assert metrics["ratio"].item() == 1.0
            assert metrics["kl"].item() == 0.0
        for k in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
            assert metrics[k].item() == 0.0


LOSS_TYPES_SPLIT = ("dapo", "cispo")


@settings(max_examples=10, **PROPERTY)
@given(data=st.data(), b=st.integers(2, 6), t=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_the_loss_does_not_depend_on_order_padding_chunks_or_the_split(kernel_backend, data, b, t, seed):
    """Shuffled sequences, more padding (columns holding NaN), another chunk budget: the same loss bits,
    for every loss type. Split into one-sequence micro-batches, the token-sum losses with a global
    normalizer (dapo, cispo with num_items_in_batch) give each sequence's share of the loss exactly,
    and the loss is their order-free sum (lvrpo_fast.fused.linear_grpo_loss.order_free_sum)."""
    name, dev = kernel_backend
    dtype = data.draw(st.sampled_from(DTYPES[:2]), label="dtype")
    skip_unless(name, dev, dtype)
    g = torch.Generator().manual_seed(seed)
    d, v = 12, 130
    hidden, weight, bias, targets, mask, advantages = sequences(b, t, d, v, dtype, dev, g, bias=True)
    logp_old = (-torch.rand(b, t, generator=g) * 4).to(dev)
    loss_type = data.draw(st.sampled_from(("dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo")),
                          label="loss_type")
    options = {"loss_type": loss_type, "beta": 0.04, "kl_estimator": "k3"}
    if loss_type == "dr_grpo":
        options["max_completion_length"] = t + 3
    if loss_type in LOSS_TYPES_SPLIT:
        options["num_items_in_batch"] = 3 * b * t
    if loss_type == "luspo":
        options.update(importance_sampling_level="sequence", beta=0.0)
    if loss_type == "cispo":
        options["epsilon_high"] = 1.1

    def loss_of(h, tg, m, a, old, chunk=None):
        with chunk_rows(chunk, v, dtype):
            loss, _ = lvrpo_fast.fused_linear_grpo_loss(
                h.detach().requires_grad_(), weight, tg, m, a, bias=bias, logp_old=old, logp_ref=old,
                temperature=0.9, backend=name, batch_invariant=True, **options)
        return loss.detach()

    whole = loss_of(hidden, targets, mask, advantages, logp_old)
    perm = torch.randperm(b, generator=g).to(dev)
    extra = data.draw(st.integers(0, 4), label="extra padding")
    pad = lambda x, fill: torch.cat([x, torch.full((b, extra) + x.shape[2:], fill, dtype=x.dtype, device=dev)], 1)
    moved = loss_of(pad(hidden, float("nan"))[perm], pad(targets, -100)[perm], pad(mask, False)[perm],
                    advantages[perm], pad(logp_old, float("nan"))[perm],
                    chunk=data.draw(st.sampled_from((1, 4, None)), label="chunk rows"))
    assert_same_bits(moved, whole, f"{loss_type} loss, sequences shuffled, {extra} more padding")
    if loss_type in LOSS_TYPES_SPLIT:
        shares = torch.stack([loss_of(hidden[i:i + 1], targets[i:i + 1], mask[i:i + 1], advantages[i:i + 1],
                                      logp_old[i:i + 1]) for i in range(b)])
        combined = shares.sort().values.sum(dtype=torch.float64).float()
        assert_same_bits(combined, whole, f"{loss_type} loss from one-sequence micro-batches")


# ------------------------------------------------------------------------------------------------
# Still the math: the float64 reference's closeness rule
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["grpo", "dapo_items_k2", "gspo_k3_bias_kl_entropy", "sapo_entropy"])
def test_loss_matches_the_reference(kernel_backend, monkeypatch, case):
    """Through LVRPO_BATCH_INVARIANT=1 (the reference ignores it): the fused loss, metrics and gradients
    against float64, with several tiles of R = 8 rows and chunks of 3 sequences."""
    name, dev = kernel_backend
    options, extras = CASES[case]
    data = loss_inputs(bias=extras.get("bias", False), weights=extras.get("weights"),
                       temperature=extras.get("temperature", 1.0))
    monkeypatch.setenv("LVRPO_BATCH_INVARIANT", "1")
    monkeypatch.setenv("LVRPO_CHUNK_BYTES", str(3 * data["hidden"].shape[1] * data["weight"].shape[0] * 4))
    with tile_rows(8, dev):
        check_linear(name, dev, data, options, torch.float32, temperature=extras.get("temperature", 1.0),
                     return_entropy=extras.get("return_entropy", False))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_logprobs_match_the_reference(kernel_backend, dtype):
    """logp, entropy and the gradients of the mode against float64, masked rows and chunks of 5 rows."""
    name, dev = kernel_backend
    skip_unless(name, dev, dtype)
    g = torch.Generator().manual_seed(11)
    n, d, v = 37, 24, 1023
    hidden, weight, bias, targets = head(n, d, v, dtype, dev, g, bias=True)
    mask = (torch.rand(n, generator=g) > 0.3).to(dev)
    grad_logp, grad_entropy = torch.randn(n, generator=g).to(dev), torch.randn(n, generator=g).to(dev)
    args = (hidden, weight, bias, targets, mask, 0.8, True, grad_logp, grad_entropy)
    with tile_rows(8, dev), chunk_rows(5, v, dtype):
        kernel = run_logprobs(lvrpo_fast.fused_linear_logprobs, *args, backend=name, batch_invariant=True)
    ref = run_logprobs(reference.fused_linear_logprobs, *args)
    truth = run_logprobs(reference.fused_linear_logprobs, *args, cast=torch.float64)
    for label, k, r, t in zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), kernel, ref, truth):
        assert_close_to_truth(k, r, t, dtype, f"{name} batch-invariant {label}")
