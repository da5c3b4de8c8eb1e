"""FSDP2 (fully_shard) on 2 gloo processes on the CPU: a tiny Qwen2 sharded over the data-parallel mesh,
its GRPO loss through lvrpo_fast.integrations.hf and the fused op, against the same model unsharded.
The LM head sits in each place FSDP2 can put it (CASES): in the root unit, in a unit of its own, in a
unit it shares with the tied input embedding, and in the root unit of a model sharded as one unit.

Each rank takes its own batch; FSDP2 averages the gradients over the ranks (reduce-scatter), so each
parameter's gathered gradient must equal the mean of the unsharded model's gradients on the two
batches. Run by tests/test_integrations_hf.py (spawned: FSDP2 needs a process group per process).
"""
import os
import tempfile

import torch
import torch.distributed as dist

V, L, K, B = 61, 11, 5, 3  # odd vocabulary and lengths


def build(tied: bool):
    import transformers

    torch.manual_seed(0)  # the same initial model on every rank and in the unsharded runs
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    return transformers.AutoModelForCausalLM.from_config(config)


def batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, V, (B, L), generator=g)
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # left padding
    completion_mask = torch.rand(B, K, generator=g) < 0.8
    advantages = torch.randn(B, generator=g)
    logp_old_noise = 0.2 * torch.randn(B, K, generator=g)
    return ids, attention, completion_mask, advantages, logp_old_noise


def loss_of(model, rank: int, backend: str):
    """The GRPO loss of `model` on rank's batch through completion_hidden_states and the fused op."""
    import lvrpo_fast
    from lvrpo_fast.integrations.hf import completion_hidden_states

    ids, attention, mask, advantages, noise = batch(rank)
    heads = completion_hidden_states(model, ids, attention, logits_to_keep=K)
    targets = ids[:, -K:]
    with torch.no_grad():
        logp = lvrpo_fast.fused_linear_logprobs(heads.hidden, heads.weight, targets, mask=mask, backend="reference")
    loss, _ = lvrpo_fast.fused_linear_grpo_loss(heads.hidden, heads.weight, targets, mask, advantages,
                                                logp_old=(logp + noise).float(), backend=backend,
                                                importance_sampling_level="sequence", loss_type="dapo")
    return loss


def completion_logprobs_of(model, rank: int, backend: str):
    """[B, K] log-probabilities of rank's completions through lvrpo_fast.integrations.hf.completion_logprobs."""
    from lvrpo_fast.integrations.hf import completion_logprobs

    ids, attention, mask, _, _ = batch(rank)
    return completion_logprobs(model, ids, attention, K, completion_mask=mask, backend=backend)


def unsharded(tied: bool, dtype: torch.dtype, backend: str):
    """(mean loss over the two ranks' batches, {name: mean gradient}) of the unsharded model."""
    model = build(tied).to(dtype)
    losses = [loss_of(model, rank, backend) for rank in (0, 1)]
    (0.5 * (losses[0] + losses[1])).backward()
    return 0.5 * (losses[0].detach() + losses[1].detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


# (how the model is wrapped, tied embeddings): where FSDP2 puts the LM head (see shard()).
CASES = (("layers", False), ("layers", True), ("head_unit", False), ("embed_head_unit", True), ("one_unit", False))


def shard(model, wrap: str) -> None:
    """fully_shard the model: "layers" each decoder layer, then the root (the head in the root unit, as
    accelerate's and verl's transformer wrap policies leave a tied one); "head_unit" also the LM head on
    its own before the root (verl's policy for an untied head); "embed_head_unit" the tied input
    embedding and head as one unit; "one_unit" the root alone (every parameter in the root unit)."""
    from torch.distributed.fsdp import fully_shard

    if wrap != "one_unit":
        for layer in model.model.layers:
            fully_shard(layer)
    if wrap == "head_unit":
        fully_shard(model.lm_head)
    elif wrap == "embed_head_unit":
        fully_shard([model.model.embed_tokens, model.lm_head])
    fully_shard(model)


def worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {}
    for wrap, tied in CASES:
        model = build(tied)
        shard(model, wrap)
        with torch.no_grad():  # an old-policy pass first: the root's forward, no backward after it
            logp = completion_logprobs_of(model, rank, "cpp")
        loss = loss_of(model, rank, "cpp")
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        # A second step: between its forward and backward the module holds FSDP2's gathered head, which
        # FSDP2 must not have hooked (a hook on this tensor, reused every step, would stay and pile up).
        second = loss_of(model, rank, "cpp")
        head = model.lm_head.weight
        gathered_head = (type(head).__name__, len(head._backward_hooks or {}))
        second.backward()
        results[wrap, tied] = {"loss": total / 2, "grads": grads, "logp": logp, "gathered_head": gathered_head,
                               "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters())}
    # A sharded head in a model that is not itself an FSDP2 module is refused, naming what to do.
    model = build(False)
    fully_shard(model.lm_head)
    try:
        loss_of(model, rank, "cpp")
        results["no_root_error"] = ""
    except ValueError as exc:
        results["no_root_error"] = str(exc)
    dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


def run(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(worker, args=(os.path.join(tmp, "store"), out), nprocs=2,
                                              start_method="spawn")
