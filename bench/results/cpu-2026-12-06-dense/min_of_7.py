import sys, time, torch
sys.path.insert(0, sys.argv[1])
import sdm_triton
from bench import methods
torch.manual_seed(0)
n = 64
res = {}
for kl in ("reverse", "forward"):
    q = torch.randn(n, 32, requires_grad=True); g = torch.randn(n, 32, requires_grad=True)
    ids = torch.arange(n) // 4
    fns = {"sdm_torch": lambda: sdm_triton.sdm_loss(q, g, ids, ids, backend="torch", temperature=0.02, kl=kl),
           "formula": lambda: methods.formula_sdm(q, g, ids, ids, scale=50.0, kl=kl)}
    best = {}
    for rep in range(7):
        for name, fn in fns.items():
            for mode in ("fwd", "fwd+bwd"):
                t0 = time.perf_counter()
                for _ in range(100):
                    l = fn()
                    if mode != "fwd": l.backward()
                t = (time.perf_counter() - t0) * 10
                best[name, mode] = min(best.get((name, mode), 1e9), t)
    print(kl, {f"{k[0]} {k[1]}": round(v, 3) for k, v in best.items()})
