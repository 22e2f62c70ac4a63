"""The chunked backward's W pass (`_grad_chunk_kernel`) by tile shape, on a GPU (issue 27, step 2).

For each W form (``--variants``: kernel_config names, "default" = none) and each tile shape
(``--tiles``: bm/bn/bw/bs tokens of `KernelConfig`), at each size: the gradients against those
of the table's tiles (W is elementwise and the products are cuBLAS', so any tile shape must give
the same bits: a difference is a bug, printed as one) and the median ms of one forward + backward
(do_bench) and of the W kernel alone (torch.profiler, per step). bf16, D = 512; pk4 ids or the
same labels as a dense [N, M] matrix (``--labels``), forward or reverse KL (``--kl``). The last
lines: one table, ms per step, the table's tiles first.

    python3 tools/w_tiles_sweep.py --sizes 16384,32768 --variants default,wfp16
    python3 tools/w_tiles_sweep.py --sizes 16384 --kl reverse --labels dense --tiles ,bm128bn64bw8bs3
"""

from __future__ import annotations

import argparse

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import sdm_triton
from step_gap import bf16_pk4     # tools/ (run from the repository root: python3 tools/...)

TILES = ["", "bm64bn64bw4bs4", "bm64bn64bw4bs3", "bm128bn64bw4bs4", "bm64bn128bw4bs4",
         "bm128bn128bw8bs3", "bm128bn128bw4bs3", "bm64bn64bw8bs4"]


def _kernel_ms(step, name="_grad_chunk_kernel"):
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if e.key == name) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--variants", default="default,wfp16")
    ap.add_argument("--tiles", default=",".join(TILES), help="bm/bn/bw/bs tokens; empty: the table's")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--kl", choices=("forward", "reverse"), default="forward")
    ap.add_argument("--labels", choices=("pk4", "dense"), default="pk4",
                    help="pk4: identity ids (4 rows an identity); dense: the same as an [N, M] matrix")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for n in map(int, args.sizes.split(",")):
        q, g, ids = bf16_pk4(n, args.d)
        if args.labels == "dense":
            label_kw = dict(labels=ids[:, None] == ids[None, :])          # bool
        else:
            label_kw = dict(q_ids=ids, g_ids=ids)
        for variant in args.variants.split(","):
            base = None
            for tiles in args.tiles.split(","):
                name = "_".join(x for x in ("" if variant == "default" else variant, tiles) if x) or None

                def step():
                    q.grad = g.grad = None
                    sdm_triton.sdm_loss(q, g, kl=args.kl, kernel_config=name, **label_kw).backward()
                try:
                    step()
                    grads = (q.grad.clone(), g.grad.clone())
                except Exception as e:  # a shape the compiler refuses (shared memory): say so, go on
                    print(f"N={n} {variant} {tiles or 'table'}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                if base is None:
                    base = grads
                same = all(torch.equal(a, b) for a, b in zip(grads, base))
                ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
                w_ms = _kernel_ms(step)
                rows.append((n, variant, tiles or "table", ms, w_ms, same))
                print(f"N={n} {variant} {tiles or 'table'}: fwd+bwd {ms:.2f} ms, W kernel {w_ms:.2f} ms/step,"
                      f" grads {'identical' if same else 'DIFFER from the table tiles'}", flush=True)
    print(f"\nkl={args.kl}, labels={args.labels}")
    print("\n| N | W form | tiles | fwd+bwd ms | W kernel ms/step | grads vs table tiles |")
    print("|---|---|---|---|---|---|")
    for n, v, t, ms, w_ms, same in rows:
        print(f"| {n} | {v} | {t} | {ms:.2f} | {w_ms:.2f} | {'identical' if same else 'DIFFER'} |")


if __name__ == "__main__":
    main()
