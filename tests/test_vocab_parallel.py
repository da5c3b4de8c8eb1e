"""Vocab-parallel heads (lvrpo_fast.VocabParallel) against the single-process op on the whole head.

2 and 4 gloo processes on the CPU, one spawn per world size: each process runs every case on every
backend (cpp, reference, triton under the interpreter) with its shard of the head, computes the
single-process float64 truth and float32 reference on the whole head itself, and checks the loss,
metrics, log-probabilities, entropy and gradients (hidden, its weight shard, its bias shard) with
lvrpo_fast.testing's rule; the parent asserts on the outcomes, one test per (world, backend, case).
Shards are unequal (and on 4 ranks one holds 4 of the 37 ids, so most rows' targets lie elsewhere);
one case puts every target in the first shard, so the other ranks hold no target of any row.
"""
import contextlib
import datetime
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import lvrpo_fast
from lvrpo_fast.options import replicated
from lvrpo_fast.testing import compare_results, failures, flatten

import test_linear_grpo_loss as linear_cases

BACKENDS = ("cpp", "reference", "triton")
B, G, T, D, V = 6, 3, 5, 16, 37
SHARDS = {2: (20, 17), 4: (11, 4, 13, 9)}
# vocab_block=BLOCK: shards of whole blocks (unequal, the last one ragged) for the block cases.
BLOCK = 4
BLOCK_SHARDS = {1: (37,), 2: (20, 17), 4: (12, 4, 12, 9)}

# The loss cases of tests/test_linear_grpo_loss.py (every loss type, GSPO, KL estimators, the entropy
# bonus and the high-entropy mask, temperature, bias, rollout weights, masked tokens).
LOSS_CASES = tuple(linear_cases.CASES)
# name -> (bias, temperature, entropy, mask)
LOGPROB_CASES = {
    "plain": (False, 1.0, False, False),
    "bias_temperature_entropy_mask": (True, 0.7, True, True),
    "entropy_mask": (False, 1.3, True, True),
}
EXTRA_CASES = ("targets_in_first_shard", "partial_grad_hidden", "nan_in_one_shard", "dtensor_head", "packed_loss",
               "bfloat16_logprobs", "batch_invariant_rows", "inconsistent_calls_raise", "head_dtype_loss",
               "module_packed_with_ref_input", "compile_breaks_the_graph", "hf_colwise_parallel_head", "vocab_blocks",
               "vocab_blocks_same_bits_at_every_degree")
ALL_CASES = tuple(f"loss-{c}" for c in LOSS_CASES) + tuple(f"logprobs-{c}" for c in LOGPROB_CASES) + EXTRA_CASES
# The interpreted Triton kernels are the slow part: on 4 processes (sharing the CI machine's cores) they
# run every case but the loss cases other than these, which cover the clip family, GSPO with the KL
# and the entropy bonus, vespo, and the high-entropy mask's two passes. All loss cases run on 2.
TRITON_4_LOSS_CASES = ("loss-grpo", "loss-gspo_k3_bias_kl_entropy", "loss-vespo_weights",
                       "loss-entropy_mask_token_mean")


# Cases whose Triton run on 4 processes adds nothing the 2-process run and the cpp backend's do not cover.
TRITON_2_ONLY = ("head_dtype_loss", "module_packed_with_ref_input")


# Cases run on the cpp backend and 2 processes only: dynamo's tracing and the transformers wiring are the
# same on every backend and world size.
CPP_2_ONLY = ("compile_breaks_the_graph", "hf_colwise_parallel_head")


def cases(world, backend):
    if backend != "cpp" or world != 2:
        return tuple(c for c in cases_(world, backend) if c not in CPP_2_ONLY)
    return cases_(world, backend)


def cases_(world, backend):
    if backend == "triton" and world == 4:
        return tuple(c for c in ALL_CASES if (not c.startswith("loss-") or c in TRITON_4_LOSS_CASES)
                     and c not in TRITON_2_ONLY)
    return ALL_CASES


def _rng(seed):
    return torch.Generator().manual_seed(seed)


def _shard(partition_sizes, rank):
    start = sum(partition_sizes[:rank])
    return slice(start, start + partition_sizes[rank])


def _leaf(t, dtype=torch.float32):
    return None if t is None else t.detach().to(dtype).clone().requires_grad_()


def _grads(leaves):
    return {name: (None if t is None else t.grad) for name, t in leaves.items()}


def _alone(vp):
    """Every rank holds the same tokens, so a whole-head run (vp None) is one process's: one data-parallel
    replica for num_items_in_batch and the entropy quantile, as a vocab-parallel op counts its group."""
    if vp is None and dist.is_initialized():
        return replicated(dist.get_rank(), dist.get_world_size())
    return contextlib.nullcontext()


def _loss_run(backend, data, options, extras, dtype, sl=None, vp=None, cu_seqlens=None, head_dtype=None):
    """fused_linear_grpo_loss with hidden / weight / bias in dtype (weight and bias sliced to `sl`);
    packed inputs with cu_seqlens; the head formed in head_dtype when given."""
    cut = (lambda t: t) if sl is None else (lambda t: None if t is None else t[sl])
    leaves = {"hidden": _leaf(data["hidden"], dtype), "weight": _leaf(cut(data["weight"]), dtype),
              "bias": _leaf(cut(data["bias"]), dtype)}
    kwargs = {} if vp is None else {"vocab_parallel": vp}
    if cu_seqlens is not None:
        kwargs["cu_seqlens"] = cu_seqlens
    if head_dtype is not None:
        kwargs["head_dtype"] = head_dtype
    with _alone(vp):
        loss, metrics = lvrpo_fast.fused_linear_grpo_loss(
            leaves["hidden"], leaves["weight"], data["targets"], data["mask"], data["advantages"], bias=leaves["bias"],
            logp_old=data["logp_old"], logp_ref=data["logp_ref"], logp_sampling=data["logp_sampling"],
            rollout_weights=data["rollout_weights"], temperature=extras.get("temperature", 1.0),
            return_entropy=extras.get("return_entropy", False), backend=backend, **options, **kwargs)
    loss.backward()
    return {"loss": loss.detach(), "metrics": {k: v for k, v in metrics.items()}, "grads": _grads(leaves)}


def _module_run(backend, data, cu_seqlens, dtype, sl=None, vp=None):
    """FusedLinearGRPOLoss (dapo, KL from ref_input / ref_weight, per-token vllm_is_ratio) on packed `data`
    with hidden / weight / bias / ref_input / ref_weight in dtype, the weights sliced to `sl`."""
    from lvrpo_fast.modules import FusedLinearGRPOLoss

    cut = (lambda t: t) if sl is None else (lambda t: None if t is None else t[sl])
    leaves = {"hidden": _leaf(data["hidden"], dtype), "weight": _leaf(cut(data["weight"]), dtype),
              "bias": _leaf(cut(data["bias"]), dtype)}
    module = FusedLinearGRPOLoss(beta=0.05, temperature=0.8, epsilon_high=0.28, backend=backend, vocab_parallel=vp)
    with _alone(vp):
        loss, (kl, clip) = module(leaves["hidden"], leaves["weight"], data["targets"], data["mask"],
                                  data["advantages"], leaves["bias"], old_per_token_logps=data["logp_old"],
                                  ref_input=data["ref_input"].to(dtype), ref_weight=cut(data["ref_weight"]).to(dtype),
                                  vllm_is_ratio=data["rollout_weights"], cu_seqlens=cu_seqlens)
    loss.backward()
    return {"loss": loss.detach(), "metrics": {"kl": kl, "clip_ratio": clip}, "grads": _grads(leaves)}


def _logprobs_run(backend, data, bias, temperature, entropy, mask, dtype, sl=None, vp=None):
    cut = (lambda t: t) if sl is None else (lambda t: None if t is None else t[sl])
    leaves = {"hidden": _leaf(data["hidden"], dtype), "weight": _leaf(cut(data["weight"]), dtype),
              "bias": _leaf(cut(data["bias"]) if bias else None, dtype)}
    kwargs = {} if vp is None else {"vocab_parallel": vp}
    out = lvrpo_fast.fused_linear_logprobs(leaves["hidden"], leaves["weight"], data["targets"], bias=leaves["bias"],
                                           temperature=temperature, return_entropy=entropy,
                                           mask=data["mask"] if mask else None, backend=backend, **kwargs)
    logp, ent = out if entropy else (out, None)
    total = (logp * data["grad_logp"]).sum() + ((ent * data["grad_entropy"]).sum() if entropy else 0)
    total.backward()
    result = {"logp": logp.detach(), "grads": _grads(leaves)}
    if entropy:
        result["entropy"] = ent.detach()
    return result


def _logprobs_blocks(backend, data, sl, vp, **kwargs):
    """_logprobs_run's bias / temperature 0.8 / entropy / mask case on shard sl with vocab_parallel vp."""
    leaves = {"hidden": _leaf(data["hidden"]), "weight": _leaf(data["weight"][sl]), "bias": _leaf(data["bias"][sl])}
    logp, ent = lvrpo_fast.fused_linear_logprobs(leaves["hidden"], leaves["weight"], data["targets"],
                                                 bias=leaves["bias"], temperature=0.8, return_entropy=True,
                                                 mask=data["mask"], backend=backend, vocab_parallel=vp, **kwargs)
    ((logp * data["grad_logp"]).sum() + (ent * data["grad_entropy"]).sum()).backward()
    return {"logp": logp.detach(), "entropy": ent.detach(), "grads": _grads(leaves)}


_GROUPS = {}


def _degree_groups(world):
    """{degree: (group, this rank's index in it)} for the degrees 1, 2 (and 4 on 4 ranks): this rank
    alone, the pairs of consecutive ranks, everyone. new_group is collective: every rank makes them all,
    once."""
    if world not in _GROUPS:
        rank = dist.get_rank()
        singles = [dist.new_group([r]) for r in range(world)]
        pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
        groups = {1: (singles[rank], 0), 2: (pairs[rank // 2], rank % 2)}
        if world == 4:
            groups[4] = (dist.group.WORLD, rank)
        _GROUPS[world] = groups
    return _GROUPS[world]


def _sliced(result, sl):
    """The whole-head result with the weight and bias gradients cut to this rank's shard."""
    grads = dict(result["grads"])
    for name in ("weight", "bias"):
        if grads[name] is not None:
            grads[name] = grads[name][sl]
    return {**result, "grads": grads}


def _compare(tp_result, whole, truth, dtype, sl):
    return [str(o) for o in failures(compare_results(tp_result, _sliced(whole, sl), _sliced(truth, sl), dtype))]


def _logprob_data(seed, masked=True):
    g = _rng(seed)
    data = {"hidden": torch.randn(B, T, D, generator=g), "weight": torch.randn(V, D, generator=g) * 0.6,
            "bias": torch.randn(V, generator=g) * 0.5, "targets": torch.randint(0, V, (B, T), generator=g),
            "mask": torch.rand(B, T, generator=g) > 0.3, "grad_logp": torch.randn(B, T, generator=g),
            "grad_entropy": torch.randn(B, T, generator=g)}
    data["mask"][0, 0] = True
    data["targets"] = torch.where(data["mask"], data["targets"], torch.full_like(data["targets"], -100))
    if not masked:
        data["targets"] = data["targets"].clamp(min=0)
    return data


def _case(name, backend, world, rank, sizes):
    """Failure strings ([] when every output matches) of one case on this rank."""
    sl = _shard(sizes, rank)
    vp = lvrpo_fast.VocabParallel()
    seed = 1000 + ALL_CASES.index(name)
    if name.startswith("loss-"):
        options, extras = linear_cases.CASES[name[5:]]
        data = linear_cases.make_inputs(B, T, D, V, group_size=G, bias=extras.get("bias", False),
                                        weights=extras.get("weights"), sampling=extras.get("sampling", False),
                                        temperature=extras.get("temperature", 1.0), generator=_rng(seed))
        tp_result = _loss_run(backend, data, options, extras, torch.float32, sl, vp)
        whole = _loss_run("reference", data, options, extras, torch.float32)
        truth = _loss_run("reference", data, options, extras, torch.float64)
        return _compare(tp_result, whole, truth, torch.float32, sl)
    if name.startswith("logprobs-") or name in ("targets_in_first_shard", "partial_grad_hidden", "bfloat16_logprobs"):
        bias, temperature, entropy, mask = LOGPROB_CASES.get(name[9:], (True, 0.8, True, True))
        data = _logprob_data(seed, masked=mask)
        dtype = torch.bfloat16 if name == "bfloat16_logprobs" else torch.float32
        if name == "targets_in_first_shard":
            data["targets"] = torch.where(data["mask"], data["targets"] % sizes[0], data["targets"])
        if name == "partial_grad_hidden":
            vp = lvrpo_fast.VocabParallel(reduce_grad_hidden=False)
        tp_result = _logprobs_run(backend, data, bias, temperature, entropy, mask, dtype, sl, vp)
        if name == "partial_grad_hidden":  # each rank holds its share; their sum is the gradient
            partial = tp_result["grads"]["hidden"].clone()
            dist.all_reduce(partial)
            tp_result["grads"]["hidden"] = partial
        whole = _logprobs_run("reference", data, bias, temperature, entropy, mask, dtype)
        truth = _logprobs_run("reference", data, bias, temperature, entropy, mask, torch.float64)
        return _compare(tp_result, whole, truth, dtype, sl)
    if name == "packed_loss":
        # Packed sequences (cu_seqlens; an empty and a one-token sequence) on a vocab-parallel head equal
        # the single-process op on the whole head and the padded batch.
        from test_packed import pack

        options, extras = linear_cases.CASES["gspo_k3_bias_kl_entropy"]
        data = linear_cases.make_inputs(B, T, D, V, group_size=G, bias=True, weights="token", generator=_rng(seed))
        packed, padded, cu = pack(data, [3, 0, 1, T, 2, T])
        tp_result = _loss_run(backend, packed, options, extras, torch.float32, sl, vp, cu_seqlens=cu)
        whole = _loss_run("reference", padded, options, extras, torch.float32)
        truth = _loss_run("reference", padded, options, extras, torch.float64)
        valid = torch.arange(T) < torch.tensor([3, 0, 1, T, 2, T])[:, None]
        for run in (whole, truth):  # the padded batch's gradient at the packed rows
            run["grads"]["hidden"] = run["grads"]["hidden"][valid]
        return _compare(tp_result, whole, truth, torch.float32, sl)
    if name == "head_dtype_loss":
        # A bfloat16 head on float32 inputs (TRL's chunked head under autocast): each rank's logits tile
        # and its gradient in bfloat16, the statistics combined in float32 / float64. Judged against the
        # float64 oracle rounding the head the same way (bfloat16's tolerance, as on one process), and
        # against the same backend on one process with the same head_dtype: the loss and the metrics to
        # float32's tolerance (a shard tile not rounded, or statistics gathered in bfloat16, moves them
        # by ~1e-3), the gradients to bfloat16's (a 1e-7 change of lse may flip a bfloat16 rounding of
        # dlogits).
        options, extras = linear_cases.CASES["entropy_mask_token_mean"]
        data = linear_cases.make_inputs(B, T, D, V, group_size=G, bias=True, temperature=extras["temperature"],
                                        generator=_rng(seed))
        bf16 = torch.bfloat16
        tp_result = _loss_run(backend, data, options, extras, torch.float32, sl, vp, head_dtype=bf16)
        single = _loss_run(backend, data, options, extras, torch.float32, head_dtype=bf16)
        whole = _loss_run("reference", data, options, extras, torch.float32, head_dtype=bf16)
        truth = _loss_run("reference", data, options, extras, torch.float64, head_dtype=bf16)
        plain = _loss_run(backend, data, options, extras, torch.float32, sl, vp)
        bad = _compare(tp_result, whole, truth, bf16, sl)
        one = _sliced(single, sl)
        dtypes = {key: (bf16 if key.startswith("grads.") else torch.float32) for key in flatten(tp_result)}
        bad += [f"against {backend} on one process: {o}" for o in
                failures(compare_results(tp_result, {}, one, torch.float32, dtypes=dtypes))]
        if torch.equal(plain["loss"], tp_result["loss"]):
            bad.append("head_dtype changed nothing on the vocab-parallel head")
        return bad
    if name == "module_packed_with_ref_input":
        # FusedLinearGRPOLoss(vocab_parallel=...) on packed sequences, its reference from ref_input /
        # ref_weight (the reference head sharded too): both fused ops get the shard and the group.
        from test_packed import pack

        data = linear_cases.make_inputs(B, T, D, V, group_size=G, bias=True, weights="token", generator=_rng(seed))
        packed, padded, cu = pack(data, [3, 0, 1, T, 2, T])
        g = _rng(seed + 1)
        packed["ref_input"] = packed["hidden"] + 0.2 * torch.randn(packed["hidden"].shape, generator=g)
        packed["ref_weight"] = data["weight"] + 0.1 * torch.randn(data["weight"].shape, generator=g)
        tp_result = _module_run(backend, packed, cu, torch.float32, sl, vp)
        whole = _module_run("reference", packed, cu, torch.float32)
        truth = _module_run("reference", packed, cu, torch.float64)
        return _compare(tp_result, whole, truth, torch.float32, sl)
    if name == "compile_breaks_the_graph":
        # torch.compile of vocab-parallel calls: without fullgraph, the collective check of each call runs
        # between graphs (every call, so a changed input is still caught on every rank) and the numbers are
        # eager's, bit for bit; fullgraph=True raises the named reason at trace time, before any collective.
        data = _logprob_data(seed)
        options, _ = linear_cases.CASES["gspo_k3_bias_kl_entropy"]
        targets, mask, advantages = data["targets"], data["mask"], torch.randn(B, generator=_rng(seed))

        def step(hidden, weight):
            logp = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, mask=mask, temperature=0.8,
                                                    backend=backend, vocab_parallel=vp)
            loss, metrics = lvrpo_fast.fused_linear_grpo_loss(
                hidden, weight, targets, mask, advantages, logp_old=logp.detach() - 0.01, logp_ref=logp.detach(),
                temperature=0.8, backend=backend, vocab_parallel=vp, **options)
            return loss, metrics["kl"]

        def run(fn):
            hidden, weight = _leaf(data["hidden"]), _leaf(data["weight"][sl])
            loss, kl = fn(hidden, weight)
            loss.backward()
            return [loss.detach(), kl, hidden.grad, weight.grad]

        torch._dynamo.reset()
        eager = run(step)
        compiled = torch.compile(step, backend="aot_eager")
        bad = [f"rank {rank}: compiled call {i}, output {j} differs from eager"
               for i in range(2) for j, (a, b) in enumerate(zip(eager, run(compiled))) if not torch.equal(a, b)]
        torch._dynamo.reset()  # dynamo's cache would give the graphs above again
        try:
            run(torch.compile(step, fullgraph=True, backend="aot_eager"))
            bad.append(f"rank {rank}: fullgraph=True traced a vocab-parallel call")
        except Exception as error:  # dynamo's Unsupported, carrying the reason
            if "vocab_parallel call checks its inputs across the group" not in str(error):
                bad.append(f"rank {rank}: fullgraph=True failed without the reason: {type(error).__name__}: "
                           f"{str(error)[:300]}")
        return bad
    if name == "hf_colwise_parallel_head":
        # A transformers model whose lm_head torch's ColwiseParallel split over the vocabulary (a Shard(0)
        # DTensor weight): lvrpo_fast.integrations.hf.completion_logprobs with vocab_parallel equals the
        # model's own log-softmax, and the gradient reaches the DTensor shard (the same as the whole
        # model's gradient, cut to the shard) and the backbone.
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
        from transformers import LlamaConfig, LlamaForCausalLM

        from lvrpo_fast.integrations import hf

        config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
        torch.manual_seed(seed)
        models = [LlamaForCausalLM(config) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        input_ids = torch.randint(0, V, (3, 9), generator=_rng(seed))
        weights = torch.randn(3, 4, generator=_rng(seed + 1))

        def run(model, **kwargs):
            logp = hf.completion_logprobs(model, input_ids, logits_to_keep=4, temperature=0.8, backend=backend,
                                          **kwargs)
            (logp * weights).sum().backward()
            grads = {"weight": model.lm_head.weight.grad, "embed": model.model.embed_tokens.weight.grad}
            return {"logp": logp.detach(), "grads": grads}

        whole = run(models[0])
        with torch.no_grad():
            logits = models[0](input_ids).logits[:, -5:-1].double() / 0.8
        truth_logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, -4:, None])[..., 0]
        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(models[1], mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
        bad = []
        try:
            hf.completion_logprobs(models[1], input_ids, logits_to_keep=4, backend=backend)
            bad.append(f"rank {rank}: a ColwiseParallel head without vocab_parallel was accepted")
        except ValueError as error:
            if "vocab_parallel=lvrpo_fast.VocabParallel()" not in str(error):
                bad.append(f"rank {rank}: unclear error without vocab_parallel: {error}")
        tp_run = run(models[1], vocab_parallel=lvrpo_fast.VocabParallel())
        sl = _shard([t.numel() for t in torch.arange(V).chunk(world)], rank)
        if tuple(tp_run["grads"]["weight"].placements) != (Shard(0),):
            bad.append(f"rank {rank}: the head's gradient has placements {tp_run['grads']['weight'].placements}")
        got = {"logp": tp_run["logp"], "grads": {"weight": tp_run["grads"]["weight"].to_local(),
                                                 "embed": tp_run["grads"]["embed"]}}
        want = {"logp": whole["logp"], "grads": {"weight": whole["grads"]["weight"][sl],
                                                 "embed": whole["grads"]["embed"]}}
        # The model's own float64-cast logits are the truth of the log-probabilities; the gradients are
        # judged against the one-process run with float32's tolerance (no float64 model here).
        bad += [f"rank {rank}: {o}" for o in failures(compare_results({"logp": got["logp"]}, {"logp": whole["logp"]},
                                                                      {"logp": truth_logp}, torch.float32))]
        bad += [f"rank {rank}: against one process: {o}" for o in
                failures(compare_results(got["grads"], {}, want["grads"], torch.float32))]
        return bad
    if name == "nan_in_one_shard":
        # A NaN in the last rank's shard only: every row's logits hold it, so every rank must return NaN
        # log-probabilities, entropies and loss (no rank may keep a finite value).
        data = _logprob_data(seed)
        data["weight"][V - 1, 3] = float("nan")
        out = _logprobs_run(backend, data, True, 0.8, True, True, torch.float32, sl, vp)
        live = data["mask"]
        bad = []
        if not torch.isnan(out["logp"][live]).all() or not torch.isnan(out["entropy"][live]).all():
            bad.append(f"rank {rank}: finite log-prob or entropy with a NaN logit in rank {world - 1}'s shard")
        if not (out["logp"][~live] == 0).all():
            bad.append(f"rank {rank}: masked positions are not 0")
        options, extras = linear_cases.CASES["grpo"]
        loss_data = linear_cases.make_inputs(B, T, D, V, group_size=G, generator=_rng(seed))
        loss_data["weight"][V - 1, 3] = float("nan")
        loss = _loss_run(backend, loss_data, options, extras, torch.float32, sl, vp)["loss"]
        if not torch.isnan(loss):
            bad.append(f"rank {rank}: loss {float(loss)} is finite with a NaN logit in another shard")
        return bad
    if name == "dtensor_head":
        mesh = init_device_mesh("cpu", (world,))
        options, extras = linear_cases.CASES["gspo_k3_bias_kl_entropy"]
        data = linear_cases.make_inputs(B, T, D, V, group_size=G, bias=True, weights="token", generator=_rng(seed))
        weight = distribute_tensor(data["weight"].clone(), mesh, [Shard(0)]).requires_grad_()
        bias = distribute_tensor(data["bias"].clone(), mesh, [Shard(0)]).requires_grad_()
        hidden = _leaf(data["hidden"])
        try:  # a DTensor head without vocab_parallel: refused (an FSDP2 shard has the same layout)
            lvrpo_fast.fused_linear_logprobs(hidden, weight, data["targets"].clamp(min=0), backend=backend)
            bad = ["a Shard(0) DTensor weight without vocab_parallel was accepted"]
        except ValueError as error:
            bad = [] if "FSDP2" in str(error) else [f"unclear error for a DTensor weight without vocab_parallel: {error}"]
        loss, metrics = lvrpo_fast.fused_linear_grpo_loss(
            hidden, weight, data["targets"], data["mask"], data["advantages"], bias=bias, logp_old=data["logp_old"],
            logp_ref=data["logp_ref"], rollout_weights=data["rollout_weights"],
            temperature=extras["temperature"], backend=backend, vocab_parallel=lvrpo_fast.VocabParallel(),
            **options)
        loss.backward()
        sizes = [t.numel() for t in torch.arange(V).chunk(world)]  # DTensor's Shard(0) split
        sl = _shard(sizes, rank)
        tp_result = {"loss": loss.detach(), "metrics": metrics,
                     "grads": {"hidden": hidden.grad, "weight": weight.grad.to_local(), "bias": bias.grad.to_local()}}
        whole = _loss_run("reference", data, options, extras, torch.float32)
        truth = _loss_run("reference", data, options, extras, torch.float64)
        bad += _compare(tp_result, whole, truth, torch.float32, sl)
        if tuple(weight.grad.placements) != (Shard(0),):
            bad.append(f"the DTensor weight's gradient has placements {weight.grad.placements}")
        replicated = distribute_tensor(data["weight"].clone(), mesh, [Replicate()])
        try:
            lvrpo_fast.fused_linear_logprobs(hidden, replicated, data["targets"].clamp(min=0), backend=backend,
                                             vocab_parallel=lvrpo_fast.VocabParallel())
            bad.append("a Replicate() DTensor weight was accepted")
        except ValueError as error:
            if "Shard(0)" not in str(error):
                bad.append(f"unclear error for a Replicate() DTensor weight: {error}")
        return bad
    if name == "batch_invariant_rows":
        # A row's log-probability and entropy have the same bits whatever else is in the call, across
        # ranks too (the all-gathered statistics are combined row by row in rank order).
        if backend == "reference":
            return []  # exempt from the batch-invariant mode, as on one process
        data = _logprob_data(seed, masked=False)
        shard = data["weight"][sl]
        whole = lvrpo_fast.fused_linear_logprobs(data["hidden"], shard, data["targets"], temperature=0.8,
                                                 return_entropy=True, backend=backend, batch_invariant=True,
                                                 vocab_parallel=vp)
        few = lvrpo_fast.fused_linear_logprobs(data["hidden"][2:4, 1:], shard, data["targets"][2:4, 1:],
                                               temperature=0.8, return_entropy=True, backend=backend,
                                               batch_invariant=True, vocab_parallel=vp)
        same = all(torch.equal(a[2:4, 1:], b) for a, b in zip(whole, few))
        return [] if same else [f"rank {rank}: rows changed bits with the batch around them"]
    if name == "vocab_blocks":
        # vocab_block: the statistics combined block by block in global order (and, in batch-invariant
        # mode, the logits as per-block GEMMs) equal the single-process op on the whole head, in both
        # modes; shards that are not whole blocks are refused on every rank.
        sl = _shard(BLOCK_SHARDS[world], rank)
        vp = lvrpo_fast.VocabParallel(vocab_block=BLOCK)
        bad = []
        for invariant in (False, True):
            data = _logprob_data(seed)
            run = dict(batch_invariant=invariant) if backend != "reference" else {}
            out = _logprobs_blocks(backend, data, sl, vp, **run)
            whole = _logprobs_run("reference", data, True, 0.8, True, True, torch.float32)
            truth = _logprobs_run("reference", data, True, 0.8, True, True, torch.float64)
            bad += _compare(out, whole, truth, torch.float32, sl)
            options, extras = linear_cases.CASES["gspo_k3_bias_kl_entropy"]
            loss_data = linear_cases.make_inputs(B, T, D, V, group_size=G, bias=True, generator=_rng(seed))
            tp_result = _loss_run(backend, loss_data, {**options, **run}, extras, torch.float32, sl, vp)
            whole = _loss_run("reference", loss_data, options, extras, torch.float32)
            truth = _loss_run("reference", loss_data, options, extras, torch.float64)
            bad += _compare(tp_result, whole, truth, torch.float32, sl)
        wrong = _shard({2: (21, 16), 4: SHARDS[4]}[world], rank)  # starts 21 / 11, 15, 28: not multiples of 4
        try:
            lvrpo_fast.fused_linear_logprobs(data["hidden"], data["weight"][wrong], data["targets"].clamp(min=0),
                                             backend=backend, vocab_parallel=vp)
            bad.append(f"rank {rank}: shards that are not whole vocab blocks were accepted")
        except ValueError as error:
            if "vocab_block" not in str(error):
                bad.append(f"rank {rank}: unclear error for shards that are not whole blocks: {error}")
        return bad
    if name == "vocab_blocks_same_bits_at_every_degree":
        # Batch-invariant mode with vocab_block: a token's log-probability and entropy, and the loss, have
        # the same bits at tensor-parallel degree 1 (this rank alone, the whole head), 2 and 4 (issue 19).
        if backend == "reference":
            return []  # exempt from the batch-invariant mode
        groups = _degree_groups(world)
        data = _logprob_data(seed)
        options, extras = linear_cases.CASES["gspo_k3_bias_kl_entropy"]
        loss_data = linear_cases.make_inputs(B, T, D, V, group_size=G, bias=True, generator=_rng(seed))
        results = {}
        for degree, (group, index) in sorted(groups.items()):
            sl = _shard(BLOCK_SHARDS[degree], index)
            vp = lvrpo_fast.VocabParallel(group=group, vocab_block=BLOCK)
            out = _logprobs_blocks(backend, data, sl, vp, batch_invariant=True)
            loss = _loss_run(backend, loss_data, {**options, "batch_invariant": True}, extras, torch.float32, sl,
                             vp)["loss"]
            results[degree] = (out["logp"], out["entropy"], loss)
        bad = []
        for degree, got in results.items():
            for what, a, b in zip(("logp", "entropy", "loss"), results[1], got):
                if not torch.equal(a, b):
                    bad.append(f"rank {rank}: {what} at degree {degree} differs from degree 1 in "
                               f"{int((a != b).sum())} element(s) (max {float((a - b).abs().max()):.3g})")
        return bad
    if name == "inconsistent_calls_raise":
        # Calls that would run different chunk plans (and hang in a collective) raise on every rank.
        data = _logprob_data(seed)
        bad = []
        mask = data["mask"].clone()
        if rank == 0:
            mask[-1, -1] = not bool(mask[-1, -1])
        targets = data["targets"].clamp(min=0)
        for label, kwargs in (("mask", {"mask": mask}),
                              ("vocab_start", {"vocab_parallel": lvrpo_fast.VocabParallel(vocab_start=sl.start + 1)}),
                              ("vocab_size", {"vocab_parallel": lvrpo_fast.VocabParallel(vocab_size=V + 1)}),
                              ("negative vocab_start on one rank",
                               {"vocab_parallel": lvrpo_fast.VocabParallel(vocab_start=-1 if rank == world - 1
                                                                           else None)})):
            kwargs = {"vocab_parallel": vp, **kwargs}
            try:
                lvrpo_fast.fused_linear_logprobs(data["hidden"], data["weight"][sl], targets, backend=backend, **kwargs)
                bad.append(f"rank {rank}: an inconsistent {label} was accepted")
            except ValueError as error:
                if "vocab_parallel" not in str(error):
                    bad.append(f"rank {rank}: the error for an inconsistent {label} does not say what: {error}")
        # An input refused on one rank only (before the collective check): that rank raises its own error
        # and every other rank raises too, instead of waiting in the check's all-gather.
        last = rank == world - 1
        hidden = data["hidden"][..., :-1] if last else data["hidden"]
        try:
            lvrpo_fast.fused_linear_logprobs(hidden, data["weight"][sl], targets, backend=backend, vocab_parallel=vp)
            bad.append(f"rank {rank}: a hidden size refused on rank {world - 1} was accepted")
        except ValueError as error:
            if ("hidden" if last else "refused their inputs") not in str(error):
                bad.append(f"rank {rank}: unclear error for a hidden size refused on one rank: {error}")
        options, extras = linear_cases.CASES["grpo"]
        loss_data = linear_cases.make_inputs(B, T, D, V, group_size=G, generator=_rng(seed))
        try:
            _loss_run(backend, loss_data, {**options, "loss_type": "nope" if rank == 0 else options["loss_type"]},
                      extras, torch.float32, sl, vp)
            bad.append(f"rank {rank}: a loss_type refused on rank 0 was accepted")
        except ValueError as error:
            if ("loss_type" if rank == 0 else "refused their inputs") not in str(error):
                bad.append(f"rank {rank}: unclear error for a loss_type refused on one rank: {error}")
        return bad
    raise AssertionError(name)


def _worker(rank, world, port, out_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    # A collective some rank never joins fails after the timeout instead of hanging the suite.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=int(os.environ.get("LVRPO_TEST_GLOO_TIMEOUT", "300"))))
    outcomes = {}
    try:
        for backend in BACKENDS:
            for name in cases(world, backend):
                try:
                    outcomes[(backend, name)] = _case(name, backend, world, rank, SHARDS[world])
                except Exception as error:  # reported per case by the parent; the other ranks raise too
                    outcomes[(backend, name)] = [f"rank {rank}: {type(error).__name__}: {error}"]
                    raise
    finally:
        torch.save(outcomes, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNS = {}


def _outcomes(world):
    """{(backend, case): [failure strings of every rank]} of one spawn of `world` processes."""
    if world not in _RUNS:
        with tempfile.TemporaryDirectory() as out_dir:
            error = None
            try:
                mp.spawn(_worker, args=(world, _free_port(), out_dir), nprocs=world, join=True)
            except Exception as e:  # the per-case outcomes saved before the failure still say where
                error = e
            merged = {}
            for rank in range(world):
                path = os.path.join(out_dir, f"rank{rank}.pt")
                for key, bad in (torch.load(path) if os.path.exists(path) else {}).items():
                    merged.setdefault(key, []).extend(bad)
            _RUNS[world] = (merged, error)
    return _RUNS[world]


@pytest.mark.parametrize("world, backend, case", [(w, b, c) for w in sorted(SHARDS) for b in BACKENDS
                                                   for c in cases(w, b)])
def test_vocab_parallel_equals_one_process(world, backend, case):
    merged, error = _outcomes(world)
    assert (backend, case) in merged, f"the {world}-process run did not reach this case: {error!r}"
    bad = merged[(backend, case)]
    assert not bad, "\n".join(bad)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vocab_parallel.py"


def _printed_numbers(command):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("loss", "grad norms"))]
    assert len(lines) == 2, done.stdout
    return lines, [float(x.rstrip(",")) for x in re.findall(r"-?\d+\.\d+,?", " ".join(lines))]


def test_readme_torchrun_example_prints_the_one_process_loss():
    """examples/vocab_parallel.py (README, "Vocab-parallel heads"), under torchrun with 2 gloo processes,
    prints the loss, the ratio metric and the gradient norms of the one-process run on the whole head."""
    one, one_values = _printed_numbers([sys.executable, str(EXAMPLE)])
    two, two_values = _printed_numbers([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2", str(EXAMPLE)])
    assert len(one_values) == len(two_values) == 4, (one, two)
    # Printed to 6 places: the loss matched to the last printed digit here, but float32 rounding of the
    # two runs may straddle a rounding boundary on another machine, so the last digit may differ by 1.
    for a, b in zip(one_values, two_values):
        assert abs(a - b) <= 1.5e-6 + 1e-5 * abs(a), (one, two)


def test_vocab_parallel_refuses_without_a_process_group_or_with_a_wrong_type():
    hidden, weight, targets = torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, vocab_parallel=lvrpo_fast.VocabParallel())
    with pytest.raises(TypeError, match="VocabParallel"):
        lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, vocab_parallel=object())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_vocab_blocks_on_the_whole_head_need_no_process_group(backend):
    """Degree 1 of the TP-degree-invariant layout: VocabParallel(vocab_size=V, vocab_block=b) on the whole
    head runs without torch.distributed, equals the float64 reference, and has the bits the same call
    with the head split over 2 and 4 ranks has (test_vocab_parallel_equals_one_process,
    vocab_blocks_same_bits_at_every_degree)."""
    assert not dist.is_initialized()
    data = _logprob_data(7)
    vp = lvrpo_fast.VocabParallel(vocab_size=V, vocab_block=BLOCK)
    whole = slice(0, V)
    out = _logprobs_blocks(backend, data, whole, vp, batch_invariant=True)
    ref = _logprobs_run("reference", data, True, 0.8, True, True, torch.float32)
    truth = _logprobs_run("reference", data, True, 0.8, True, True, torch.float64)
    bad = _compare(out, ref, truth, torch.float32, whole)
    assert not bad, "\n".join(bad)


def test_vocab_block_refuses_bad_values():
    hidden, weight, targets = torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long)
    for block in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="vocab_block"):
            lvrpo_fast.fused_linear_logprobs(hidden, weight, targets,
                                             vocab_parallel=lvrpo_fast.VocabParallel(vocab_size=5, vocab_block=block))
    # Without a process group only the whole head (vocab_size = its rows) is a split: a shard is refused.
    with pytest.raises(RuntimeError, match="init_process_group"):
        lvrpo_fast.fused_linear_logprobs(hidden, weight, targets,
                                         vocab_parallel=lvrpo_fast.VocabParallel(vocab_size=9, vocab_block=2))
