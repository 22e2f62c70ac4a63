"""Backward: dL/dS for one column chunk, both directions at once.

For row i (side a) and column j (side b), with the saved log-sum-exps and row losses:

    P_ij  = exp(S_ij - lse_a_i),   Y_ij  = y_ij * inv_ysum_a_i
    P'_ij = exp(S_ij - lse_b_j),   Y'_ij = y_ij * inv_ysum_b_j
    forward KL:  d_r = P - Y,                           d_c = P' - Y'
    reverse KL:  d_r = P (log P - log(Y + eps) - L_a_i), d_c likewise with L_b_j
    dS_ij = ga_i * d_r + gb_j * d_c           (ga, gb: upstream gradients of the row losses,
                                               zero for invalid rows, pre-divided by g_max)

Each program owns BLOCK_M rows and a group of column tiles (with ONE_K the rows' features
stay on chip across the group), rebuilds each S tile (tl.dot over the raw inputs when
FUSED_DOT, else from the cuBLAS dot chunk) and writes W_ij = dS_ij * pa_i * pb_j to the chunk workspace. The
launcher's products use x' = x * 2^-e (the raw features scaled by a power of two per row,
exact in the input dtype) and p = inv_norm * 2^e in (1, 2] (prepare.product_operand), so
that x_hat = p * x' exactly: W @ b' = pa * dL/da_hat, with no normalised copy rounded to
half precision, no split of the features, and dS <= W <= 4 dS (scaling by the inverse
norms themselves would push small entries of dS into fp32's subnormal range, where the
property tests' floors caught it).

lse arrives as hi + lo pairs in fp32 (stats.split_lse): S - hi - lo keeps the
log-probability of the best column exact where P ~ 1 and P - Y is tiny, which one fp32
lse (m + log l rounded) lost. For half inputs W is stored as hi + lo halves of the input
dtype, so the products keep about 16 bits of dS instead of 8 (11 + 11 for fp16):
rounding dS alone lost the small tangential gradients when the normalisation backward
cancels the radial part (found by the property tests at s = 200). Dividing ga, gb by
their largest magnitude keeps dS in [-O(1), O(1)], safe for an fp16 workspace. With
WANT_DSCALE, each program also writes sum_j dS_ij * cos_ij for the gradient of the logit
scale.

Galleries (as in `direction_stats.py`): the columns may be K galleries of ``gal_cols``
columns, each with its own row softmax; the row side's per-gallery vectors (inv_ysum,
lse, loss, upstream gradient) are [K, N] with stride ``stride_a_gal``. Programs along
axis 1 own a group of column tiles inside ONE gallery: the chunk's piece of gallery
k = col_start // gal_cols + pid // subs, group pid % subs of it. One gallery:
``gal_cols`` >= col_end, and the groups simply tile the chunk.
"""

import triton
import triton.language as tl

from .tile_stats import _label_tile, _load_row_tile, _similarity_tile


# Sizes change from batch to batch (last batch, chunk bounds): no divisibility
# specialisation on them, or every new size would compile a new kernel.
@triton.jit(do_not_specialize=["N", "col_start", "col_end", "gal_cols", "group_cols", "subs"])
def _sdm_tile_grad_kernel(
    a_ptr, b_ptr, dot_ptr, ra_ptr, rb_ptr, scale_ptr, pa_ptr, pb_ptr,
    a_ids_ptr, b_ids_ptr, labels_ptr,
    a_valid_ptr, b_valid_ptr, a_inv_ysum_ptr, b_inv_ysum_ptr,
    lse_a_ptr, lse_a_lo_ptr, lse_b_ptr, lse_b_lo_ptr, loss_a_ptr, loss_b_ptr, ga_ptr, gb_ptr,
    ds_ptr, ds_lo_ptr, dscale_part_ptr,
    N, col_start, col_end, gal_cols, group_cols, subs, D,
    stride_am, stride_ad, stride_bm, stride_bd, stride_dotm, stride_dotn, stride_lm, stride_ln, stride_a_gal,
    stride_dsm, stride_dsn, stride_dscale_blk,
    eps,
    DENSE: tl.constexpr, REVERSE: tl.constexpr, FUSED_DOT: tl.constexpr, ONE_K: tl.constexpr,
    WANT_DSCALE: tl.constexpr, SPLIT: tl.constexpr,
    IS_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_M rows against the column tiles of one group (see the module doc)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    gal = col_start // gal_cols + pid_n // subs
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ga = gal * stride_a_gal + offs_m     # the row side's per-gallery vectors
    row_in = offs_m < N
    rv = row_in & (tl.load(a_valid_ptr + offs_m, mask=row_in, other=0) != 0)
    inv_ya = tl.load(a_inv_ysum_ptr + offs_ga, mask=row_in, other=0.0)
    lse_a = tl.load(lse_a_ptr + offs_ga, mask=row_in, other=0.0)
    lse_a_lo = tl.load(lse_a_lo_ptr + offs_ga, mask=row_in, other=0.0)
    ga = tl.load(ga_ptr + offs_ga, mask=row_in, other=0.0)
    pa = tl.load(pa_ptr + offs_m, mask=row_in, other=0.0)
    if REVERSE:
        loss_a = tl.load(loss_a_ptr + offs_ga, mask=row_in, other=0.0)
    a_rows = 0.0
    if ONE_K:   # the rows' features stay on chip for the whole column loop
        a_rows = _load_row_tile(a_ptr, offs_m, row_in, D, stride_am, stride_ad, UPCAST, BLOCK_K)
    dscale_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    seg_start = tl.maximum(col_start, gal * gal_cols)      # this chunk's piece of gallery gal
    seg_end = tl.minimum(col_end, (gal + 1) * gal_cols)
    group_start = seg_start + (pid_n % subs) * group_cols
    group_end = tl.minimum(group_start + group_cols, seg_end)
    for n0 in range(group_start, group_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_in = offs_n < group_end
        S, cos = _similarity_tile(a_ptr, b_ptr, dot_ptr, ra_ptr, rb_ptr, scale_ptr, a_rows, offs_m, offs_n,
                                  row_in, col_in, col_start, D, stride_am, stride_ad, stride_bm, stride_bd,
                                  stride_dotm, stride_dotn, FUSED_DOT, ONE_K, IS_FP32, DOT_PRECISION, UPCAST,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
        cv = col_in & (tl.load(b_valid_ptr + offs_n, mask=col_in, other=0) != 0)
        both = rv[:, None] & cv[None, :]
        y = _label_tile(a_ids_ptr, b_ids_ptr, labels_ptr, stride_lm, stride_ln,
                        offs_m, offs_n, row_in, col_in, both, DENSE)
        inv_yb = tl.load(b_inv_ysum_ptr + offs_n, mask=col_in, other=0.0)
        lse_b = tl.load(lse_b_ptr + offs_n, mask=col_in, other=0.0)
        lse_b_lo = tl.load(lse_b_lo_ptr + offs_n, mask=col_in, other=0.0)
        gb = tl.load(gb_ptr + offs_n, mask=col_in, other=0.0)
        # A row contributes only if it is a valid row of its direction (inv_ysum > 0);
        # for the others lse may be meaningless, so gate with where, never multiply by 0.
        on_r = both & (inv_ya > 0)[:, None]
        on_c = both & (inv_yb > 0)[None, :]

        # S - lse_hi is exact near the row's maximum (Sterbenz), then the small lse_lo
        logp_r = (S - lse_a[:, None]) - lse_a_lo[:, None]
        p_r = tl.exp(tl.where(on_r, logp_r, 0.0))
        Y_r = y * inv_ya[:, None]
        logp_c = (S - lse_b[None, :]) - lse_b_lo[None, :]
        p_c = tl.exp(tl.where(on_c, logp_c, 0.0))
        Y_c = y * inv_yb[None, :]
        if REVERSE:
            loss_b = tl.load(loss_b_ptr + offs_n, mask=col_in, other=0.0)
            d_r = p_r * (logp_r - tl.log(Y_r + eps) - loss_a[:, None])
            d_c = p_c * (logp_c - tl.log(Y_c + eps) - loss_b[None, :])
        else:
            d_r = p_r - Y_r
            d_c = p_c - Y_c
        dS = tl.where(on_r, ga[:, None] * d_r, 0.0) + tl.where(on_c, gb[None, :] * d_c, 0.0)

        pb = tl.load(pb_ptr + offs_n, mask=col_in, other=0.0)
        W = dS * (pa[:, None] * pb[None, :])

        tile_in = row_in[:, None] & col_in[None, :]
        ds_offs = offs_m[:, None] * stride_dsm + (offs_n - col_start)[None, :] * stride_dsn
        if SPLIT:  # W = hi + lo, two halves of the input dtype: ~16 bits of W instead of 8
            if ds_ptr.dtype.element_ty == tl.bfloat16:
                # hi = W with the low 16 mantissa bits cleared: exact in bf16 (and no bf16 -> fp32
                # conversion, which the CPU interpreter gets wrong)
                hi32 = (W.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
            else:
                hi32 = W.to(ds_ptr.dtype.element_ty).to(tl.float32)
            tl.store(ds_ptr + ds_offs, hi32.to(ds_ptr.dtype.element_ty), mask=tile_in)
            tl.store(ds_lo_ptr + ds_offs, (W - hi32).to(ds_lo_ptr.dtype.element_ty), mask=tile_in)
        else:
            tl.store(ds_ptr + ds_offs, W.to(ds_ptr.dtype.element_ty), mask=tile_in)
        if WANT_DSCALE:
            dscale_acc += tl.sum(dS * cos, axis=1)
    if WANT_DSCALE:
        tl.store(dscale_part_ptr + pid_n * stride_dscale_blk + offs_m, dscale_acc, mask=row_in)
