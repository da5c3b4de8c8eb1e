"""The processes of a run: one, or one per rank under torchrun (torch.distributed, gloo on the CPU,
NCCL on GPUs), and the few collectives the trainer needs.

Every rank runs the same steps on different prompts; gradients are averaged before each optimizer
step, scalars for the metrics are averaged or summed, and rank 0 alone writes the run directory.
"""
from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.distributed as dist


class Processes:
    """This process's rank in torch.distributed (torchrun sets WORLD_SIZE > 1), or a lone process."""

    def __init__(self, requested_device: str, cpu_threads: int):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if requested_device == "auto":
            requested_device = "cuda" if torch.cuda.is_available() else "cpu"
        if requested_device == "cuda":
            requested_device = f"cuda:{local_rank}"
        self.device = torch.device(requested_device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        """Mean over ranks of each value (all ranks pass the same keys)."""
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def sum(self, values: List[float]) -> List[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def average_gradients(self, parameters) -> None:
        if self.world == 1:
            return
        grads = []
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_parameters(self, model) -> None:
        if self.world == 1:
            return
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (a decision only rank 0 can make, such as which checkpoint to load)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any: ranks that stop must stop at the same step,
        since saving a checkpoint is a collective."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
