"""A short GPU check of the identity positives' kernels (launch/positives.py) when a device call
has little time: on each case the centroids path against the in-loop compare ("tiles"), whose
gradients must be the same bits (the backward reads neither lin nor the counts' source) and
whose losses differ by the rounding of the positives' logit sum; then the forward's wall and
host time at 16384 (bf16, D = 512, pk4, forward KL), centroids against tiles.

    python3 tools/gpu_smoke_positives.py
"""

from __future__ import annotations

import torch
import triton

import sdm_triton
from step_gap import wall_and_host     # tools/ (run from the repository root: python3 tools/...)


def _run(cfg, q, g, qi, gi, multi=False, **kw):
    q = q.detach().clone().requires_grad_()
    gs = [x.detach().clone().requires_grad_() for x in (g if multi else [g])]
    if multi:
        loss = sdm_triton.sdm_loss_multi(q, gs, qi, gi, kernel_config=cfg, **kw).sum()
    else:
        loss = sdm_triton.sdm_loss(q, gs[0], qi, gi, kernel_config=cfg, **kw)
    loss.backward()
    return float(loss.detach()), [q.grad] + [x.grad for x in gs]


def main():
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    bad = 0
    cases = []
    n = 2048
    q, g = torch.randn(n, 512, device=dev, dtype=bf), torch.randn(n, 512, device=dev, dtype=bf)
    pk4 = torch.arange(n, device=dev) // 4
    few = torch.randint(0, 40, (n,), device=dev)
    cases += [("pk4 forward", (q, g, pk4, pk4), {}), ("pk4 reverse", (q, g, pk4, pk4), dict(kl="reverse")),
              ("few ids, int32 q ids", (q, g, few.int(), few.flip(0)), {}),
              ("masks", (q, g, few, few), dict(q_mask=torch.rand(n, device=dev) > 0.3,
                                               g_mask=torch.rand(n, device=dev) > 0.5)),
              ("no match rows", (q, g, pk4, pk4 + n // 8), {}),
              ("stats", (q, g, few, few), dict(kl="reverse", return_stats=True))]
    for name, (a, b, ai, bi), kw in cases:
        stats = kw.pop("return_stats", False)
        if stats:
            outs = {c: sdm_triton.sdm_loss(a, b, ai, bi, kernel_config=c, return_stats=True, **kw)[1] for c in
                    ("centroids", "tiles")}
            fields = ("valid_q2g", "valid_g2q", "pos_prob_q2g", "pos_prob_g2q")
            diff = max(abs(float(getattr(outs["centroids"], f)) - float(getattr(outs["tiles"], f))) for f in fields)
            ok = diff < 1e-4
            print(f"{name:24s} stats max diff {diff:.2e} {'ok' if ok else 'BAD'}")
            bad += not ok
            continue
        (la, ga), (lb, gb) = (_run(c, a, b, ai, bi, **kw) for c in ("centroids", "tiles"))
        same = all(torch.equal(x, y) for x, y in zip(ga, gb))
        rel = abs(la - lb) / max(abs(lb), 1e-30)
        ok = same and rel < 1e-5
        print(f"{name:24s} loss {la:.6g} vs {lb:.6g} (rel {rel:.1e}), grads {'identical' if same else 'DIFFER'}"
              f" {'ok' if ok else 'BAD'}")
        bad += not ok
    qs = torch.randn(512, 256, device=dev, dtype=bf)
    gs = [torch.randn(512, 256, device=dev, dtype=bf) for _ in range(3)]
    ids = torch.randint(0, 60, (512,), device=dev)
    (la, ga), (lb, gb) = (_run(c, qs, gs, ids, ids, multi=True) for c in ("centroids", "tiles"))
    same = all(torch.equal(x, y) for x, y in zip(ga, gb))
    ok = same and abs(la - lb) / abs(lb) < 1e-5
    print(f"{'multi K=3':24s} loss {la:.6g} vs {lb:.6g}, grads {'identical' if same else 'DIFFER'} {'ok' if ok else 'BAD'}")
    bad += not ok
    n = 16384
    q = torch.randn(n, 512, device=dev, dtype=bf).requires_grad_()
    g = torch.randn(n, 512, device=dev, dtype=bf).requires_grad_()
    i = torch.arange(n, device=dev) // 4
    for cfg in ("centroids", "tiles"):
        fwd = lambda: sdm_triton.sdm_loss(q, g, i, i, kernel_config=cfg)
        wall, host = wall_and_host(fwd)

        def both():
            q.grad = g.grad = None
            fwd().backward()
        step = triton.testing.do_bench(both, warmup=5, rep=200, return_mode="median")
        print(f"N={n} {cfg}: fwd wall {wall:.3f} ms, fwd host {host:.3f} ms, fwd+bwd {step:.3f} ms")
    print("smoke:", "ok" if not bad else f"{bad} BAD")


if __name__ == "__main__":
    main()
