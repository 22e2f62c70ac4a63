"""Issue 18 on a GPU, in one call: where the exact-logit gradient errors came from, and whether
a compiled training step runs.

    python3 tools/gpu_diag_18.py [--old PATH]      (PATH: a copy of an older sdm_triton package's
                                                    parent folder, e.g. from `git archive 10eec40`)

Part 1 runs test_kernels' exact-logit case (integer features, normalize=False, s = 4 and 64,
five-way exact ties at s = 64) on both backward paths and prints the relative gradient error
against float64 for: this checkout, the old package, and the old package compiled with
TRITON_DEFAULT_FP_FUSION=0 (no FMA contraction anywhere). If contraction of the backward's
t - m is the cause, the old package fails at 1e-5 and passes without fusion, and this checkout
passes with fusion on.

Part 2 compiles a bf16 training step with torch.compile(fullgraph=True) as a user would
(sdm_loss and sdm_loss_multi) and compares loss and gradients with eager.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:          # part 2 runs in this process: this checkout's package
    sys.path.insert(0, ROOT)


def exact_logit_errors():
    import torch
    import sdm_triton
    from sdm_triton import reference

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_kernels import exact_logits_problem          # the test's own case

    q, g, kw = exact_logits_problem("cuda")
    out = {}
    for path in ("fused", "chunked"):
        for kl in ("forward", "reverse"):
            for scale in (4.0, 64.0):
                qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
                sdm_triton.sdm_loss(qa, ga, **kw, kl=kl, logit_scale=scale, normalize=False, backend="triton",
                                    kernel_config=path).backward()
                q64, g64 = q.double().requires_grad_(), g.double().requires_grad_()
                reference.sdm_loss(q64, g64, **kw, kl=kl, logit_scale=scale, normalize=False).backward()
                err = max(((a.double() - b).norm() / b.norm()).item() for a, b in ((qa.grad, q64.grad),
                                                                                   (ga.grad, g64.grad)))
                out[f"{path} {kl} s={scale:g}"] = err
    return out


def compiled_step():
    import torch
    import sdm_triton

    torch.manual_seed(0)
    n, d = 256, 512
    q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    gs = torch.randn(3, n, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, n // 4, (n,), device="cuda")
    rows = []
    for name, fn, args in (
            ("sdm_loss", lambda a, b: sdm_triton.sdm_loss(a, b, ids, ids, temperature=0.02), (q, g)),
            ("sdm_loss_multi", lambda a, b: sdm_triton.sdm_loss_multi(a, b, ids, ids, temperature=0.02).sum(),
             (q, gs))):
        results = []
        for mode in ("eager", "compiled"):
            f = torch.compile(fn, fullgraph=True) if mode == "compiled" else fn
            a, b = (x.clone().requires_grad_() for x in args)
            try:
                loss = f(a, b)
                loss.backward()
                results.append((loss.detach().double(), a.grad.double(), b.grad.double()))
            except Exception as exc:  # noqa: BLE001
                rows.append(f"{name}: {mode} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                break
        if len(results) == 2:
            (l0, a0, b0), (l1, a1, b1) = results
            rel = lambda x, y: ((x - y).norm() / y.norm().clamp_min(1e-30)).item()  # noqa: E731
            rows.append(f"{name}: compiled vs eager: loss {rel(l1, l0):.1e}, dq {rel(a1, a0):.1e}, "
                        f"dg {rel(b1, b0):.1e}")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="folder holding an older sdm_triton package")
    ap.add_argument("--child", choices=["errors"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "errors":
        print(json.dumps(exact_logit_errors()))
        return 0
    runs = [("this checkout", ROOT, {})]
    if args.old:
        runs += [("old", args.old, {}), ("old, fp fusion off", args.old, {"TRITON_DEFAULT_FP_FUSION": "0"})]
    table = {}
    for label, path, extra in runs:
        env = dict(os.environ, PYTHONPATH=path + os.pathsep + ROOT, **extra)
        env.pop("TRITON_INTERPRET", None)
        r = subprocess.run([sys.executable, __file__, "--child", "errors"], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{label}: FAILED\n{r.stderr[-2000:]}")
            continue
        table[label] = json.loads(r.stdout.strip().splitlines()[-1])
    print("== exact-logit gradients: max relative error of dq, dg vs float64 (test limit 1e-5)")
    labels = list(table)
    print(f"{'case':26s}" + "".join(f"{lb:>22s}" for lb in labels))
    for case in (table[labels[0]] if labels else {}):
        print(f"{case:26s}" + "".join(f"{table[lb][case]:22.2e}" for lb in labels))
    print("== torch.compile(fullgraph=True) of a bf16 step, N = 256, D = 512")
    for row in compiled_step():
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
