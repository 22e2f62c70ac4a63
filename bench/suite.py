"""The benchmark loop: cases x methods (x variants) x modes, checked before timed.

For each case: allocate the inputs and their gradient buffers, compute the
trusted loss and gradients once, then for each method: skip it (with the reason)
if it does not apply or would not fit, check it against the truth, and only if
that passed, measure peak memory and time in each mode. The floor runs first so
every row can carry its ratio to the floor.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import measure, methods as M, report
from .cases import MODES, PRESETS, Case, input_bytes_estimate, make_inputs

CSV_COLUMNS = report.CSV_COLUMNS


@dataclasses.dataclass
class Config:
    """Everything one run needs; ``Config.from_preset`` fills it from a named preset."""

    cases: List[Case]
    methods: Tuple[str, ...]
    variants: Tuple[str, ...] = ("default",)
    modes: Tuple[str, ...] = MODES
    out: Optional[Path] = None
    plots: bool = True
    triton_max_nm: Optional[int] = None
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_budget_s: float = 0.15
    device: Optional[str] = None
    seed: int = 0
    verbose: bool = True

    @staticmethod
    def from_preset(name: str, **overrides) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        p = PRESETS[name]
        cfg = Config(cases=p.cases(), methods=p.methods, modes=p.modes, triton_max_nm=p.triton_max_nm)
        return dataclasses.replace(cfg, **overrides)


def default_preset() -> str:
    return "gpu-quick" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class Result:
    rows: List[Dict]
    csv_path: Path
    plots: List[Path]
    table: str


def validate(cfg: Config):
    """Unknown methods, modes or variants raise ValueError before anything runs or is written."""
    for kind, given, known in (("method", cfg.methods, M.METHODS), ("mode", cfg.modes, MODES)):
        unknown = [x for x in given if x not in known]
        if unknown:
            raise ValueError(f"unknown {kind} {unknown[0]!r}; choose from {', '.join(known)}")
    for variant in cfg.variants:
        M.check_variant(variant)
    if not cfg.cases:
        raise ValueError("no cases to run")


def _plan(cfg: Config, case: Case) -> List[Tuple[str, str]]:
    plan = []
    ordered = sorted(cfg.methods, key=lambda m: m != "floor")   # floor first: the ratios need it
    for method in ordered:
        if method == "sdm_triton_multi" and case.k == 1:
            continue   # only meaningful against several galleries
        variants = cfg.variants if method in M.TRITON_METHODS else (M.NO_VARIANT,)
        plan += [(method, v) for v in variants]
    return plan


def _elapsed(t_start: float) -> str:
    s = int(time.perf_counter() - t_start)
    return f"{s // 60}m{s % 60:02d}s elapsed"


def _log(cfg: Config, msg: str):
    if cfg.verbose:
        print(msg, file=sys.stderr, flush=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


_OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", MemoryError),
                     getattr(torch.cuda, "OutOfMemoryError", MemoryError), MemoryError})


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, _OOM_ERRORS) or "out of memory" in str(exc).lower()


def _cleanup(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run(cfg: Config) -> Result:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The CPU cases are tiny: intra-op threads only add scheduling noise (a busy core
        # next door turned 0.5 ms calls into 20 ms ones with 2 threads).
        torch.set_num_threads(1)
    try:
        return _run(cfg, device)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, device: torch.device) -> Result:
    validate(cfg)
    env = report.environment(device)
    out = Path(cfg.out) if cfg.out is not None else report.default_out_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    writer = report.CsvWriter(out / "results.csv")
    rows: List[Dict] = []
    t_start = time.perf_counter()
    _log(cfg, f"bench: {len(cfg.cases)} cases, methods {', '.join(cfg.methods)}, modes {', '.join(cfg.modes)} "
              f"on {env['gpu']} (torch {env['torch_version']}, triton {env['triton_version']}, "
              f"sdm_triton {env['sdm_version']}, git {env['git_rev'] or '-'}); writing {out}")

    def emit(case: Case, method: str, variant: str, mode: str, **fields):
        row = dict(env, timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                   method=method, variant=variant, N=case.n, M=case.m, D=case.d, K=case.k,
                   dtype=case.dtype, kl=case.kl, labels=case.labels, combine=case.combine, mode=mode)
        row.update(median_ms=math.nan, p20_ms=math.nan, p80_ms=math.nan, x_floor=math.nan, tflops=math.nan,
                   peak_mib=math.nan, checked_against="", loss_rel_err=math.nan, grad_rel_err=math.nan, note="",
                   tag="")
        row.update(fields)
        if not math.isnan(row["median_ms"]):
            row["tflops"] = case.flops(mode) / (row["median_ms"] * 1e-3) / 1e12
        writer.write(row)
        rows.append({k: report._fmt_csv(v) if isinstance(v, float) else str(v) for k, v in row.items()})

    for index, case in enumerate(cfg.cases, 1):
        plan = _plan(cfg, case)
        if not plan:
            continue
        _log(cfg, f"[case {index}/{len(cfg.cases)}, {_elapsed(t_start)}] {case.label()}")
        if input_bytes_estimate(case) > 0.9 * measure.free_bytes(device):
            for method, variant in plan:
                for mode in cfg.modes:
                    emit(case, method, variant, mode, status="skipped", note="inputs do not fit in memory")
            continue
        inputs = make_inputs(case, device, seed=cfg.seed)
        inputs.allocate_grads()
        truth: Dict[str, measure.Truth] = {}

        def get_truth(case=case, inputs=inputs, truth=truth):
            # computed once per case, by the first method that needs it
            if "value" not in truth:
                truth["value"] = measure.compute_truth(case, inputs, device)
                _cleanup(device)
            return truth["value"]

        floor_ms: Dict[str, float] = {}
        for method, variant in plan:
            _run_method(cfg, case, inputs, device, method, variant, emit, floor_ms, get_truth)
        del inputs, truth, get_truth
        _cleanup(device)

    plots: List[Path] = []
    if cfg.plots:
        try:
            plots = report.plot(rows, out, cfg.modes)
        except Exception as exc:  # a plotting problem must not lose the measurements
            _log(cfg, f"plots skipped: {_short(exc)}")
    table = report.markdown_table(rows, cfg.modes)
    _log(cfg, f"bench: {len(cfg.cases)} cases done in {_elapsed(t_start)}")
    return Result(rows, out / "results.csv", plots, table)


def _run_method(cfg, case, inputs, device, method, variant, emit, floor_ms, get_truth):
    done = []   # modes already written (an OOM in a later mode keeps the earlier rows)

    def skip(note, status="skipped", **extra):
        for mode in cfg.modes:
            if mode not in done:
                emit(case, method, variant, mode, status=status, note=note, **extra)
        _log(cfg, f"  {method:18s} {variant:14s} {status}: {note}")

    need = M.estimate_bytes(method, case)
    if need > 0.9 * measure.free_bytes(device):
        return skip(f"would not fit: needs ~{need / 2**30:.1f} GiB beyond inputs")
    runner = None
    try:
        runner = M.build(method, variant, case, inputs, device, cfg.triton_max_nm)
        checked = {}
        if runner.is_loss:
            truth = get_truth()   # outside the method's matmul precision
        with measure.matmul_precision(runner.precision):
            if runner.is_loss:
                res = measure.check(method, runner, truth, case)
                checked = dict(checked_against=truth.source, loss_rel_err=res.loss_err, grad_rel_err=res.grad_err)
                if not res.ok:
                    return skip(res.detail, status="FAILED", **checked)
                _log(cfg, f"  {method:18s} {variant:14s} check ok vs {truth.source}: {res.detail}")
            status = "ok" if runner.is_loss else "n/a"
            for mode in cfg.modes:
                # one untimed call first: lazy allocations (cuBLAS workspace, compiled kernels)
                # belong to no mode's peak
                if mode == "bwd":
                    runner.bwd_setup()()
                    peak = measure.peak_mib(device, setup=runner.bwd_setup)
                    bwd = runner.bwd_setup()
                    t = measure.time_ms(bwd, device, cfg.warmup_ms, cfg.rep_ms, cfg.cpu_budget_s)
                    del bwd
                else:
                    fn = runner.fwd if mode == "fwd" else runner.fwd_bwd
                    fn()
                    peak = measure.peak_mib(device, run=fn)
                    t = measure.time_ms(fn, device, cfg.warmup_ms, cfg.rep_ms, cfg.cpu_budget_s)
                if method == "floor":
                    floor_ms[mode] = t[0]
                ratio = t[0] / floor_ms[mode] if mode in floor_ms else math.nan
                emit(case, method, variant, mode, status=status, median_ms=t[0], p20_ms=t[1], p80_ms=t[2],
                     x_floor=ratio, peak_mib=peak, note=runner.note, tag=runner.tag, **checked)
                done.append(mode)
                tflops = case.flops(mode) / (t[0] * 1e-3) / 1e12
                _log(cfg, f"  {method:18s} {variant:14s} {mode:8s} {t[0]:10.4f} ms  x{ratio:6.2f}  "
                          f"{tflops:8.3g} TFLOP/s  peak {peak:9.1f} MiB")
    except M.SkipMethod as exc:
        skip(str(exc))
    except Exception as exc:
        if _is_oom(exc):
            skip(f"out of memory ({_short(exc)[:120]})")
        elif method in M.COMPILED_METHODS:
            skip(f"torch.compile failed: {_short(exc)}")
        elif variant not in (M.DEFAULT_VARIANT, M.NO_VARIANT) and isinstance(exc, ValueError) \
                and "kernel_config" in str(exc):
            skip(f"the library refuses this kernel_config here: {_short(exc)}")
        else:
            if cfg.verbose:
                traceback.print_exc(file=sys.stderr)
            skip(_short(exc), status="FAILED")
    finally:
        del runner
        _cleanup(device)
