"""2-GPU scaling of sdm_loss_distributed against one GPU on the same global batch.

python tools/dist_scaling.py --local 32768 --d 512 [--world 2]
Prints one table: strategy, GPUs, global N, median ms per forward+backward, peak MiB per GPU
beyond inputs and gradients. Correctness of these strategies is tested in tests/test_distributed.py.
"""

import argparse
import os
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sdm_triton
from sdm_triton.distributed import sdm_loss_distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(n_global, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n_global, generator=gen) // 4          # 4 samples per identity
    return ids


def _time(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _inputs(n, d, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, d, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    g = torch.randn(n, d, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    q.grad, g.grad = torch.zeros_like(q), torch.zeros_like(g)
    return q, g


def _worker(rank, world, port, local, d, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    ids = _global_batch(local * world, d).cuda()
    my_ids = ids[rank * local:(rank + 1) * local]
    q, g = _inputs(local, d, "cuda", seed=rank + 1)
    for strategy in ("allgather", "ring"):
        def step():
            sdm_loss_distributed(q, g, my_ids, my_ids, strategy=strategy).backward()
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = _time(step)
        peaks = torch.tensor([peak], device="cuda")
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        t = torch.tensor([ms], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.append((strategy, world, local * world, t.item(), peaks.item()))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--local", type=int, default=32768)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args()
    rows = []
    n_global = args.local * args.world
    ids = _global_batch(n_global, args.d).cuda()
    q, g = _inputs(n_global, args.d, "cuda", seed=0)

    def single():
        sdm_triton.sdm_loss(q, g, ids, ids).backward()
    single()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    single()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    rows.append(("single GPU", 1, n_global, _time(single, iters=5, warmup=1), peak))
    del q, g
    torch.cuda.empty_cache()

    with mp.Manager() as manager:
        out = manager.list()
        mp.spawn(_worker, args=(args.world, _free_port(), args.local, args.d, out), nprocs=args.world)
        rows += list(out)
    print(f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}")
    print("| strategy | GPUs | global N=M | fwd+bwd ms (max over ranks) | peak MiB per GPU beyond inputs+grads | vs half of 1-GPU time |")
    print("|---|---|---|---|---|---|")
    half = rows[0][3] / args.world
    for s, w, n, ms, pk in rows:
        print(f"| {s} | {w} | {n} | {ms:.2f} | {pk:.0f} | {ms / half:.2f} |")


if __name__ == "__main__":
    main()
