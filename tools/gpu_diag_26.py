"""Issue 26 on a GPU, in one call: the fp32 dot's accuracy and cost, and compiled steps at every size.

    python3 tools/gpu_diag_26.py [--old PATH] [--sizes 256,2048,4096,8192,32768]
                                 (PATH: the parent folder of an older sdm_triton package,
                                  e.g. from `git archive 8388360`)

Part 1, accuracy: test_kernels' anti-aligned fp32 case (s = 200, 16 x 40) for D in
{24, 160, 512, 768, 1000}: relative errors against float64 of the per-row losses, dq and dg, for
this checkout's kernels and the old package's (both backward paths), PyTorch's fp32 formula on
this GPU (cuBLAS), the machine-independent baseline of the test (an exactly emulated fp32 dot
of 16-long FMA chains) and a sequential chain along D (emulated).
Part 2, cost: forward and forward + backward of fp32 ("ieee") and bf16 problems, this checkout
and the old package in the same call (median ms, triton.testing.do_bench).
Part 3, torch.compile(fullgraph=True) of a bf16 sdm_loss step at each size (D = 512): loss and
gradients against eager, and the warnings torch logged while compiling.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = (24, 160, 512, 768, 1000)


def _child_env(path):
    env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.path.join(ROOT, "tests") + os.pathsep + ROOT)
    env.pop("TRITON_INTERPRET", None)
    return env


def accuracy(which):
    """{case: {quantity: error}} for the kernels of the package on sys.path (``which`` "kernels"),
    or for the baselines ("baselines")."""
    import torch
    import test_kernels as tk

    out = {}
    for d in DIMS:
        for kl in ("forward", "reverse"):
            case = tk.anti_aligned_case(d, kl)
            q, g = case[:2]
            truth = tk._fp32_formula(*case, cosines=None)
            key = f"D={d} {kl}"
            if which == "kernels":
                for path in ("fused", "chunked"):
                    out[f"{key} {path}"] = tk._errors(tk._sdm_rows_and_grads(*case, config=path), truth)
            else:
                qc, gc = q.cuda(), g.cuda()
                cub = (torch.nn.functional.normalize(qc, dim=1) @ torch.nn.functional.normalize(gc, dim=1).T).cpu()
                out[f"{key} pytorch-cuBLAS"] = tk._errors(tk._fp32_formula(*case, cosines=cub), truth)
                out[f"{key} emulated-16"] = tk._errors(
                    tk._fp32_formula(*case, cosines=tk.fp32_dot_cosines(q, g, chain=16)), truth)
                out[f"{key} emulated-chain"] = tk._errors(
                    tk._fp32_formula(*case, cosines=tk.fp32_dot_cosines(q, g, chain=None)), truth)
    return out


def timings(sizes=(4096, 16384), dtypes=("float32", "bfloat16")):
    """{label: median ms} of forward and forward + backward, fp32 ("ieee") and bf16, D = 512."""
    import torch
    import triton
    import sdm_triton

    out = {}
    for dtype in (getattr(torch, name) for name in dtypes):
        for n in sizes:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(n, 512, device="cuda", generator=gen).to(dtype).requires_grad_()
            g = torch.randn(n, 512, device="cuda", generator=gen).to(dtype).requires_grad_()
            ids = torch.arange(n, device="cuda") // 4

            def fwd():
                return sdm_triton.sdm_loss(q, g, ids, ids, temperature=0.02, backend="triton")

            def step():
                fwd().backward()
            name = f"{str(dtype)[6:]} N={n}"
            out[f"{name} fwd"] = triton.testing.do_bench(lambda: fwd(), warmup=50, rep=300)
            out[f"{name} fwd+bwd"] = triton.testing.do_bench(step, warmup=50, rep=300)
    return out


def compiled_steps(sizes):
    import torch
    import sdm_triton

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()[:160]}")

    rows = []
    for n in sizes:
        torch.manual_seed(0)
        q = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, max(1, n // 4), (n,), device="cuda")

        def step(a, b):
            return sdm_triton.sdm_loss(a, b, ids, ids, temperature=0.02)
        results = []
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            f = torch.compile(step, fullgraph=True) if mode == "compiled" else step
            a, b = q.clone().requires_grad_(), g.clone().requires_grad_()
            records.clear()
            handler = Keep(level=logging.WARNING)
            logging.getLogger("torch").addHandler(handler)
            try:
                loss = f(a, b)
                loss.backward()
                torch.cuda.synchronize()
                results.append((loss.detach().double(), a.grad.double(), b.grad.double()))
            except Exception as exc:  # noqa: BLE001
                rows.append(f"N={n}: {mode} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                break
            finally:
                logging.getLogger("torch").removeHandler(handler)
        if len(results) == 2:
            (l0, a0, b0), (l1, a1, b1) = results
            rel = lambda x, y: ((x - y).norm() / y.norm().clamp_min(1e-30)).item()  # noqa: E731
            rows.append(f"N={n}: compiled vs eager: loss {rel(l1, l0):.1e}, dq {rel(a1, a0):.1e}, dg {rel(b1, b0):.1e}"
                        f"; {len(records)} warnings logged while compiling" + "".join(f"\n    {r}" for r in records[:3]))
    return rows


def _run_child(path, part, extra=()):
    r = subprocess.run([sys.executable, __file__, "--child", part, *extra], env=_child_env(path), capture_output=True,
                       text=True)
    if r.returncode != 0:
        print(f"{path} {part}: FAILED\n{r.stderr[-3000:]}")
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="folder holding an older sdm_triton package")
    ap.add_argument("--sizes", default="256,2048,4096,8192,32768", help="of the compiled steps")
    ap.add_argument("--parts", default="accuracy,timings,compile")
    ap.add_argument("--timings", default="float32,bfloat16:4096,16384", help="dtypes:sizes of part 2")
    ap.add_argument("--old-accuracy", action="store_true", help="part 1 for the old package too")
    ap.add_argument("--child", choices=["kernels", "baselines", "timings"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    t_dtypes, t_sizes = args.timings.split(":")
    if args.child:
        print(json.dumps(timings(tuple(int(x) for x in t_sizes.split(",")), tuple(t_dtypes.split(",")))
                         if args.child == "timings" else accuracy(args.child)))
        return 0
    parts = args.parts.split(",")
    runs = [("new", ROOT)] + ([("old", args.old)] if args.old else [])
    if "accuracy" in parts:
        part_accuracy([r for r in runs if r[0] == "new" or args.old_accuracy])
    if "timings" in parts:
        part_timings(runs, args.timings)
    if "compile" in parts:
        print("== 3. torch.compile(fullgraph=True) of a bf16 sdm_loss step, D = 512")
        sys.path.insert(0, ROOT)
        for row in compiled_steps([int(s) for s in args.sizes.split(",")]):
            print(row)
    return 0


def part_accuracy(runs):
    acc = {label: _run_child(path, "kernels") for label, path in runs}
    base = _run_child(ROOT, "baselines")
    print("== 1. anti-aligned fp32, s = 200, 16 x 40: relative error vs float64 (rows | dq | dg)")
    for case in base:
        print(f"{case:34s} " + " | ".join(f"{base[case][k]:.2e}" for k in ("rows", "dq", "dg")))
    for label, table in acc.items():
        for case, e in table.items():
            print(f"{label + ' ' + case:34s} " + " | ".join(f"{e[k]:.2e}" for k in ("rows", "dq", "dg")))


def part_timings(runs, spec):
    tim = {label: _run_child(path, "timings", ["--timings", spec]) for label, path in runs}
    print("== 2. median ms, D = 512, forward KL, pk4 ids (" + " / ".join(tim) + ")")
    for case in tim.get("new", {}):
        print(f"{case:28s} " + " / ".join(f"{tim[label].get(case, float('nan')):8.3f}" for label in tim))


if __name__ == "__main__":
    sys.exit(main())
