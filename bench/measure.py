"""Timing, peak memory and the correctness gate.

Timing: ``triton.testing.do_bench`` (median, 20th and 80th percentiles) on CUDA; on CPU
``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of calls sized so the timer's own
overhead is negligible, one intra-op thread), with the same statistics over its blocks.

Memory: one untimed run after the input tensors and their ``.grad`` buffers exist;
``torch.cuda.max_memory_allocated()`` minus what was allocated before the run is the
memory the method needs beyond its inputs and gradients. Not measured on CPU (NaN).

Correctness: before any timing, a method's loss and gradients are compared with a
trusted value computed on the same (already rounded) inputs: the float64 reference
where it fits in memory, else the chunked torch backend in fp32 (the ``checked_against``
column says which).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from sdm_triton import reference
import sdm_triton

from .cases import EPS, TEMPERATURE, Case, Inputs
from .methods import REPORTED_METHODS, TF32_METHODS, TRUTH_BYTES_PER_NM, WORKSPACE_BYTES

QUANTILES = (0.5, 0.2, 0.8)

# ---------------------------------------------------------------------------------------------
# timing


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_budget_s: float = 0.15) -> Tuple[float, ...]:
    """(median, p20, p80) of ``fn`` in milliseconds.

    On CPU, ``blocked_autorange``: its block-size search is the warm-up (the caller has made
    an untimed call already), then blocks until ``cpu_budget_s`` is spent; the quantiles are
    over the blocks' per-call times (a single block when one call outlasts the budget, as an
    interpreted Triton call does).
    """
    if device.type == "cuda":
        import triton.testing
        res = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return tuple(float(x) for x in res)
    from torch.utils.benchmark import Timer
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=cpu_budget_s)
    times = torch.tensor(m.times, dtype=torch.float64) * 1e3
    return tuple(float(torch.quantile(times, q)) for q in QUANTILES)


@contextlib.contextmanager
def matmul_precision(precision: Optional[str]) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` inside the block, the previous value after."""
    if precision is None:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def peak_mib(device: torch.device, run: Optional[Callable[[], object]] = None,
             setup: Optional[Callable[[], Callable[[], object]]] = None) -> float:
    """Peak memory beyond what was allocated before the call (MiB); NaN off CUDA.

    Either ``run`` (measured as is) or ``setup``: the untimed forward of the bwd mode,
    returning the backward to measure. What the forward keeps alive for the backward
    counts in the peak, since it is live while the backward runs.
    """
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    if setup is not None:
        run = setup()
        torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del run
    return peak / 2**20


def free_bytes(device: torch.device) -> int:
    """Memory a method may still allocate (the caching allocator's spare blocks included)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


# ---------------------------------------------------------------------------------------------
# the correctness gate


@dataclasses.dataclass
class Truth:
    loss: torch.Tensor           # float64 scalar
    grads: List[torch.Tensor]    # float64, one per leaf
    source: str                  # "float64 reference" or "fp32 sdm_torch"


@dataclasses.dataclass
class Check:
    ok: bool
    loss_err: float
    grad_err: float
    detail: str


def _loss_kwargs(case: Case):
    return dict(temperature=TEMPERATURE, kl=case.kl, eps=EPS, combine=case.combine)


def compute_truth(case: Case, inputs: Inputs, device: torch.device, memory_fraction: float = 0.5) -> Truth:
    """The trusted loss and gradients on the case's inputs (their values, not their dtype)."""
    use_f64 = case.n * case.m * TRUTH_BYTES_PER_NM <= memory_fraction * free_bytes(device)
    ct = torch.float64 if use_f64 else torch.float32
    leaves = [x.detach().to(ct).requires_grad_() for x in inputs.leaves]
    kw = inputs.label_kwargs()
    if "labels" in kw:
        kw = dict(labels=kw["labels"].to(ct))
    total = None
    with matmul_precision("highest"):   # IEEE fp32 products in the fp32 fallback, whoever calls
        for g in leaves[1:]:
            if use_f64:
                val = reference.sdm_loss(leaves[0], g, **kw, **_loss_kwargs(case))
            else:
                val = sdm_triton.sdm_loss(leaves[0], g, backend="torch", workspace_bytes=WORKSPACE_BYTES,
                                          **kw, **_loss_kwargs(case))
            val.backward()
            total = val.detach() if total is None else total + val.detach()
    return Truth(total.double(), [x.grad.double() for x in leaves],
                 "float64 reference" if use_f64 else "fp32 sdm_torch")


def rel_err(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.double().pow(2).sum()) for y in b)
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


#: Relative error allowed on the loss: every implementation does the loss math in fp32
#: (exact products of half inputs, fp32 accumulation) whatever the input dtype; docs/contract.md
#: asks for 1e-5 against float64 (measured here: 1e-7 and below).
LOSS_RTOL = 1e-5
#: Gradients come back in the input dtype: allowed is GRAD_FACTOR times the error of rounding
#: the trusted gradient to that dtype (PyTorch's own error for the same formula is that
#: rounding), plus GRAD_RTOL (docs/contract.md's fp32 bound; measured here: 2e-6 and below).
GRAD_FACTOR = 4.0
GRAD_RTOL = 1e-5
#: Methods whose products run in TF32 by design (methods.TF32_METHODS) are gated at that
#: precision. TF32 keeps 10 mantissa bits (unit roundoff 2^-11 rounding, 2^-10 truncating), so
#: every logit carries an error of order s * 2^-10 / sqrt(D) and every gradient product one of
#: order 2^-10 relative:
#: - Inf-CL rounds its operands to TF32 itself (inline cvt.rna.tf32) for q.k^T and for both
#:   gradient products; measured on an H200 (bf16, N = 1024-32768): loss 2.7e-4 to 3.5e-4,
#:   gradients 1.7e-3 (the bf16 rounding of the gradient).
#: - The formula peers (formula_eager, formula_compiled) run fp32 products under float32 matmul
#:   precision "high" (bf16 inputs upcast to fp32 first, then TF32). Emulated on the CPU (operands
#:   rounded to 10 mantissa bits, float64 accumulation, the bench's inputs, D = 512, N = 64-1024):
#:   loss error 5e-7 to 6e-6, gradient error 3.4e-4 to 6.5e-4 for fp32 inputs (the bf16 rounding,
#:   1.7e-3, dominates for bf16 inputs). Not yet measured on a GPU, where cuBLAS may truncate
#:   rather than round and the error may be a few times larger.
#: The gate allows a loss error of 1e-3 and a gradient error of 4 x rounding + 1e-2: over 10x the
#: TF32 figures above, and still far below what a wrong formula gives (a missing normalisation,
#: the wrong combine or eps: errors of 1e-1 and more).
TF32_LOSS_RTOL = 1e-3
TF32_GRAD_RTOL = 1e-2


def tolerances(method: str, rounding: float) -> Tuple[float, float]:
    """(loss, gradient) relative-error bounds of ``method``; ``rounding`` is the error of rounding
    the true gradient to the input dtype."""
    if method in TF32_METHODS:
        return TF32_LOSS_RTOL, GRAD_FACTOR * rounding + TF32_GRAD_RTOL
    return LOSS_RTOL, GRAD_FACTOR * rounding + GRAD_RTOL


def check(method: str, runner, truth: Truth, case: Case) -> Check:
    loss, grads = runner.loss_and_grads()
    if any(gr is None for gr in grads):
        return Check(False, math.nan, math.nan, "a leaf got no gradient")
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(gr).all()) for gr in grads)
    loss_err = rel_err([loss], [truth.loss])
    grad_err = rel_err(grads, truth.grads)
    rounding = rel_err([gr.to(case.torch_dtype) for gr in truth.grads], truth.grads)
    if method in REPORTED_METHODS:       # reported beside the time, gates nothing but finiteness
        detail = (f"loss rel err {loss_err:.1e}, grad rel err {grad_err:.1e} (reported, not gated)"
                  + ("" if finite else ", NON-FINITE"))
        return Check(finite, loss_err, grad_err, detail)
    loss_tol, grad_tol = tolerances(method, rounding)
    ok = finite and loss_err <= loss_tol and grad_err <= grad_tol
    detail = (f"loss rel err {loss_err:.1e} (tol {loss_tol:.0e}), grad rel err {grad_err:.1e} "
              f"(tol {grad_tol:.1e})" + ("" if finite else ", NON-FINITE"))
    return Check(ok, loss_err, grad_err, detail)
