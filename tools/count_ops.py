"""How many host-side operations one forward + backward issues (the cost that dominates at
IRRA batch sizes, where the GPU work is microseconds): ATen ops (counted with a
TorchDispatchMode; views and metadata-only ops excluded) and Triton kernel launches.

    python tools/count_ops.py [--n 256] [--d 64] [--galleries 15]

Runs anywhere: without CUDA the kernels are interpreted (TRITON_INTERPRET=1), and the ops
the interpreter itself issues during a launch are not counted.
"""

import argparse
import collections
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import sdm_triton  # noqa: E402
from sdm_triton import launch  # noqa: E402

KERNELS = ("_sdm_direction_stats_kernel", "_sdm_tile_grad_kernel", "_sdm_merge_stats_kernel",
           "_sdm_tile_stats_kernel")
NOT_COUNTED = {"aten.detach", "aten.view", "aten.select", "aten.slice", "aten.t", "aten.transpose",
               "aten.expand", "aten.alias", "aten.unbind", "aten._reshape_alias", "aten.unsqueeze",
               "aten.squeeze", "aten.permute", "aten.as_strided"}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.launches = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not self.paused and name not in NOT_COUNTED:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    def __init__(self, name, kernel, counter):
        self.name, self.kernel, self.counter = name, kernel, counter

    def __getitem__(self, grid):
        launcher = self.kernel[grid]

        def call(*args, **kwargs):
            self.counter.launches[self.name] += 1
            self.counter.paused = True       # the interpreter's own tensor traffic is not ours
            try:
                return launcher(*args, **kwargs)
            finally:
                self.counter.paused = False
        return call


def count(step, counter):
    saved = {k: getattr(launch, k) for k in KERNELS}
    for k in KERNELS:
        setattr(launch, k, _CountedKernel(k, saved[k], counter))
    try:
        with counter:
            step()
    finally:
        for k, v in saved.items():
            setattr(launch, k, v)
    return counter


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--galleries", type=int, default=15)
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(args.n, args.d, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(args.n, args.d, device=dev, dtype=dtype, requires_grad=True)
    gs = [torch.randn(args.n, args.d, device=dev, dtype=dtype, requires_grad=True) for _ in range(args.galleries)]
    ids = torch.arange(args.n, device=dev) // 4
    steps = {
        "sdm_loss": lambda: sdm_triton.sdm_loss(q, g, ids, ids, backend="triton").backward(),
        f"sdm_loss_multi (K={args.galleries})":
            lambda: sdm_triton.sdm_loss_multi(q, gs, ids, ids, backend="triton").sum().backward(),
    }
    for name, step in steps.items():
        step()   # compile / warm up outside the count
        c = count(step, _Counter())
        print(f"{name}: {sum(c.ops.values())} ATen ops, Triton launches {dict(c.launches)}; "
              f"most frequent: {', '.join(f'{k} {v}' for k, v in c.ops.most_common(6))}")


if __name__ == "__main__":
    main()
