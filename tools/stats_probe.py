"""Time the forward (the statistics pass and what surrounds it) of `sdm_loss` under several
kernel configs in one run, beside a plain-Triton log-sum-exp yardstick when one is given.

Issue 27: the statistics kernel's tile shape decides its register spills (`tools/compile_check.py`
reads them on the CPU: at 128 x 256 with 8 warps the kernel spills 0.7-2.8 KB with Triton 3.6,
at 128 x 64 with 8 warps nothing), and the centroids path removes the label terms from the loop.
This measures which of those the GPU rewards. bf16, D = 512, pk4 identity labels (4 samples
per identity, the gallery's order shuffled; ``--labels dense``: the same identities as a dense
label matrix), forward only (no gradient), median of
`triton.testing.do_bench`. Each config's loss is checked against the first config's.

    python3 tools/stats_probe.py --sizes 16384,32768 --kl forward,reverse \\
        --configs tiles,centroids,centroids_m128n64k64w8s3

Prints one line per measurement as it goes, then a table (ms, and x the first config).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--kl", default="forward,reverse")
    ap.add_argument("--configs", default="tiles,centroids")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--labels", default="ids", choices=("ids", "dense"),
                    help="ids: the pk4 ids; dense: the same identities as a dense fp32 [N, M] label matrix")
    args = ap.parse_args(argv)
    import triton
    import sdm_triton

    if not torch.cuda.is_available():
        print("stats_probe: needs a GPU")
        return 1
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    configs = args.configs.split(",")
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(n, args.d, device="cuda", generator=gen).to(torch.bfloat16)
        g = torch.randn(n, args.d, device="cuda", generator=gen).to(torch.bfloat16)
        q_ids = torch.arange(n, device="cuda") // 4
        g_ids = q_ids[torch.randperm(n, device="cuda", generator=gen)]
        labels = None
        if args.labels == "dense":          # the same problem, its labels read from an [N, M] matrix
            labels = (q_ids[:, None] == g_ids[None, :]).float()
            q_ids = g_ids = None
        for kl in args.kl.split(","):
            base_ms = base_loss = None
            for config in configs:
                def fwd():
                    return sdm_triton.sdm_loss(q, g, q_ids, g_ids, labels=labels, kl=kl, kernel_config=config)
                with torch.no_grad():
                    loss = float(fwd())
                    ms = triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")
                base_ms = base_ms or ms
                base_loss = base_loss if base_loss is not None else loss
                rel = abs(loss - base_loss) / max(abs(base_loss), 1e-30)
                rows.append((n, kl, config, ms, ms / base_ms, rel))
                print(f"N={n} {args.labels} {kl:7s} {config:32s} {ms:8.3f} ms  x{ms / base_ms:5.2f}  loss {loss:.6g} "
                      f"(rel diff {rel:.1e})", flush=True)
    print("\n| N | kl | config | fwd ms | x first | loss rel diff |")
    print("|---|---|---|---|---|---|")
    for n, kl, config, ms, x, rel in rows:
        print(f"| {n} | {kl} | {config} | {ms:.3f} | {x:.2f} | {rel:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
