"""Best-of-7 batches of 100 calls per cpu-preset case: sdm_torch and formula_eager, fwd and fwd+bwd.
Run with PYTHONPATH=<tree>; prints one JSON line."""
import sys, time, json, torch
from bench import cases, methods
dev = torch.device("cpu")
out = {}
for case in cases.PRESETS["cpu"].cases():
    inputs = cases.make_inputs(case, dev)
    name = f"{case.n}x{case.m} {case.dtype} {case.kl} {case.labels} K={case.k}"
    runs = {m: methods.build(m, "-", case, inputs, dev) for m in ("sdm_torch", "formula_eager")}
    best = {}
    for r in runs.values():
        for _ in range(20): r.fwd_bwd()
    for rep in range(7):
        for meth, r in runs.items():
            for mode in ("fwd", "fwd+bwd"):
                f = r.fwd if mode == "fwd" else r.fwd_bwd
                t0 = time.perf_counter()
                for _ in range(100): f()
                t = (time.perf_counter() - t0) * 10
                best[f"{meth} {mode}"] = min(best.get(f"{meth} {mode}", 1e9), t)
    out[name] = best
print(json.dumps(out))
