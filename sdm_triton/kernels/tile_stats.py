"""Forward: per-tile partial statistics of both softmax directions.

Math (SPEC.md). For a tile of rows i (side a, e.g. queries) and columns j (side b):

    S_ij = s * ra_i * rb_j * <a_i, b_j>          fp32 accumulation of the raw inputs;
                                                 ra, rb = inverse norms (1 when not normalising)
    y_ij = [a_ids_i == b_ids_j]  or labels[i, j] zero unless both i and j are valid samples
    Y_ij = y_ij * inv_ysum_a_i  (row direction),  Y'_ij = y_ij * inv_ysum_b_j  (column direction)

Row direction, over the valid columns of the tile, relative to the tile row max m:

    m      = max_j S_ij
    l      = sum_j exp(S_ij - m)
    pos    = sum_{j: y_ij > 0} exp(S_ij - m)                      (positive mass, for statistics)
    forward KL:  A = sum_j Y_ij (S_ij - m),        B = sum_j Y_ij
    reverse KL:  A = sum_j exp(S_ij - m)(S_ij - m), B = sum_j exp(S_ij - m) log(Y_ij + eps)

The column direction is the same along axis 0 with Y'. Keeping A relative to m
avoids the cancellation of LSE - sum Y S; `sdm_triton/_stats.py` merges the
partials of all tiles and turns them into row losses.

One program handles one [BLOCK_M, BLOCK_N] tile and writes only 5 numbers per
(row, column block) and per (column, row block) of a bounded column chunk. The
raw dot products <a_i, b_j> of the tile come from one of two places (a constexpr):

    FUSED_DOT = False  read from a [N, C] fp32 chunk that cuBLAS computed (fp32
                       accumulation of the raw half inputs, exact products);
    FUSED_DOT = True   computed in the kernel with tl.dot, looping over D (no
                       chunk in memory; slower at D = 512, see bench/NOTES.md).
"""

import triton
import triton.language as tl

# Finite stand-in for -inf: keeps (S - m) and 0 * (S - m) free of NaN for masked entries.
NEG_BIG = tl.constexpr(-1.0e30)
NUM_STATS = 5  # m, l, pos, A, B


@triton.jit
def _load_row_tile(a_ptr, offs_m, row_in, D, stride_am, stride_ad, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """The rows' features over all of D (BLOCK_K >= D): loaded once per program when ONE_K."""
    offs_k = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ad,
                mask=row_in[:, None] & (offs_k < D)[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    return a


@triton.jit
def _similarity_tile(
    a_ptr, b_ptr, dot_ptr, ra_ptr, rb_ptr, scale_ptr, a_rows,
    offs_m, offs_n, row_in, col_in, col_start, D,
    stride_am, stride_ad, stride_bm, stride_bd, stride_dotm, stride_dotn,
    FUSED_DOT: tl.constexpr, ONE_K: tl.constexpr,
    IS_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Return (S, cos) for the tile: S = s * cos, cos = ra * rb * <a, b> (fp32 [BLOCK_M, BLOCK_N]).

    ONE_K (BLOCK_K >= D): ``a_rows`` holds the rows' features (`_load_row_tile`), loaded once
    by a program that visits many column tiles, and the dot is one tl.dot over all of D;
    otherwise ``a_rows`` is unused and the dot loops over D in BLOCK_K steps.
    """
    if FUSED_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ONE_K:
            b = _load_row_tile(b_ptr, offs_n, col_in, D, stride_bm, stride_bd, UPCAST, BLOCK_K)
            if IS_FP32 or UPCAST:
                acc = tl.dot(a_rows, tl.trans(b), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(a_rows, tl.trans(b), acc)
        else:
            for k0 in range(0, D, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_in = offs_k < D
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ad,
                            mask=row_in[:, None] & k_in[None, :], other=0.0)       # [BLOCK_M, BLOCK_K]
                b = tl.load(b_ptr + offs_n[:, None] * stride_bm + offs_k[None, :] * stride_bd,
                            mask=col_in[:, None] & k_in[None, :], other=0.0)       # [BLOCK_N, BLOCK_K]
                if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if IS_FP32 or UPCAST:
                    acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
                else:
                    acc = tl.dot(a, tl.trans(b), acc)
    else:
        acc = tl.load(dot_ptr + offs_m[:, None] * stride_dotm + (offs_n - col_start)[None, :] * stride_dotn,
                      mask=row_in[:, None] & col_in[None, :], other=0.0)
    ra = tl.load(ra_ptr + offs_m, mask=row_in, other=0.0)
    rb = tl.load(rb_ptr + offs_n, mask=col_in, other=0.0)
    s = tl.load(scale_ptr).to(tl.float32)
    # ra * rb first: the product commutes exactly, so the two-pass statistics (which build
    # this tile transposed, rows and columns swapped) get bit-identical S to the backward's.
    # The backward's P = exp(S - lse) must see the S its lse was computed from: where one
    # column dominates, P - Y is smaller than one rounding of S.
    cos = acc * (ra[:, None] * rb[None, :])
    return cos * s, cos


@triton.jit
def _label_tile(
    a_ids_ptr, b_ids_ptr, labels_ptr, stride_lm, stride_ln,
    offs_m, offs_n, row_in, col_in, both,
    DENSE: tl.constexpr,
):
    """y_ij as fp32, zero outside the valid (row, column) pairs."""
    if DENSE:
        y = tl.load(labels_ptr + offs_m[:, None] * stride_lm + offs_n[None, :] * stride_ln,
                    mask=both, other=0).to(tl.float32)
    else:
        ai = tl.load(a_ids_ptr + offs_m, mask=row_in, other=0)
        bi = tl.load(b_ids_ptr + offs_n, mask=col_in, other=0)
        y = (ai[:, None] == bi[None, :]).to(tl.float32)
    return tl.where(both, y, 0.0)


# Sizes change from batch to batch (last batch, chunk bounds): no divisibility
# specialisation on them, or every new size would compile a new kernel.
@triton.jit(do_not_specialize=["N", "col_start", "col_end"])
def _sdm_tile_stats_kernel(
    a_ptr, b_ptr, dot_ptr, ra_ptr, rb_ptr, scale_ptr,
    a_ids_ptr, b_ids_ptr, labels_ptr,
    a_valid_ptr, b_valid_ptr, a_inv_ysum_ptr, b_inv_ysum_ptr,
    row_part_ptr, col_part_ptr,
    N, col_start, col_end, D,
    stride_am, stride_ad, stride_bm, stride_bd, stride_dotm, stride_dotn, stride_lm, stride_ln,
    stride_rp_stat, stride_rp_blk, stride_cp_stat, stride_cp_blk,
    eps,
    DENSE: tl.constexpr, REVERSE: tl.constexpr, FUSED_DOT: tl.constexpr,
    IS_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)  # 64-bit: N*D and N*M may pass 2^31
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col_start + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = offs_m < N
    col_in = offs_n < col_end

    S, cos = _similarity_tile(a_ptr, b_ptr, dot_ptr, ra_ptr, rb_ptr, scale_ptr, 0.0, offs_m, offs_n, row_in,
                              col_in, col_start, D, stride_am, stride_ad, stride_bm, stride_bd, stride_dotm,
                              stride_dotn, FUSED_DOT, False, IS_FP32, DOT_PRECISION, UPCAST,
                              BLOCK_M, BLOCK_N, BLOCK_K)
    rv = row_in & (tl.load(a_valid_ptr + offs_m, mask=row_in, other=0) != 0)   # [BLOCK_M]
    cv = col_in & (tl.load(b_valid_ptr + offs_n, mask=col_in, other=0) != 0)   # [BLOCK_N]
    both = rv[:, None] & cv[None, :]
    y = _label_tile(a_ids_ptr, b_ids_ptr, labels_ptr, stride_lm, stride_ln,
                    offs_m, offs_n, row_in, col_in, both, DENSE)              # [BLOCK_M, BLOCK_N]
    inv_ya = tl.load(a_inv_ysum_ptr + offs_m, mask=row_in, other=0.0)
    inv_yb = tl.load(b_inv_ysum_ptr + offs_n, mask=col_in, other=0.0)

    # ---- row direction: softmax over the tile's valid columns
    S_r = tl.where(cv[None, :], S, NEG_BIG)
    m_r = tl.max(S_r, axis=1)                                                 # [BLOCK_M]
    dev_r = S_r - m_r[:, None]                                                # <= 0, finite
    p_r = tl.where(cv[None, :], tl.exp(dev_r), 0.0)
    Y_r = y * inv_ya[:, None]
    l_r = tl.sum(p_r, axis=1)
    pos_r = tl.sum(tl.where(y > 0, p_r, 0.0), axis=1)
    if REVERSE:
        A_r = tl.sum(p_r * dev_r, axis=1)
        B_r = tl.sum(p_r * tl.log(Y_r + eps), axis=1)
    else:
        A_r = tl.sum(Y_r * dev_r, axis=1)
        B_r = tl.sum(Y_r, axis=1)

    # ---- column direction: softmax over the tile's valid rows
    S_c = tl.where(rv[:, None], S, NEG_BIG)
    m_c = tl.max(S_c, axis=0)                                                 # [BLOCK_N]
    dev_c = S_c - m_c[None, :]
    p_c = tl.where(rv[:, None], tl.exp(dev_c), 0.0)
    Y_c = y * inv_yb[None, :]
    l_c = tl.sum(p_c, axis=0)
    pos_c = tl.sum(tl.where(y > 0, p_c, 0.0), axis=0)
    if REVERSE:
        A_c = tl.sum(p_c * dev_c, axis=0)
        B_c = tl.sum(p_c * tl.log(Y_c + eps), axis=0)
    else:
        A_c = tl.sum(Y_c * dev_c, axis=0)
        B_c = tl.sum(Y_c, axis=0)

    rp = row_part_ptr + pid_n * stride_rp_blk + offs_m
    tl.store(rp, m_r, mask=row_in)
    tl.store(rp + stride_rp_stat, l_r, mask=row_in)
    tl.store(rp + 2 * stride_rp_stat, pos_r, mask=row_in)
    tl.store(rp + 3 * stride_rp_stat, A_r, mask=row_in)
    tl.store(rp + 4 * stride_rp_stat, B_r, mask=row_in)
    cp = col_part_ptr + pid_m * stride_cp_blk + (offs_n - col_start)
    tl.store(cp, m_c, mask=col_in)
    tl.store(cp + stride_cp_stat, l_c, mask=col_in)
    tl.store(cp + 2 * stride_cp_stat, pos_c, mask=col_in)
    tl.store(cp + 3 * stride_cp_stat, A_c, mask=col_in)
    tl.store(cp + 4 * stride_cp_stat, B_c, mask=col_in)
