"""The chunked backward by workspace size, on a GPU (issue 27: at N = 16384 the step's host time
exceeds its GPU time, and each column chunk costs host time; a larger workspace means fewer,
wider chunks, at the price of memory).

For each size and each ``--workspaces`` (MiB) and W form (``--configs``): fwd+bwd wall ms
(do_bench), the host's enqueue ms (`step_gap.wall_and_host`), the chunk count, and the peak
memory beyond the inputs and their gradients. The gradients are compared with the first
workspace's: W is elementwise and the products' order over chunks changes only the fp32
accumulation of dq, so they agree to the fp32 rounding of a sum (printed: max rel diff).
bf16, D = 512, pk4 ids, forward KL. The last lines: one table.

    python3 tools/workspace_sweep.py --sizes 16384,32768 --workspaces 64,96,128,256
"""

from __future__ import annotations

import argparse

import torch

import sdm_triton
from step_gap import bf16_pk4, wall_and_host     # tools/ (run from the repository root: python3 tools/...)

MIB = 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--workspaces", default="64,96,128,256", help="MiB")
    ap.add_argument("--configs", default="default,wfp16")
    ap.add_argument("--d", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for n in map(int, args.sizes.split(",")):
        q, g, ids = bf16_pk4(n, args.d)
        for cfg in args.configs.split(","):
            name = None if cfg == "default" else cfg
            base = None
            for ws in map(int, args.workspaces.split(",")):
                def step():
                    q.grad = g.grad = None
                    sdm_triton.sdm_loss(q, g, ids, ids, kernel_config=name, workspace_bytes=ws * MIB).backward()
                step()
                grads = (q.grad.float(), g.grad.float())
                base = base or grads
                diff = max(float(((a - b).abs().max() / b.abs().max())) for a, b in zip(grads, base))
                wall, host = wall_and_host(step)
                q.grad = g.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
                step()                   # the gradients (inputs' size) are kept: count them as held
                torch.cuda.synchronize()
                extra = (torch.cuda.max_memory_allocated() - held - q.numel() * 2 * 2) / MIB
                rows.append((n, cfg, ws, wall, host, extra, diff))
                print(f"N={n} {cfg} ws={ws} MiB: fwd+bwd {wall:.2f} ms, host {host:.2f} ms, peak +{extra:.0f} MiB,"
                      f" grads max rel diff {diff:.1e}", flush=True)
    print("\n| N | W form | workspace MiB | fwd+bwd ms | host ms | peak beyond inputs + grads MiB | grads vs first |")
    print("|---|---|---|---|---|---|---|")
    for n, cfg, ws, wall, host, extra, diff in rows:
        print(f"| {n} | {cfg} | {ws} | {wall:.2f} | {host:.2f} | {extra:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
