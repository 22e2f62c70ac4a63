"""sdm_loss_distributed against the single-process loss of the gathered batch.

Every case builds one global problem from a seed; each rank takes its slice (uneven
sizes), calls ``sdm_loss_distributed`` (or the module ``SDMLossDistributed``) and compares
its value, per-row losses and gradients (local q, g and logit_scale) with
``sdm_triton.sdm_loss(backend="torch")`` on the whole batch, computed by every rank in
float64. Gradient conventions: a case without ``grad_convention`` runs the default, "ddp",
whose q and g gradients must be the world size times the single-process ones (logit_scale's
unscaled); "unscaled" (and its earlier name "global") must give them as they are. Spawning a process group
costs seconds, so one group per world size runs every case and each test reads its
case's result. Workers never raise inside a case (a raising rank would leave the
others waiting in a collective): they record errors, and a gloo timeout plus a
join deadline turn a hang into a failure.
"""

from __future__ import annotations

import datetime
import faulthandler
import functools
import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdm_triton import reference
import sdm_triton
from sdm_triton.distributed import sdm_loss_distributed

SIZES = {  # (N_r per rank, M_r per rank): uneven on purpose
    1: ([7], [5]),
    2: ([5, 9], [7, 3]),
    3: ([4, 1, 6], [2, 5, 3]),
    4: ([4, 1, 6, 3], [2, 5, 1, 4]),
    8: ([3, 1, 5, 2, 4, 1, 6, 2], [2, 4, 1, 3, 5, 2, 1, 3]),   # tools/gloo_exactness.py (not run in CI)
}
EVEN = {1: ([7], [5]), 2: ([4, 4], [3, 3]), 3: ([3, 3, 3], [4, 4, 4]), 4: ([3] * 4, [2] * 4), 8: ([2] * 8, [3] * 8)}
CI_WORLDS = [2, 3, 4]
GRAD_OUT = 1.3   # grad_output != 1
TOL = 1e-10      # relative, float64

# Each case: options of the call plus problem knobs. All run for world sizes 2, 3 and 4 (CI_WORLDS);
# tools/gloo_exactness.py runs them with 4 and 8 processes against the oracle (reference.sdm_loss).
CASES = {
    "allgather-forward-ids": dict(strategy="allgather", kl="forward"),
    "ring-forward-ids": dict(strategy="ring", kl="forward"),
    "allgather-reverse-dense-masks-sum": dict(strategy="allgather", kl="reverse", eps=1e-2, labels="dense",
                                              masks=True, combine="sum"),
    "ring-reverse-dense-masks-sum": dict(strategy="ring", kl="reverse", eps=1e-2, labels="dense", masks=True,
                                         combine="sum"),
    "allgather-none-ids-masks": dict(strategy="allgather", reduction="none", masks=True),
    "ring-none-reverse-ids-masks-tinychunks-noncontig": dict(strategy="ring", kl="reverse", reduction="none",
                                                             masks=True, workspace_bytes=1, noncontig=True),
    "allgather-q2g-sum-temperature": dict(strategy="allgather", direction="q2g", reduction="sum",
                                          logit_scale=False),
    "ring-g2q-dense-bool": dict(strategy="ring", direction="g2q", labels="bool"),
    "allgather-even-nonormalize": dict(strategy="allgather", even=True, normalize=False, kl="reverse"),
    "ring-even-dense-none": dict(strategy="ring", even=True, labels="dense", reduction="none", kl="reverse"),
    "allgather-unscaled": dict(strategy="allgather", grad_convention="unscaled", masks=True),
    "ring-unscaled-none": dict(strategy="ring", grad_convention="unscaled", reduction="none", labels="dense"),
    "allgather-stats": dict(strategy="allgather", masks=True, return_stats=True),
    "ring-stats": dict(strategy="ring", masks=True, return_stats=True, kl="reverse"),
    "local_rows-ids-masks": dict(layout="local_rows", masks=True, kl="reverse"),
    "local_rows-dense-none": dict(layout="local_rows", labels="dense", reduction="none"),
    "local_rows-unscaled-sum": dict(layout="local_rows", grad_convention="unscaled", combine="sum", masks=True),
    # the nn.Module form (options held by the module, the earlier name of "unscaled")
    "module-ring-reverse-masks-global-alias": dict(module=True, strategy="ring", kl="reverse", masks=True,
                                                   grad_convention="global"),
    "module-allgather-dense-stats": dict(module=True, strategy="allgather", labels="dense", return_stats=True),
}
TRITON_SUFFIX = "|triton-fp32"
ERROR_CASES = ("mismatch-D", "mismatch-kl", "mismatch-logit-scale", "mismatch-requires-grad",
               "local-invalid-input", "labels-width", "workspace-bytes-on-one-rank", "check-values-on-one-rank")
UNSCALED = ("unscaled", "global")   # grad_convention values whose q / g gradients are not multiplied by P


# --------------------------------------------------------------------------------------------
# Problem construction and the single-process reference
# --------------------------------------------------------------------------------------------

def _problem(case: dict, world: int, seed: int, dtype=torch.float64, device="cpu"):
    n_sizes, m_sizes = (EVEN if case.get("even") else SIZES)[world]
    n, m, d = sum(n_sizes), sum(m_sizes), 13
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.rand(n, 1, generator=gen, dtype=torch.float64) * 3
    g = torch.randn(m, d, generator=gen, dtype=torch.float64) * torch.rand(m, 1, generator=gen, dtype=torch.float64) * 3
    # (no zero vector here: its 1/NORM_EPS-sized gradient would dominate the norms the errors are relative to)
    p = dict(n_sizes=n_sizes, m_sizes=m_sizes, q=q.to(dtype).to(device), g=g.to(dtype).to(device))
    if case.get("labels") is None:
        p["q_ids"] = torch.randint(0, 5, (n,), generator=gen).to(device)    # few ids: positives across ranks
        p["g_ids"] = torch.randint(0, 6, (m,), generator=gen).to(device)
    else:
        lab = torch.rand(n, m, generator=gen, dtype=torch.float64)
        lab[lab < 0.6] = 0
        p["labels"] = (lab > 0 if case["labels"] == "bool" else lab.to(dtype)).to(device)
    if case.get("masks"):
        qm = torch.rand(n, generator=gen) > 0.25
        gm = torch.rand(m, generator=gen) > 0.25
        if world > 1:
            qm[n_sizes[0]: n_sizes[0] + n_sizes[1]] = False  # rank 1: every q row absent
            gm[: m_sizes[0]] = False                         # rank 0: every g row absent
        p["q_mask"], p["g_mask"] = qm.to(device), gm.to(device)
    p["w_q"] = torch.rand(n, generator=gen, dtype=torch.float64).to(device)   # weights for reduction="none"
    p["w_g"] = torch.rand(m, generator=gen, dtype=torch.float64).to(device)
    p["scale"] = torch.tensor(7.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    return p


def _loss_kwargs(case: dict):
    kw = {k: case[k] for k in ("kl", "eps", "direction", "combine", "reduction", "normalize") if k in case}
    kw.setdefault("kl", "forward")
    if "eps" not in kw and kw["kl"] == "reverse":
        kw["eps"] = 1e-8
    return kw


def _objective(out, case, w_q, w_g):
    """What a rank backpropagates: GRAD_OUT * loss, or a weighting of the per-row losses."""
    if isinstance(out, tuple) and not isinstance(out, sdm_triton.SDMRowLosses):
        out = out[0]
    if isinstance(out, sdm_triton.SDMRowLosses):
        total = 0.0
        if out.q2g is not None:
            total = total + (out.q2g.double() * w_q).sum()
        if out.g2q is not None:
            total = total + (out.g2q.double() * w_g).sum()
        return total
    return GRAD_OUT * out


def _split(x, sizes):
    return list(torch.split(x, sizes)) if x is not None else [None] * len(sizes)


def _oracle_loss(q, g, q_ids=None, g_ids=None, *, return_stats=False, backend=None, **kw):
    """``reference.sdm_loss`` (the plain oracle) with ``sdm_triton.sdm_loss``'s call signature.

    The oracle has no statistics: with ``return_stats``, the statistics come from the
    torch backend on the same inputs (detached); the value and gradients from the oracle.
    """
    out = reference.sdm_loss(q, g, q_ids, g_ids, **kw)
    if not return_stats:
        return out
    with torch.no_grad():
        _, stats = sdm_triton.sdm_loss(q.detach(), g.detach(), q_ids, g_ids, backend="torch", return_stats=True,
                                       **{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    return out, stats


def _reference(p, case, world, backend="torch"):
    """Single-process value(s) and the gradients of J with respect to the global q, g and logit scale.

    backend: "torch" (``sdm_triton.sdm_loss(backend="torch")``, the CI reference) or
    "reference" (the oracle ``reference.sdm_loss``, used by tools/gloo_exactness.py).
    """
    loss_fn = _oracle_loss if backend == "reference" else sdm_triton.sdm_loss
    kw = _loss_kwargs(case)
    q = p["q"].detach().clone().requires_grad_()
    g = p["g"].detach().clone().requires_grad_()
    scale = p["scale"].detach().clone().requires_grad_()
    common = dict(backend=backend, **kw)
    if case.get("logit_scale", True):
        common["logit_scale"] = scale
    else:
        common["temperature"] = 0.1
    if case.get("return_stats"):
        common["return_stats"] = True
    data = {k: p.get(k) for k in ("q_ids", "g_ids", "labels", "q_mask", "g_mask")}
    if case.get("layout", "global") == "global":
        out = loss_fn(q, g, **data, **common)
        values = out
        objective = _objective(out, case, p["w_q"], p["w_g"])
    else:   # local_rows: rank r's loss of its q rows x all g and its g rows x all q; J = mean over ranks
        common.pop("return_stats", None)
        qs, gs = _split(q, p["n_sizes"]), _split(g, p["m_sizes"])
        wqs, wgs = _split(p["w_q"], p["n_sizes"]), _split(p["w_g"], p["m_sizes"])
        qms = _split(p.get("q_mask"), p["n_sizes"])
        gms = _split(p.get("g_mask"), p["m_sizes"])
        row_kw = dict(common, direction="q2g")
        values, objective = [], 0.0
        g_off = 0
        for r in range(world):
            if p.get("labels") is not None:
                lab_q = _split(p["labels"], p["n_sizes"])[r]
                lab_g = p["labels"][:, g_off: g_off + p["m_sizes"][r]].T
                ids_q, ids_g = dict(labels=lab_q), dict(labels=lab_g)
            else:
                ids_q = dict(q_ids=_split(p["q_ids"], p["n_sizes"])[r], g_ids=p["g_ids"])
                ids_g = dict(q_ids=_split(p["g_ids"], p["m_sizes"])[r], g_ids=p["q_ids"])
            g_off += p["m_sizes"][r]
            parts = {}
            if kw.get("direction", "both") in ("both", "q2g"):
                parts["q2g"] = loss_fn(qs[r], g, **ids_q, q_mask=qms[r], g_mask=p.get("g_mask"), **row_kw)
            if kw.get("direction", "both") in ("both", "g2q"):
                parts["g2q"] = loss_fn(gs[r], q, **ids_g, q_mask=gms[r], g_mask=p.get("q_mask"), **row_kw)
            if kw.get("reduction", "mean") == "none":
                value = sdm_triton.SDMRowLosses(
                    parts["q2g"].q2g if "q2g" in parts else None, parts["g2q"].q2g if "g2q" in parts else None,
                    parts["q2g"].q2g_valid if "q2g" in parts else None,
                    parts["g2q"].q2g_valid if "g2q" in parts else None)
            else:
                v = list(parts.values())
                value = v[0] if len(v) == 1 else (0.5 * (v[0] + v[1]) if kw.get("combine", "mean") == "mean"
                                                  else v[0] + v[1])
            values.append(value)
            objective = objective + _objective(value, case, wqs[r], wgs[r]) / world
    objective.backward()
    return values, q.grad, g.grad, (scale.grad if case.get("logit_scale", True) else None)


def _rel(a, b, scale_norm):
    diff = (a.detach().double() - b.detach().double()).norm()
    return float(diff / max(float(torch.as_tensor(scale_norm).detach()), 1e-30))


# --------------------------------------------------------------------------------------------
# One case on one rank
# --------------------------------------------------------------------------------------------

def _run_case(name, case, rank, world, seed, device="cpu", dtype=torch.float64, backend="torch",
              ref_backend="torch", tol=TOL, measured=None):
    """Returns a list of error strings (empty: the case passed on this rank).

    ``measured``: a dict that receives every relative error checked ({what: error}).
    """
    errors = []

    def check(what, a, b, scale_norm, tol=tol):
        if a is None or b is None:
            if (a is None) != (b is None):
                errors.append(f"{what}: one side is None")
            return
        if a.shape != b.shape:
            errors.append(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
            return
        err = _rel(a, b, scale_norm)
        if measured is not None:
            measured[what] = err
        if not err <= tol:
            errors.append(f"{what}: relative error {err:.3e} > {tol:.0e}")

    p = _problem(case, world, seed, dtype, device)
    # The truth: float64 on the same (dtype-rounded) inputs.
    p64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in p.items()}
    ref_values, ref_dq, ref_dg, ref_ds = _reference(p64, case, world, ref_backend)
    ns, ms = p["n_sizes"], p["m_sizes"]
    q0, g0 = sum(ns[:rank]), sum(ms[:rank])
    qsl, gsl = slice(q0, q0 + ns[rank]), slice(g0, g0 + ms[rank])

    q_loc = p["q"][qsl].detach().clone()
    g_loc = p["g"][gsl].detach().clone()
    if case.get("noncontig"):   # the same values through transposed storage
        q_loc = q_loc.T.contiguous().T
        g_loc = g_loc.T.contiguous().T
    q_loc.requires_grad_()
    g_loc.requires_grad_()
    scale = p["scale"].detach().clone().requires_grad_()
    kw = _loss_kwargs(case)
    kw.update(strategy=case.get("strategy", "allgather"), layout=case.get("layout", "global"), backend=backend)
    if "grad_convention" in case:   # otherwise the default ("ddp") runs
        kw["grad_convention"] = case["grad_convention"]
    if "workspace_bytes" in case:
        kw["workspace_bytes"] = case["workspace_bytes"]
    call_kw = dict(return_stats=case.get("return_stats", False))
    if case.get("logit_scale", True):
        kw["logit_scale"] = scale
    else:
        kw["temperature"] = 0.1
    if p.get("labels") is not None:
        kw["labels"] = p["labels"][qsl]
        if kw["labels"].is_floating_point():
            kw["labels"] = kw["labels"].to(dtype)
    else:
        kw["q_ids"], kw["g_ids"] = p["q_ids"][qsl], p["g_ids"][gsl]
    if p.get("q_mask") is not None:
        kw["q_mask"], kw["g_mask"] = p["q_mask"][qsl], p["g_mask"][gsl]

    for name in ("logit_scale", "labels", "q_ids", "g_ids", "q_mask", "g_mask"):
        if name in kw:
            call_kw[name] = kw.pop(name)
    if case.get("module"):
        from sdm_triton.distributed import SDMLossDistributed
        ids = [call_kw.pop("q_ids", None), call_kw.pop("g_ids", None)]
        out = SDMLossDistributed(**kw)(q_loc, g_loc, *ids, **call_kw)
    else:
        out = sdm_loss_distributed(q_loc, g_loc, **kw, **call_kw)
    _objective(out, case, p["w_q"][qsl], p["w_g"][gsl]).backward()

    stats = ref_stats = None
    if case.get("return_stats"):
        out, stats = out
        ref_values, ref_stats = ref_values
    ref = ref_values[rank] if case.get("layout") == "local_rows" else ref_values
    if isinstance(ref, sdm_triton.SDMRowLosses):
        if case.get("layout") == "local_rows":   # per-rank rows already
            rq, rg, vq, vg = ref.q2g, ref.g2q, ref.q2g_valid, ref.g2q_valid
        else:
            sl = lambda x, s: None if x is None else x[s]  # noqa: E731
            rq, rg, vq, vg = sl(ref.q2g, qsl), sl(ref.g2q, gsl), sl(ref.q2g_valid, qsl), sl(ref.g2q_valid, gsl)
        for what, a, b in (("q2g rows", out.q2g, rq), ("g2q rows", out.g2q, rg)):
            check(what, a, b, 1.0 if b is None else b.norm().clamp_min(1e-300))
        for what, a, b in (("q2g valid", out.q2g_valid, vq), ("g2q valid", out.g2q_valid, vg)):
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                errors.append(f"{what} differs")
    else:
        check("loss", out.reshape(1), ref.reshape(1), ref.abs().clamp_min(1e-300))

    factor = 1 if case.get("grad_convention") in UNSCALED else world
    check("dq", q_loc.grad, factor * ref_dq[qsl], ref_dq.norm() * factor)
    check("dg", g_loc.grad, factor * ref_dg[gsl], ref_dg.norm() * factor)
    if ref_ds is not None:
        check("dlogit_scale", scale.grad.reshape(1), ref_ds.reshape(1), ref_ds.abs())
    elif scale.grad is not None:
        errors.append("logit_scale got a gradient it should not have")

    if stats is not None:
        for field in ("valid_q2g", "valid_g2q"):
            if int(getattr(stats, field)) != int(getattr(ref_stats, field)):
                errors.append(f"stats.{field}: {int(getattr(stats, field))} != {int(getattr(ref_stats, field))}")
        for field in ("pos_prob_q2g", "pos_prob_g2q"):
            check(f"stats.{field}", getattr(stats, field).reshape(1), getattr(ref_stats, field).reshape(1),
                  getattr(ref_stats, field).abs().clamp_min(1e-300))
        for field in ("q_norm_mean", "q_norm_max", "g_norm_mean", "g_norm_max"):   # float32 by definition
            check(f"stats.{field}", getattr(stats, field).reshape(1), getattr(ref_stats, field).reshape(1),
                  getattr(ref_stats, field).abs(), tol=1e-6)
    return errors


def _run_error_case(name, rank, world, device="cpu"):
    """A disagreement or a local input error: every rank must raise ValueError (the culprit its own
    error: a TypeError for a wrongly typed argument), before any collective that could hang."""
    p = _problem({}, world, 123, torch.float64, device)
    ns, ms = p["n_sizes"], p["m_sizes"]
    q0, g0 = sum(ns[:rank]), sum(ms[:rank])
    q = p["q"][q0: q0 + ns[rank]].clone()
    g = p["g"][g0: g0 + ms[rank]].clone()
    q_ids, g_ids = p["q_ids"][q0: q0 + ns[rank]], p["g_ids"][g0: g0 + ms[rank]]
    kw = dict(backend="torch", logit_scale=p["scale"].clone())
    last = rank == world - 1
    expect, expect_type = "ranks disagree", ValueError
    if name == "mismatch-D" and last:
        q, g = torch.cat([q, q[:, :1]], 1), torch.cat([g, g[:, :1]], 1)
    if name == "mismatch-kl" and last:
        kw["kl"] = "reverse"
    if name == "mismatch-logit-scale" and last:
        kw["logit_scale"] = kw["logit_scale"] + 1e-9
    if name == "mismatch-requires-grad" and last:
        q.requires_grad_()
    if name == "local-invalid-input":
        expect = "must have shape" if last else "rejected their inputs"
        if last:
            q_ids = q_ids[:-1] if q_ids.numel() > 1 else q_ids.repeat(2)
    if name == "workspace-bytes-on-one-rank":   # issue 12, section 5: it used to hang the other ranks
        expect = "workspace_bytes" if last else "rejected their inputs"
        if last:
            kw["workspace_bytes"], expect_type = "64", TypeError
    if name == "check-values-on-one-rank":
        kw["check_values"] = True
        q_mask = torch.ones(q.shape[0], dtype=torch.bool, device=device)
        q_mask[0] = False
        q[0] = float("nan")              # an absent row may hold anything, also with check_values=True
        kw["q_mask"] = q_mask
        if last and q.shape[0] > 1:
            q[-1] = float("inf")
        elif last:
            g[0] = float("inf")
        expect = "NaN or Inf in a present row" if last else "check_values found a problem on rank(s)"
    kw_labels = {}
    if name == "labels-width":
        expect = "M_global"
        width = sum(ms) + (1 if last else 0)
        kw_labels = dict(labels=torch.ones(ns[rank], width, dtype=torch.float64, device=device))
        q_ids = g_ids = None
    try:
        sdm_loss_distributed(q, g, q_ids, g_ids, **kw_labels, **kw)
    except Exception as exc:   # noqa: BLE001
        if type(exc) is not expect_type:
            return [f"expected {expect_type.__name__}, got {type(exc).__name__}: {exc}"]
        if expect not in str(exc) or (name == "mismatch-D" and "D" not in str(exc)):
            return [f"{expect_type.__name__} without {expect!r}: {exc}"]
        if name == "check-values-on-one-rank" and not last and f"[{world - 1}]" not in str(exc):
            return [f"the error does not name rank {world - 1}: {exc}"]
        return []
    return ["no error raised"]


# The default gradient convention under DistributedDataParallel: one training step's parameter
# gradients, after DDP has averaged them, equal those of the single-process loss of the global batch.
DDP_STEPS = ("ddp-step-allgather-function", "ddp-step-ring-module")


def _run_ddp_step(name, rank, world, device="cpu"):
    """Two linear encoders and a learnable logit scale (as CLIP keeps it: exp of a parameter) under
    DDP; each rank encodes its rows and calls the loss with the default convention, then
    ``loss.backward()``. The averaged gradients must be the single-process ones (float64)."""
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    from sdm_triton.distributed import SDMLossDistributed

    class Dual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_q, self.enc_g = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
            self.log_scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, xq, xg):
            return self.enc_q(xq), self.enc_g(xg), self.log_scale.exp()

    torch.manual_seed(3)   # the same initial parameters on every rank
    model = Dual().double().to(device)
    ns, ms = SIZES[world]
    gen = torch.Generator().manual_seed(4)
    xq = torch.randn(sum(ns), 6, generator=gen, dtype=torch.float64).to(device)
    xg = torch.randn(sum(ms), 6, generator=gen, dtype=torch.float64).to(device)
    q_ids = torch.randint(0, 4, (sum(ns),), generator=gen).to(device)
    g_ids = torch.randint(0, 4, (sum(ms),), generator=gen).to(device)
    ref = copy.deepcopy(model)
    fq, fg, s = ref(xq, xg)
    sdm_triton.sdm_loss(fq, fg, q_ids, g_ids, logit_scale=s, backend="torch", kl="reverse").backward()

    ddp = DDP(model)
    q0, g0 = sum(ns[:rank]), sum(ms[:rank])
    qs, gs = slice(q0, q0 + ns[rank]), slice(g0, g0 + ms[rank])
    fq, fg, s = ddp(xq[qs], xg[gs])
    if name.endswith("module"):
        loss = SDMLossDistributed(strategy="ring", backend="torch", kl="reverse")(fq, fg, q_ids[qs], g_ids[gs],
                                                                                  logit_scale=s)
    else:
        loss = sdm_loss_distributed(fq, fg, q_ids[qs], g_ids[gs], logit_scale=s, backend="torch", kl="reverse")
    loss.backward()
    errors = []
    for (pname, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        err = _rel(p.grad, p_ref.grad, p_ref.grad.norm())
        if not err <= TOL:
            errors.append(f"{pname}: relative error {err:.3e} of the DDP-averaged gradient")
    return errors


# --------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------

def interpreter_usable() -> bool:
    """Triton's CPU interpreter before 3.8 fails under numpy >= 2.4 ("only 0-dimensional arrays
    can be converted to Python scalars"), e.g. on the GPU machine (Triton 3.6, numpy 2.5)."""
    import numpy
    import triton

    def version(v):
        return tuple(int(x) for x in v.split(".")[:2])
    return version(triton.__version__) >= (3, 8) or version(numpy.__version__) < (2, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, backend, gpu):
    if not gpu:   # this child process only: the Triton kernels run in the interpreter on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    results = {}
    try:
        if gpu:
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        for i, (name, case) in enumerate(CASES.items()):
            # float64 with the torch tiles (tolerance 1e-10), then float32 with the Triton tiles
            # (on the GPU, or interpreted on CPU; fp32 against the float64 truth: 2e-5)
            device = f"cuda:{rank}" if gpu else "cpu"
            runs = {name: dict(device=device)}
            if gpu or interpreter_usable():
                runs[name + TRITON_SUFFIX] = dict(dtype=torch.float32, backend="triton", tol=2e-5, device=device)
            for key, kw in runs.items():
                _progress(f"case {key}")
                try:
                    errs = _run_case(name, case, rank, world, 1000 + i, **kw)
                except Exception:   # noqa: BLE001 -- recorded; the other ranks may now fail on a timeout
                    errs = [traceback.format_exc()]
                results[key] = errs
        for name in ERROR_CASES:
            _progress(f"error case {name}")
            results[name] = _run_error_case(name, rank, world, device=f"cuda:{rank}" if gpu else "cpu")
        for name in DDP_STEPS:
            _progress(f"DDP step {name}")
            try:
                results[name] = _run_ddp_step(name, rank, world, device=f"cuda:{rank}" if gpu else "cpu")
            except Exception:   # noqa: BLE001
                results[name] = [traceback.format_exc()]
        _progress("barrier, destroy_process_group")
        dist.barrier()
        dist.destroy_process_group()
    except Exception:   # noqa: BLE001
        results["__worker__"] = [traceback.format_exc()]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    _progress("results written")


def _progress(what: str) -> None:
    """A line in this child's log (`_child_main`): the last one says where a crash happened."""
    print(what, file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=None)
def _group_results(world: int, backend: str = "gloo", gpu: bool = False, deadline_s: float = 150.0):
    """Run every case in one spawned group; {case: {rank: [errors]}}."""
    return spawn_group(_worker, (backend, gpu), world, deadline_s)


class ChildKilled(RuntimeError):
    """A child of a process group died by a signal; the message quotes every rank's log."""


class CrashWarning(UserWarning):
    """A child of a process group died by a signal and the group ran again."""


class GroupCrashed(RuntimeError):
    """Every try of a process group had a child die by a signal; the message quotes the ranks' logs."""


# A child killed by a signal fails the tests only after CRASH_TRIES tries in a row crashed; every
# assertion runs on the results of a group that finished. Seen: SIGABRT, on 2-core machines in
# whole-suite runs only (never in this file alone): about one run in three once, and on CI at
# 8e7811d the first two groups of 2 in a row. The one crash with logs (bench/NOTES.md, section 37)
# came after every case had run, in the child's interpreter finalization ("terminate called without
# an active exception" from a thread of torch's C++ layer), which children now skip (`_child_main`).
# Each crash is a CrashWarning (pytest's warnings summary) quoting every rank's log: stderr, where
# the C++ layer says why it aborts, faulthandler's Python stacks and the worker's progress lines.
CRASH_TRIES = 3


def spawn_group(worker, worker_args: tuple, world: int, deadline_s: float, tries: int = CRASH_TRIES) -> dict:
    """Run ``worker(rank, world, port, out_dir, *worker_args)`` in ``world`` spawned processes;
    each writes ``rank{r}.json`` (name -> result) into out_dir. Returns name -> {rank: result}.
    A group whose child dies by a signal runs again with a fresh port, ``tries`` times in all.
    (Also used by tools/gloo_exactness.py.)"""
    reports = []
    for attempt in range(1, tries + 1):
        try:
            return _spawn_group_once(worker, worker_args, world, deadline_s)
        except ChildKilled as exc:
            reports.append(f"try {attempt}: {exc}")
            # shown in pytest's warnings summary even when a later try passes
            warnings.warn(f"process group of {world}, try {attempt} of {tries}: {exc}", CrashWarning, stacklevel=1)
    raise GroupCrashed(f"each of {tries} tries of a process group of {world} had a child killed by a signal\n"
                       + "\n".join(reports))


def _spawn_group_once(worker, worker_args, world, deadline_s):
    out_dir = tempfile.mkdtemp(prefix="sdm_dist_")
    ctx = mp.start_processes(_child_main, args=(worker, world, _free_port(), out_dir, *worker_args), nprocs=world,
                             join=False, start_method="spawn")
    t_end = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(0.1, t_end - time.monotonic())):
            if time.monotonic() > t_end:
                raise TimeoutError(f"process group of {world} did not finish in {deadline_s} s (a hang?)\n"
                                   + _rank_logs(out_dir, world))
    except mp.ProcessExitedException as exc:
        if exc.signal_name is None:   # a non-zero exit code: the worker's own failure, not retried
            raise
        raise ChildKilled(f"rank {exc.error_index} died by {exc.signal_name}\n{_rank_logs(out_dir, world)}") from exc
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    merged = {}
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            for name, errs in json.load(f).items():
                merged.setdefault(name, {})[rank] = errs
    return merged


def _child_main(rank, worker, world, port, out_dir, *worker_args):
    """A child's entry: its stderr goes to rank{r}.log in out_dir (gloo's C++ layer writes
    "terminate called after throwing ..." there before it aborts), and faulthandler writes
    every thread's Python stack there on a fatal signal (SIGABRT included) and on SIGTERM."""
    fd = os.open(os.path.join(out_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable(all_threads=True)
    # the group's other children get SIGTERM when one dies: their stacks say where they waited
    if hasattr(faulthandler, "register"):   # (not on Windows)
        faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    worker(rank, world, port, out_dir, *worker_args)
    # The results are on disk and the group is destroyed: leave without the interpreter's
    # finalization. There, after every case had run and the results were written, a thread of
    # torch's C++ layer aborted in a CI run ("terminate called without an active exception",
    # no Python frame left: bench/NOTES.md, section 37); what the child computed is not at stake.
    sys.stderr.flush()
    os._exit(0)


_LOG_NOISE = ("RuntimeWarning", "output = op(", "return TensorHandle(")   # the interpreter's warnings on inf / nan


def _rank_logs(out_dir, world, lines=40):
    """The last lines of every rank's log, the interpreter's floating-point warnings left out."""
    parts = []
    for rank in range(world):
        try:
            with open(os.path.join(out_dir, f"rank{rank}.log"), errors="replace") as f:
                text = [ln.rstrip() for ln in f if not any(n in ln for n in _LOG_NOISE)]
        except OSError as exc:
            text = [f"(no log: {exc})"]
        parts.append(f"--- rank {rank} log (last {lines} lines) ---\n" + "\n".join(text[-lines:]))
    return "\n".join(parts)


def _assert_case(results, name, world):
    assert "__worker__" not in results, results["__worker__"]
    per_rank = results.get(name)
    assert per_rank is not None and len(per_rank) == world, f"case {name} did not run on every rank"
    failures = {r: e for r, e in per_rank.items() if e}
    assert not failures, f"{name} (world {world}): {failures}"


@pytest.mark.parametrize("world", CI_WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(world, name):
    _assert_case(_group_results(world), name, world)


# (case, world) whose float32 dlogit_scale is ill-conditioned, not wrong: normalize=False gives logits up
# to |S| = 278 and the sum behind dJ/ds cancels 32-fold (tools/gloo_exactness.py prints both numbers);
# one-process Triton float32 on the same inputs misses the float64 value by 8.1e-5, the distributed
# run by 2.7e-5, against the tolerance 2e-5. Only that quantity is skipped; the rest of the case is checked.
_ILL_CONDITIONED_FP32 = {("allgather-even-nonormalize", 4): "dlogit_scale:"}


@pytest.mark.parametrize("world", CI_WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_triton_tiles_match_single_process(world, name):
    """The same cases through the Triton tile kernels (interpreted on CPU), float32."""
    if not interpreter_usable():
        pytest.skip("Triton's interpreter cannot run with this numpy (Triton < 3.8, numpy >= 2.4)")
    results = _group_results(world)
    skip = _ILL_CONDITIONED_FP32.get((name, world))
    if skip is not None and name + TRITON_SUFFIX in results:
        results = dict(results)
        results[name + TRITON_SUFFIX] = {r: [e for e in errs if not e.startswith(skip)]
                                         for r, errs in results[name + TRITON_SUFFIX].items()}
    _assert_case(results, name + TRITON_SUFFIX, world)


@pytest.mark.parametrize("world", CI_WORLDS)
@pytest.mark.parametrize("name", ERROR_CASES)
def test_disagreement_raises_on_every_rank(world, name):
    _assert_case(_group_results(world), name, world)


@pytest.mark.parametrize("world", CI_WORLDS)
@pytest.mark.parametrize("name", DDP_STEPS)
def test_default_convention_is_exact_under_ddp_averaging(world, name):
    """Issue 15 C: with the default grad_convention, DDP's averaged gradients of the encoders and of
    the logit scale are those of the single-process loss of the global batch."""
    _assert_case(_group_results(world), name, world)


def _aborting_worker(rank, world, port, out_dir, marker):
    """Rank 1 aborts as gloo's C++ layer does (a message on stderr, then SIGABRT): on every try
    when ``marker`` is None, else on the first try only (it creates ``marker``)."""
    print(f"rank {rank} started", file=sys.stderr, flush=True)
    if rank == 1 and (marker is None or not os.path.exists(marker)):
        if marker is not None:
            open(marker, "w").close()
        print("terminate called after throwing an instance of 'test::Abort'", file=sys.stderr, flush=True)
        import resource   # (POSIX)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # no core file in the working directory
        os.abort()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"ran": rank}, f)


def test_a_crashed_group_runs_again_and_says_why(tmp_path):
    """The harness itself: a child killed by a signal is reported with its log (its stderr and
    faulthandler's Python stack), and the group's next try gives the results."""
    with pytest.warns(CrashWarning) as record:
        results = spawn_group(_aborting_worker, (str(tmp_path / "crashed"),), 2, 60.0, tries=2)
    assert results == {"ran": {0: 0, 1: 1}}
    (warning,) = [w for w in record if issubclass(w.category, CrashWarning)]
    message = str(warning.message)
    for expected in ("try 1 of 2", "rank 1 died by SIGABRT", "--- rank 1 log", "test::Abort",
                     "Fatal Python error: Aborted", "in _aborting_worker"):
        assert expected in message, (expected, message)


def test_a_group_that_keeps_crashing_fails_with_every_try_reported():
    with pytest.warns(CrashWarning), pytest.raises(GroupCrashed) as info:
        spawn_group(_aborting_worker, (None,), 2, 60.0, tries=2)
    message = str(info.value)
    assert message.startswith("each of 2 tries of a process group of 2 had a child killed by a signal")
    assert "try 1: rank 1 died by SIGABRT" in message and "try 2: rank 1 died by SIGABRT" in message
    assert message.count("test::Abort") == 2


def test_single_rank_group_equals_sdm_loss():
    """world = 1 (no communication at all) is the single-process loss, both strategies."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        for i, name in enumerate(("allgather-none-ids-masks", "ring-reverse-dense-masks-sum", "local_rows-ids-masks")):
            assert _run_case(name, CASES[name], 0, 1, 7 + i) == []
    finally:
        dist.destroy_process_group()


def test_feature_norms_past_fp32_square_sums_in_the_statistics():
    """A row of norm 3.5e20 (normalize=False): its fp32 square sum overflows, its norm does not
    (the statistics read it as sdm_loss does, reduction.row_norms); one rank."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        gen = torch.Generator().manual_seed(3)
        q, g = torch.randn(6, 8, generator=gen), torch.randn(7, 8, generator=gen)
        q[2] *= 3.5e20 / q[2].norm()
        ids = torch.arange(6) % 3, torch.arange(7) % 3
        _, stats = sdm_triton.sdm_loss_distributed(q, g, *ids, normalize=False, logit_scale=1e-21, return_stats=True)
        norms = q.double().norm(dim=1)
        assert torch.isfinite(stats.q_norm_max)
        torch.testing.assert_close(stats.q_norm_max.double(), norms.max(), rtol=1e-6, atol=0)
        torch.testing.assert_close(stats.q_norm_mean.double(), norms.mean(), rtol=1e-6, atol=0)
    finally:
        dist.destroy_process_group()


def test_module_validates_its_options_at_construction():
    """SDMLossDistributed checks every option when it is built (no process group needed)."""
    from sdm_triton.distributed import SDMLossDistributed
    for bad, exc, name in ((dict(workspace_bytes="64"), TypeError, "workspace_bytes"),
                           (dict(workspace_bytes=0), ValueError, "workspace_bytes"),
                           (dict(strategy="rign"), ValueError, "strategy"),
                           (dict(layout="local_rows", strategy="ring"), ValueError, "local_rows"),
                           (dict(grad_convention="mean"), ValueError, "grad_convention"),
                           (dict(kl="kl"), ValueError, "kl"), (dict(temperature=0.0), ValueError, "temperature"),
                           (dict(backend="cuda"), ValueError, "backend"),
                           (dict(check_values=1), TypeError, "check_values"),
                           (dict(kernel_config="m17"), ValueError, "KernelConfig")):
        with pytest.raises(exc, match=name):
            SDMLossDistributed(**bad)
    module = SDMLossDistributed(strategy="ring", grad_convention="global", kl="reverse")
    assert "grad_convention='global'" in repr(module) and "strategy='ring'" in repr(module)
    assert SDMLossDistributed().options["grad_convention"] == "ddp"


def test_default_gradient_convention_is_ddp():
    """The function's and the module's default is "ddp" (issue 15 C); the other one keeps a name."""
    import inspect
    from sdm_triton.distributed import GRAD_CONVENTIONS, SDMLossDistributed
    assert inspect.signature(sdm_loss_distributed).parameters["grad_convention"].default == "ddp"
    assert inspect.signature(SDMLossDistributed).parameters["grad_convention"].default == "ddp"
    assert GRAD_CONVENTIONS == ("ddp", "unscaled")
    doc = sdm_loss_distributed.__doc__
    assert "DistributedDataParallel" in doc and "AVERAGE" in doc and '"unscaled"' in doc


def test_needs_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="process group"):
        sdm_loss_distributed(torch.randn(2, 3), torch.randn(2, 3), torch.arange(2), torch.arange(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or not dist.is_nccl_available(), reason="needs 2 CUDA GPUs and NCCL")
def test_nccl_triton_two_gpus():
    """Every case over NCCL on cuda:0 and cuda:1: float64 torch tiles (1e-10) and float32 Triton kernels (2e-5)."""
    results = _group_results(2, "nccl", True, 300.0)
    for name in (*CASES, *(n + TRITON_SUFFIX for n in CASES), *ERROR_CASES, *DDP_STEPS):
        _assert_case(results, name, 2)
