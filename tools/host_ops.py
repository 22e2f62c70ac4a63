"""Host microseconds of the chunked backward's per-chunk operations, on a GPU (issue 27: at
N = 16384 a step's host time exceeds its GPU time, bench/NOTES.md 40).

Each operation is enqueued ``--reps`` times with the GPU left to run (synchronised only between
batches of 10, so the queue never fills) and its median host time per call printed: the bf16
products with fp32 results (``out_dtype``, what `matmul.mm_f32` / `addmm_f32` run on CUDA), the
same products in bf16 and in fp32, ``torch.cat`` of a chunk's operand, ``torch.empty`` and a
trivial elementwise op for scale.

    python3 tools/host_ops.py --n 16384 --width 1024 --d 512
"""

from __future__ import annotations

import argparse
import time

import torch


def host_us(fn, reps):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps // 10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        times.append((time.perf_counter() - t0) / 10 * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    bf = torch.bfloat16
    w = torch.randn(a.n, 2 * a.width, device="cuda", dtype=bf)       # [hi | lo] of a chunk
    g_c = torch.randn(a.width, a.d, device="cuda", dtype=bf)
    g2 = torch.cat([g_c, g_c])
    q = torch.randn(a.n, a.d, device="cuda", dtype=bf)
    u = torch.zeros(a.n, a.d, device="cuda", dtype=torch.float32)
    w32, g32, q32 = w.float(), g2.float(), q.float()
    x = torch.zeros(a.n, device="cuda")
    ops = {
        "addmm out_dtype=fp32 (u += W [G_c; G_c])": lambda: torch.addmm(u, w, g2, out_dtype=torch.float32, out=u),
        "mm out_dtype=fp32 (W^T Q)": lambda: torch.mm(w.T, q, out_dtype=torch.float32),
        "mm bf16 (W^T Q)": lambda: torch.mm(w.T, q),
        "addmm_ fp32 operands": lambda: u.addmm_(w32, g32),
        "mm fp32 operands (W^T Q)": lambda: torch.mm(w32.T, q32),
        "cat [G_c; G_c]": lambda: torch.cat([g_c, g_c]),
        "torch.empty (n, d) fp32": lambda: torch.empty(a.n, a.d, device="cuda"),
        "x.add_(1) (one elementwise op)": lambda: x.add_(1),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: N = {a.n}, chunk width {a.width}, D = {a.d}")
    for name, fn in ops.items():
        try:
            print(f"  {name:48s} {host_us(fn, a.reps):8.1f} us host per call", flush=True)
        except Exception as e:   # out_dtype absent in this torch
            print(f"  {name:48s} {type(e).__name__}: {str(e)[:100]}", flush=True)


if __name__ == "__main__":
    main()
