"""Backward: dL/dS recomputed tile by tile from the forward's statistics, and the gradients.

For a pair of present samples (row i of one side, column j of the other), with the log2-domain
logit t_ij and each softmax's saved state (m, 1 / l, 1 / ysum, ln l) and loss L (`finish.py`):

    P_ij  = exp2(t_ij - m_i) / l_i,   ln P_ij = ln2 (t_ij - m_i) - ln l_i     (t - m: exact near the max)
    P'_ij = exp2(t_ij - m'_j) / l'_j                      (the column's own softmax)

(P is formed from the same exp2 values the forward summed into l, not through a log2 / exp2
round trip: on the GPU both are approximations, and sum_j P_ij = 1 is what the cancelling sums
of dL/ds and of the radial gradient rely on.)

dL/ds is summed centred: the softmax Jacobian's rows sum to zero (sum_j d_ij = 0 for either
divergence: L is invariant to a shift of S_i), so sum_j w_i d_ij cos_ij = sum_j w_i d_ij
(cos_ij - a_i) for any a_i, and likewise over i for the columns' terms. With a_i the cosine at
row i's maximum (m_i / (s log2 e)) the rounding of sum_j P_ij (~2^-22 with the GPU's exp2, or
a segment merge's order) is no longer multiplied by |cos| ~ 1: at s = 200 with anti-aligned
features the plain sum erred by 3e-3 on the H200, PyTorch's fp32 formula by 1e-4.
    forward KL:  d_ij = P_ij - y_ij / ysum_i
    reverse KL:  d_ij = P_ij (ln P_ij - ln(y_ij / ysum_i + eps) - L_i)
    dS_ij = w_i d_ij + w'_j d'_ij

w_i is the weight the output puts on row i's loss (`row_weights`: grad of the value times the
reduction's coefficient, plus the grad of the row loss; 0 for an invalid row). Then

    dL/dx_hat_i = s sum_j dS_ij y_hat_j,     dL/ds = sum_ij dS_ij cos_ij,
    dL/dx_i = r_i (d - x_hat (x_hat . d))   (F.normalize's backward; r_i d where |x_i| <= eps)

Products: with c_j = 2^-e_j the power of two that scales row j to norm [0.5, 1) (prep.py) and
p_j = r_j / c_j, x' = c x is exact in the input dtype and W_ij = dS_ij p_i p_j gives
sum_j W_ij y'_j = p_i sum_j dS_ij y_hat_j, so dL/dx_i = s c_i (u_i - x_hat_i (x_hat_i . u_i))
with u_i = sum_j W_ij y'_j. For half inputs W is split into hi + lo halves of the input dtype
(two tensor-core products, ~16 bits of W): one rounding of W to a half dtype puts errors of
2^-9 |dS| into every product, more than the gradient's own rounding (SPEC, precision), as
measured in bench/NOTES.md. fp16 W is divided by the largest weight first (its range), then
multiplied by a power of two that its bound leaves room for (`launch.backward.fp16_w_headroom`):
a W below fp16's normal range keeps only an absolute accuracy, and a gradient that the
projection off x_hat leaves small lost it (issue 26: 6.5% of a dg row, where fp32 inputs err 0.7%).

W_FP16 (KernelConfig.w_dtype="fp16", half inputs; `launch.policy.w_dtype_path`): W is rounded
once to fp16, scaled as fp16 W above (gmax, fp16_w_headroom), and the operands x' = c x are
cast to fp16, so each side is one fp16 product with fp32 accumulation instead of two: half the
tensor-core work and half the workspace. The price is one rounding of W, 2^-11 |W|, which the
products carry into the gradient; where the normalisation's projection cancels most of it (a
near-perfect fit) that is several roundings of the gradient itself (SPEC, precision: the
allowance; ../shared/yardsticks/w_rounding.py). x' is exact in fp16 for fp16 inputs; for bf16
inputs |x'| < 1 (rows of norm [0.5, 1)), so the cast cannot overflow, and only entries below
2^-17 (fp16's subnormals) lose bits: an absolute error of at most 2^-25 in a row of norm ~1.
Under the CPU interpreter fp16 is numpy's own float16 (its conversions round to nearest, its
fp16 dot multiplies exactly and accumulates in fp32), so the CPU tests see the GPU's numbers.

Two ways to run the products:
    _fused_grad_kernel   one launch: a program owns BLOCK_M rows of one side, walks every
                         column of the other side, accumulates u in registers (all of D) and
                         writes dL/dx. For small problems (and D up to a few hundred).
    _grad_chunk_kernel   W for the columns of one chunk into a workspace, then cuBLAS
                         products (run by the launch layer, `sdm_triton.launch`, between the
                         launches) and `_input_grad_kernel`: large problems.
"""

import triton
import triton.language as tl

from .prep import NORM_EPS
from .slots import (PRE_C, PRE_NORM, PRE_R, RED_VALID_G2Q, RED_VALID_Q2G, STATE_INV_L, STATE_INV_YSUM, STATE_LN_L,
                    STATE_M)
from .tiles import (FLT_MIN, LN2, LOG2E, NEG_BIG, as_f32, dot_tile, label_tile, load_scale, log2_logits, logit_dot,
                    present, row_ids, split_hi_lo)


@triton.jit
def row_weights(idx, in_range, k, saved_ptr, NDR, dv_ptr, s_dv, drows_ptr, red_ptr, K, coef, cnt_row,
                MEAN: tl.constexpr):
    """(w, 1 / ysum) of softmax rows ``idx`` (direction-row space) of gallery k.

    w = dvalue[k] * coef / (valid count if MEAN) + drows[idx] for valid rows, else 0; the valid
    count is row ``cnt_row`` of ``red`` (RED_VALID_Q2G or RED_VALID_G2Q, the rows' direction).
    ``dv_ptr`` / ``drows_ptr`` None: that output got no gradient. ``s_dv``: dvalue's stride (0 when
    autograd hands over an expanded gradient, as ``losses.sum().backward()`` does for [K] values).
    """
    inv_y = tl.load(saved_ptr + STATE_INV_YSUM * NDR + idx, mask=in_range, other=0.0)
    w = tl.zeros(idx.shape, dtype=tl.float32)
    if dv_ptr is not None:
        c = as_f32(coef) * tl.load(dv_ptr + k * s_dv).to(tl.float32)
        if MEAN:
            c = c / tl.maximum(tl.load(red_ptr + cnt_row * K + k), 1.0)
        w += c
    if drows_ptr is not None:
        w += tl.load(drows_ptr + idx, mask=in_range, other=0.0).to(tl.float32)
    return tl.where(in_range & (inv_y != 0), w, 0.0), inv_y


@triton.jit
def softmax_state(saved_ptr, NDR, idx, in_range):
    """(m, 1 / l, 1 / ysum, ln l) of softmax rows ``idx``, as finish.py saved them."""
    m = tl.load(saved_ptr + STATE_M * NDR + idx, mask=in_range, other=0.0)
    il = tl.load(saved_ptr + STATE_INV_L * NDR + idx, mask=in_range, other=0.0)
    iy = tl.load(saved_ptr + STATE_INV_YSUM * NDR + idx, mask=in_range, other=0.0)
    ll = tl.load(saved_ptr + STATE_LN_L * NDR + idx, mask=in_range, other=0.0)
    return m, il, iy, ll


@triton.jit
def row_losses(rows_ptr, idx, in_range, REVERSE: tl.constexpr):
    """The losses of softmax rows ``idx`` where reverse KL's dS reads them (0 for forward KL)."""
    L = tl.zeros(idx.shape, dtype=tl.float32)
    if REVERSE:
        L = tl.load(rows_ptr + idx, mask=in_range, other=0.0)
    return L


@triton.jit
def scaled_w(dS, pa, rb, cb, inv_gmax):
    """W = dS p_i p_j / gmax on a tile (module doc): ``pa`` = p_i of the rows, p_j = r_j / c_j of
    the columns (``cb`` 1 where a column is absent: its r_j and dS are 0)."""
    return dS * (pa[:, None] * (rb / cb)[None, :]) * inv_gmax


@triton.jit
def ds_tile(t, y, both, m_r, il_r, ll_r, iy_r, w_r, L_r, m_c, il_c, ll_c, iy_c, w_c, L_c, eps, ln_eps,
            REVERSE: tl.constexpr, DENSE: tl.constexpr):
    """(row term, column term) of dS on a tile (module doc; dS = their sum): rows' softmax
    (suffix _r, [BM]) and columns' (_c, [BN]); m: maximum, il = 1 / l, ll = ln l,
    iy = 1 / ysum (0: invalid row), w: weight, L: loss."""
    on_r = both & (iy_r != 0)[:, None]
    on_c = both & (iy_c != 0)[None, :]
    z_r = tl.where(on_r, t - m_r[:, None], 0.0)
    z_c = tl.where(on_c, t - m_c[None, :], 0.0)
    p_r = tl.exp2(z_r) * il_r[:, None]
    p_c = tl.exp2(z_c) * il_c[None, :]
    if REVERSE:
        if DENSE:
            ly_r = tl.log(y * iy_r[:, None] + eps)
            ly_c = tl.log(y * iy_c[None, :] + eps)
        else:   # y in {0, 1}: two values per row
            ly_r = tl.where(y > 0, tl.log(iy_r + eps)[:, None], ln_eps)
            ly_c = tl.where(y > 0, tl.log(iy_c + eps)[None, :], ln_eps)
        d_r = p_r * ((LN2 * z_r - ll_r[:, None]) - ly_r - L_r[:, None])
        d_c = p_c * ((LN2 * z_c - ll_c[None, :]) - ly_c - L_c[None, :])
    else:
        d_r = p_r - y * iy_r[:, None]
        d_c = p_c - y * iy_c[None, :]
    return tl.where(on_r, w_r[:, None] * d_r, 0.0), tl.where(on_c, w_c[None, :] * d_c, 0.0)


@triton.jit
def scale_grad_rows(g_r, g_c, cos, m_r, m_c, inv_s_log2e):
    """Per row: sum_j g_r (cos - a_i) + g_c (cos - b_j), a / b the cosines at the row's and the
    column's maxima (the centred dL/ds of the module doc). A row or column that saw no present
    entry keeps the maximum NEG_BIG (or -inf) and has g = 0: its centre is 0, since NEG_BIG /
    (s log2e) overflows to -inf at s < 0.7 and 0 * inf is NaN."""
    a = tl.where(m_r <= NEG_BIG, 0.0, m_r * inv_s_log2e)
    b = tl.where(m_c <= NEG_BIG, 0.0, m_c * inv_s_log2e)
    return tl.sum(g_r * (cos - a[:, None]) + g_c * (cos - b[None, :]), axis=1)


@triton.jit
def half_operand(x, HALF: tl.constexpr, W_FP16: tl.constexpr, UPCAST: tl.constexpr):
    """A product operand (fp32 ``x``, exact in the input dtype): in the input dtype (fp32 values
    of bf16 in the interpreter), or rounded to fp16 for W_FP16 (module doc: |x| < 1). (One
    return: the compiler requires every return of a function to have one type, constexpr
    branches or not.)"""
    if W_FP16:
        op = x.to(tl.float16)
    elif UPCAST:
        op = x.to(tl.float32)
    else:
        op = x.to(HALF)
    return op


@triton.jit
def accumulate_product(acc, W, b_op, HALF: tl.constexpr, IS_FP32: tl.constexpr, W_FP16: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += W @ b_op: fp32 W as one product (fp32 inputs), W rounded once to fp16 as one
    product with an fp16 ``b_op`` (W_FP16), or hi + lo halves (half inputs)."""
    if IS_FP32:
        acc = tl.dot(W, b_op, acc, input_precision=DOT_PRECISION)
    elif W_FP16:     # the one rounding of W (module doc); fp32 accumulation, in the interpreter too
        acc = tl.dot(W.to(tl.float16), b_op, acc)
    else:
        hi, lo = split_hi_lo(W, HALF, UPCAST)
        if UPCAST:   # interpreter, bf16: the same hi + lo values, as fp32
            acc = tl.dot(hi, b_op, acc, input_precision="ieee")
            acc = tl.dot(lo, b_op, acc, input_precision="ieee")
        else:
            acc = tl.dot(hi, b_op, acc)
            acc = tl.dot(lo, b_op, acc)
    return acc


@triton.jit
def _fused_rows(
    acc, ds_acc, a_ptr, sa_row, sa_d, ra, pa, ai, row_ok,
    b_ptr, sb_row, sb_d, b_msk, b_moff, s_bmsk, b_ids, b_ioff, sb_id, lab, lab_off, sl_row, sl_col,
    pre_ptr, NR, b_pre, saved_ptr, rows_ptr, NDR, a_dir, b_dir,
    dv_ptr, s_dv, drows_ptr, red_ptr, K, k, coef_a, coef_b, cnt_a, cnt_b,
    rows, row_in, n_cols, D, s_log2e, eps, ln_eps, inv_gmax,
    REVERSE: tl.constexpr, DENSE: tl.constexpr, MEAN: tl.constexpr, WANT_DSCALE: tl.constexpr,
    HALF: tl.constexpr, IS_FP32: tl.constexpr, W_FP16: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """acc += sum_j W_ij b'_j over every column of one softmax block (gallery k or the queries).

    S is rebuilt with the forward's own dot (`logit_dot`, the same BLOCK_K steps): P =
    exp2(t - m) / l must see the t its (m, l) came from, bit for bit, for the column's softmax
    too (the forward computed it with the operands swapped). One rounding of difference is
    u |t| in log P (~3e-5 at s = 200), which the cancelling sum of dL/ds showed; at |t| ~ 1e22
    it is inf (issue 26.4)."""
    arow = a_dir + rows
    m_r, il_r, _iy_r, ll_r = softmax_state(saved_ptr, NDR, arow, row_in)          # 1 / ysum: row_weights'
    w_r, iy_r = row_weights(idx=arow, in_range=row_in, k=k, saved_ptr=saved_ptr, NDR=NDR, dv_ptr=dv_ptr, s_dv=s_dv,
                            drows_ptr=drows_ptr, red_ptr=red_ptr, K=K, coef=coef_a, cnt_row=cnt_a, MEAN=MEAN)
    L_r = row_losses(rows_ptr, arow, row_in, REVERSE)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    for n0 in range(0, n_cols, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(INDEX)
        col_in = cols < n_cols
        col_ok = present(b_msk, b_moff, s_bmsk, cols, col_in)
        dot = logit_dot(a_ptr=a_ptr, sa_row=sa_row, sa_d=sa_d, rows=rows, row_in=row_ok,
                        b_ptr=b_ptr, sb_row=sb_row, sb_d=sb_d, cols=cols, col_in=col_ok, D=D,
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION)
        # the columns' features over all of D, for the product; absent columns load as 0 (they may hold NaN)
        b_tile = tl.load(b_ptr + cols[:, None] * sb_row + offs_d[None, :] * sb_d,
                         mask=col_ok[:, None] & d_in[None, :], other=0.0)                    # [BN, BD]
        bcol = b_pre + cols
        rb = tl.load(pre_ptr + PRE_R * NR + bcol, mask=col_ok, other=0.0)
        cb = tl.load(pre_ptr + PRE_C * NR + bcol, mask=col_ok, other=1.0)
        cos, t = log2_logits(dot, ra, rb, s_log2e)
        both = row_ok[:, None] & col_ok[None, :]
        y = label_tile(ai=ai, b_ids=b_ids, b_off=b_ioff, sb_id=sb_id, lab=lab, lab_off=lab_off, sl_row=sl_row,
                       sl_col=sl_col, rows=rows, cols=cols, col_in=col_in, both=both, DENSE=DENSE)
        ccol = b_dir + cols
        m_c, il_c, _iy_c, ll_c = softmax_state(saved_ptr, NDR, ccol, col_in)
        w_c, iy_c = row_weights(idx=ccol, in_range=col_in, k=k, saved_ptr=saved_ptr, NDR=NDR, dv_ptr=dv_ptr, s_dv=s_dv,
                                drows_ptr=drows_ptr, red_ptr=red_ptr, K=K, coef=coef_b, cnt_row=cnt_b, MEAN=MEAN)
        L_c = row_losses(rows_ptr, ccol, col_in, REVERSE)
        g_r, g_c = ds_tile(t=t, y=y, both=both,
                           m_r=m_r, il_r=il_r, ll_r=ll_r, iy_r=iy_r, w_r=w_r, L_r=L_r,
                           m_c=m_c, il_c=il_c, ll_c=ll_c, iy_c=iy_c, w_c=w_c, L_c=L_c,
                           eps=eps, ln_eps=ln_eps, REVERSE=REVERSE, DENSE=DENSE)
        dS = g_r + g_c
        if WANT_DSCALE:
            ds_acc += scale_grad_rows(g_r, g_c, cos, m_r, m_c, 1.0 / s_log2e)
        W = scaled_w(dS, pa, rb, cb, inv_gmax)
        b_op = half_operand(b_tile.to(tl.float32) * cb[:, None], HALF, W_FP16, UPCAST)   # c_j b_j
        acc = accumulate_product(acc, W, b_op, HALF, IS_FP32, W_FP16, UPCAST, DOT_PRECISION)
    return acc, ds_acc


@triton.jit
def input_gradient(u, x, r, c, norm, keep, scale, NORMALIZE: tl.constexpr):
    """dL/dx from u = sum_j W_ij y'_j (module doc): s c (u - x_hat (x_hat . u)), 0 for absent rows."""
    g = u * (scale * c)[:, None]
    if NORMALIZE:
        x_hat = x * r[:, None]
        radial = tl.sum(x_hat * g, axis=1)
        g = tl.where((norm > NORM_EPS)[:, None], g - x_hat * radial[:, None], g)
    return tl.where(keep[:, None], g, 0.0)


@triton.jit
def store_gradient(out_ptr, so_row, so_d, rows, row_in, offs_d, d_in, g, OUT: tl.constexpr):
    """Store in the input dtype, rounded to nearest: a value beyond the dtype's range becomes
    inf, as in PyTorch's own ops, so that a loss scaler (torch.amp.GradScaler) sees the overflow
    and skips the step (saturating at 65504 hid it: issue 23)."""
    tl.store(out_ptr + rows[:, None] * so_row + offs_d[None, :] * so_d, g.to(OUT),
             mask=row_in[:, None] & d_in[None, :])


@triton.jit
def _gallery_weights(k, top, w_ptr, saved_ptr, NDR, dv_ptr, s_dv, drows_ptr, red_ptr, K, N, M, coef_q, coef_g,
                     MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """The weights (`row_weights`) of gallery k's softmax rows (the q rows against it, then its own),
    BLOCK at a time: stored at ``w_ptr`` (None: not stored); returns ``top`` [BLOCK], a running
    max |w|, raised by them."""
    for i0 in range(0, N, BLOCK):
        i = i0 + tl.arange(0, BLOCK).to(tl.int64)
        w, _ = row_weights(idx=k * N + i, in_range=i < N, k=k, saved_ptr=saved_ptr, NDR=NDR, dv_ptr=dv_ptr, s_dv=s_dv,
                           drows_ptr=drows_ptr, red_ptr=red_ptr, K=K, coef=coef_q, cnt_row=RED_VALID_Q2G, MEAN=MEAN)
        if w_ptr is not None:
            tl.store(w_ptr + k * N + i, w, mask=i < N)
        top = tl.maximum(top, tl.abs(w))
    for j0 in range(0, M, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        idx = K * N + k * M + j
        w, _ = row_weights(idx=idx, in_range=j < M, k=k, saved_ptr=saved_ptr, NDR=NDR, dv_ptr=dv_ptr, s_dv=s_dv,
                           drows_ptr=drows_ptr, red_ptr=red_ptr, K=K, coef=coef_g, cnt_row=RED_VALID_G2Q, MEAN=MEAN)
        if w_ptr is not None:
            tl.store(w_ptr + idx, w, mask=j < M)
        top = tl.maximum(top, tl.abs(w))
    return top


@triton.jit
def _max_weight(saved_ptr, NDR, dv_ptr, s_dv, drows_ptr, red_ptr, K, N, M, coef_q, coef_g,
                MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """max |w| over every softmax row (for fp16 workspaces), at least the smallest normal float."""
    top = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, K):
        top = _gallery_weights(k=k, top=top, w_ptr=None, saved_ptr=saved_ptr, NDR=NDR, dv_ptr=dv_ptr, s_dv=s_dv,
                               drows_ptr=drows_ptr, red_ptr=red_ptr, K=K, N=N, M=M, coef_q=coef_q, coef_g=coef_g,
                               MEAN=MEAN, BLOCK=BLOCK)
    return tl.maximum(tl.max(top, axis=0), FLT_MIN)


@triton.jit
def scale_product_bound(pre_ptr, NR, N, BLOCK: tl.constexpr):
    """max_i p_i * max_j p_j / 4 (p = r / c, module doc) over the q samples [0, N) and the gallery
    samples [N, NR): what the bound of fp16 W (`launch.backward.fp16_w_headroom`, which takes
    p_i p_j < 4) is multiplied by where the rows are not normalised. Normalised, p is in [1, 2);
    not normalised, p = 1 / c is the row's norm times a factor in (1, 2], unbounded: rows of norm
    8 overflowed fp16 W, and every gradient was NaN. Absent and zero rows have p ~ 2^-40."""
    top_q = tl.zeros((BLOCK,), dtype=tl.float32)
    top_g = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, NR, BLOCK):
        i = i0 + tl.arange(0, BLOCK).to(tl.int64)
        p = (tl.load(pre_ptr + PRE_R * NR + i, mask=i < NR, other=0.0)
             / tl.load(pre_ptr + PRE_C * NR + i, mask=i < NR, other=1.0))
        top_q = tl.maximum(top_q, tl.where(i < N, p, 0.0))
        top_g = tl.maximum(top_g, tl.where(i >= N, p, 0.0))
    return tl.max(top_q, axis=0) * tl.max(top_g, axis=0) * 0.25


@triton.jit(do_not_specialize=["N", "M", "K", "n_q_programs"])
def _fused_grad_kernel(
    q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d,
    q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
    q_ids, s_qid, g_ids, s_gid_gal, s_gid,
    lab, sl_q, sl_gal, sl_g,
    pre_ptr, saved_ptr, rows_ptr, red_ptr, scale_ptr, dv_ptr, s_dv, drows_ptr,
    dq_ptr, sdq_row, sdq_d, dg_ptr, sdg_row, sdg_d, dscale_ptr,
    N, M, K, n_q_programs, D, scale_value, eps, coef_q, coef_g, w_headroom,
    REVERSE: tl.constexpr, DENSE: tl.constexpr, MEAN: tl.constexpr, NORMALIZE: tl.constexpr,
    WANT_DSCALE: tl.constexpr, SCALE_W: tl.constexpr,
    HALF: tl.constexpr, IS_FP32: tl.constexpr, W_FP16: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Programs [0, n_q_programs): BLOCK_M q rows against every gallery -> dq rows (and the
    dL/ds partial); the rest: BLOCK_M rows of one gallery against the queries -> dg rows.
    ``dg`` is [K * M, D] (contiguous rows per gallery). BLOCK_W: rows per step of the fp16
    scale's walk over every weight (SCALE_W: W goes through fp16, as fp16 hi + lo or W_FP16's
    one fp16 W); ``w_headroom``: launch.backward.fp16_w_headroom."""
    pid = tl.program_id(0)
    NR = N + K * M
    NDR = K * N + K * M
    s = load_scale(scale_ptr, scale_value)
    s_log2e = s * LOG2E
    eps = as_f32(eps)
    ln_eps = tl.log(eps)
    gmax = 1.0
    if SCALE_W:
        gmax = _max_weight(saved_ptr=saved_ptr, NDR=NDR, dv_ptr=dv_ptr, s_dv=s_dv, drows_ptr=drows_ptr,
                           red_ptr=red_ptr, K=K, N=N, M=M, coef_q=coef_q, coef_g=coef_g, MEAN=MEAN, BLOCK=BLOCK_W)
        if not NORMALIZE:
            gmax = gmax * scale_product_bound(pre_ptr, NR, N, BLOCK_W)
        headroom = as_f32(w_headroom)
        gmax = tl.maximum(gmax / headroom, FLT_MIN)
    inv_gmax = 1.0 / gmax
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if pid < n_q_programs:
        rows = (pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)).to(INDEX)
        row_in = rows < N
        row_ok = present(q_msk, 0, s_qmsk, rows, row_in)
        ra = tl.load(pre_ptr + PRE_R * NR + rows, mask=row_in, other=0.0)
        ca = tl.load(pre_ptr + PRE_C * NR + rows, mask=row_in, other=1.0)
        pa = ra / ca
        ai = row_ids(q_ids, 0, s_qid, rows, row_in, DENSE)
        for k in range(0, K):
            acc, ds_acc = _fused_rows(
                acc=acc, ds_acc=ds_acc, a_ptr=q_ptr, sa_row=sq_row, sa_d=sq_d, ra=ra, pa=pa, ai=ai, row_ok=row_ok,
                b_ptr=g_ptr + k * sg_gal, sb_row=sg_row, sb_d=sg_d, b_msk=g_msk, b_moff=k * s_gmsk_gal, s_bmsk=s_gmsk,
                b_ids=g_ids, b_ioff=k * s_gid_gal, sb_id=s_gid,
                lab=lab, lab_off=k * sl_gal, sl_row=sl_q, sl_col=sl_g,
                pre_ptr=pre_ptr, NR=NR, b_pre=N + k * M, saved_ptr=saved_ptr, rows_ptr=rows_ptr, NDR=NDR,
                a_dir=k * N, b_dir=K * N + k * M,
                dv_ptr=dv_ptr, s_dv=s_dv, drows_ptr=drows_ptr, red_ptr=red_ptr, K=K, k=k,
                coef_a=coef_q, coef_b=coef_g, cnt_a=RED_VALID_Q2G, cnt_b=RED_VALID_G2Q,
                rows=rows, row_in=row_in, n_cols=M, D=D, s_log2e=s_log2e, eps=eps, ln_eps=ln_eps, inv_gmax=inv_gmax,
                REVERSE=REVERSE, DENSE=DENSE, MEAN=MEAN, WANT_DSCALE=WANT_DSCALE,
                HALF=HALF, IS_FP32=IS_FP32, W_FP16=W_FP16, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION,
                INDEX=INDEX, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
        norm = tl.load(pre_ptr + PRE_NORM * NR + rows, mask=row_in, other=0.0)
        x = tl.load(q_ptr + rows[:, None] * sq_row + offs_d[None, :] * sq_d,
                    mask=row_ok[:, None] & d_in[None, :], other=0.0).to(tl.float32)
        if dq_ptr is not None:   # None: dq not asked for (these programs ran for dL/ds)
            dx = input_gradient(acc * gmax, x, ra, ca, norm, row_ok, s, NORMALIZE)
            store_gradient(out_ptr=dq_ptr, so_row=sdq_row, so_d=sdq_d, rows=rows, row_in=row_in, offs_d=offs_d,
                           d_in=d_in, g=dx, OUT=dq_ptr.dtype.element_ty)
        if WANT_DSCALE:
            tl.store(dscale_ptr + pid, tl.sum(ds_acc, axis=0))
    else:
        p = pid - n_q_programs
        m_blocks = tl.cdiv(M, BLOCK_M)
        gal = (p // m_blocks).to(tl.int64)
        rows = ((p % m_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)).to(INDEX)
        row_in = rows < M
        row_ok = present(g_msk, gal * s_gmsk_gal, s_gmsk, rows, row_in)
        gk = g_ptr + gal * sg_gal
        srow = N + gal * M + rows
        ra = tl.load(pre_ptr + PRE_R * NR + srow, mask=row_in, other=0.0)
        ca = tl.load(pre_ptr + PRE_C * NR + srow, mask=row_in, other=1.0)
        pa = ra / ca
        ai = row_ids(g_ids, gal * s_gid_gal, s_gid, rows, row_in, DENSE)
        acc, ds_acc = _fused_rows(
            acc=acc, ds_acc=ds_acc, a_ptr=gk, sa_row=sg_row, sa_d=sg_d, ra=ra, pa=pa, ai=ai, row_ok=row_ok,
            b_ptr=q_ptr, sb_row=sq_row, sb_d=sq_d, b_msk=q_msk, b_moff=0, s_bmsk=s_qmsk,
            b_ids=q_ids, b_ioff=0, sb_id=s_qid,
            lab=lab, lab_off=gal * sl_gal, sl_row=sl_g, sl_col=sl_q,
            pre_ptr=pre_ptr, NR=NR, b_pre=0, saved_ptr=saved_ptr, rows_ptr=rows_ptr, NDR=NDR,
            a_dir=K * N + gal * M, b_dir=gal * N,
            dv_ptr=dv_ptr, s_dv=s_dv, drows_ptr=drows_ptr, red_ptr=red_ptr, K=K, k=gal,
            coef_a=coef_g, coef_b=coef_q, cnt_a=RED_VALID_G2Q, cnt_b=RED_VALID_Q2G,
            rows=rows, row_in=row_in, n_cols=N, D=D, s_log2e=s_log2e, eps=eps, ln_eps=ln_eps, inv_gmax=inv_gmax,
            REVERSE=REVERSE, DENSE=DENSE, MEAN=MEAN, WANT_DSCALE=False,
            HALF=HALF, IS_FP32=IS_FP32, W_FP16=W_FP16, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION,
            INDEX=INDEX, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
        norm = tl.load(pre_ptr + PRE_NORM * NR + srow, mask=row_in, other=0.0)
        x = tl.load(gk + rows[:, None] * sg_row + offs_d[None, :] * sg_d,
                    mask=row_ok[:, None] & d_in[None, :], other=0.0).to(tl.float32)
        if dg_ptr is not None:   # None: no gallery programs are launched (this branch must still compile)
            dx = input_gradient(acc * gmax, x, ra, ca, norm, row_ok, s, NORMALIZE)
            store_gradient(out_ptr=dg_ptr + gal * M * sdg_row, so_row=sdg_row, so_d=sdg_d, rows=rows, row_in=row_in,
                           offs_d=offs_d, d_in=d_in, g=dx, OUT=dg_ptr.dtype.element_ty)


# ---------------------------------------------------------------------------------------------
# the chunked path: weights, operands, W chunks, input gradients


@triton.jit(do_not_specialize=["N", "M", "K"])
def _weights_kernel(saved_ptr, dv_ptr, s_dv, drows_ptr, red_ptr, w_ptr, N, M, K, coef_q, coef_g,
                    MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """w[NDR] (`row_weights`) for every softmax row; program k handles gallery k."""
    k = tl.program_id(0).to(tl.int64)
    NDR = K * N + K * M
    _gallery_weights(k=k, top=tl.zeros((BLOCK,), dtype=tl.float32), w_ptr=w_ptr, saved_ptr=saved_ptr, NDR=NDR,
                     dv_ptr=dv_ptr, s_dv=s_dv, drows_ptr=drows_ptr, red_ptr=red_ptr, K=K, N=N, M=M, coef_q=coef_q,
                     coef_g=coef_g, MEAN=MEAN, BLOCK=BLOCK)


@triton.jit(do_not_specialize=["M", "s0", "NR"])
def _operand_kernel(x_ptr, sx_gal, sx_row, sx_d, msk, s_msk_gal, s_msk, pre_ptr, NR, s0, out_ptr,
                    M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """x' = c x in the input dtype (exact), or in fp16 for W_FP16 (module doc), 0 for absent rows:
    the cuBLAS products' operand (its dtype is ``out_ptr``'s).
    Grid (row blocks, galleries) over a [K, M, D] side (K = 1, M = N for q); output [K * M, D]."""
    k = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_in = j < M
    keep = present(msk, k * s_msk_gal, s_msk, j, row_in)
    rows = k * M + j
    c = tl.load(pre_ptr + PRE_C * NR + s0 + rows, mask=row_in, other=0.0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_in = offs_d < D
        x = tl.load(x_ptr + k * sx_gal + j[:, None] * sx_row + offs_d[None, :] * sx_d,
                    mask=keep[:, None] & d_in[None, :], other=0.0)
        y = tl.where(keep[:, None], x.to(tl.float32) * c[:, None], 0.0)
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=row_in[:, None] & d_in[None, :])


@triton.jit(do_not_specialize=["N", "M", "K", "col0", "col1", "k"])
def _grad_chunk_kernel(
    q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d,
    q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
    q_ids, s_qid, g_ids, s_gid_gal, s_gid,
    lab, sl_q, sl_gal, sl_g,
    pre_ptr, saved_ptr, rows_ptr, w_ptr, scale_ptr, gmax_ptr,
    ws_ptr, s_ws_row, dscale_ptr,
    N, M, K, k, col0, col1, D, scale_value, eps,
    REVERSE: tl.constexpr, DENSE: tl.constexpr, WANT_DSCALE: tl.constexpr,
    HALF: tl.constexpr, IS_FP32: tl.constexpr, W_FP16: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """W = dS p_i p_j / gmax for q rows x columns [col0, col1) of gallery k, into the workspace:
    ws[:, 0:w] (hi; W itself for fp32 and, rounded to fp16, for W_FP16) and, for hi + lo only,
    ws[:, w:2w] (lo) with w = col1 - col0; grid (row blocks, column tiles). WANT_DSCALE:
    dscale[tile, row] = sum over the tile of dS cos."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    NR = N + K * M
    NDR = K * N + K * M
    s = load_scale(scale_ptr, scale_value)
    s_log2e = s * LOG2E
    eps = as_f32(eps)
    ln_eps = tl.log(eps)
    inv_gmax = 1.0
    if gmax_ptr is not None:
        inv_gmax = 1.0 / tl.load(gmax_ptr)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(INDEX)
    row_in = rows < N
    cols = (col0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(INDEX)
    col_in = cols < col1
    row_ok = present(q_msk, 0, s_qmsk, rows, row_in)
    col_ok = present(g_msk, k * s_gmsk_gal, s_gmsk, cols, col_in)
    gk = g_ptr + k * sg_gal
    # q rows as the A operand: `logit_dot`'s orientation (the forward's t, bit for bit)
    dot = dot_tile(a_ptr=q_ptr, sa_row=sq_row, sa_d=sq_d, rows=rows, row_in=row_ok,
                   b_ptr=gk, sb_row=sg_row, sb_d=sg_d, cols=cols, col_in=col_ok, D=D,
                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION)
    ra = tl.load(pre_ptr + PRE_R * NR + rows, mask=row_in, other=0.0)
    ca = tl.load(pre_ptr + PRE_C * NR + rows, mask=row_in, other=1.0)
    bcol = N + k * M + cols
    rb = tl.load(pre_ptr + PRE_R * NR + bcol, mask=col_ok, other=0.0)
    cb = tl.load(pre_ptr + PRE_C * NR + bcol, mask=col_ok, other=1.0)
    cos, t = log2_logits(dot, ra, rb, s_log2e)
    both = row_ok[:, None] & col_ok[None, :]
    ai = row_ids(q_ids, 0, s_qid, rows, row_in, DENSE)
    y = label_tile(ai=ai, b_ids=g_ids, b_off=k * s_gid_gal, sb_id=s_gid, lab=lab, lab_off=k * sl_gal, sl_row=sl_q,
                   sl_col=sl_g, rows=rows, cols=cols, col_in=col_in, both=both, DENSE=DENSE)
    arow = k * N + rows
    ccol = K * N + k * M + cols
    m_r, il_r, iy_r, ll_r = softmax_state(saved_ptr, NDR, arow, row_in)
    w_r = tl.load(w_ptr + arow, mask=row_in, other=0.0)
    m_c, il_c, iy_c, ll_c = softmax_state(saved_ptr, NDR, ccol, col_in)
    w_c = tl.load(w_ptr + ccol, mask=col_in, other=0.0)
    L_r = row_losses(rows_ptr, arow, row_in, REVERSE)
    L_c = row_losses(rows_ptr, ccol, col_in, REVERSE)
    g_r, g_c = ds_tile(t=t, y=y, both=both,
                       m_r=m_r, il_r=il_r, ll_r=ll_r, iy_r=iy_r, w_r=w_r, L_r=L_r,
                       m_c=m_c, il_c=il_c, ll_c=ll_c, iy_c=iy_c, w_c=w_c, L_c=L_c,
                       eps=eps, ln_eps=ln_eps, REVERSE=REVERSE, DENSE=DENSE)
    dS = g_r + g_c
    if WANT_DSCALE:
        tl.store(dscale_ptr + pid_n * N + rows, scale_grad_rows(g_r, g_c, cos, m_r, m_c, 1.0 / s_log2e), mask=row_in)
    W = scaled_w(dS, ra / ca, rb, cb, inv_gmax)
    width = col1 - col0
    offs = rows[:, None] * s_ws_row + (cols - col0)[None, :]
    tile_in = row_in[:, None] & col_in[None, :]
    if IS_FP32:
        tl.store(ws_ptr + offs, W, mask=tile_in)
    elif W_FP16:     # the one rounding of W (module doc): an fp16 workspace, one product per side
        tl.store(ws_ptr + offs, W.to(tl.float16), mask=tile_in)
    else:
        hi, lo = split_hi_lo(W, HALF, UPCAST)
        tl.store(ws_ptr + offs, hi.to(HALF), mask=tile_in)
        tl.store(ws_ptr + offs + width, lo.to(HALF), mask=tile_in)


@triton.jit(do_not_specialize=["n_rows", "M", "s0", "r0", "gal", "NR"])
def _input_grad_kernel(u_ptr, su_row, u2_ptr, x_ptr, sx_gal, sx_row, sx_d, msk, s_msk_gal, s_msk,
                       pre_ptr, NR, s0, gal, r0, scale_ptr, scale_value, gmax_ptr, out_ptr, so_row, so_d,
                       n_rows, M, D, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/dx for rows r0 .. r0 + n_rows of gallery ``gal`` (rows j of a [K, M, D] side; K = 1 and
    M = N for q) from u (+ u2: the lo half's product; None where W is one product) =
    sum_j W_ij y'_j, whose rows start at r0 (`input_gradient`, in two sweeps over D: the radial
    part first)."""
    k = tl.cast(gal, tl.int64)
    loc = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_in = loc < n_rows
    j = r0 + loc
    keep = present(msk, k * s_msk_gal, s_msk, j, row_in)
    s = load_scale(scale_ptr, scale_value)
    gmax = 1.0
    if gmax_ptr is not None:
        gmax = tl.load(gmax_ptr)
    srow = s0 + k * M + j
    r = tl.load(pre_ptr + PRE_R * NR + srow, mask=row_in, other=0.0)
    c = tl.load(pre_ptr + PRE_C * NR + srow, mask=row_in, other=0.0)
    norm = tl.load(pre_ptr + PRE_NORM * NR + srow, mask=row_in, other=0.0)
    factor = s * c * gmax
    radial = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if NORMALIZE:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            both = keep[:, None] & (offs_d < D)[None, :]
            u = tl.load(u_ptr + loc[:, None] * su_row + offs_d[None, :], mask=both, other=0.0)
            if u2_ptr is not None:
                u += tl.load(u2_ptr + loc[:, None] * su_row + offs_d[None, :], mask=both, other=0.0)
            x = tl.load(x_ptr + k * sx_gal + j[:, None] * sx_row + offs_d[None, :] * sx_d,
                        mask=both, other=0.0).to(tl.float32)
            radial += tl.sum(x * u, axis=1)
        radial = tl.where(norm > NORM_EPS, radial * r * r, 0.0)          # (x_hat . u) per unit of x_hat
    out_row = (k * M + j) * so_row
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_in = offs_d < D
        both = keep[:, None] & d_in[None, :]
        u = tl.load(u_ptr + loc[:, None] * su_row + offs_d[None, :], mask=both, other=0.0)
        if u2_ptr is not None:
            u += tl.load(u2_ptr + loc[:, None] * su_row + offs_d[None, :], mask=both, other=0.0)
        g = u
        if NORMALIZE:
            x = tl.load(x_ptr + k * sx_gal + j[:, None] * sx_row + offs_d[None, :] * sx_d,
                        mask=both, other=0.0).to(tl.float32)
            g = u - x * radial[:, None]
        g = tl.where(keep[:, None], g * factor[:, None], 0.0)
        tl.store(out_ptr + out_row[:, None] + offs_d[None, :] * so_d, g.to(out_ptr.dtype.element_ty),
                 mask=row_in[:, None] & d_in[None, :])
