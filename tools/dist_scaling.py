"""Weak and strong scaling of ``sdm_loss_distributed``, with an exactness check at every size (issue #7).

    python tools/dist_scaling.py --worlds 1,2,4 --out bench/results/<card>x4-dist-scaling-<date>
    python tools/dist_scaling.py --cpu-smoke --out /tmp/dist_smoke   # gloo on CPU, tiny sizes: the whole pipeline

One run does everything, for both strategies ("allgather", "ring"), both id modes and the
run dtype (bf16) at D = 512; both directions, forward KL, temperature 0.02, q_ids = g_ids:

  ids modes  "unique": ids = arange(N) (one positive per row);
             "pk4":    ids = randperm(N) // 4 (4 samples per identity, positives across ranks).
  weak       --local rows per GPU (32768) on every world W in --worlds: global N = W * local.
  strong     global N = --global-n (131072) on every world W >= 2 in --worlds, and on one GPU
             too when 1 is in --worlds (memory is O(N): it fits on 80 GB; if it fails, the
             smallest world measured becomes the base).
  World 1 is plain ``sdm_triton.sdm_loss`` in one process without a process group (strategy
  "single" in the outputs; the base of both strategies). A configuration that is both weak
  and strong (W * local == global-n) is measured once and reported in both tables.

Efficiency (base b: one GPU when measured, else the smallest world measured)
  weak    A global batch of W*L samples has (W*L)^2 pairs, W*L^2 per GPU: W times the work of
          the 1-GPU run on L samples. Ideal time T_W = T_1 * W, and
              E_weak(W) = T_1 * W / T_W               (generally T_b * (W / b) / T_W).
  strong  The same global batch split W ways: ideal T_W = T_b * b / W, and
              E_strong(W) = T_b * b / (W * T_W)       (b = 1: sdm_loss on the whole batch).

Measurements
  time       forward + backward (``loss.backward()``, gradients accumulate into preallocated
             ``.grad``); CUDA events around each step, then per step the max over ranks, then the
             median, p20 and p80 over --iters steps after --warmup steps.
  memory     per-GPU peak of torch's caching allocator during one step minus what was allocated
             before it (inputs, preallocated grads, ids), max over ranks. NCCL's own buffers are
             not in it.
  exactness  one fresh forward + backward per configuration, on the inputs that are timed: the
             loss and the gradient rows of --sample random global rows of q and of g (gathered
             to rank 0) against a float64 evaluation of the whole global batch in one process:
             ``sdm_loss(..., backend="torch")`` on float64 copies of the (bf16) inputs, chunked, so
             O(chunk * N) memory (--ref-workspace-gib). Relative errors |loss - ref| / |ref| and
             ||rows - ref rows||_F / ||ref rows||_F for q and g (grad_rel_err: the larger). For
             scale, the same errors of one-GPU ``sdm_loss`` in the run dtype on the same global
             batch are reported beside them (single_gpu_*): bf16 gradients are returned in bf16,
             so no implementation gets closer than the rounding to bf16 (~1e-3).

Inputs are generated on the CPU per 4096-row block from fixed seeds, so every process builds the
same global batch (each rank only its rows); the reference runs once per (global N, ids mode),
the references spread over the GPUs, before anything is timed (this also compiles the Triton
kernels into the shared cache, ~/.triton/cache or $TRITON_CACHE_DIR, once per process).

Outputs in --out: results.csv (long format, one row per measurement), scaling.png, summary.md
(the markdown table, also printed last), cards.txt, dist_scaling.log (everything printed).
They are rewritten after every phase, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) and symmetric-memory multicast off; set before anything starts NCCL (a caller may override).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run as a script from anywhere: the package and reference/ are at the root
    sys.path.insert(0, ROOT)

STRATEGIES = ("allgather", "ring")
IDS_MODES = ("unique", "pk4")
BLOCK_ROWS = 4096          # inputs are generated per block of rows (fixed seeds): any rank can build its rows
SEED_Q, SEED_G, SEED_IDS, SEED_SAMPLE = 11, 23, 37, 53
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
CSV_FIELDS = ("kind", "strategy", "ids", "world", "global_n", "local_n", "d", "dtype", "backend",
              "ms_median", "ms_p20", "ms_p80", "iters", "ideal_ms", "efficiency", "base_world", "peak_mib",
              "loss", "loss_ref", "loss_rel_err", "dq_rel_err", "dg_rel_err", "grad_rel_err",
              "single_gpu_loss_rel_err", "single_gpu_grad_rel_err", "sample_rows", "ref_seconds",
              "gpu", "gpus_visible", "device", "torch", "triton", "cuda", "nccl", "date", "error")


# --------------------------------------------------------------------------------------------
# Inputs (identical in every process) and small helpers
# --------------------------------------------------------------------------------------------

def _rows(seed: int, start: int, stop: int, d: int, dtype, device) -> torch.Tensor:
    """Rows [start, stop) of the global feature matrix of ``seed`` (standard normal, cast to ``dtype``)."""
    out = torch.empty((stop - start, d), dtype=dtype, device=device)
    for b in range(start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1 if stop > start else 0):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        block = torch.randn(BLOCK_ROWS, d, generator=gen)
        lo, hi = max(start, b * BLOCK_ROWS), min(stop, (b + 1) * BLOCK_ROWS)
        out[lo - start: hi - start] = block[lo - b * BLOCK_ROWS: hi - b * BLOCK_ROWS].to(dtype)
    return out


def _ids(n: int, mode: str) -> torch.Tensor:
    if mode == "unique":
        return torch.arange(n)
    if mode == "pk4":
        return torch.randperm(n, generator=torch.Generator().manual_seed(SEED_IDS + n)) // 4
    raise ValueError(mode)


def _sample(n: int, k: int, which: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED_SAMPLE + 7 * which + n)
    return torch.randperm(n, generator=gen)[: min(k, n)].sort().values


def _split_sizes(n: int, world: int):
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = p * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _log(cfg: dict, msg: str):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(cfg["log_path"], "a") as f:
        f.write(line + "\n")


def _append_result(cfg: dict, row: dict):
    with open(os.path.join(cfg["tmp"], "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:   # noqa: BLE001
        tv = "n/a"
    nccl = "n/a"
    if torch.cuda.is_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:   # noqa: BLE001
            pass
    return dict(torch=torch.__version__, triton=tv, cuda=str(torch.version.cuda), nccl=nccl)


def _ref_path(cfg: dict, n: int, ids: str) -> str:
    return os.path.join(cfg["tmp"], f"ref_{ids}_{n}.pt")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _errors(loss: float, dq: torch.Tensor, dg: torch.Tensor, ref: dict) -> dict:
    lerr = abs(loss - ref["loss"]) / max(abs(ref["loss"]), 1e-300)
    eq, eg = _rel(dq, ref["dq"]), _rel(dg, ref["dg"])
    return dict(loss=loss, loss_ref=ref["loss"], loss_rel_err=lerr, dq_rel_err=eq, dg_rel_err=eg,
                grad_rel_err=max(eq, eg))


def _sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


def _time_steps(step, iters: int, warmup: int, cuda: bool):
    """Per-step milliseconds of ``iters`` steps after ``warmup`` steps (CUDA events, or the host clock on CPU)."""
    for _ in range(warmup):
        step()
    _sync(cuda)
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _peak_step(step, cuda: bool) -> float:
    """MiB allocated at the peak of one step beyond what was allocated before it (NaN on CPU)."""
    if not cuda:
        step()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _child_setup(cfg: dict, rank: int):
    if cfg["smoke_interpret"]:
        os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton in this child
    torch.set_num_threads(max(1, cfg["cpu_threads"]))
    if cfg["cuda"]:
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Phase 1: float64 references (one process per GPU, jobs spread over them)
# --------------------------------------------------------------------------------------------

def _ref_worker(rank: int, nprocs: int, cfg: dict, jobs: list):
    device = _child_setup(cfg, rank)
    import sdm_triton
    for n, mode in jobs[rank::nprocs]:
        t0 = time.perf_counter()
        dtype = DTYPES[cfg["dtype"]]
        ids = _ids(n, mode).to(device)
        idx_q, idx_g = _sample(n, cfg["sample"], 0), _sample(n, cfg["sample"], 1)
        q = _rows(SEED_Q, 0, n, cfg["d"], dtype, device)
        g = _rows(SEED_G, 0, n, cfg["d"], dtype, device)
        # the truth: float64 on the same (dtype-rounded) inputs, chunked torch tiles
        q64 = q.double().requires_grad_()
        g64 = g.double().requires_grad_()
        loss64 = sdm_triton.sdm_loss(q64, g64, ids, ids, backend="torch",
                                     workspace_bytes=int(cfg["ref_workspace_gib"] * 2**30 * max(1.0, n / 131072)))
        loss64.backward()
        _sync(cfg["cuda"])
        ref = dict(loss=float(loss64.detach()), dq=q64.grad[idx_q.to(device)].cpu(),
                   dg=g64.grad[idx_g.to(device)].cpu(), idx_q=idx_q, idx_g=idx_g)
        t_ref = time.perf_counter() - t0
        del q64, g64, loss64
        if cfg["cuda"]:
            torch.cuda.empty_cache()
        # for scale: one process, the run dtype, the library's default path, same global batch
        qs, gs = q.clone().requires_grad_(), g.clone().requires_grad_()
        loss = sdm_triton.sdm_loss(qs, gs, ids, ids, backend=cfg["backend"])
        loss.backward()
        single = _errors(float(loss.detach()), qs.grad[idx_q.to(device)].cpu(), gs.grad[idx_g.to(device)].cpu(), ref)
        ref.update(ref_seconds=t_ref, single_gpu_loss_rel_err=single["loss_rel_err"],
                   single_gpu_grad_rel_err=single["grad_rel_err"])
        torch.save(ref, _ref_path(cfg, n, mode))
        _log(cfg, f"reference {mode:6s} N={n}: float64 loss {ref['loss']:.10g} in {t_ref:.1f} s on {device}; "
                  f"one-process {cfg['dtype']} errors: loss {single['loss_rel_err']:.2e}, "
                  f"grad rows {single['grad_rel_err']:.2e}")
        del q, g, qs, gs, loss
        if cfg["cuda"]:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Phases 2 and 3: the measurements (world 1: sdm_loss in one process; world >= 2: a process group)
# --------------------------------------------------------------------------------------------

def _group_worker(rank: int, world: int, cfg: dict, jobs: list, port: int):
    device = _child_setup(cfg, rank)
    import sdm_triton
    from sdm_triton.distributed import sdm_loss_distributed
    cuda = cfg["cuda"]
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        kw = dict(timeout=datetime.timedelta(seconds=cfg["collective_timeout_s"]))
        if cuda:
            kw["device_id"] = device
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, **kw)
    gpu = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    dtype = DTYPES[cfg["dtype"]]
    strategies = STRATEGIES if world > 1 else ("single",)

    def reduce_(x: torch.Tensor, op=None):
        if world > 1:
            dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
        return x

    for n, mode, kinds in jobs:
        sizes = _split_sizes(n, world)
        r0, r1 = sum(sizes[:rank]), sum(sizes[: rank + 1])
        q = _rows(SEED_Q, r0, r1, cfg["d"], dtype, device).requires_grad_()
        g = _rows(SEED_G, r0, r1, cfg["d"], dtype, device).requires_grad_()
        ids = _ids(n, mode)[r0:r1].to(device)
        ref = torch.load(_ref_path(cfg, n, mode)) if rank == 0 and os.path.exists(_ref_path(cfg, n, mode)) else None
        idx_q, idx_g = _sample(n, cfg["sample"], 0), _sample(n, cfg["sample"], 1)
        for strategy in strategies:
            if strategy == "single":
                def call(q=q, g=g, ids=ids):
                    return sdm_triton.sdm_loss(q, g, ids, ids, backend=cfg["backend"])
            else:
                def call(q=q, g=g, ids=ids, strategy=strategy):
                    # "unscaled": the gradients of the global loss itself, compared with one process
                    return sdm_loss_distributed(q, g, ids, ids, strategy=strategy, backend=cfg["backend"],
                                                grad_convention="unscaled")

            def step(call=call):
                call().backward()

            row = dict(strategy=strategy, ids=mode, world=world, global_n=n, local_n=max(sizes), d=cfg["d"],
                       dtype=cfg["dtype"], backend=cfg["backend"], gpu=gpu, device=str(device), error="")
            try:
                # exactness (also the first call: compiles / warms up)
                q.grad = g.grad = None
                loss = call()
                loss.backward()
                rows = []
                for x, idx in ((q, idx_q), (g, idx_g)):
                    buf = torch.zeros((idx.numel(), cfg["d"]), dtype=torch.float64, device=device)
                    mine = (idx >= r0) & (idx < r1)
                    buf[mine.to(device)] = x.grad[(idx[mine] - r0).to(device)].double()
                    rows.append(reduce_(buf).cpu())        # every sampled row lives on exactly one rank
                loss_value = float(loss.detach())
                # memory of one step (grads preallocated: they count as inputs), then the timing
                q.grad, g.grad = torch.zeros_like(q), torch.zeros_like(g)
                peak = _peak_step(step, cuda)
                times = _time_steps(step, cfg["iters"], cfg["warmup"], cuda)
                if world > 1:
                    stats = torch.tensor(times + [peak], dtype=torch.float64, device=device)
                    reduce_(stats, dist.ReduceOp.MAX)        # per step: the slowest rank
                    times, peak = stats[:-1].tolist(), float(stats[-1])
                row.update(ms_median=_quantile(times, 0.5), ms_p20=_quantile(times, 0.2),
                           ms_p80=_quantile(times, 0.8), iters=len(times), peak_mib=peak, sample_rows=len(idx_q))
                if ref is not None:
                    row.update(_errors(loss_value, rows[0], rows[1], ref))
                    row.update({k: ref[k] for k in ("single_gpu_loss_rel_err", "single_gpu_grad_rel_err",
                                                    "ref_seconds")})
            except torch.cuda.OutOfMemoryError as exc:
                if world > 1:
                    raise   # the other ranks would wait in a collective: let the group fail
                row["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0]}"
            if rank == 0:
                row["kinds"] = kinds
                _append_result(cfg, row)
                if row["error"]:
                    _log(cfg, f"world {world} {strategy:9s} {mode:6s} N={n}: {row['error']}")
                else:
                    err = (f"loss err {row['loss_rel_err']:.2e}, grad err {row['grad_rel_err']:.2e}"
                           if "loss_rel_err" in row else "no reference")
                    _log(cfg, f"world {world} {strategy:9s} {mode:6s} N={n:7d} ({max(sizes)}/rank): "
                              f"{row['ms_median']:9.2f} ms [{row['ms_p20']:.2f}, {row['ms_p80']:.2f}], "
                              f"peak {row['peak_mib']:.0f} MiB/rank, {err}")
            q.grad = g.grad = None
            if cuda:
                torch.cuda.empty_cache()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

def _launch(cfg: dict, name: str, fn, nprocs: int, args: tuple) -> bool:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; False (logged) on an error or the deadline."""
    t0 = time.monotonic()
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = t0 + cfg["phase_timeout_s"]
    ok = True
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                _log(cfg, f"{name}: not finished after {cfg['phase_timeout_s']} s; killed (results so far kept)")
                ok = False
                break
    except Exception:   # noqa: BLE001 -- a child failed: report it, keep what was measured, go on
        _log(cfg, f"{name} FAILED:\n{traceback.format_exc()}")
        ok = False
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    _log(cfg, f"{name}: {'done' if ok else 'stopped'} in {time.monotonic() - t0:.0f} s")
    return ok


def _plan(args):
    """{world: {(global_n, ids): [kinds]}}: each configuration measured once, tagged weak and/or strong."""
    plan = {}
    for w in args.worlds:
        for mode in IDS_MODES:
            plan.setdefault(w, {}).setdefault((w * args.local, mode), []).append("weak")
            if w >= 2 or (w == 1 and not args.no_strong_single):
                plan[w].setdefault((args.global_n, mode), []).append("strong")
    return plan


def _with_efficiency(rows: list) -> list:
    """Long-format rows: one per (kind, configuration), with the ideal time and efficiency against the base."""
    out = []
    for kind in ("weak", "strong"):
        for mode in IDS_MODES:
            measured = [r for r in rows if kind in r.get("kinds", []) and r["ids"] == mode]
            good = [r for r in measured if not r.get("error") and r.get("ms_median") is not None]
            singles = [r for r in good if r["world"] == 1]
            for strategy in ("single",) + STRATEGIES:
                line = sorted((r for r in measured if r["strategy"] == strategy), key=lambda r: r["world"])
                if not line:
                    continue
                base_pool = singles or sorted((r for r in good if r["strategy"] == strategy),
                                              key=lambda r: r["world"])[:1]
                base = min(base_pool, key=lambda r: r["world"]) if base_pool else None
                for r in line:
                    e = dict(r, kind=kind)
                    e.pop("kinds", None)
                    if base is not None and not r.get("error") and r.get("ms_median"):
                        w, b = r["world"], base["world"]
                        ideal = base["ms_median"] * (w / b if kind == "weak" else b / w)
                        e.update(ideal_ms=ideal, efficiency=ideal / r["ms_median"], base_world=b)
                    out.append(e)
    return out


def _fmt(x, spec):
    if x is None or x == "" or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _markdown(rows: list, header: str) -> str:
    lines = [header, "",
             "| kind | strategy | ids | GPUs | global N | per GPU | ms median [p20, p80] | ideal ms | efficiency "
             "| peak MiB/GPU | loss rel err | grad rel err (sampled rows) | 1-process grad rel err, same inputs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kind']} | {r['strategy']} | {r['ids']} | {r['world']} | {r['global_n']} "
                         f"| {r['local_n']} | {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['kind']} | {r['strategy']} | {r['ids']} | {r['world']} | {r['global_n']} | {r['local_n']} "
            f"| {_fmt(r.get('ms_median'), '.2f')} [{_fmt(r.get('ms_p20'), '.2f')}, {_fmt(r.get('ms_p80'), '.2f')}] "
            f"| {_fmt(r.get('ideal_ms'), '.2f')} | {_fmt(r.get('efficiency'), '.1%')} "
            f"| {_fmt(r.get('peak_mib'), '.0f')} | {_fmt(r.get('loss_rel_err'), '.1e')} "
            f"| {_fmt(r.get('grad_rel_err'), '.1e')} | {_fmt(r.get('single_gpu_grad_rel_err'), '.1e')} |")
    return "\n".join(lines)


def _plot(rows: list, path: str, title: str):
    """2 x 2: weak time, weak efficiency, strong time, per-GPU peak memory (one line per strategy and ids mode)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"allgather": "tab:blue", "ring": "tab:orange"}
    styles = {"unique": ("-", "o"), "pk4": ("--", "s")}
    good = [r for r in rows if not r.get("error") and r.get("ms_median")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_wt, ax_we, ax_st, ax_mem = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]

    def line(kind, mode, strategy):
        """The strategy's points, with the one-process point (strategy "single") at world 1."""
        return sorted((r for r in good if r["kind"] == kind and r["ids"] == mode
                       and r["strategy"] in ("single", strategy)), key=lambda r: r["world"])

    for mode in IDS_MODES:
        ls, mk = styles[mode]
        for strategy in STRATEGIES:
            style = dict(ls=ls, marker=mk, color=colors[strategy], label=f"{strategy}, {mode}")
            for kind, ax in (("weak", ax_wt), ("strong", ax_st)):
                pts = line(kind, mode, strategy)
                if pts:
                    ax.plot([r["world"] for r in pts], [r["ms_median"] for r in pts], **style)
            pts = [r for r in line("weak", mode, strategy) if r.get("efficiency") is not None]
            if pts:
                ax_we.plot([r["world"] for r in pts], [100 * r["efficiency"] for r in pts], **style)
            for kind, mem_ls in (("weak", "-"), ("strong", ":")):
                pts = [r for r in line(kind, mode, strategy) if not math.isnan(r.get("peak_mib", float("nan")))]
                if pts:
                    ax_mem.plot([r["world"] for r in pts], [r["peak_mib"] for r in pts], ls=mem_ls, marker=mk,
                                color=colors[strategy], label=f"{kind}: {strategy}, {mode}")
        for kind, ax in (("weak", ax_wt), ("strong", ax_st)):
            ideal = {r["world"]: r["ideal_ms"] for r in good
                     if r["kind"] == kind and r["ids"] == mode and r.get("ideal_ms")}
            if ideal:
                ws = sorted(ideal)
                ax.plot(ws, [ideal[w] for w in ws], ls=":", color="gray", marker=mk, mfc="none",
                        label=f"ideal, {mode}")
    local = next((r["local_n"] for r in good if r["kind"] == "weak"), None)
    total = next((r["global_n"] for r in good if r["kind"] == "strong"), None)
    ax_wt.set(title=f"weak scaling: {local} samples per GPU (ideal T1 * W)", ylabel="ms per forward + backward")
    ax_we.axhline(85, color="red", lw=0.8, ls="--", label="target: ring >= 85% on 8 GPUs")
    ax_we.set(title="weak-scaling efficiency T1 * W / T_W", ylabel="efficiency (%)", ylim=(0, 110))
    ax_st.set(title=f"strong scaling: global batch {total} (ideal T_b * b / W)", ylabel="ms per forward + backward",
              yscale="log")
    ax_mem.set(title="peak MiB/GPU beyond inputs + grads (solid: weak, dotted: strong)", ylabel="MiB")
    worlds = sorted({r["world"] for r in good})
    if not ax_mem.get_lines():
        ax_mem.text(0.5, 0.5, "not measured (CPU)", ha="center", va="center", transform=ax_mem.transAxes)
        if worlds:
            ax_mem.set_xlim(worlds[0] / 1.2, worlds[-1] * 1.2)
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        if worlds:
            ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("GPUs" if "CPU" not in title else "processes")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(cfg: dict, args, meta: dict, final: bool):
    raw = []
    path = os.path.join(cfg["tmp"], "results.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            raw = [json.loads(line) for line in f if line.strip()]
    rows = _with_efficiency(raw)
    for r in rows:
        r.update(meta)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    header = (f"{meta['gpu']} x{meta['gpus_visible']} ({cfg['device_kind']}), torch {meta['torch']}, "
              f"triton {meta['triton']}, CUDA {meta['cuda']}, NCCL {meta['nccl']}, {meta['date']}; "
              f"{cfg['dtype']}, D = {cfg['d']}, both directions, forward KL, fwd+bwd; "
              f"efficiency: weak T1*W/T_W, strong T_b*b/(W*T_W)")
    md = _markdown(rows, header)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md + "\n")
    try:
        if rows:
            _plot(rows, os.path.join(args.out, "scaling.png"), header)
    except Exception:   # noqa: BLE001 -- the plot must not lose the numbers
        _log(cfg, f"plot failed:\n{traceback.format_exc()}")
    if final:
        _log(cfg, f"wrote {args.out}/results.csv, summary.md, scaling.png, cards.txt")
        print(md, flush=True)
        with open(cfg["log_path"], "a") as f:
            f.write(md + "\n")


def _cards(args, cuda: bool) -> tuple[str, int]:
    lines = [f"host {platform.node()}, {platform.platform()}, python {platform.python_version()}, "
             f"{os.cpu_count()} CPUs", json.dumps(_versions())]
    name, count = _cpu_name(), 0
    if cuda:
        count = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(count)]
        name = names[0] if names else "?"
        lines += [f"cuda:{i} {n}" for i, n in enumerate(names)]
        for cmd in (["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version,clocks.max.sm",
                     "--format=csv"], ["nvidia-smi", "topo", "-m"]):
            try:
                lines.append(subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout)
            except Exception as exc:   # noqa: BLE001
                lines.append(f"{' '.join(cmd)}: {exc}")
    with open(os.path.join(args.out, "cards.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return name, count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes (GPUs), e.g. 1,2,4,8")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--local", type=int, default=None, help="weak scaling: samples per GPU (32768)")
    p.add_argument("--global-n", type=int, default=None, help="strong scaling: global batch (131072)")
    p.add_argument("--d", type=int, default=None, help="feature dimension (512)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="input dtype (bf16)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="sdm_triton backend of the measured runs (auto; --cpu-smoke: torch)")
    p.add_argument("--sample", type=int, default=None, help="gradient rows of q and of g checked (256)")
    p.add_argument("--no-exact", action="store_true", help="skip the float64 references (no error columns)")
    p.add_argument("--no-strong-single", action="store_true",
                   help="do not run the strong-scaling global batch on one GPU (base: smallest world)")
    p.add_argument("--ref-workspace-gib", type=float, default=2.0,
                   help="chunk workspace of the float64 reference (torch backend) per 131072 rows: the "
                        "chunk width stays ~256 columns at every N")
    p.add_argument("--phase-timeout", type=float, default=420.0, help="seconds per phase before it is killed")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="gloo on CPU, tiny sizes (local 48, D 16, fp32, backend torch): checks the whole pipeline")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = dict(local=48, global_n=192, d=16, iters=3, warmup=1, dtype="fp32", backend="torch", sample=16) \
        if smoke else dict(local=32768, global_n=131072, d=512, iters=10, warmup=3, dtype="bf16", backend="auto",
                           sample=256)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.worlds = sorted({int(w) for w in args.worlds.split(",") if w.strip()})
    cuda = not smoke
    if cuda and not torch.cuda.is_available():
        p.error("no CUDA device: use --cpu-smoke to check the script on CPU")
    if cuda and torch.cuda.device_count() < max(args.worlds):
        p.error(f"--worlds asks for {max(args.worlds)} GPUs, {torch.cuda.device_count()} visible")
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="sdm_dist_scaling_")
    cfg = dict(cuda=cuda, d=args.d, dtype=args.dtype, backend=args.backend, sample=args.sample, iters=args.iters,
               warmup=args.warmup, tmp=tmp, log_path=os.path.join(args.out, "dist_scaling.log"),
               ref_workspace_gib=args.ref_workspace_gib, phase_timeout_s=args.phase_timeout,
               collective_timeout_s=600 if cuda else 120,
               smoke_interpret=smoke and args.backend == "triton",
               cpu_threads=max(1, (os.cpu_count() or 1) // max(args.worlds)),
               device_kind="CUDA, NCCL" if cuda else "CPU, gloo")
    if cfg["smoke_interpret"]:
        os.environ["TRITON_INTERPRET"] = "1"
    open(cfg["log_path"], "w").close()
    t_start = time.monotonic()
    gpu, count = _cards(args, cuda)
    meta = dict(gpu=gpu, gpus_visible=count if cuda else os.cpu_count(), **_versions(),
                date=datetime.date.today().isoformat())
    _log(cfg, f"{' '.join(sys.argv)}\n  {gpu} x{meta['gpus_visible']}, {meta}; worlds {args.worlds}, "
              f"local {args.local}, global {args.global_n}, D {args.d}, {args.dtype}, backend {args.backend}, "
              f"iters {args.iters} (+{args.warmup} warm-up); scratch {tmp}")
    plan = _plan(args)

    if not args.no_exact and plan:
        jobs = sorted({key for w in plan.values() for key in w}, key=lambda k: -k[0])   # largest first
        nprocs = min(len(jobs), torch.cuda.device_count() if cuda else max(1, min(4, os.cpu_count() or 1)))
        _launch(cfg, f"phase 1: {len(jobs)} float64 references on {nprocs} {'GPU' if cuda else 'process'}(es)",
                _ref_worker, nprocs, (nprocs, cfg, jobs))
    for w in sorted(plan):
        jobs = [(n, mode, kinds) for (n, mode), kinds in sorted(plan[w].items())]
        name = ("phase 2: one GPU, sdm_loss" if w == 1 else f"phase 3: world {w}") + \
            f" ({', '.join(f'{m} N={n}' for n, m, _ in jobs)})"
        _launch(cfg, name, _group_worker, w, (w, cfg, jobs, _free_port()))
        _report(cfg, args, meta, final=False)
    _log(cfg, f"total {time.monotonic() - t_start:.0f} s")
    _report(cfg, args, meta, final=True)


if __name__ == "__main__":
    main()
