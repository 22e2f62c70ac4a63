"""The host floor of a training step on a GPU (issue 28): what a forward + backward costs when the
GPU has almost nothing to do, for plain PyTorch, for an autograd.Function around trivial Triton
launches, and for sdm_triton at training batch sizes. Median microseconds per step, the GPU
synchronised once per step (as a training loop's loss.item() would).

    python3 tools/host_floor.py [--reps 300] [--kernel-config single,staged]

``--kernel-config``: the sdm_loss rows once per config named (comma separated; "auto": none
given), interleaved round by round, so that two forward paths compare on one warm machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _touch(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n, other=0.0) + 0.0, mask=i < n)


def _launch(x):
    _touch[(1,)](x, x.numel(), BLOCK=128)


class _Trivial(torch.autograd.Function):
    """``launches`` trivial Triton launches in the forward and as many in the backward."""

    @staticmethod
    def forward(ctx, x, launches):
        ctx.launches = launches
        out = x.clone()
        for _ in range(launches):
            _launch(out)
        return out.sum()

    @staticmethod
    def backward(ctx, grad):
        dx = grad.expand(64).contiguous()
        for _ in range(ctx.launches):
            _launch(dx)
        return dx, None


def median_us(step, reps):
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--kernel-config", default="auto",
                    help="comma-separated kernel_config names for the sdm_loss rows (auto: none given)")
    args = ap.parse_args()
    configs = args.kernel_config.split(",")
    import sdm_triton

    a = torch.randn(64, device="cuda", requires_grad=True)
    b = torch.randn(64, device="cuda")
    rows = [("(a * b).sum().backward()", lambda: (a * b).sum().backward())]
    for k in (1, 2):
        rows.append((f"autograd.Function, {k} + {k} trivial Triton launches",
                     lambda k=k: _Trivial.apply(a, k).backward()))
    for dtype, kl, n in ((torch.float32, "reverse", 64), (torch.bfloat16, "forward", 64),
                         (torch.bfloat16, "forward", 256), (torch.bfloat16, "forward", 1024)):
        q = torch.randn(n, 512, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn(n, 512, device="cuda", dtype=dtype, requires_grad=True)
        ids = torch.arange(n, device="cuda") // 4
        for cfg in configs:
            kc = None if cfg == "auto" else cfg
            rows.append((f"sdm_loss {str(dtype)[6:]} {kl} N={n} [{cfg}]",
                         lambda q=q, g=g, ids=ids, kl=kl, kc=kc: sdm_triton.sdm_loss(
                             q, g, ids, kl=kl, logit_scale=50.0, kernel_config=kc).backward()))
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    for name, step in rows:
        print(f"{name:56s} {median_us(step, args.reps):8.1f} us")


if __name__ == "__main__":
    main()
