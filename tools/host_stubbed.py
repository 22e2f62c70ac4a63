"""The package's own host time of a training step, with every Triton launch stubbed (issue 28).

On a CPU the kernels run in Triton's interpreter; here each launch is replaced by a no-op, so
what is timed is sdm_loss's Python (validation, the problem, tile choices, launch arguments,
allocations, autograd) without Triton's launcher or any kernel. Compare with
tools/host_floor.py's numbers on a GPU: the difference is the launches themselves.

    python3 tools/host_stubbed.py [--n 64] [--d 32] [--reps 300] [--profile] [--calls] [--kernel-config single]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported: launches go through the interpreter

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import sdm_triton  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--kernel-config", default=None, help="sdm_loss's kernel_config (default: none)")
    ap.add_argument("--profile", action="store_true", help="print the cProfile of 200 steps")
    ap.add_argument("--sort", default="cumulative", help="cProfile order: cumulative or tottime")
    ap.add_argument("--calls", action="store_true",
                    help="print the Python function calls a step makes (cProfile's count over 200 steps): a "
                         "measure of the host work that this VM's +-30%% timing noise does not move")
    args = ap.parse_args()
    launches = [0]

    def stub(self, *a, **k):
        launches[0] += 1

    interpreter.InterpretedFunction.run = stub
    torch.manual_seed(0)
    q = torch.randn(args.n, args.d, requires_grad=True)
    g = torch.randn(args.n, args.d, requires_grad=True)
    ids = torch.arange(args.n) // 2

    def step():
        sdm_triton.sdm_loss(q, g, ids, ids, backend="triton", kernel_config=args.kernel_config).backward()
        q.grad = g.grad = None

    for _ in range(20):
        step()
    launches[0] = 0
    t0 = time.perf_counter()
    for _ in range(args.reps):
        step()
    per_step = (time.perf_counter() - t0) / args.reps
    print(f"N = {args.n}, D = {args.d}, fp32, ids, forward + backward: {per_step * 1e6:.0f} us per step "
          f"with the launches stubbed ({launches[0] / args.reps:.0f} launches a step)")
    if args.calls or args.profile:
        steps = 200
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            step()
        pr.disable()
        stats = pstats.Stats(pr)
        if args.calls:
            print(f"Python function calls a step: {sum(v[1] for v in stats.stats.values()) / steps:.0f}")
        if args.profile:
            stats.sort_stats(args.sort).print_stats(30)

if __name__ == "__main__":
    main()
