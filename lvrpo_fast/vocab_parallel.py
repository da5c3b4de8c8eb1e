"""Vocab-parallel (tensor-parallel) LM heads: the head split over the vocabulary across the ranks of a
process group, Megatron-style contiguous shards of possibly unequal size.

Each rank holds weight rows [start, start + V_local) (and that slice of the bias), the same hidden
states and the same global target ids. Per chunk of rows, each rank forms its [C, V_local] logits tile
and reduces it with the backend's own row primitive to (logp_r, lse_r, H_r): the log-probability of
the target when the shard holds it (target id -1 otherwise), the shard's log-sum-exp and its entropy.
The whole row's statistics follow from those alone (z = logits / T, p_r = exp(lse_r - lse)):

    lse  = M + log sum_r exp(lse_r - M),      M = max_r lse_r
    logp = logp_o - (lse - lse_o)             o: the rank holding the target
    H    = lse - sum_r p_r (lse_r - H_r)      (sum_{i in r} p_i z_i = p_r (lse_r - H_r))

One all-gather of the [k, C] float32 statistics per chunk (k = 2, or 3 with the entropy) moves
(TP - 1) k C 4 bytes to each rank, and every rank combines the same gathered values in the same
(rank) order in float64, so all ranks get the same bits, a row's result depends on that row alone
(the batch-invariant mode holds across ranks), and a NaN on any rank reaches every rank's result
(torch's max propagates NaN; an all-reduce MAX would be at the mercy of the transport's NaN rule).

The backward (or the loss's forward, which forms dlogits) runs the backend's gradient primitive on
the local tile with the GLOBAL lse and entropy and target -1 where the shard does not hold it, so each
rank forms exactly its columns of d(loss)/d(logits). grad_weight and grad_bias stay local; grad_hidden
is each rank's partial sum dlogits_r @ W_r, all-reduced over the group when reduce_grad_hidden (the
default: hidden is replicated on the TP ranks, as a column-parallel layer's input) or left partial for
callers that reduce it themselves (Megatron's output layer, whose input already went through
copy_to_tensor_model_parallel_region).

Bits at every degree (vocab_block = b, with batch_invariant=True): the combine above sums over ranks,
so a token's bits follow the degree t. With a vocab_block the parts combined are fixed blocks of b
vocabulary ids in global coordinates instead of shards: each rank reduces each of its blocks with the
backend's row primitive (the same b values per row, in the backend's fixed order, whatever the
shard's width), the per-block (logp, lse, H) of all ranks are all-gathered ([n_blocks, k, C] per
rank, padded to the most blocks of a shard) and combined in global block order, element-wise in
float64. Every shard must hold whole blocks (its first id a multiple of b). The logits of a block are
those of its own [R, D] x [D, b] GEMM, whose shape does not depend on t either (chunking.Logits' column
blocks: BLAS libraries pick kernels by the GEMM's width too, this MKL for narrow ones). So at every
degree whose shards are whole blocks, degree 1 included (the whole head as one shard, no process group
needed), a token's log-probability and entropy, and the loss, have the same bits. Cost: the all-gather
carries (V / b) k 4 bytes per token instead of t k 4 (V / b = 8: 96 B per token with the entropy), the
row primitive runs once per block, and the combine does O(V / b) element-wise float64 operations per
token. The gradients are not covered (grad_hidden is still a sum over ranks).

How the group reaches the fused ops: torch.library schemas cannot carry a ProcessGroup, so the
resolved :class:`Partition` is kept in a small process-local registry and the op receives its integer
key (0: not vocab-parallel). The key is a constant of the call (torch.compile would see an int), and
the registry holds at most one entry per distinct (group, partition, reduce_grad_hidden).

This module is a leaf above the contract: it imports nothing of the package, so the reference (the
oracle) and the fused ops can both use it.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist


# torch 2.13 renamed all_gather_into_tensor (a FutureWarning since); torch >= 2.11 is supported.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class VocabParallel:
    """How an LM head is split over the vocabulary (the public argument of the fused ops).

    group: the tensor-parallel process group (None: the default group). Every rank of it calls the op
        with the same hidden, targets and mask, and its own shard of the head.
    vocab_start: this rank's first vocabulary id; None: the sum of the shard sizes of the group's lower
        ranks (contiguous shards in rank order, Megatron's layout). Given on one rank, give it on all.
    vocab_size: the global V, checked against the shards; None: their sum.
    reduce_grad_hidden: all-reduce the gradient w.r.t. hidden over the group (True, default), or leave
        each rank its partial sum (False) for a caller that reduces it itself.
    vocab_block: None (default), or b: the vocabulary is cut into fixed blocks of b ids in global
        coordinates (the last one V - b floor((V - 1) / b) wide), each shard must hold whole blocks (its
        first id a multiple of b), and the row statistics are combined block by block in global block
        order instead of shard by shard. With batch_invariant=True the head's GEMMs then also run per
        block ([R, D] x [D, b] on every degree), so a token's log-probability and entropy have the same
        bits at every tensor-parallel degree whose shards are whole blocks (see "Batch-invariant mode"
        below). The degree-1 run of such a comparison is VocabParallel(vocab_size=V, vocab_block=b) on
        the whole head: it needs no process group when vocab_size equals the weight's rows.
    """

    group: Optional[object] = None
    vocab_start: Optional[int] = None
    vocab_size: Optional[int] = None
    reduce_grad_hidden: bool = True
    vocab_block: Optional[int] = None


@dataclass(frozen=True, eq=False)
class Partition:
    """A resolved vocab-parallel split, checked on every rank: starts / sizes of every rank's shard in
    group-rank order, this rank's index, the global V."""

    group: object
    starts: Tuple[int, ...]
    sizes: Tuple[int, ...]
    rank: int
    vocab_size: int
    reduce_grad_hidden: bool
    vocab_block: Optional[int] = None

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def local_blocks(self) -> Tuple[Tuple[int, int], ...]:
        """This shard's vocabulary blocks as (first, end) ids into the shard, in order (vocab_block set)."""
        b, n = self.vocab_block, self.local_size
        return tuple((i, min(i + b, n)) for i in range(0, n, b))

    def block_counts(self) -> Tuple[int, ...]:
        """The number of vocabulary blocks of every rank's shard, in rank order (vocab_block set)."""
        return tuple(-(-size // self.vocab_block) for size in self.sizes)

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def local_size(self) -> int:
        return self.sizes[self.rank]

    @property
    def max_local_size(self) -> int:
        """The widest shard: every rank sizes its chunks by it, so that all ranks run the same chunk plan
        (one collective per chunk must match on every rank)."""
        return max(self.sizes)


_KEYS: Dict[tuple, int] = {}
_PARTITIONS: Dict[int, Partition] = {}


def register(partition: Partition) -> int:
    """The key (>= 1) under which the fused ops find `partition` (see the module docstring)."""
    ident = (id(partition.group), partition.starts, partition.sizes, partition.rank, partition.vocab_size,
             partition.reduce_grad_hidden, partition.vocab_block)
    if ident not in _KEYS:
        _KEYS[ident] = len(_KEYS) + 1
        _PARTITIONS[_KEYS[ident]] = partition
    return _KEYS[ident]


def lookup(key: int) -> Optional[Partition]:
    """The partition registered under `key`, None for 0 (not vocab-parallel)."""
    if key == 0:
        return None
    return _PARTITIONS[key]


def _single(spec: VocabParallel, local_size: int) -> bool:
    """Whether `spec` is the one-shard (degree 1) split that runs without a process group: no group
    initialized, none given, and vocab_size equal to the weight's rows (so a shard cannot pass for the
    whole head)."""
    return (spec.group is None and spec.vocab_size == local_size and
            not (dist.is_available() and dist.is_initialized()))


def _int_or_none(spec: VocabParallel, name: str, least: int) -> Optional[str]:
    value = getattr(spec, name)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= least):
        return None
    return f"vocab_parallel.{name} must be an int >= {least} or None, got {value!r}"


def resolve(spec: VocabParallel, local_size: int, device: torch.device, consistency: Tuple[int, ...] = ()) -> Partition:
    """Checks `spec` with this rank's shard size against every other rank's, with one small all-gather
    (a host synchronization), and returns the :class:`Partition`.

    consistency: integers that must be equal on every rank (the rows, the live rows, whether a gradient
    is needed): a rank that disagreed would run another chunk plan and hang the collectives, so a
    mismatch raises on every rank instead. Collective: every rank of the group must call it."""
    if not isinstance(spec, VocabParallel):
        raise TypeError(f"vocab_parallel must be a lvrpo_fast.VocabParallel or None, got {type(spec).__name__}")
    bad = [e for e in (_int_or_none(spec, "vocab_start", 0), _int_or_none(spec, "vocab_size", 0),
                       _int_or_none(spec, "vocab_block", 1)) if e]
    if bad and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("; ".join(bad))  # no other rank to tell
    if not bad and _single(spec, local_size):
        if spec.vocab_start not in (None, 0):
            raise ValueError(f"vocab_parallel.vocab_start must be 0 or None for the whole head, got {spec.vocab_start}")
        return Partition(None, (0,), (local_size,), 0, local_size, bool(spec.reduce_grad_hidden), spec.vocab_block)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group), except on the whole head with "
                           "vocab_parallel.vocab_size equal to the weight's rows")
    group = spec.group
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("vocab_parallel: this process is not a member of vocab_parallel.group")
    # A bad value on one rank is raised after the all-gather, on every rank, so none is left waiting.
    given = (lambda name: -1 if getattr(spec, name) is None or bad else getattr(spec, name))
    mine = [local_size, given("vocab_start"), given("vocab_size"), int(spec.reduce_grad_hidden), int(bool(bad)),
            given("vocab_block"), *consistency]
    # The group's backend decides the device (NCCL needs CUDA tensors, gloo takes CPU ones).
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    table = torch.empty(world * len(mine), dtype=torch.int64, device=device)
    _all_gather(table, local, group=group)
    rows = table.view(world, len(mine)).tolist()
    sizes = tuple(r[0] for r in rows)
    given_starts = [r[1] for r in rows]
    if bad or any(r[4] for r in rows):
        raise ValueError("; ".join(bad) if bad else
                         f"vocab_parallel: rank(s) {[i for i, r in enumerate(rows) if r[4]]} refused their inputs "
                         "or vocab_parallel arguments (see the error raised there); every rank stops")
    if any(r[_HEADER:] != rows[0][_HEADER:] for r in rows):
        raise ValueError("vocab_parallel: the ranks of the group called the op with different inputs "
                         f"(rows, live rows, gradient flags per rank: {[r[_HEADER:] for r in rows]}); every rank "
                         "must pass the same hidden shape, targets and mask")
    if any(r[3] != rows[0][3] for r in rows):
        raise ValueError("vocab_parallel.reduce_grad_hidden differs between the ranks of the group")
    if any(r[5] != rows[0][5] for r in rows):
        raise ValueError(f"vocab_parallel.vocab_block differs between the ranks of the group: "
                         f"{[None if r[5] < 0 else r[5] for r in rows]}")
    if any(s < 1 for s in sizes):
        raise ValueError(f"vocab_parallel: every rank's weight shard must have at least one row, got shard sizes "
                         f"{list(sizes)}")
    starts = tuple(sum(sizes[:r]) for r in range(world))
    if any(s >= 0 for s in given_starts):
        if any(s < 0 for s in given_starts):
            raise ValueError(f"vocab_parallel.vocab_start is given on some ranks and not on others: {given_starts}")
        if tuple(given_starts) != starts:
            raise ValueError(f"vocab_parallel: the shards must be contiguous in rank order, starting at 0: "
                             f"vocab_start per rank {given_starts} with shard sizes {list(sizes)} (expected "
                             f"starts {list(starts)})")
    total = sum(sizes)
    given_v = {r[2] for r in rows}
    if given_v != {-1} and given_v != {total}:
        raise ValueError(f"vocab_parallel.vocab_size {sorted(given_v)} does not match the shards' total {total} "
                         f"(shard sizes {list(sizes)})")
    block = spec.vocab_block
    if block is not None and any(start % block for start in starts):
        raise ValueError(f"vocab_parallel.vocab_block={block}: every shard must hold whole blocks (start at a "
                         f"multiple of {block}), got shard starts {list(starts)} (sizes {list(sizes)})")
    return Partition(group, starts, sizes, rank, total, bool(spec.reduce_grad_hidden), block)


_HEADER = 6  # the fields resolve all-gathers before the consistency integers


EAGER_UNDER_COMPILE = (
    "lvrpo_fast: a vocab_parallel call checks its inputs across the group (lvrpo_fast.vocab_parallel.resolve: "
    "one all-gather and host reads of the mask and of the gathered table) before its op, on every call, so "
    "it cannot be inside one torch.compile graph: compile without fullgraph=True (the check's host reads then "
    "break the graph, and the op itself is still one node of a graph; the numbers are eager's), or call the "
    "op outside the compiled region")


def leave_graph() -> None:
    """Under torch.compile, a named graph break before the eager part of a vocab-parallel call (resolve and
    the host reads that feed it): fullgraph=True then raises with EAGER_UNDER_COMPILE as its message,
    before any rank enters a collective, instead of a data-dependent guard error deep in resolve. A no-op
    in eager mode (torch._dynamo is only touched while dynamo traces, when it is imported already)."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=EAGER_UNDER_COMPILE)


CONSISTENCY_WIDTH = {"logprobs": 4, "linear_grpo_loss": 7}  # len(consistency) each public op passes to resolve


@contextlib.contextmanager
def failing_together(spec, like, op: str):
    """The input checks a rank runs before :func:`resolve`: if they raise on this rank, it still joins
    resolve's all-gather, flagged as failed (so the other ranks raise there instead of waiting in it
    forever), then raises its own error. spec: the op's vocab_parallel argument; like: a tensor on the
    device the group's collectives take; op: a key of CONSISTENCY_WIDTH."""
    try:
        yield
    except Exception:
        if isinstance(spec, VocabParallel) and dist.is_available() and dist.is_initialized():
            try:
                device = like.device if isinstance(like, torch.Tensor) else torch.device("cpu")
                local = torch.tensor([0, -1, -1, int(spec.reduce_grad_hidden), 1, -1] + [0] * CONSISTENCY_WIDTH[op],
                                     dtype=torch.int64, device=device)
                table = torch.empty(dist.get_world_size(spec.group) * local.numel(), dtype=torch.int64, device=device)
                _all_gather(table, local, group=spec.group)
            except Exception:  # noqa: BLE001 (this rank's own error, raised below, is the one to report)
                pass
        raise


# --- DTensor heads ---------------------------------------------------------------------------------
def _is_dtensor(t) -> bool:
    # No DTensor can exist before torch.distributed.tensor is imported; importing it here for an
    # isinstance check would cost every call of a plain head.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def head_shards(weight, bias, spec: Optional[VocabParallel]):
    """(weight, bias, spec) as the fused ops take them. A DTensor weight sharded on the vocabulary
    dimension (placements (Shard(0),)) over a 1-D device mesh becomes its local shard (to_local keeps
    the autograd link, so the DTensor gets its gradient) with a VocabParallel over the mesh's group,
    the shards in mesh order (DTensor's own, possibly unequal, split), when `spec` says so
    (VocabParallel(), its group None or the mesh's; its reduce_grad_hidden kept); a bias must then be a
    DTensor sharded the same way. A DTensor without `spec` raises: FSDP2's shards have the same layout
    and must not be read as a vocabulary split. Any other DTensor raises: its layout is not a vocabulary
    split this op can use."""
    if not _is_dtensor(weight):
        if _is_dtensor(bias):
            raise TypeError("bias is a DTensor but weight is not: pass both as DTensors sharded on the vocabulary "
                            "dimension, or both as plain tensors")
        return weight, bias, spec
    placements, mesh = tuple(weight.placements), weight.device_mesh
    module = sys.modules["torch.distributed.tensor"]
    if spec is None:
        # An FSDP2 shard has the same layout (Shard(0) over a 1-D mesh), but each rank holds other tokens:
        # combining its statistics as vocabulary shards would be silently wrong. So the caller says which.
        raise ValueError(f"weight is a DTensor (placements {placements} on a {mesh.ndim}-D device mesh) and "
                         "vocab_parallel is not given. If it is a tensor-parallel split of the vocabulary, pass "
                         "vocab_parallel=lvrpo_fast.VocabParallel() (the shards and group come from the DTensor). "
                         "If it is an FSDP2 (fully_shard) parameter, call the op inside the module's forward, where "
                         "FSDP2 has gathered it (lvrpo_fast.integrations.hf does), or pass weight.full_tensor()")
    if mesh.ndim != 1 or placements != (module.Shard(0),):
        raise ValueError(f"weight is a DTensor with placements {placements} on a {mesh.ndim}-D device mesh; "
                         "lvrpo_fast takes a DTensor LM head only when it is sharded on the vocabulary dimension "
                         "(placements (Shard(0),)) over a 1-D tensor-parallel mesh (then each rank's shard runs "
                         "the vocab-parallel path); for another layout pass weight.full_tensor() or a plain shard "
                         "with vocab_parallel=VocabParallel(group)")
    if bias is not None and (not _is_dtensor(bias) or tuple(bias.placements) != placements or
                             bias.device_mesh != mesh):
        raise ValueError("weight is a DTensor sharded on the vocabulary dimension; bias must be a DTensor with the "
                         f"same placements {placements} on the same mesh, got "
                         f"{type(bias).__name__ if not _is_dtensor(bias) else tuple(bias.placements)}")
    group = mesh.get_group()
    if spec is not None and spec.group is not None and spec.group is not group:
        raise ValueError("vocab_parallel.group is not the process group of the DTensor weight's device mesh")
    reduce = True if spec is None else spec.reduce_grad_hidden
    if spec is not None and spec.vocab_start is not None:
        raise ValueError("vocab_parallel.vocab_start must be None with a DTensor weight: the DTensor's own split "
                         "gives the shards")
    out = VocabParallel(group=group, vocab_size=int(weight.shape[0]), reduce_grad_hidden=reduce)
    return weight.to_local(), None if bias is None else bias.to_local(), out


# --- the row statistics of a shard, combined ---------------------------------------------------------
def column_block(partition: Optional[Partition]) -> Optional[int]:
    """The width of the logits' column blocks the batch-invariant tiles run (chunking.Logits): the
    partition's vocab_block, None without one (one GEMM over the whole head or shard)."""
    return None if partition is None else partition.vocab_block


def local_targets(partition: Partition, targets: torch.Tensor) -> torch.Tensor:
    """Global ids [C] int64 as ids into this rank's shard, -1 where another shard holds the target."""
    local = targets - partition.start
    return torch.where((local >= 0) & (local < partition.local_size), local, torch.full_like(local, -1))


def owners(partition: Partition, targets: torch.Tensor) -> torch.Tensor:
    """The group rank holding each target id [C] (ids already checked in [0, V))."""
    ends = torch.tensor(partition.starts[1:], dtype=targets.dtype, device=targets.device)
    return torch.bucketize(targets, ends, right=True)


def _gather_rows(partition: Partition, local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` [n, C] stacked in rank order: [world, n, C] (no communication on one rank)."""
    if partition.world == 1:
        return local.unsqueeze(0)
    gathered = local.new_empty((partition.world * local.shape[0], local.shape[1]))  # dim 0 concatenated, as gloo wants
    _all_gather(gathered, local, group=partition.group)
    return gathered.view(partition.world, local.shape[0], local.shape[1])


def combine_parts(g: torch.Tensor, owner: torch.Tensor, with_entropy: bool):
    """The whole rows' (logp, lse, entropy or None), float32 [C], from the statistics of U parts of the
    vocabulary g [U, k, C] (float32: logp where the part holds the target, else anything; the part's
    lse; its entropy when with_entropy) and owner [C], the part holding each row's target. Computed in
    float64, part after part in the order of g, element-wise: a row's bits depend on its own U columns
    alone, whatever C is (see the module docstring for the formulas)."""
    g = g.double()
    lses = g[:, 1]
    # torch.maximum propagates NaN; M = +-inf makes lses - M NaN (a non-finite row, as on one process).
    m = lses[0]
    for u in range(1, lses.shape[0]):
        m = torch.maximum(m, lses[u])
    exps = torch.exp(lses - m)
    acc = exps[0]
    for u in range(1, exps.shape[0]):
        acc = acc + exps[u]
    total = m + torch.log(acc)
    rows = torch.arange(g.shape[2], device=g.device)
    lp = g[owner, 0, rows] - (total - lses[owner, rows])
    lp = torch.where(lp > 0, torch.zeros_like(lp), lp)  # where, not clamp: keeps a NaN
    ent = None
    if with_entropy:
        weights = torch.exp(lses - total)
        # A part whose logits are all -inf has weight 0 and entropy NaN (0 / 0): it adds nothing.
        terms = torch.where(weights > 0, weights * (lses - g[:, 2]), torch.zeros_like(weights))
        acc = terms[0]
        for u in range(1, terms.shape[0]):
            acc = acc + terms[u]
        ent = total - acc
        ent = torch.where(ent < 0, torch.zeros_like(ent), ent).float()
    return lp.float(), total.float(), ent


def combine(partition: Partition, targets: torch.Tensor, logp: torch.Tensor, lse: torch.Tensor,
            entropy: Optional[torch.Tensor]):
    """The whole rows' (logp, lse, entropy or None), float32 [C], from this rank's shard statistics
    (float32 [C], logp NaN where the shard does not hold the target): see the module docstring."""
    parts = [logp, lse] + ([entropy] if entropy is not None else [])
    g = _gather_rows(partition, torch.stack(parts).contiguous())
    return combine_parts(g, owners(partition, targets), entropy is not None)


def combine_blocks(partition: Partition, targets: torch.Tensor, stats: torch.Tensor, with_entropy: bool):
    """As :func:`combine`, from this rank's per-block statistics stats [n_local_blocks, k, C] (vocab_block
    set): every rank's blocks gathered (padded to the most blocks of a shard) and combined in global
    block order, so the result is the same bits at any degree whose shards are whole blocks."""
    counts = partition.block_counts()
    most = max(counts)
    n, k, C = stats.shape
    if n < most:
        stats = torch.cat([stats, stats.new_zeros((most - n, k, C))])
    g = _gather_rows(partition, stats.reshape(most * k, C)).view(partition.world, most, k, C)
    blocks = torch.cat([g[r, :count] for r, count in enumerate(counts)])
    return combine_parts(blocks, torch.div(targets, partition.vocab_block, rounding_mode="floor"), with_entropy)


class ShardPrimitives:
    """A backend's row primitives (lvrpo_fast.contract.Primitives) on one rank's vocabulary shard,
    giving the whole rows' results: logits_stats combines the shards' statistics (collective: every
    rank calls it for the same chunk), logits_grad_ takes the global lse and entropy and forms this
    shard's columns of the gradient. Everything else is the backend's own.

    With vocab_block, logits_stats runs the backend's primitive on each block of the tile (a view of its
    columns, rows strided: the backend reduces exactly those b values per row, in its fixed order) and
    combines the blocks (combine_blocks)."""

    def __init__(self, local, partition: Partition):
        self._local = local
        self.partition = partition
        self.name = local.name

    def __getattr__(self, name):
        return getattr(self._local, name)

    def logits_stats(self, logits, targets, temperature, with_entropy, batch_invariant=False):
        p = self.partition
        if p.vocab_block is None:
            lp, lse, ent = self._local.logits_stats(logits, local_targets(p, targets), temperature,
                                                    with_entropy, batch_invariant)
            return combine(p, targets, lp, lse, ent)
        shard = targets - p.start
        parts = []
        for first, end in p.local_blocks:
            inside = (shard >= first) & (shard < end)
            block_targets = torch.where(inside, shard - first, torch.full_like(shard, -1))
            lp, lse, ent = self._local.logits_stats(logits[:, first:end], block_targets, temperature,
                                                    with_entropy, batch_invariant)
            parts.append(torch.stack([lp, lse] + ([ent] if with_entropy else [])))
        return combine_blocks(p, targets, torch.stack(parts), with_entropy)

    def logits_grad_(self, logits, targets, lse, entropy, grad_logp, grad_entropy, temperature):
        self._local.logits_grad_(logits, local_targets(self.partition, targets), lse, entropy, grad_logp,
                                 grad_entropy, temperature)


def reduce_grad_hidden_(partition: Optional[Partition], grad_hidden: Optional[torch.Tensor]) -> None:
    """Sums grad_hidden over the group in place when the partition asks for it."""
    if partition is not None and partition.reduce_grad_hidden and grad_hidden is not None and partition.world > 1:
        dist.all_reduce(grad_hidden, group=partition.group)


# --- the eager path: the reference's logits gathered over the vocabulary -----------------------------
class _GatherVocab(torch.autograd.Function):
    """[n, V_local] -> [n, V], every rank's shard in order. Backward: this rank's columns of the
    gradient, no communication: every rank computes the same loss from the same gathered logits, so
    each already holds the whole gradient (an all-gather's usual reduce-scatter backward would count
    it once per rank)."""

    @staticmethod
    def forward(ctx, local, partition):
        ctx.partition = partition
        if partition.world == 1:
            return local.view_as(local)
        width = partition.max_local_size
        padded = local.new_zeros((local.shape[0], width))
        padded[:, :local.shape[1]] = local
        gathered = local.new_empty((partition.world * padded.shape[0], width))
        _all_gather(gathered, padded, group=partition.group)
        gathered = gathered.view(partition.world, padded.shape[0], width)
        return torch.cat([gathered[r, :, :size] for r, size in enumerate(partition.sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.partition
        return grad[:, p.start:p.start + p.local_size].contiguous(), None


class _ReduceGrad(torch.autograd.Function):
    """The identity, whose backward sums the gradient over the group (a column-parallel layer's input)."""

    @staticmethod
    def forward(ctx, x, partition):
        ctx.partition = partition
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        if ctx.partition.world > 1:
            dist.all_reduce(grad, group=ctx.partition.group)
        return grad, None


def gathered_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    partition: Partition) -> torch.Tensor:
    """hidden [n, D] through this rank's head shard, the shards' logits all-gathered into [n, V]
    (differentiable: the weight and bias get their local gradients, hidden its partial or, with
    reduce_grad_hidden, summed one). What the eager reference does under vocab parallelism, and the
    all-gather-the-logits baseline of the benchmarks: n V element_size bytes per rank."""
    if partition.reduce_grad_hidden:
        hidden = _ReduceGrad.apply(hidden, partition)
    return _GatherVocab.apply(torch.nn.functional.linear(hidden, weight, bias), partition)


__all__ = ["VocabParallel", "Partition", "head_shards", "register", "lookup", "resolve", "leave_graph", "local_targets",
           "owners", "combine", "combine_parts", "combine_blocks", "ShardPrimitives", "column_block",
           "reduce_grad_hidden_", "gathered_logits"]
