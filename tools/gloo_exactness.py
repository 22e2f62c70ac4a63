"""sdm_loss_distributed with 4 and 8 gloo CPU processes against a single-process float64 oracle.

    python tools/gloo_exactness.py [--worlds 4,8] [--ref reference|torch] [--log FILE]

The CI tests (tests/test_distributed.py) run every case with 2, 3 and 4 processes; this
runs the same cases (same problems, seeds and uneven local sizes: SIZES / EVEN there)
with larger groups and prints the measured errors, not only pass / fail:

  * every case of ``CASES``: both strategies ("allgather", "ring"), layout "global" and
    "local_rows", grad_convention "ddp" (the default) and "unscaled", the module form
    (``SDMLossDistributed``), ids / dense / bool labels, masks
    (a rank whose q rows are all absent, another whose g rows are), reduction
    mean / sum / none, both KL directions, return_stats, non-contiguous inputs,
    a 1-byte workspace (one column per chunk);
  * each twice: float64 with the torch tiles (tolerance 1e-10) and float32 with the Triton
    tiles, interpreted on CPU (tolerance 2e-5); both against float64 on the same inputs;
  * the disagreement / invalid-input cases (every rank must raise; the culprit its own error);
  * a DDP training step per strategy (the default gradient convention: DDP-averaged parameter
    gradients equal the single-process ones).

Reference: ``reference.sdm_loss`` (the plain oracle: the whole similarity matrix, float64)
by default, ``--ref torch`` for the CI reference (``sdm_triton.sdm_loss(backend="torch")``).
Statistics (return_stats) are always compared with the torch backend (the oracle has none).
Relative errors: ||a - b|| / ||b|| per quantity (loss or per-row losses, the local dq and dg,
dlogit_scale, statistics), max over ranks. For the float32 Triton run, rank 0 also measures
the single-process Triton float32 error on the same global inputs (gradients of the global
objective): the distributed error should be of the same size. "condition of dlogit_scale":
sum_ij |dJ/dS_ij S_ij| / |sum_ij dJ/dS_ij S_ij| in float64 (how much the sum behind dJ/ds
cancels); a float32 dlogit_scale is good to about that * max|S| * 6e-8, relative.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("TRITON_INTERPRET", "1")   # CPU tensors: the Triton kernels run in the interpreter

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import test_distributed as T  # noqa: E402  (tests/test_distributed.py: problems, cases, reference, spawn_group)
from dist_scaling import _cpu_name  # noqa: E402  (tools/, this script's folder)

FP64, FP32 = "fp64-torch-tiles", "fp32-triton-interpreted"
U_FP32 = 2.0 ** -24   # unit roundoff of float32
RUNS = {FP64: dict(tol=T.TOL), FP32: dict(dtype=torch.float32, backend="triton", tol=2e-5)}


def _single_process_fp32(name, case, world, seed, ref_backend):
    """Errors of one-process Triton float32 (interpreted) on the same global inputs, against float64."""
    p = T._problem(case, world, seed, torch.float32)
    p64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in p.items()}
    _, rq, rg, rs = T._reference(p64, case, world, ref_backend)
    _, sq, sg, ss = T._reference(p, case, world, "triton")
    out = {"dq": T._rel(sq, rq, rq.norm()), "dg": T._rel(sg, rg, rg.norm())}
    if rs is not None:
        out["dlogit_scale"] = T._rel(ss.reshape(1), rs.reshape(1), rs.abs())
    return out


def _scale_condition(case, world, seed):
    """(condition, max |S_ij|) of dJ/ds = sum_ij dJ/dS_ij * S_ij / s; condition: sum |terms| / |sum terms|.

    Every term carries a rounding error of about |S_ij| * u (u = 6e-8 in float32: S is rounded
    before the exp), so a float32 dlogit_scale is good to about this factor * max|S| * u,
    relative. None for layout "local_rows", without a logit_scale tensor, or with no valid row.
    """
    if case.get("layout", "global") != "global" or not case.get("logit_scale", True):
        return None
    from sdm_triton.options import SDMOptions
    from sdm_triton.reference.sdm import _sdm_materialised
    p = T._problem(case, world, seed, torch.float64)
    kw = T._loss_kwargs(case)
    opts = SDMOptions(**{k: v for k, v in kw.items() if k in ("kl", "eps", "direction", "combine", "reduction",
                                                                "normalize")})
    s = torch.full((p["q"].shape[0], p["g"].shape[0]), float(p["scale"]), dtype=torch.float64, requires_grad=True)
    out = _sdm_materialised(p["q"], p["g"], p.get("q_ids"), p.get("g_ids"), p.get("labels"), p.get("q_mask"),
                            p.get("g_mask"), s, opts)
    T._objective(out, case, p["w_q"], p["w_g"]).backward()
    terms = s.grad
    if float(terms.abs().sum()) == 0.0:   # no valid row (masks): dJ/ds = 0 exactly
        return None
    q, g = p["q"], p["g"]
    if opts.normalize:
        q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    s_max = float(p["scale"]) * float((q @ g.T).abs().max())
    return float(terms.abs().sum() / terms.sum().abs().clamp_min(1e-300)), s_max


def _worker(rank, world, port, out_dir, ref_backend, timeout_s):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    results = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        for i, (name, case) in enumerate(T.CASES.items()):
            seed = 1000 + i   # as tests/test_distributed.py: the same problems
            for run, kw in RUNS.items():
                measured = {}
                t0 = time.perf_counter()
                try:
                    errs = T._run_case(name, case, rank, world, seed, ref_backend=ref_backend, measured=measured, **kw)
                except Exception:   # noqa: BLE001 -- recorded; the other ranks may then fail on a timeout
                    errs = [traceback.format_exc()]
                results[f"{name}|{run}"] = dict(errors=errs, measured=measured, seconds=time.perf_counter() - t0)
            if rank == 0:
                try:
                    results[f"{name}|single"] = dict(measured=_single_process_fp32(name, case, world, seed,
                                                                                   ref_backend), errors=[],
                                                     kappa=_scale_condition(case, world, seed))
                except Exception:   # noqa: BLE001
                    results[f"{name}|single"] = dict(measured={}, errors=[traceback.format_exc()])
        for name in T.ERROR_CASES:
            results[f"{name}|error-case"] = dict(errors=T._run_error_case(name, rank, world), measured={})
        for name in T.DDP_STEPS:
            results[f"{name}|ddp-step"] = dict(errors=T._run_ddp_step(name, rank, world), measured={})
        dist.barrier()
        dist.destroy_process_group()
    except Exception:   # noqa: BLE001
        results["__worker__"] = dict(errors=[traceback.format_exc()], measured={})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _run_group(world, ref_backend, deadline_s, timeout_s):
    return T.spawn_group(_worker, (ref_backend, timeout_s), world, deadline_s)


def _max_over_ranks(per_rank: dict) -> dict:
    out = {}
    for res in per_rank.values():
        for what, err in res["measured"].items():
            out[what] = max(out.get(what, 0.0), err)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="4,8")
    p.add_argument("--ref", choices=("reference", "torch"), default="reference",
                   help="single-process float64 reference: the oracle reference.sdm_loss, or the torch backend")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds per process group")
    p.add_argument("--collective-timeout", type=float, default=300.0, help="gloo timeout (seconds)")
    p.add_argument("--log", default=None, help="also write everything printed to this file")
    p.add_argument("--note", default=None, help="a line for the log's header (e.g. which code was tested)")
    args = p.parse_args(argv)
    lines = []

    def say(msg=""):
        print(msg, flush=True)
        lines.append(msg)

    import triton
    say(f"# tools/gloo_exactness.py {' '.join(sys.argv[1:])}")
    say(f"# {datetime.datetime.now().isoformat(timespec='seconds')}; machine: CPU only, {_cpu_name()}, "
        f"nproc {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}); {platform.platform()}; "
        f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__} (interpreter)")
    try:
        rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except Exception:   # noqa: BLE001
        rev = ""
    say(f"# code: {ROOT}" + (f", git {rev}" if rev else " (no git)") + (f"; {args.note}" if args.note else ""))
    say(f"# reference: {'reference.sdm_loss (oracle)' if args.ref == 'reference' else 'sdm_triton torch backend'}"
        f", float64, one process; errors are ||a - b|| / ||b||, max over ranks; tolerances: {FP64} "
        f"{RUNS[FP64]['tol']:.0e}, {FP32} {RUNS[FP32]['tol']:.0e}")
    failures, explained = [], []
    overall = {FP64: {}, FP32: {}}
    for world in [int(w) for w in args.worlds.split(",") if w.strip()]:
        t0 = time.monotonic()
        # (a group whose child dies by a signal runs again: tests/test_distributed.py's spawn_group)
        res = _run_group(world, args.ref, args.deadline, args.collective_timeout)
        elapsed = time.monotonic() - t0
        say("")
        say(f"## {world} processes (q rows per rank {T.SIZES[world][0]}, g rows {T.SIZES[world][1]}; even cases "
            f"{T.EVEN[world][0]}, {T.EVEN[world][1]}): {elapsed:.1f} s")
        if "__worker__" in res:
            for rank, r in res["__worker__"].items():
                say(f"worker failure on rank {rank}:\n{r['errors'][0]}")
                failures.append((world, "__worker__", rank))
        say(f"| case | {FP64}: max rel err (quantity) | {FP32}: max rel err (quantity) "
            "| one-process fp32 Triton, same inputs: grad rel errs | condition of dlogit_scale (max abs S) | status |")
        say("|---|---|---|---|---|---|")
        for name in T.CASES:
            cells, status = [], []
            single = res.get(f"{name}|single", {}).get(0, {})
            kappa = single.get("kappa")
            for run in (FP64, FP32):
                per_rank = res.get(f"{name}|{run}", {})
                errs = {r: v["errors"] for r, v in per_rank.items() if v["errors"]}
                worst = _max_over_ranks(per_rank)
                for what, err in worst.items():
                    key = "dlogit_scale" if what == "dlogit_scale" else what.split()[0]
                    overall[run][key] = max(overall[run].get(key, 0.0), err)
                if worst:
                    what, err = max(worst.items(), key=lambda kv: kv[1])
                    cells.append(f"{err:.1e} ({what})")
                else:
                    cells.append("-")
                if len(per_rank) != world:
                    errs["missing ranks"] = [f"{len(per_rank)} of {world} reported"]
                messages = sorted({e.splitlines()[-1] if e else e for v in errs.values() for e in v})
                bound = kappa[0] * kappa[1] * U_FP32 if kappa is not None else None
                if errs and run == FP32 and bound is not None and len(per_rank) == world \
                        and all(m.startswith("dlogit_scale:") for m in messages) \
                        and worst.get("dlogit_scale", float("inf")) <= bound:
                    status.append(f"{run}: dlogit_scale over the tolerance, within its conditioning bound "
                                  f"condition * max abs S * 2^-24 = {bound:.1e}")
                    explained.append((world, name, run))
                elif errs:
                    status.append(f"{run} FAIL: " + "; ".join(messages))
                    failures.append((world, name, run))
            cells.append(", ".join(f"{k} {v:.1e}" for k, v in single.get("measured", {}).items()) or "-")
            cells.append(f"{kappa[0]:.1e} (max abs S {kappa[1]:.0f})" if kappa is not None else "-")
            say(f"| {name} | {' | '.join(cells)} | {'; '.join(status) or 'ok'} |")
        bad = []
        for name in T.ERROR_CASES:
            per_rank = res.get(f"{name}|error-case", {})
            errs = {r: v["errors"] for r, v in per_rank.items() if v["errors"]}
            if errs or len(per_rank) != world:
                bad.append(f"{name}: {errs or 'missing ranks'}")
                failures.append((world, name, "error-case"))
        say(f"disagreement / invalid-input cases ({', '.join(T.ERROR_CASES)}): "
            + ("every rank raised the expected error" if not bad else "FAIL " + "; ".join(bad)))
        bad = []
        for name in T.DDP_STEPS:
            per_rank = res.get(f"{name}|ddp-step", {})
            errs = {r: v["errors"] for r, v in per_rank.items() if v["errors"]}
            if errs or len(per_rank) != world:
                bad.append(f"{name}: {errs or 'missing ranks'}")
                failures.append((world, name, "ddp-step"))
        say(f"DDP training steps with the default gradient convention ({', '.join(T.DDP_STEPS)}): "
            + ("DDP-averaged gradients equal the single-process ones" if not bad else "FAIL " + "; ".join(bad)))
    say("")
    say("## summary: max relative error over every case, rank and world, per quantity")
    for run in (FP64, FP32):
        say(f"{run}: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(overall[run].items())))
    say("over the tolerance, within the conditioning bound of dlogit_scale: "
        + (", ".join(f"world {w} {n} [{r}]" for w, n, r in explained) if explained else "none"))
    say("failures: " + (", ".join(f"world {w} {n} [{r}]" for w, n, r in failures) if failures else "none"))
    if args.log:
        with open(args.log, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
