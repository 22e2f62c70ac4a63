"""Where the host time of a small training step goes on a GPU (issue 28), in three views:

1. cProfile of sdm_loss steps (bf16, forward KL, N = 64, D = 512): the functions with the most
   time of their own, and the cumulative view of the package's own functions; then each
   kernel's GPU time per step (torch.profiler): a step synchronised per call waits for both;
2. each Triton launch of one step, replayed alone: host microseconds of ``kernel[grid](**kw)``,
   of Triton's argument binder alone, and of the compiled kernel's launcher called directly with
   the bound arguments (what a cached launch would cost);
3. reference costs on the same host: ``torch.empty`` on the GPU, one elementwise torch op.

    python3 tools/host_profile.py [--n 64] [--reps 300] [--top 25]

Needs a CUDA device (the launches are the compiled kernels', not the interpreter's).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
import triton
from triton import knobs
from triton.runtime import driver

import sdm_triton
from sdm_triton.launch import backward as _bwd
from sdm_triton.launch import direct as _direct
from sdm_triton.launch import forward as _fwd


def _host_us(fn, reps):
    """Median host microseconds of fn() over reps calls, in batches of 10 (the GPU synchronised
    between batches, so the queue never fills)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(reps // 10, 1)):
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        times.append((time.perf_counter() - t0) * 1e5)
        torch.cuda.synchronize()
    return statistics.median(times)


def _cuda_us(event) -> float:
    """An event's own device time in us (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _record_launches(step):
    """Run one step with every launch recorded: [(kernel, grid, kwargs)]."""
    seen = []
    originals = (_fwd._traceable, _bwd._traceable)

    def recording(kernel):
        def at(grid):
            def launch(**kw):
                seen.append((kernel, grid, kw))
                return kernel[grid](**kw)
            return launch
        return type("Rec", (), {"__getitem__": lambda self, grid: at(grid)})()

    _fwd._traceable = _bwd._traceable = recording
    try:
        step()
    finally:
        _fwd._traceable, _bwd._traceable = originals
    torch.cuda.synchronize()
    return seen


def _launch_costs(kernel, grid, kw, reps):
    device = driver.active.get_current_device()
    binder = kernel.device_caches[device][4]
    opts = dict(kw)
    opts["debug"] = kernel.debug or knobs.runtime.debug
    opts["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    compiled = kernel[grid](**kw)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    bound, _, _ = binder(**opts)
    values = tuple(bound.values())
    g = tuple(grid) + (1,) * (3 - len(grid))
    stream = driver.active.get_current_stream(device)

    def direct():
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *values)

    return {
        "kernel[grid](**kw)": _host_us(lambda: kernel[grid](**kw), reps),
        "binder only": _host_us(lambda: binder(**opts), reps),
        "compiled.run direct": _host_us(direct, reps),
        "sdm_triton's launcher": _host_us(lambda: _direct._launch(kernel, grid, dict(kw)), reps),
        "stream query": _host_us(lambda: driver.active.get_current_stream(driver.active.get_current_device()), reps),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    n, d = args.n, args.d
    q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.arange(n, device="cuda") // 4

    def step():
        sdm_triton.sdm_loss(q, g, ids, logit_scale=50.0).backward()
        q.grad = g.grad = None

    print(f"\nstep (bf16, forward KL, N = {n}, D = {d}), host us per step: {_host_us(step, args.reps):.1f}")
    # the direct launcher (sdm_triton/launch/direct.py) against Triton's kernel[grid](**kw), alternately
    for rep in range(3):
        for enabled in (False, True):
            _direct.ENABLED = enabled
            _direct._LAUNCHERS.clear()
            label = "direct launches" if enabled else "kernel[grid](**kw)"
            print(f"  round {rep}: {label:20s} host us per step: {_host_us(step, args.reps):.1f}")

    pr = cProfile.Profile()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    pr.enable()
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    pr.disable()
    for order in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(order).print_stats(args.top)
        print(f"\n--- cProfile of 200 steps, by {order} ---")
        print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))

    print("\n--- GPU time of each kernel (torch.profiler, 50 steps; us per step) ---")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            step()
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -_cuda_us(e))[:12]:
        if _cuda_us(e) > 0:
            print(f"{e.key[:60]:60s} {e.count / 50:5.1f} calls {_cuda_us(e) / 50:9.1f} us")

    print("\n--- each launch of one step, replayed: host us per launch ---")
    rows = []
    for kernel, grid, kw in _record_launches(step):
        nargs = len(kw)
        costs = _launch_costs(kernel, grid, kw, args.reps)
        rows.append((kernel.fn.__name__, nargs, costs))
    keys = list(rows[0][2])
    print(f"{'kernel':24s} {'args':>4s} " + " ".join(f"{k:>20s}" for k in keys))
    for name, nargs, costs in rows:
        print(f"{name:24s} {nargs:4d} " + " ".join(f"{costs[k]:20.1f}" for k in keys))

    print("\n--- reference costs on this host, us ---")
    x = torch.randn(n, device="cuda")
    print(f"torch.empty(64) on cuda    {_host_us(lambda: torch.empty(64, device='cuda'), args.reps):8.1f}")
    print(f"x * 2 (one elementwise op) {_host_us(lambda: x * 2, args.reps):8.1f}")
    print(f"x.copy_(x)                 {_host_us(lambda: x.copy_(x), args.reps):8.1f}")


if __name__ == "__main__":
    main()
