"""The Triton backend: tile shapes, grids and allocations around the kernels of `kernels/`.

Launches of one forward + backward:

    forward    prep (norms, label masses) -> stats (online softmax statistics, both directions,
               column segments when the row blocks alone would leave the GPU idle) -> finish
               (merge, per-row losses, reduction): 3 launches, whatever the size.
    backward   "fused": 1 launch (u accumulated in registers over all of D; small problems),
               "chunked": weights, operands, then per column chunk a W kernel, cuBLAS products
               and the input-gradient kernel (large problems; workspace bounded by
               ``workspace_bytes``).

Tile shapes: `KernelConfig` fields given by the caller win; otherwise `_tiles` picks by size
(measured on an H200, bench/NOTES.md), and fixed small tiles under the CPU interpreter.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Optional, Tuple

import torch
import triton

from .backend import NUM_RED, NUM_STATS, ForwardOut, Statistics, reduction_coefficients
from .kernels.finish import _finish_kernel
from .kernels.grad import (
    _fused_grad_kernel,
    _grad_chunk_kernel,
    _input_grad_kernel,
    _operand_kernel,
    _weights_kernel,
)
from .kernels.prep import _prep_kernel
from .kernels.stats import NUM_STATS as _KERNEL_NUM_STATS
from .kernels.stats import _stats_kernel
from .matmul import addmm_f32, mm_f32
from .problem import Problem

try:
    from torch.library import wrap_triton as _wrap_triton
except ImportError:   # PyTorch < 2.6: eager launches only
    _wrap_triton = None

#: True while ops.py's triton_op bodies run (the compiler traces them): launches go through
#: wrap_triton then. In eager mode they must not: wrap_triton is enabled outside any op too
#: and routes every launch through a higher-order op (pytree, signature binding, dispatch),
#: ~0.5 ms of host time per launch measured on an H200 host (bench/NOTES.md).
_TRACING = contextvars.ContextVar("sdm_triton_traceable_launches", default=False)


@contextlib.contextmanager
def traceable_launches():
    token = _TRACING.set(True)
    try:
        yield
    finally:
        _TRACING.reset(token)


def _traceable(kernel):
    return _wrap_triton(kernel) if (_wrap_triton is not None and _TRACING.get()) else kernel

assert _KERNEL_NUM_STATS.value == NUM_STATS, "kernels/stats.py and backend.py disagree on NUM_STATS"

_HALF = {torch.float16: triton.language.float16, torch.bfloat16: triton.language.bfloat16,
         torch.float32: triton.language.float32}

#: The fused backward keeps u [BLOCK_M, D] in registers: used up to this padded D.
FUSED_MAX_D = 512
#: ... and while the problem is small: the fused kernel runs each side's rows against all
#: columns with small tiles; above this many logits (N * K * M) the chunked path is faster.
FUSED_MAX_LOGITS = 2**23


#: Read once, as Triton reads it when the kernels are decorated (an import-time choice).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRETING


def _per_problem(fn):
    """``fn(p)`` computed once per problem and kept in `Problem.derived` (for what depends on
    the problem alone: the forward and the backward of a call share it)."""
    key = fn.__name__

    @functools.wraps(fn)
    def cached(p: Problem):
        value = p.derived.get(key)
        if value is None:
            value = p.derived[key] = fn(p)
        return value
    return cached


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision: TF32 only when the caller allowed it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers (triton.cdiv is a ConstexprFunction in Triton 3.8: ~10 us a
    call from Python, ~15 calls a step)."""
    return -(-a // b)


def _pow2_at_least(x: int) -> int:
    """The smallest power of two >= x (x >= 1), for host integers (see _cdiv)."""
    return 1 << (x - 1).bit_length()


def _dv_stride(d_value) -> int:
    """The stride of the gradient of the [K] (or 0-dim) loss values: 0 for a scalar or an
    expanded gradient."""
    return d_value.stride(0) if d_value is not None and d_value.dim() else 0


def _target_programs(device: torch.device) -> int:
    """Programs that fill the GPU (two per SM); a handful under the interpreter, so that small
    test cases still cut their columns into segments."""
    if device.type != "cuda":
        return 4
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _merge(cfg, default: Tiles, backward: bool = False) -> Tiles:
    """The caller's KernelConfig fields (forward's, or the bwd_* ones) over ``default``."""
    fields = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
    given = [getattr(cfg, ("bwd_" if backward else "") + f) for f in fields]
    return Tiles(*(g or getattr(default, f) for g, f in zip(given, fields)))


@_per_problem
def _stats_tiles(p: Problem) -> Tiles:
    if interpreting():
        return _merge(p.config, Tiles(16, 16, 16, 1, 1))
    logits = p.n * p.galleries * p.m
    if logits >= 2**24 and p.q.dtype != torch.float32:
        # H200, bf16, N = 16384 / 32768: 1.36x / 1.49x faster than 128 x 128 (bench/NOTES.md 20)
        default = Tiles(128, 256, 64, 8, 3)
    elif logits >= 2**24:
        default = Tiles(128, 128, 64, 8, 3)      # fp32 at 128 x 256: 196 KiB of shared memory, unmeasured
    elif logits >= 2**20:
        default = Tiles(64, 64, 64, 4, 3)
    else:
        default = Tiles(32, 32, 64, 4, 2)
    return _merge(p.config, default)


def _fused_tiles(p: Problem, block_d: int) -> Tiles:
    if interpreting():
        return _merge(p.config, Tiles(16, 16, block_d, 1, 1), backward=True)
    block_m = 16 if block_d >= 256 else 32
    return _merge(p.config, Tiles(block_m, 32, block_d, 4, 1), backward=True)


@_per_problem
def _chunk_tiles(p: Problem) -> Tiles:
    if interpreting():
        return _merge(p.config, Tiles(16, 16, 16, 1, 1), backward=True)
    return _merge(p.config, Tiles(128, 64, 64, 8, 3), backward=True)


def backward_path(p: Problem) -> str:
    """"fused" or "chunked" (module doc): the caller's KernelConfig.backward, else by size. The
    fused kernel keeps a row block's gradient over all of D on chip, so above FUSED_MAX_D it
    hands over to the chunked one whatever was asked (at D = 4096 it would need 256 KiB of
    shared memory, more than a Hopper SM has)."""
    block_d = max(16, _pow2_at_least(p.d))
    if block_d > FUSED_MAX_D:
        return "chunked"
    if p.config.backward != "auto":
        return p.config.backward
    return "fused" if p.n * p.galleries * p.m <= FUSED_MAX_LOGITS else "chunked"


def _span(t) -> int:
    """Elements between a tensor's first and last addressed element (+1): its offsets' range."""
    if t is None or t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _index_dtype(*extents: int):
    """tl.int32 offsets unless some tensor's offsets can pass 2^31 (then tl.int64): 64-bit
    address arithmetic on every tile costs the statistics pass dearly (bench/NOTES.md)."""
    return triton.language.int64 if max(extents) >= 2**31 else triton.language.int32


@_per_problem
def _index_extents(p: Problem) -> Tuple[int, ...]:
    """The offset ranges of the problem's own tensors and of the statistics partials."""
    return _span(p.q), _span(p.g), _span(p.labels), p.num_rows * NUM_STATS * 64


def _problem_index(p: Problem, *more: int):
    return _index_dtype(*_index_extents(p), *more)


def _want_pos(p: Problem) -> bool:
    """Whether the statistics carry the positives' softmax mass (statistics asked for, or reverse
    KL with identity labels, whose loss needs it)."""
    return p.return_stats or (p.options.reverse and not p.dense)


@_per_problem
def _side_args(p: Problem) -> dict:
    """The tensors of the problem and their strides, as every kernel names them."""
    sg_gal, sg_row, sg_d = p.g_strides()
    s_gid_gal, s_gid = p.g_ids_strides()
    s_gmsk_gal, s_gmsk = p.g_mask_strides()
    sl_q, sl_gal, sl_g = p.label_strides()
    return dict(
        q_ptr=p.q, sq_row=p.q.stride(0), sq_d=p.q.stride(1), g_ptr=p.g, sg_gal=sg_gal, sg_row=sg_row, sg_d=sg_d,
        q_msk=p.q_mask, s_qmsk=p.q_mask.stride(0) if p.q_mask is not None else 0,
        g_msk=p.g_mask, s_gmsk_gal=s_gmsk_gal, s_gmsk=s_gmsk,
        q_ids=p.q_ids, s_qid=p.q_ids.stride(0) if p.q_ids is not None else 0,
        g_ids=p.g_ids, s_gid_gal=s_gid_gal, s_gid=s_gid,
        lab=p.labels, sl_q=sl_q, sl_gal=sl_gal, sl_g=sl_g)


class TritonBackend:
    """`backend.Backend` with the Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""

    name = "triton"

    @staticmethod
    def check_supported(q: torch.Tensor) -> None:
        if q.dtype == torch.float64:
            raise TypeError("backend='triton' supports float32, bfloat16 and float16 features; "
                            "use backend='torch' (or 'auto') for float64")
        if q.device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (got {q.device}); use backend='torch' "
                             "on CPU, or set TRITON_INTERPRET=1 before importing triton to interpret the kernels")

    # ----------------------------------------------------------------------------- forward
    #: prepare() needs no label masses for identity labels: the statistics pass counts the positives
    needs_id_masses = False

    def forward(self, p: Problem) -> ForwardOut:
        prepared = self.prepare(p)
        st = self.statistics(p, prepared)
        return self.finish(p, st.partial, st.segments_q, st.segments_g, prepared)

    def prepare(self, p: Problem, label_masses: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``buf`` [3 NR + 2 NDR] fp32: per sample r, c, norm (kernels/prep.py), then per softmax
        row ysum, ylny (dense labels; from ``label_masses`` [2, NDR] when given)."""
        n, m, k, d = p.n, p.m, p.galleries, p.d
        nr, ndr = p.num_samples, p.num_rows
        t = _stats_tiles(p)
        buf = torch.empty(3 * nr + 2 * ndr, dtype=torch.float32, device=p.q.device)
        pre, lab = buf[:3 * nr], buf[3 * nr:]
        n_qp = _cdiv(n, t.block_m) * k
        n_gp = k * _cdiv(m, t.block_m)
        masses_given = p.dense and label_masses is not None
        _traceable(_prep_kernel)[(n_qp + n_gp,)](
            **_side_args(p), pre_ptr=pre, lab_ptr=lab, N=n, M=m, K=k, n_q_programs=n_qp, D=d,
            NORMALIZE=p.options.normalize, DENSE=p.dense and not masses_given, BLOCK_M=t.block_m,
            BLOCK_N=t.block_n, BLOCK_K=min(t.block_k, max(16, _pow2_at_least(d))), num_warps=4)
        if masses_given:      # summed over blocks or ranks: a mass that overflowed there is NaN
            lab.view(2, ndr).copy_(torch.where(torch.isinf(label_masses), float("nan"), label_masses))
        return buf

    def statistics(self, p: Problem, prepared: torch.Tensor) -> Statistics:
        """part [S, NUM_STATS, NDR] fp32 (kernels/stats.py), in column segments: enough programs
        to fill the GPU, each walking at least one column tile (``KernelConfig.segments`` fixes
        their number; 1 gives exactly one segment per side)."""
        n, m, k, d = p.n, p.m, p.galleries, p.d
        nr, ndr = p.num_samples, p.num_rows
        dev = p.q.device
        o = p.options
        t = _stats_tiles(p)
        pre, lab = prepared[:3 * nr], prepared[3 * nr:]
        n_qp = _cdiv(n, t.block_m) * k
        n_gp = k * _cdiv(m, t.block_m)
        base = n_qp + n_gp
        segs = max(1, min(p.config.segments or _cdiv(_target_programs(dev), base),
                          _cdiv(max(n, m), t.block_n)))
        seg_q = _cdiv(_cdiv(m, segs), t.block_n) * t.block_n
        seg_g = _cdiv(_cdiv(n, segs), t.block_n) * t.block_n
        s_q, s_g = _cdiv(m, seg_q), _cdiv(n, seg_g)
        part = torch.empty((max(s_q, s_g), NUM_STATS, ndr), dtype=torch.float32, device=dev)
        _traceable(_stats_kernel)[(n_qp * s_q + n_gp * s_g,)](
            **_side_args(p), pre_ptr=pre, lab_ptr=lab, scale_ptr=p.scale, out_ptr=part,
            N=n, M=m, K=k, n_q_programs=n_qp * s_q, seg_cols_q=seg_q, seg_cols_g=seg_g, D=d,
            scale_value=p.scale_value, eps=o.eps, REVERSE=o.reverse, DENSE=p.dense, WANT_POS=_want_pos(p),
            UPCAST=interpreting() and p.q.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(p.q.dtype),
            INDEX=_problem_index(p), BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
            num_warps=t.num_warps, num_stages=t.num_stages)
        return Statistics(part, s_q, s_g)

    def finish(self, p: Problem, partial: torch.Tensor, segments_q: int, segments_g: int,
               prepared: torch.Tensor) -> ForwardOut:
        """kernels/finish.py over the first segments_q (q rows) / segments_g (gallery rows)
        segments of ``partial`` [S, NUM_STATS, NDR] (contiguous fp32)."""
        n, m, k = p.n, p.m, p.galleries
        nr, ndr = p.num_samples, p.num_rows
        dev, f32 = p.q.device, torch.float32
        o = p.options
        if partial.dtype != f32 or not partial.is_contiguous() or tuple(partial.shape[1:]) != (NUM_STATS, ndr):
            raise ValueError(f"finish: partial must be a contiguous fp32 [S, {NUM_STATS}, {ndr}] tensor, got "
                             f"{partial.dtype} {tuple(partial.shape)}")
        args = _side_args(p)
        value = torch.empty(() if p.scalar_value else (k,), dtype=f32, device=dev)
        rows = torch.empty(ndr, dtype=f32, device=dev)
        valid = torch.empty(ndr, dtype=torch.bool, device=dev)
        saved = torch.empty(4 * ndr, dtype=f32, device=dev)      # m, 1 / l, 1 / ysum, ln l
        red = torch.empty((NUM_RED, k), dtype=f32, device=dev)
        _traceable(_finish_kernel)[(1,)](
            part_ptr=partial, pre_ptr=prepared[:3 * nr], lab_ptr=prepared[3 * nr:], q_msk=args["q_msk"],
            s_qmsk=args["s_qmsk"], g_msk=args["g_msk"], s_gmsk_gal=args["s_gmsk_gal"], s_gmsk=args["s_gmsk"],
            scale_ptr=p.scale, rows_ptr=rows, valid_ptr=valid, saved_ptr=saved, red_ptr=red, value_ptr=value,
            N=n, M=m, K=k, S_q=segments_q, S_g=segments_g, scale_value=p.scale_value, eps=o.eps,
            REVERSE=o.reverse, DENSE=p.dense, WANT_Q2G=o.wants_q2g, WANT_G2Q=o.wants_g2q,
            MEAN=o.reduction == "mean", COMBINE_MEAN=o.combine == "mean", STATS=p.return_stats,
            WANT_POS=_want_pos(p), BLOCK=16 if interpreting() else 1024, num_warps=4)
        return ForwardOut(value, rows, valid, red, (prepared, saved))

    # ----------------------------------------------------------------------------- per-row state
    def row_state(self, p: Problem, out: ForwardOut) -> torch.Tensor:
        """[6, NDR] fp32: m, 1 / l, 1 / ysum, ln l (the finish kernel's ``saved``), loss, validity."""
        ndr = p.num_rows
        _, saved = out.state
        return torch.cat([saved.view(4, ndr), out.rows.view(1, ndr), out.valid.view(1, ndr).to(torch.float32)])

    def state_from_rows(self, p: Problem, prepared: torch.Tensor, rows: torch.Tensor) -> ForwardOut:
        red = torch.zeros((NUM_RED, p.galleries), dtype=torch.float32, device=p.q.device)
        return ForwardOut(None, rows[4].contiguous(), rows[5] != 0, red, (prepared, rows[:4].contiguous().view(-1)))

    # ----------------------------------------------------------------------------- backward
    def backward(self, p: Problem, out: ForwardOut, d_value, d_rows, want, partial_grads: bool = False):
        """``partial_grads``: dq, dg in fp32 (the kernels store what they computed, unrounded;
        backend.Backend.backward)."""
        # autograd may hand over expanded (stride-0) gradients: the kernels take d_value's stride
        # (losses.sum().backward() of [K] values: no copy) and index d_rows densely (rare)
        if d_rows is not None:
            d_rows = d_rows.contiguous()
        grad_dtype = torch.float32 if partial_grads else p.q.dtype
        if backward_path(p) == "fused":
            return self._fused_backward(p, out, d_value, d_rows, want, grad_dtype)
        return self._chunked_backward(p, out, d_value, d_rows, want, grad_dtype)

    def _common(self, p: Problem, out: ForwardOut):
        buf, saved = out.state
        o = p.options
        coef_q, coef_g = reduction_coefficients(p)
        dtype = p.q.dtype
        upcast = interpreting() and dtype == torch.bfloat16
        flags = dict(REVERSE=o.reverse, DENSE=p.dense, HALF=_HALF[dtype], IS_FP32=dtype == torch.float32,
                     UPCAST=upcast, DOT_PRECISION=_dot_precision(dtype))
        return buf, saved, coef_q, coef_g, flags

    def _fused_backward(self, p: Problem, out: ForwardOut, d_value, d_rows, want, grad_dtype):
        want_q, want_g, want_scale = want
        n, m, k, d = p.n, p.m, p.galleries, p.d
        dev = p.q.device
        buf, saved, coef_q, coef_g, flags = self._common(p, out)
        block_d = max(16, _pow2_at_least(d))
        t = _fused_tiles(p, block_d)
        n_qp = _cdiv(n, t.block_m) if (want_q or want_scale) else 0
        n_gp = k * _cdiv(m, t.block_m) if want_g else 0
        dq = torch.empty(p.q.shape, dtype=grad_dtype, device=dev) if n_qp else None
        dg = torch.empty(p.g.shape, dtype=grad_dtype, device=dev) if n_gp else None
        dsp = torch.empty(n_qp, dtype=torch.float32, device=dev) if want_scale else None
        _traceable(_fused_grad_kernel)[(n_qp + n_gp,)](
            **_side_args(p), pre_ptr=buf, saved_ptr=saved, rows_ptr=out.rows, red_ptr=out.red,
            scale_ptr=p.scale, dv_ptr=d_value, s_dv=_dv_stride(d_value), drows_ptr=d_rows,
            dq_ptr=dq, sdq_row=d, sdq_d=1, dg_ptr=dg, sdg_row=d, sdg_d=1, dscale_ptr=dsp,
            N=n, M=m, K=k, n_q_programs=n_qp, D=d, scale_value=p.scale_value, eps=p.options.eps,
            coef_q=coef_q, coef_g=coef_g, MEAN=p.options.reduction == "mean", NORMALIZE=p.options.normalize,
            WANT_DSCALE=want_scale, SCALE_W=p.q.dtype == torch.float16, INDEX=_problem_index(p), **flags,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=_stats_tiles(p).block_k, BLOCK_D=block_d,
            num_warps=t.num_warps,
            num_stages=t.num_stages)
        return (dq if want_q else None), dg, (dsp.sum() if want_scale else None)

    def _chunked_backward(self, p: Problem, out: ForwardOut, d_value, d_rows, want, grad_dtype):
        want_q, want_g, want_scale = want
        n, m, k, d = p.n, p.m, p.galleries, p.d
        nr, ndr = p.num_samples, p.num_rows
        dev, f32, dtype = p.q.device, torch.float32, p.q.dtype
        buf, saved, coef_q, coef_g, flags = self._common(p, out)
        args = _side_args(p)
        split = dtype != torch.float32
        t = _chunk_tiles(p)
        small = 16 if interpreting() else 64

        w = torch.empty(ndr, dtype=f32, device=dev)
        _traceable(_weights_kernel)[(k,)](saved_ptr=saved, dv_ptr=d_value, s_dv=_dv_stride(d_value), drows_ptr=d_rows,
                              red_ptr=out.red, w_ptr=w,
                              N=n, M=m, K=k, coef_q=coef_q, coef_g=coef_g, MEAN=p.options.reduction == "mean",
                              BLOCK=small * 16 if not interpreting() else 16)
        # fp16 workspaces: divide W by the largest weight (dS stays O(1), inside fp16's range)
        gmax = w.abs().amax().clamp_min(torch.finfo(f32).tiny).reshape(1) if dtype == torch.float16 else None

        gemm_dtype = dtype if split else f32
        q_op = self._operand(p.q, (0, *p.q.stride()), p.q_mask, (0, args["s_qmsk"]), buf, nr, 0, 1, n, gemm_dtype)
        g_op = self._operand(p.g, p.g_strides(), p.g_mask, p.g_mask_strides(), buf, nr, n, k, m, gemm_dtype)

        u_q = torch.zeros((n, d), dtype=f32, device=dev) if want_q else None
        dg = torch.empty(p.g.shape, dtype=grad_dtype, device=dev) if want_g else None
        d_scale = torch.zeros((), dtype=f32, device=dev) if want_scale else None
        per_col = n * (4 if not split else 2 * 2)
        width = max(t.block_n, min(_cdiv(m, t.block_n) * t.block_n,
                                   p.workspace_bytes // per_col // t.block_n * t.block_n))
        parts = 2 if split else 1
        ws = torch.empty((n, parts * width), dtype=gemm_dtype, device=dev)
        index = _problem_index(p, _span(ws), _cdiv(width, t.block_n) * n)
        n_tiles = _cdiv(width, t.block_n)
        dsp = torch.empty((n_tiles, n), dtype=f32, device=dev) if want_scale else None
        for gal in range(k):
            for c0 in range(0, m, width):
                c1 = min(m, c0 + width)
                cw = c1 - c0
                tiles_n = _cdiv(cw, t.block_n)
                _traceable(_grad_chunk_kernel)[(_cdiv(n, t.block_m), tiles_n)](
                    **args, pre_ptr=buf, saved_ptr=saved, rows_ptr=out.rows, w_ptr=w, scale_ptr=p.scale,
                    gmax_ptr=gmax, ws_ptr=ws, s_ws_row=ws.stride(0), dscale_ptr=dsp,
                    N=n, M=m, K=k, k=gal, col0=c0, col1=c1, D=d, scale_value=p.scale_value, eps=p.options.eps,
                    WANT_DSCALE=want_scale, **flags, INDEX=index, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                    BLOCK_K=_stats_tiles(p).block_k,     # the forward's dot, step for step (see grad.py)
                    num_warps=t.num_warps, num_stages=t.num_stages)
                chunk = ws[:, :parts * cw]
                b0 = gal * m + c0
                if want_q:
                    g_c = g_op[b0:b0 + cw]
                    addmm_f32(u_q, chunk, torch.cat([g_c, g_c]) if split else g_c)
                if want_g:
                    u_g = mm_f32(chunk.T, q_op)                                   # [parts * cw, D]
                    self._input_grad(p, u_g[:cw], u_g[cw:] if split else None, p.g, p.g_strides(), p.g_mask,
                                     p.g_mask_strides(), buf, nr, n, gal, c0, cw, m, gmax, dg)
                if want_scale:
                    d_scale += dsp[:tiles_n].sum()
        dq = None
        if want_q:
            dq = torch.empty(p.q.shape, dtype=grad_dtype, device=dev)
            self._input_grad(p, u_q, None, p.q, (0, *p.q.stride()), p.q_mask, (0, args["s_qmsk"]), buf, nr, 0, 0, 0,
                             n, n, gmax, dq)
        return dq, dg, d_scale

    @staticmethod
    def _operand(x, strides, msk, msk_strides, pre, nr, s0, k, m, dtype):
        """x' [K * M, D] (kernels/grad.py, _operand_kernel)."""
        out = torch.empty((k * m, x.shape[-1]), dtype=dtype, device=x.device)
        block_m = 16 if interpreting() else 32
        _traceable(_operand_kernel)[(_cdiv(m, block_m), k)](
            x_ptr=x, sx_gal=strides[0], sx_row=strides[1], sx_d=strides[2], msk=msk, s_msk_gal=msk_strides[0],
            s_msk=msk_strides[1], pre_ptr=pre, NR=nr, s0=s0, out_ptr=out, M=m, D=x.shape[-1],
            BLOCK_M=block_m, BLOCK_D=16 if interpreting() else 128, num_warps=4)
        return out

    @staticmethod
    def _input_grad(p, u, u2, x, strides, msk, msk_strides, pre, nr, s0, gal, r0, n_rows, m, gmax, out):
        """dL/dx of rows r0 .. r0 + n_rows of gallery ``gal`` of a side from its products u (+ u2)."""
        d = x.shape[-1]
        block_m = 16 if interpreting() else 32
        _traceable(_input_grad_kernel)[(_cdiv(n_rows, block_m),)](
            u_ptr=u, su_row=u.stride(0), u2_ptr=u2, x_ptr=x, sx_gal=strides[0], sx_row=strides[1],
            sx_d=strides[2], msk=msk, s_msk_gal=msk_strides[0], s_msk=msk_strides[1], pre_ptr=pre, NR=nr,
            s0=s0, gal=gal, r0=r0, scale_ptr=p.scale, scale_value=p.scale_value, gmax_ptr=gmax, out_ptr=out,
            so_row=d, so_d=1, n_rows=n_rows, M=m, D=d, NORMALIZE=p.options.normalize,
            BLOCK_M=block_m, BLOCK_D=16 if interpreting() else 128, num_warps=4)


def describe_path(p: Problem) -> str:
    """Which kernels a call runs, for benchmark notes."""
    t = _stats_tiles(p)
    return (f"triton: stats m{t.block_m}n{t.block_n}k{t.block_k}w{t.num_warps}s{t.num_stages}, "
            f"backward {backward_path(p)}")
