"""Wall time against GPU time of a step, on a GPU (issue 27's idle gap at 16384, bench/NOTES.md 39).

For the forward alone and for forward + backward, at each size: the median wall ms (do_bench),
the GPU's busy ms in one step (the sum of its kernels' device time, torch.profiler), the number
of kernels, and the host ms of the step with the GPU left to run (time to return from the call
with no synchronisation: what the host spends enqueuing). Where wall >> GPU, the GPU waits on
the host; the kernels listed last (most launches first) say on what.

    python3 tools/step_gap.py --sizes 16384 --config default
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import sdm_triton


def bf16_pk4(n, d):
    """The large-batch benchmarks' problem (issue 27): q and g [n, d] bf16 on the GPU, requiring
    grad, and pk4 ids (4 rows an identity)."""
    q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    g = torch.randn(n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    return q, g, torch.arange(n, device="cuda") // 4


def wall_and_host(step, reps=7):
    """(wall, host) ms of ``step``: the median of do_bench, and the median time to return from one
    call with the GPU idle before it and left to run (what the host spends enqueuing)."""
    step()
    torch.cuda.synchronize()
    wall = triton.testing.do_bench(step, warmup=10, rep=200, return_mode="median")
    host = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return wall, sorted(host)[reps // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16384")
    ap.add_argument("--configs", default="default,tiles")
    ap.add_argument("--d", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    for n in map(int, args.sizes.split(",")):
        q, g, ids = bf16_pk4(n, args.d)
        for cfg in args.configs.split(","):
            name = None if cfg == "default" else cfg
            fwd = lambda: sdm_triton.sdm_loss(q, g, ids, ids, kernel_config=name)

            def both():
                q.grad = g.grad = None
                fwd().backward()
            for label, step in (("fwd", fwd), ("fwd+bwd", both)):
                wall, host = wall_and_host(step)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
                names = collections.Counter(e.name[:48] for e in kernels)
                print(f"N={n} {cfg} {label}: wall {wall:.3f} ms, GPU busy {busy:.3f} ms, {len(kernels)} kernels,"
                      f" host enqueue {host:.3f} ms", flush=True)
                print("   ", ", ".join(f"{k} x{c}" for k, c in names.most_common(12)), flush=True)


if __name__ == "__main__":
    main()
