"""The backward's launches (`kernels/grad.py`), one of two paths (`backward_path`):

    "fused"    1 launch: u accumulated in registers over all of D (small problems).
    "chunked"  weights, operands, then per column chunk a W kernel, cuBLAS products and the
               input-gradient kernel (large problems; workspace bounded by ``workspace_bytes``).
"""

from __future__ import annotations

import math

from typing import NamedTuple, Optional, Tuple

import torch
import triton

from ..backend import ForwardOut, option_coefficients
from ..kernels.grad import (
    _fused_grad_kernel,
    _grad_chunk_kernel,
    _input_grad_kernel,
    _operand_kernel,
    _weights_kernel,
)
from .. import matmul
from ..kernels.slots import PRE_C, PRE_R
from ..problem import Problem
from .policy import backward_path, interpreting, padded_d, positives_path, table_tiles, w_dtype_path
from .positives import ids_as_ranks
from .tiles import (_cdiv, _chunk_tiles, _dot_precision, _fused_tiles, _per_problem, _per_shape, _problem_index,
                    _side_args, _span, _stats_tiles, _traceable, tracing)

#: The input dtype as Triton names it: the kernels' HALF, the dtype of W's hi and lo halves and of
#: the product operands (for fp32 inputs, IS_FP32, W is one fp32 product and HALF goes unused;
#: with W_FP16, W and the operands are fp16 whatever the half dtype).
_TL_DTYPE = {torch.float16: triton.language.float16, torch.bfloat16: triton.language.bfloat16,
             torch.float32: triton.language.float32}


class Side(NamedTuple):
    """One side of the problem as the chunked backward's operand and input-gradient kernels
    read it: features x as a [galleries, rows, D] view (q: 1 gallery of N rows)."""
    x: torch.Tensor
    strides: Tuple[int, int, int]        # x's (gallery, row, feature) strides
    msk: Optional[torch.Tensor]          # the side's mask, or None
    msk_strides: Tuple[int, int]         # its (gallery, row) strides
    s0: int                              # the side's first sample in the sample space (q: 0, galleries: N)
    galleries: int                       # K (q: 1)
    rows: int                            # rows per gallery, M (q: N)


@_per_problem
def _sides(p: Problem) -> Tuple[Side, Side]:
    """(q side, gallery side)."""
    q = Side(p.q, (0, *p.q.stride()), p.q_mask, (0, _side_args(p)["s_qmsk"]), 0, 1, p.n)
    g = Side(p.g, p.g_strides(), p.g_mask, p.g_mask_strides(), p.n, p.galleries, p.m)
    return q, g


def _dv_stride(d_value) -> int:
    """The stride of the gradient of the [K] (or 0-dim) loss values: 0 for a scalar or an
    expanded gradient."""
    return d_value.stride(0) if d_value is not None and d_value.dim() else 0


def backward(p: Problem, out: ForwardOut, d_value, d_rows, want, partial_grads: bool = False):
    """``partial_grads``: dq, dg in fp32 (the kernels store what they computed, unrounded;
    backend.Backend.backward)."""
    # autograd may hand over expanded (stride-0) gradients: the kernels take d_value's stride
    # (losses.sum().backward() of [K] values: no copy) and index d_rows densely (rare)
    if d_rows is not None:
        d_rows = d_rows.contiguous()
    grad_dtype = torch.float32 if partial_grads else p.q.dtype
    if backward_path(p) == "fused":
        return _fused_backward(p, out, d_value, d_rows, want, grad_dtype)
    return _chunked_backward(p, out, d_value, d_rows, want, grad_dtype)


def fp16_w_headroom(o) -> float:
    """The power of two that fp16 W (kernels/grad.py: dS p_i p_j / gmax) is multiplied by, as
    large as its bound leaves room for: fp16's normal range ends at 2^-14, and a W below it
    keeps only an absolute accuracy, 2^-25 of the largest weight with no headroom (issue 26:
    one dg row 6.5% off, the hi + lo split's 22 bits lost). |dS| <= 2 gmax |d| and p_i p_j < 4
    (normalised rows; otherwise gmax carries the factor `_scale_product_bound`):
    |W| <= 8 B with B bounding |d_ij|: 1 for forward KL (|P - Y| <= 1), and for reverse KL,
    d = P (ln P - ln(Y + eps) - L): P |ln P| <= 1/e, |ln(Y + eps)| <= |ln eps|, and
    |L| <= max(|ln eps|, ln M) with ln M < 32. W stays below 2^14 (fp16's largest is 65504)."""
    bound = 1.0 if not o.reverse else 1.0 + 2.0 * max(abs(math.log(o.eps)), 32.0)
    return 2.0 ** math.floor(math.log2(2.0**11 / bound))


def _scale_product_bound(p: Problem, pre: torch.Tensor) -> torch.Tensor:
    """kernels/grad.py's `scale_product_bound` (max p_i * max p_j / 4, the factor of fp16 W's bound
    for rows that are not normalised) from the prepared buffer ``pre``."""
    nr = p.num_samples
    scale = pre[PRE_R.value * nr:(PRE_R.value + 1) * nr] / pre[PRE_C.value * nr:(PRE_C.value + 1) * nr]
    return scale[:p.n].amax() * scale[p.n:].amax() * 0.25


def _gemm_dtype_parts(p: Problem):
    """(dtype, parts) of the chunked backward's products by `w_dtype_path`: the dtype of W (or
    of its halves) and of the operands x' = c x, and how many W blocks a chunk holds side by
    side: hi | lo halves of the input dtype (2), one fp16 W, or one fp32 W (fp32 inputs)."""
    path = w_dtype_path(p)
    if path == "split":
        return p.q.dtype, 2
    return (torch.float16 if path == "fp16" else torch.float32), 1


def _scales_w(p: Problem) -> bool:
    """Whether W goes through fp16 (fp16 hi + lo, or W rounded to fp16): then it is divided by
    gmax and lifted by `fp16_w_headroom` into fp16's range (bf16 has fp32's range)."""
    return p.q.dtype == torch.float16 or w_dtype_path(p) == "fp16"


@_per_shape
def _coefficients_flags(p: Problem):
    """What both backwards hand their kernels beyond the forward's state: the reduction
    coefficients of the two directions, and the kernels' constexpr flags (W_FP16:
    `w_dtype_path` is "fp16")."""
    o = p.options
    coef_q, coef_g = option_coefficients(o)
    dtype = p.q.dtype
    upcast = interpreting() and dtype == torch.bfloat16
    flags = dict(REVERSE=o.reverse, DENSE=p.dense, HALF=_TL_DTYPE[dtype], IS_FP32=dtype == torch.float32,
                 W_FP16=w_dtype_path(p) == "fp16", UPCAST=upcast, DOT_PRECISION=_dot_precision(dtype))
    return coef_q, coef_g, flags


@_per_shape
def _fused_launch(p: Problem):
    """(q programs, gallery programs, the fused kernel's arguments other than tensors and the
    scale's value): every program when both gradients are wanted."""
    n, m, k, d = p.n, p.m, p.galleries, p.d
    coef_q, coef_g, flags = _coefficients_flags(p)
    t = _fused_tiles(p)
    static = dict(
        sdq_row=d, sdq_d=1, sdg_row=d, sdg_d=1, N=n, M=m, K=k, D=d, eps=p.options.eps,
        coef_q=coef_q, coef_g=coef_g, w_headroom=fp16_w_headroom(p.options),
        MEAN=p.options.reduction == "mean", NORMALIZE=p.options.normalize,
        SCALE_W=_scales_w(p), INDEX=_problem_index(p), **flags,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=_stats_tiles(p).block_k, BLOCK_D=padded_d(d),
        BLOCK_W=table_tiles("max_weight").block_m, num_warps=t.num_warps, num_stages=t.num_stages)
    return _cdiv(n, t.block_m), k * _cdiv(m, t.block_m), static


def _fused_backward(p: Problem, out: ForwardOut, d_value, d_rows, want, grad_dtype):
    want_q, want_g, want_scale = want
    dev = p.q.device
    buf, saved = out.state
    q_programs, g_programs, static = _fused_launch(p)
    n_qp = q_programs if (want_q or want_scale) else 0
    n_gp = g_programs if want_g else 0
    dq = torch.empty(p.q.shape, dtype=grad_dtype, device=dev) if n_qp else None
    dg = torch.empty(p.g.shape, dtype=grad_dtype, device=dev) if n_gp else None
    dsp = torch.empty(n_qp, dtype=torch.float32, device=dev) if want_scale else None
    _traceable(_fused_grad_kernel)[(n_qp + n_gp,)](
        **_side_args(p), pre_ptr=buf, saved_ptr=saved, rows_ptr=out.rows, red_ptr=out.red,
        scale_ptr=p.scale, dv_ptr=d_value, s_dv=_dv_stride(d_value), drows_ptr=d_rows,
        dq_ptr=dq, dg_ptr=dg, dscale_ptr=dsp, n_q_programs=n_qp, scale_value=p.scale_value,
        WANT_DSCALE=want_scale, **static)
    return (dq if want_q else None), dg, (dsp.sum() if want_scale else None)


def _chunked_backward(p: Problem, out: ForwardOut, d_value, d_rows, want, grad_dtype):
    want_q, want_g, _ = want
    n, m, k = p.n, p.m, p.galleries
    dev, f32 = p.q.device, torch.float32
    buf, saved = out.state           # the prepared per-sample buffer, the saved per-row statistics
    coef_q, coef_g, flags = _coefficients_flags(p)
    args = _side_args(p)
    if positives_path(p) == "centroids":      # the W pass compares identity labels as int32 ranks
        args = ids_as_ranks(p, args)

    w = torch.empty(p.num_rows, dtype=f32, device=dev)
    _traceable(_weights_kernel)[(k,)](saved_ptr=saved, dv_ptr=d_value, s_dv=_dv_stride(d_value), drows_ptr=d_rows,
                                      red_ptr=out.red, w_ptr=w,
                                      N=n, M=m, K=k, coef_q=coef_q, coef_g=coef_g, MEAN=p.options.reduction == "mean",
                                      BLOCK=table_tiles("weights").block_m)
    # fp16 workspaces (fp16 hi + lo, or fp16 W): divide W by the largest weight (dS stays O(1),
    # inside fp16's range), then lift it by fp16_w_headroom; the weights are in memory here, so
    # torch takes their maximum (the fused kernel, which keeps none, recomputes them:
    # kernels/grad.py's _max_weight)
    gmax = None
    if _scales_w(p):
        headroom = fp16_w_headroom(p.options)
        top = w.abs().amax()
        if not p.options.normalize:
            top = top * _scale_product_bound(p, buf)
        gmax = (top.clamp_min(torch.finfo(f32).tiny * headroom) / headroom).reshape(1)

    dg = torch.empty(p.g.shape, dtype=grad_dtype, device=dev) if want_g else None
    # the products' operands and the workspace are the chunk loop's own: freed when it returns,
    # before dq is allocated (at N = 32768 the step's peak memory was the end of the backward:
    # u_q, both operands, the workspace, dg and dq together, 263 MiB beyond the inputs and their
    # gradients against the 256: bench/NOTES.md 41)
    u_q, d_scale = _column_chunks(p, out, args, buf, saved, w, gmax, flags, want, dg)
    dq = None
    if want_q:
        dq = torch.empty(p.q.shape, dtype=grad_dtype, device=dev)
        _input_grad_launcher(p, side=_sides(p)[0], pre=buf, gmax=gmax, out=dq)(u_q, None, 0, 0, n)
    return dq, dg, d_scale


def _column_chunks(p: Problem, out: ForwardOut, args: dict, buf, saved, w, gmax, flags: dict, want, dg):
    """The chunked backward's loop over column chunks: per chunk the W kernel into the workspace,
    the cuBLAS products, dg of the chunk's gallery rows (into ``dg``); returns (u_q, the fp32
    products of the q side, accumulated over all chunks; dL/ds)."""
    want_q, want_g, want_scale = want
    n, m, k, d = p.n, p.m, p.galleries, p.d
    nr = p.num_samples
    dev, f32 = p.q.device, torch.float32
    q_side, g_side = _sides(p)
    gemm_dtype, parts = _gemm_dtype_parts(p)
    split = parts == 2
    t = _chunk_tiles(p)
    mm_f32, addmm_f32 = matmul.traced_products() if tracing() else (matmul.mm_f32, matmul.addmm_f32)
    q_op = _operand(q_side, pre=buf, nr=nr, dtype=gemm_dtype)
    g_op = _operand(g_side, pre=buf, nr=nr, dtype=gemm_dtype)

    u_q = torch.zeros((n, d), dtype=f32, device=dev) if want_q else None
    d_scale = torch.zeros((), dtype=f32, device=dev) if want_scale else None
    # bytes per column of the workspace: n rows of W in fp32, of its hi and lo halves (2 + 2
    # bytes), or of fp16 W (2 bytes: chunks twice as wide, half the launches)
    column_bytes = n * parts * gemm_dtype.itemsize
    width = max(t.block_n, min(_cdiv(m, t.block_n) * t.block_n,
                               p.workspace_bytes // column_bytes // t.block_n * t.block_n))
    ws = torch.empty((n, parts * width), dtype=gemm_dtype, device=dev)
    index = _problem_index(p, _span(ws), _cdiv(width, t.block_n) * n)
    n_tiles = _cdiv(width, t.block_n)
    dsp = torch.empty((n_tiles, n), dtype=f32, device=dev) if want_scale else None
    # the launch arguments are built once; a chunk sets its gallery and columns (at N = 16384 the
    # step's host time exceeds its GPU time, and the loop runs 16 chunks a side: bench/NOTES.md 40)
    w_chunk = _traceable(_grad_chunk_kernel)
    w_kw = dict(**args, pre_ptr=buf, saved_ptr=saved, rows_ptr=out.rows, w_ptr=w, scale_ptr=p.scale,
                gmax_ptr=gmax, ws_ptr=ws, s_ws_row=ws.stride(0), dscale_ptr=dsp,
                N=n, M=m, K=k, D=d, scale_value=p.scale_value, eps=p.options.eps,
                WANT_DSCALE=want_scale, **flags, INDEX=index, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                BLOCK_K=_stats_tiles(p).block_k,     # the forward's dot, step for step (see grad.py)
                num_warps=t.num_warps, num_stages=t.num_stages)
    row_blocks = _cdiv(n, t.block_m)
    g_grad = _input_grad_launcher(p, side=g_side, pre=buf, gmax=gmax, out=dg) if want_g else None
    for gal in range(k):
        for c0 in range(0, m, width):
            c1 = min(m, c0 + width)
            cw = c1 - c0
            tiles_n = _cdiv(cw, t.block_n)
            w_chunk[(row_blocks, tiles_n)](k=gal, col0=c0, col1=c1, **w_kw)
            chunk = ws[:, :parts * cw]
            b0 = gal * m + c0
            if want_q:
                g_c = g_op[b0:b0 + cw]
                addmm_f32(u_q, chunk, torch.cat([g_c, g_c]) if split else g_c)
            if want_g:
                u_g = mm_f32(chunk.T, q_op)                                   # [parts * cw, D]
                g_grad(u_g[:cw], u_g[cw:] if split else None, gal, c0, cw)
            if want_scale:
                d_scale += dsp[:tiles_n].sum()
    return u_q, d_scale


def _operand(side: Side, pre, nr: int, dtype) -> torch.Tensor:
    """x' [K * M, D] of a side (kernels/grad.py, _operand_kernel); ``pre``: the prepared
    per-sample buffer of ``nr`` samples."""
    x, k, m = side.x, side.galleries, side.rows
    out = torch.empty((k * m, x.shape[-1]), dtype=dtype, device=x.device)
    t = table_tiles("operand")
    _traceable(_operand_kernel)[(_cdiv(m, t.block_m), k)](
        x_ptr=x, sx_gal=side.strides[0], sx_row=side.strides[1], sx_d=side.strides[2], msk=side.msk,
        s_msk_gal=side.msk_strides[0], s_msk=side.msk_strides[1], pre_ptr=pre, NR=nr, s0=side.s0, out_ptr=out,
        M=m, D=x.shape[-1], BLOCK_M=t.block_m, BLOCK_D=t.block_k, num_warps=t.num_warps)
    return out


def _input_grad_launcher(p: Problem, side: Side, pre, gmax, out):
    """``launch(u, u2, gal, r0, n_rows)``: dL/dx of rows r0 .. r0 + n_rows of gallery ``gal`` of a
    side into ``out``, from its products u (+ u2, the lo half's); ``pre``: the prepared
    per-sample buffer. The arguments that are the same for every chunk are built once."""
    x = side.x
    d = x.shape[-1]
    t = table_tiles("operand")
    kernel = _traceable(_input_grad_kernel)
    kw = dict(x_ptr=x, sx_gal=side.strides[0], sx_row=side.strides[1], sx_d=side.strides[2], msk=side.msk,
              s_msk_gal=side.msk_strides[0], s_msk=side.msk_strides[1], pre_ptr=pre, NR=p.num_samples, s0=side.s0,
              scale_ptr=p.scale, scale_value=p.scale_value, gmax_ptr=gmax, out_ptr=out, so_row=d, so_d=1,
              M=side.rows, D=d, NORMALIZE=p.options.normalize, BLOCK_M=t.block_m, BLOCK_D=t.block_k,
              num_warps=t.num_warps)

    def launch(u, u2, gal: int, r0: int, n_rows: int) -> None:
        kernel[(_cdiv(n_rows, t.block_m),)](u_ptr=u, su_row=u.stride(0), u2_ptr=u2, gal=gal, r0=r0, n_rows=n_rows,
                                           **kw)
    return launch
