"""Issue 26 section 4 on a GPU: huge logits (normalize=False, features ~1e20) and huge scales
(temperature 1e-6, both divergences), Triton backend (fused and chunked backward) against float64
on the same (dtype-rounded) inputs, beside the torch backend and PyTorch's fp32 formula.

    python3 tools/gpu_diag_26_edges.py [--quick]   (prints one line per case and path; --quick:
                                                    one seed, the 8 x 8 x 16 shape)

Columns: relative error (norm of the difference / norm of the truth) of the loss, dq, dg; where
the truth is 0 (reverse KL with a one-hot softmax) the norm of the difference instead ("abs").
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sdm_triton  # noqa: E402
from sdm_triton import reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def err(a, b):
    d = (a.double().cpu() - b.double().cpu()).norm().item()
    n = b.double().norm().item()
    if not torch.isfinite(a).all():
        return "nonfinite"
    return f"{d / n:.1e}" if n > 0 else f"abs {d:.1e}"


def formula(q, g, qi, gi, s, kl, normalize):
    """PyTorch's fp32 formula (dense, both directions, mean)."""
    qh = torch.nn.functional.normalize(q.float(), dim=1) if normalize else q.float()
    gh = torch.nn.functional.normalize(g.float(), dim=1) if normalize else g.float()
    S = s * qh @ gh.T
    y = (qi[:, None] == gi[None, :]).float()
    out = []
    for S_, y_ in ((S, y), (S.T, y.T)):
        Y = y_ / y_.sum(1, keepdim=True)
        ok = y_.sum(1) > 0
        lp = torch.log_softmax(S_, 1)
        if kl == "forward":
            L = torch.where(Y > 0, Y * (torch.log(Y.clamp_min(1e-38)) - lp), 0).sum(1)
        else:
            P = lp.exp()
            L = (P * (lp - torch.log(Y + 1e-8))).sum(1)
        out.append(L[ok].mean())
    return 0.5 * (out[0] + out[1])


def case_inputs(name, seed, n, m, d):
    gen = torch.Generator().manual_seed(seed)
    q, g = torch.randn(n, d, generator=gen), torch.randn(m, d, generator=gen)
    qi, gi = torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 3, (m,), generator=gen)
    qi[0] = gi[0]
    if name == "q1e20_nonorm":
        return q * 1e20, g, qi, gi, dict(normalize=False, temperature=0.02)
    if name == "both1e10_nonorm_s1":
        return q * 1e10, g * 1e10, qi, gi, dict(normalize=False, logit_scale=1.0)
    if name == "s1e6_forward":
        return q, g, qi, gi, dict(temperature=1e-6, kl="forward")
    if name == "s1e6_reverse":
        return q, g, qi, gi, dict(temperature=1e-6, kl="reverse")
    if name == "s1e4_forward":
        return q, g, qi, gi, dict(temperature=1e-4, kl="forward")
    if name == "s1e4_reverse":
        return q, g, qi, gi, dict(temperature=1e-4, kl="reverse")
    raise KeyError(name)


def main():
    quick = "--quick" in sys.argv[1:]
    names = ["q1e20_nonorm", "both1e10_nonorm_s1", "s1e6_forward", "s1e6_reverse", "s1e4_forward", "s1e4_reverse"]
    shapes = [(8, 8, 16), (5, 7, 3), (64, 48, 40)]
    cases = list(itertools.product(names, range(2), shapes, (torch.float32, torch.bfloat16)))
    if quick:
        cases = list(itertools.product(names, [0], shapes[:1], (torch.float32, torch.bfloat16)))
    elif DEV == "cuda":   # the GPU's other tile shapes: medium and large statistics tiles, the chunked path
        cases += list(itertools.product(names, [0], [(1024, 1100, 64), (4096, 4096, 64)],
                                        (torch.float32, torch.bfloat16)))
    for name, seed, shape, dtype in cases:
        q, g, qi, gi, kw = case_inputs(name, seed, *shape)
        q, g = q.to(dtype), g.to(dtype)
        q64, g64 = q.double().to(DEV).requires_grad_(), g.double().to(DEV).requires_grad_()
        want = reference.sdm_loss(q64, g64, qi.to(DEV), gi.to(DEV), **kw)
        want.backward()
        rows = []
        for be, cfg in (("torch", None), ("triton", "fused"), ("triton", "chunked"), ("formula", None)):
            qa = q.detach().clone().to(DEV).requires_grad_()
            ga = g.detach().clone().to(DEV).requires_grad_()
            qd, gd = qi.to(DEV), gi.to(DEV)
            try:
                if be == "formula":
                    s = 1.0 / kw.get("temperature", 1.0) if "logit_scale" not in kw else kw["logit_scale"]
                    loss = formula(qa, ga, qd, gd, s, kw.get("kl", "forward"), kw.get("normalize", True))
                else:
                    extra = dict(kernel_config=cfg) if cfg else {}
                    loss = sdm_triton.sdm_loss(qa, ga, qd, gd, backend=be, **extra, **kw)
                loss.backward()
                rows.append(f"{be}/{cfg}: loss {err(loss.detach().reshape(1), want.detach().reshape(1))} "
                            f"dq {err(qa.grad, q64.grad)} dg {err(ga.grad, g64.grad)}")
            except Exception as e:  # noqa: BLE001
                rows.append(f"{be}/{cfg}: {type(e).__name__}: {str(e)[:120]}")
        print(f"{name} seed={seed} {shape} {str(dtype)[6:]} | " + " | ".join(rows), flush=True)


if __name__ == "__main__":
    main()
