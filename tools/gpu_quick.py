"""First GPU check of the kernels: correctness against float64, then a few timings.

python tools/gpu_quick.py [--sizes 8192,32768] [--configs default,...]
Prints a short table last. Not part of the test suite (see tests/ for that).
"""

import argparse
import sys
import time

import torch
import triton

from sdm_triton import reference
import sdm_triton


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def case(n, m, d, dtype, kl, dense, masks, seed, config="default", backend="triton"):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(n, d, device="cuda", generator=gen) * torch.rand(n, 1, device="cuda", generator=gen).mul(4).exp()
    g = torch.randn(m, d, device="cuda", generator=gen)
    q[0] = 0
    ids_q = torch.randint(0, max(1, n // 4), (n,), device="cuda", generator=gen)
    ids_g = torch.randint(0, max(1, m // 4), (m,), device="cuda", generator=gen)
    kw = {}
    if dense:
        lab = torch.rand(n, m, device="cuda", generator=gen)
        lab = torch.where(lab > 0.9, lab, torch.zeros_like(lab))
        kw["labels"] = lab
    else:
        kw["q_ids"], kw["g_ids"] = ids_q, ids_g
    if masks:
        kw["q_mask"] = torch.rand(n, device="cuda", generator=gen) > 0.2
        kw["g_mask"] = torch.rand(m, device="cuda", generator=gen) > 0.2
    w_q = torch.rand(n, device="cuda", generator=gen, dtype=torch.float64)
    w_g = torch.rand(m, device="cuda", generator=gen, dtype=torch.float64)
    qd = q.to(dtype).requires_grad_()
    gd = g.to(dtype).requires_grad_()
    ls = torch.tensor(30.0, device="cuda", requires_grad=True)
    out = sdm_triton.sdm_loss(qd, gd, kl=kl, logit_scale=ls, reduction="none", backend=backend,
                              tile_config=config if backend == "triton" else None, **kw)
    tot = (out.q2g.double() * w_q).sum() + (out.g2q.double() * w_g).sum()
    tot.backward()
    q64 = qd.detach().double().requires_grad_()
    g64 = gd.detach().double().requires_grad_()
    ls64 = torch.tensor(30.0, device="cuda", dtype=torch.float64, requires_grad=True)
    kw64 = {k: (v.double() if k == "labels" else v) for k, v in kw.items()}
    ref = reference.sdm_loss(q64, g64, kl=kl, logit_scale=ls64, reduction="none", **kw64)
    rt = (ref.q2g * w_q).sum() + (ref.g2q * w_g).sum()
    rt.backward()
    # PyTorch's own error for the same formula in the input dtype (fp32 math, as the reference does)
    qp = qd.detach().clone().requires_grad_()
    gp = gd.detach().clone().requires_grad_()
    lsp = torch.tensor(30.0, device="cuda", requires_grad=True)
    pt = reference.sdm_loss(qp, gp, kl=kl, logit_scale=lsp, reduction="none", **kw)
    ptt = (pt.q2g.double() * w_q).sum() + (pt.g2q.double() * w_g).sum()
    ptt.backward()
    # exclude the zero row from gradient comparisons (its gradient is 1/NORM_EPS-scaled)
    sl = slice(1, None)
    errs = dict(loss=rel(tot.detach(), rt.detach()), dq=rel(qd.grad[sl], q64.grad[sl]),
                dg=rel(gd.grad, g64.grad), ds=rel(ls.grad, ls64.grad))
    base = dict(loss=rel(ptt.detach(), rt.detach()), dq=rel(qp.grad[sl], q64.grad[sl]),
                dg=rel(gp.grad, g64.grad), ds=rel(lsp.grad, ls64.grad))
    finite = bool(torch.isfinite(qd.grad[sl]).all() and torch.isfinite(gd.grad).all())
    return errs, base, finite


def correctness(configs):
    """Full grid on the first config; one bf16 case per other config (compiles dominate the time)."""
    ok = True
    rows = []
    for ci, config in enumerate(configs):
        full = ci == 0
        for (n, m, d) in ([(300, 457, 512), (129, 1, 77)] if full else [(300, 457, 512)]):
            for dtype in ((torch.bfloat16, torch.float16, torch.float32) if full and n == 300 else (torch.bfloat16,)):
                for kl in (("forward", "reverse") if full else ("forward",)):
                    for dense, masks in (((False, False), (True, True), (False, True)) if full else ((False, True),)):
                        try:
                            errs, base, finite = case(n, m, d, dtype, kl, dense, masks, seed=n + d, config=config)
                        except Exception as exc:  # noqa: BLE001 - one broken variant must not end the run
                            print(f"{config}: {type(exc).__name__}: {str(exc).splitlines()[-1][:200]}")
                            ok = False
                            continue
                        # tolerance by measurement: no worse than 4x PyTorch's own error, + tiny absolute
                        # (the scalar ds is a sum of N*M terms; hold it to fp32 accuracy, 1e-5)
                        tol = {k: 4 * base[k] + (1e-5 if k == "ds" else 2e-6) for k in errs}
                        bad = [k for k in errs if not (errs[k] <= tol[k])] + ([] if finite else ["nonfinite"])
                        ok &= not bad
                        rows.append((config, n, m, d, str(dtype)[6:], kl, dense, masks, errs, base, bad))
    for r in rows:
        config, n, m, d, dt, kl, dense, masks, errs, base, bad = r
        print(f"{config:14s} {n:5d}x{m:5d}x{d:4d} {dt:8s} {kl:7s} dense={int(dense)} mask={int(masks)} "
              + " ".join(f"{k}={errs[k]:.1e}/{base[k]:.1e}" for k in errs) + (f"  FAIL {bad}" if bad else ""))
    return ok


def bench(n, d, fn_list):
    out = []
    for name, fn in fn_list:
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            ms = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
            peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
            out.append((name, n, ms[0], ms[1], ms[2], peak))
        except Exception as exc:  # noqa: BLE001 - out of memory or a variant that cannot run
            print(f"{name} at {n}: {type(exc).__name__}: {str(exc).splitlines()[-1][:200]}")
            out.append((name, n, float("nan"), float("nan"), float("nan"), float("nan")))
            torch.cuda.empty_cache()
    return out


def timings(sizes, configs, d=512):
    rows = []
    for n in sizes:
        q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ids = torch.randperm(n, device="cuda") // 4
        q.grad = torch.zeros_like(q)
        g.grad = torch.zeros_like(g)
        a, b = q.detach(), g.detach()
        dy = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

        def floor():
            s = a @ b.T
            dq = dy @ b
            dg = dy.T @ a
            s2 = a @ b.T
            return s, dq, dg, s2

        fns = [("floor(4 mm)", floor)]
        for c in configs:
            def run(c=c):
                loss = sdm_triton.sdm_loss(q, g, ids, ids, backend="triton", tile_config=c)
                loss.backward()
            fns.append((f"triton:{c}", run))

            def fwd(c=c):
                with torch.no_grad():
                    sdm_triton.sdm_loss(q, g, ids, ids, backend="triton", tile_config=c)
            fns.append((f"triton-fwd:{c}", fwd))
        if n <= 8192:
            def torch_be():
                sdm_triton.sdm_loss(q, g, ids, ids, backend="torch").backward()
            fns.append(("torch-chunked", torch_be))

            def ref():
                reference.sdm_loss(q, g, ids, ids).backward()
            fns.append(("reference", ref))
        rows += bench(n, d, fns)
        del dy
        torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="4096,16384,32768")
    p.add_argument("--configs", default="default")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--time-anyway", action="store_true", help="time the variants even if a check failed")
    args = p.parse_args()
    configs = args.configs.split(",")
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    t0 = time.time()
    ok = True if args.skip_correctness else correctness(configs)
    print(f"correctness {'OK' if ok else 'FAILED'} ({time.time() - t0:.0f}s)")
    if not ok and not args.time_anyway:
        sys.exit(1)
    rows = timings([int(s) for s in args.sizes.split(",")], configs)
    floor = {r[1]: r[2] for r in rows if r[0].startswith("floor")}
    print("| method | N=M | median ms | p20 | p80 | x floor | peak MiB beyond inputs |")
    print("|---|---|---|---|---|---|---|")
    for name, n, med, p20, p80, peak in rows:
        print(f"| {name} | {n} | {med:.3f} | {p20:.3f} | {p80:.3f} | {med / floor[n]:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
