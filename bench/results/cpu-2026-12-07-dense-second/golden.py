"""Run many torch-backend configurations; save (or compare against) every output and gradient."""
import sys, itertools, torch, sdm_triton
torch.manual_seed(0)
def inputs(n, m, k, dt, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 8, generator=gen, dtype=torch.float64).to(dt)
    g = torch.randn(*((k,) if k else ()), m, 8, generator=gen, dtype=torch.float64).to(dt)
    return q, g
res = {}
seed = 0
for (n, m), k, dt, kl, lab, mask, scale, red, stats, direction, ws in itertools.product(
        [(6, 6), (5, 7)], [0, 2], [torch.float32, torch.float64, torch.bfloat16], ["forward", "reverse"],
        ["ids", "dense", "dense_nan"], [None, "q", "qg"], ["float", "tensor"], ["mean", "sum", "none"], [False, True],
        ["both", "q2g"], [64 * 2**20, 1]):
    if k and lab != "ids": continue
    if dt == torch.bfloat16 and (mask == "q" or red == "sum"): continue
    seed += 1
    gen = torch.Generator().manual_seed(seed)
    q, g = inputs(n, m, k, dt, seed)
    if seed % 7 == 0:
        q[1] = 0          # zero row
    if lab == "dense_nan" and seed % 3 == 0:
        q[2, 0] = float("nan")
    q.requires_grad_(); g.requires_grad_()
    ids = torch.randint(0, 3, (n,), generator=gen); gids = torch.randint(0, 3, (m,), generator=gen)
    kw = {}
    if lab == "ids":
        kw = dict(q_ids=ids, g_ids=gids if not k else torch.stack([gids] * k))
    else:
        L = (ids[:, None] == gids[None]).double() * torch.rand(n, m, generator=gen, dtype=torch.float64)
        if lab == "dense_nan": L[0, 1] = float("nan")
        kw = dict(labels=L)
    if mask:
        qm = torch.rand(n, generator=gen) > 0.3
        kw["q_mask"] = qm
        if mask == "qg":
            kw["g_mask"] = torch.rand(*((k,) if k else ()), m, generator=gen) > 0.3
    ls = None
    if scale == "tensor":
        ls = torch.tensor(20.0, dtype=torch.float32, requires_grad=True)
    fn = sdm_triton.sdm_loss_multi if k else sdm_triton.sdm_loss
    out = fn(q, g, **kw, logit_scale=ls if ls is not None else 20.0, kl=kl, reduction=red, return_stats=stats,
             direction=direction, backend="torch", workspace_bytes=ws)
    stt = None
    if stats: out, stt = out
    if red == "none":
        vals = [x for x in (out.q2g, out.g2q) if x is not None]
        tot = sum((x * torch.linspace(0.5, 1.5, x.numel()).view_as(x)).sum() for x in vals)
        vals = [v.detach().clone() for v in vals]
    else:
        tot = out.sum(); vals = [out.detach().clone()]
    tot.backward()
    key = (n, m, k, str(dt), kl, lab, mask, scale, red, stats, direction, ws)
    res[key] = vals + [q.grad.clone(), g.grad.clone()] + ([ls.grad.clone()] if ls is not None else []) + \
        ([torch.as_tensor(f).detach().clone().double() for f in __import__('dataclasses').astuple(stt)] if stt is not None else [])
if sys.argv[1] == "save":
    torch.save(res, sys.argv[2]); print("saved", len(res))
else:
    old = torch.load(sys.argv[2])
    assert old.keys() == res.keys()
    worst = 0.0; nd = 0
    for key in res:
        for a, b in zip(old[key], res[key]):
            a, b = a.double(), b.double()
            same_nan = torch.equal(torch.isnan(a), torch.isnan(b))
            d = (a - b).abs().nan_to_num(0).max().item() if a.numel() else 0.0
            if not same_nan or d > 0 or not torch.equal(torch.isinf(a), torch.isinf(b)):
                nd += 1
                if nd < 15: print("DIFF", key, d, same_nan)
                worst = max(worst, d)
    print("configs", len(res), "differing tensors", nd, "max abs diff", worst)
