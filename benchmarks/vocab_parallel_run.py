"""One vocab-parallel benchmark run: fused_linear_grpo_loss forward and backward on every rank.

    python -m torch.distributed.run --nproc_per_node W benchmarks/vocab_parallel_run.py \
        --impl {fused,gather_logits,single} --batch B --seq T --hidden D --vocab V --rounds R OUT_DIR

impl:
    fused          the C++ backend with vocab_parallel: each rank its [V / W, D] shard (the last
                   rank's shard takes the remainder), the shards' row statistics all-gathered
    gather_logits  each rank's [N, V / W] logits all-gathered into the whole [N, V] logits, the loss
                   on them in eager PyTorch (the reference backend's vocab-parallel path)
    single         one process, the C++ backend on the whole head (run it with W = 1)
Inputs as the benchmarks' (README, "What is measured"): hidden ~ N(0, 1), logits of standard deviation
~3, a completion mask of random length in [T/2, T] per sequence, logp_old / logp_ref the current
log-probabilities plus N(0, 0.1) / N(0, 0.2) noise, dapo with beta = 0.04. Written to
OUT_DIR/rank<r>.json per rank: median_s / min_s of the timed rounds (after one warm-up), the peak
extra memory of one call (benchmarks/measure.py: VmHWM growth of the rank's process on the CPU), the
loss (the same on every rank and equal to the single process's).
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import lvrpo_fast
import measure


def inputs(batch, seq, hidden_size, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * (3.0 / hidden_size ** 0.5)
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    advantages = torch.randn(batch, generator=g)
    with torch.no_grad():  # the current log-probabilities plus noise, so ratios clip and the KL is live
        logp = lvrpo_fast.fused_linear_logprobs(hidden, weight, targets, mask=mask)
    logp_old = logp + 0.1 * torch.randn(batch, seq, generator=g)
    logp_ref = logp + 0.2 * torch.randn(batch, seq, generator=g)
    return hidden, weight, targets, mask, advantages, logp_old, logp_ref


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("fused", "gather_logits", "single"), required=True)
    for name in ("batch", "seq", "hidden", "vocab", "rounds"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("out_dir")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    distributed = args.impl != "single"
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, targets, mask, advantages, logp_old, logp_ref = inputs(args.batch, args.seq, args.hidden, args.vocab)
    size = args.vocab // world
    start = rank * size
    stop = args.vocab if rank == world - 1 else start + size
    shard = weight[start:stop].contiguous()
    vp = lvrpo_fast.VocabParallel() if distributed else None
    backend = "reference" if args.impl == "gather_logits" else "cpp"
    del weight

    def call(_):
        h = hidden.detach().requires_grad_()
        w = shard.detach().requires_grad_()
        loss, _ = lvrpo_fast.fused_linear_grpo_loss(h, w, targets, mask, advantages, logp_old=logp_old,
                                                    logp_ref=logp_ref,
                                                    loss_type="dapo", beta=0.04, backend=backend, vocab_parallel=vp)
        loss.backward()
        return {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}

    first = call(None)  # warm-up: the C++ extension's load, the chunk buffers
    if distributed:
        dist.barrier()
    peak, method, _, _ = measure.peak_extra_memory(call, None)
    times = []
    for _ in range(args.rounds):
        if distributed:
            dist.barrier()  # every rank starts a round together, so a round's time is the slowest rank's
        t0 = time.perf_counter()
        call(None)
        times.append(time.perf_counter() - t0)
    out = {"impl": args.impl, "rank": rank, "world": world, "batch": args.batch, "seq": args.seq,
           "hidden": args.hidden, "vocab": args.vocab, "local_vocab": stop - start, "tokens": int(mask.sum()),
           "median_s": statistics.median(times), "min_s": min(times), "peak_extra_bytes": peak,
           "peak_method": method, "loss": float(first["loss"]), "load_average": os.getloadavg()}
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
