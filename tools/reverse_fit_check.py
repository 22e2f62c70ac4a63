"""Reverse KL's gradient at well-separated fits, against float64 (bench/NOTES.md 37).

IRRA's settings (reverse KL, eps = 1e-8, s = 50, combine="sum"), one positive per row, features with
a shared component so that positive cosines run 0.65-0.90 and negative ones 0.10-0.20: the loss is
~ -eps per row and the gradient tiny. Prints, per fit, the relative gradient error of the plain
formula, the reference and the torch backend in fp32, and of the Triton kernels (interpreted on a
CPU, compiled on a GPU), each on fresh leaves:

    python3 tools/reverse_fit_check.py [--n 64] [--d 512]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported (sdm_triton does)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sdm_triton  # noqa: E402
from bench.methods import formula_sdm  # noqa: E402
from sdm_triton import reference  # noqa: E402

FITS = ((0.5, 0.8), (0.6, 1.0), (0.6, 1.5), (0.7, 2.0))   # (shared component, own identity component)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=512)
    args = ap.parse_args()
    n, d = args.n, args.d
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(1)
    ids = torch.arange(n, device=dev)
    shared = torch.randn(1, d, generator=gen)
    common = dict(logit_scale=50.0, kl="reverse", combine="sum")

    def grads(fn, q, g, dtype, **kw):
        x = q.to(dev, dtype).clone().requires_grad_()
        y = g.to(dev, dtype).clone().requires_grad_()
        fn(x, y, ids, ids, **kw).backward()
        return x.grad.double(), y.grad.double()

    def formula(x, y, a, b):
        return formula_sdm(x, y, a, b, scale=50.0, kl="reverse", combine="sum")

    print(f"N = {n}, D = {d}, {dev}; relative gradient error against float64 (max of dq, dg)")
    print("cos+   cos-   |dq| f64   formula32  reference32  torch32    triton32")
    for a_shared, a_own in FITS:
        base = torch.randn(n, d, generator=gen)
        q = a_shared * shared + a_own * base + 0.7 * torch.randn(n, d, generator=gen)
        g = a_shared * shared + a_own * base + 0.7 * torch.randn(n, d, generator=gen)
        cos = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
        c_pos = cos.diag().mean().item()
        c_neg = (cos.sum() - cos.diag().sum()).item() / (n * n - n)
        truth = grads(reference.sdm_loss, q, g, torch.float64, **common)

        def err(r):
            return max(((a - b).norm() / b.norm()).item() for a, b in zip(r, truth))

        cols = [err(grads(formula, q, g, torch.float32)), err(grads(reference.sdm_loss, q, g, torch.float32, **common)),
                err(grads(sdm_triton.sdm_loss, q, g, torch.float32, backend="torch", **common)),
                err(grads(sdm_triton.sdm_loss, q, g, torch.float32, backend="triton", **common))]
        print(f"{c_pos:.3f}  {c_neg:.3f}  {truth[0].norm().item():.2e}   " + "   ".join(f"{c:.2e}" for c in cols))


if __name__ == "__main__":
    main()
