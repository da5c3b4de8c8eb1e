"""The GRPO loss with the LM head split over the vocabulary across processes (tensor parallelism).

    torchrun --nproc_per_node 2 examples/vocab_parallel.py   # 2 processes, gloo, each half of the head
    python examples/vocab_parallel.py                         # 1 process, the whole head: the same loss

Every process builds the same inputs from the same seed; under torchrun each keeps its contiguous
shard of the head's rows and passes vocab_parallel=VocabParallel() (the default process group). The
loss and metrics are the whole head's on every rank; the weight gradient is the rank's shard's and
the hidden-state gradient is summed over the ranks, so the printed loss and gradient norms match the
one-process run up to float32 rounding.
"""
import os

import torch
import torch.distributed as dist

import lvrpo_fast

B, T, D, V = 4, 16, 64, 1000

distributed = "RANK" in os.environ  # set by torchrun
rank, world = 0, 1
if distributed:
    dist.init_process_group("gloo")  # "nccl" with CUDA tensors
    rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)
hidden = torch.randn(B, T, D)
weight = torch.randn(V, D) / D ** 0.5
targets = torch.randint(0, V, (B, T))
mask = torch.arange(T) < torch.randint(T // 2, T + 1, (B, 1))
advantages = torch.randn(B)

# Megatron-style contiguous shards (they may differ in size): rank r holds ids [start, stop).
start, stop = rank * V // world, (rank + 1) * V // world
shard = weight[start:stop].clone().requires_grad_()
hidden.requires_grad_()

loss, metrics = lvrpo_fast.fused_linear_grpo_loss(
    hidden, shard, targets, mask, advantages, loss_type="dapo", temperature=0.9,
    vocab_parallel=lvrpo_fast.VocabParallel() if distributed else None)
loss.backward()

grad_weight_norm = shard.grad.norm() ** 2
if distributed:
    dist.all_reduce(grad_weight_norm)  # the whole head's gradient norm, from every rank's shard
if rank == 0:
    print(f"loss {loss.item():.6f}  ratio {metrics['ratio'].item():.6f}")
    print(f"grad norms: hidden {hidden.grad.norm().item():.6f}, weight {grad_weight_norm.sqrt().item():.6f}")
if distributed:
    dist.destroy_process_group()
