"""Forward, two-pass variant: the statistics of ONE softmax direction, rows against a column range.

The same five statistics as `tile_stats.py` (m, l, pos, A, B; see there and
`sdm_triton/stats.py`), but each program owns BLOCK_M rows and loops over the
columns [seg_start, seg_end) itself, merging each [BLOCK_M, BLOCK_N] tile into
running statistics held in registers (online softmax, as FlashAttention does for
its row max and sum):

    m' = max(m, max_j S_ij),  shift = m - m',  alpha = exp(shift)
    l'   = alpha l + sum_j exp(S_ij - m')            pos' likewise over the positives
    forward KL:  A' = A + shift B + sum_j Y_ij (S_ij - m'),           B' = B + sum_j Y_ij
    reverse KL:  A' = alpha (A + shift l) + sum_j p_ij (S_ij - m'),  B' = alpha B + sum_j p_ij log(Y_ij + eps)

The launcher runs it twice, rows = queries against the gallery and rows = gallery
against the queries (swapped operands, transposed dense labels), so every
reduction is along axis 1 (inside a warp for the MMA layout) and the epilogue holds
one direction's temporaries, not two. The price is a second S product; the one-pass
kernel's two-direction epilogue (cross-warp column reductions, twice the live
[BLOCK_M, BLOCK_N] tensors, partials of every tile) cost more than that on an H100
(bench/NOTES.md §8). Rows are split into segments of columns only to fill the GPU
when there are few row blocks; the segments' statistics merge with `merge_stats.py`.

Galleries. The column range may be the concatenation of several galleries of
``gal_cols`` columns each (K galleries against one anchor, `sdm_loss_multi`): a row's
softmax then runs over each gallery separately. Program (i, s) handles gallery
k = s // subs, segment s % subs of it, reads the row label masses of gallery k
(``a_inv_ysum`` [K, rows], stride ``stride_ya_gal``) and writes statistics [k, row].
With one gallery (``gal_cols`` >= the range) this is the plain segmented pass.
"""

import triton
import triton.language as tl

from .tile_stats import NEG_BIG, _label_tile, _load_row_tile, _similarity_tile


# Sizes change from batch to batch: no divisibility specialisation on them, or every
# new size would compile a new kernel.
@triton.jit(do_not_specialize=["row_start", "row_end", "col_start", "col_end", "gal_cols", "seg_cols", "subs"])
def _sdm_direction_stats_kernel(
    a_ptr, b_ptr, ra_ptr, rb_ptr, scale_ptr,
    a_ids_ptr, b_ids_ptr, labels_ptr,
    a_valid_ptr, b_valid_ptr, a_inv_ysum_ptr,
    out_ptr,
    row_start, row_end, col_start, col_end, gal_cols, seg_cols, subs, D,
    stride_am, stride_ad, stride_bm, stride_bd, stride_lm, stride_ln, stride_ya_gal,
    stride_out_stat, stride_out_seg, stride_out_gal,
    eps,
    DENSE: tl.constexpr, REVERSE: tl.constexpr,
    ONE_K: tl.constexpr, LOOP_FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, IS_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)   # 64-bit: N*D and N*M may pass 2^31
    pid_s = tl.program_id(1).to(tl.int64)
    gal = pid_s // subs
    offs_m = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < row_end
    rv = row_in & (tl.load(a_valid_ptr + offs_m, mask=row_in, other=0) != 0)
    inv_ya = tl.load(a_inv_ysum_ptr + gal * stride_ya_gal + offs_m, mask=row_in, other=0.0)
    gal_start = col_start + gal * gal_cols
    seg_start = gal_start + (pid_s % subs) * seg_cols
    seg_end = tl.minimum(tl.minimum(seg_start + seg_cols, gal_start + gal_cols), col_end)

    a_rows = 0.0
    if ONE_K:   # the rows' features stay on chip for the whole column loop
        a_rows = _load_row_tile(a_ptr, offs_m, row_in, D, stride_am, stride_ad, UPCAST, BLOCK_K)
    m = tl.full((BLOCK_M,), NEG_BIG, dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    A = tl.zeros((BLOCK_M,), dtype=tl.float32)
    B = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # LOOP_FLATTEN / WARP_SPECIALIZE: Triton's loop-nest flattening (one software pipeline
    # across the column and D loops) and automatic warp specialisation (loads, MMA and the
    # epilogue in separate warps), as variants (launch.TileConfig)
    for n0 in tl.range(seg_start, seg_end, BLOCK_N, flatten=LOOP_FLATTEN, warp_specialize=WARP_SPECIALIZE):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_in = offs_n < seg_end
        S, _ = _similarity_tile(a_ptr, b_ptr, a_ptr, ra_ptr, rb_ptr, scale_ptr, a_rows, offs_m, offs_n, row_in,
                                col_in, 0, D, stride_am, stride_ad, stride_bm, stride_bd, 0, 0,
                                True, ONE_K, IS_FP32, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        cv = col_in & (tl.load(b_valid_ptr + offs_n, mask=col_in, other=0) != 0)
        both = rv[:, None] & cv[None, :]
        y = _label_tile(a_ids_ptr, b_ids_ptr, labels_ptr, stride_lm, stride_ln,
                        offs_m, offs_n, row_in, col_in, both, DENSE)
        S = tl.where(cv[None, :], S, NEG_BIG)
        m_new = tl.maximum(m, tl.max(S, axis=1))
        shift = m - m_new                                  # <= 0; 0 while the row has seen no column
        alpha = tl.exp(shift)
        dev = S - m_new[:, None]                           # <= 0, finite
        p = tl.where(cv[None, :], tl.exp(dev), 0.0)
        Y = y * inv_ya[:, None]
        pos = pos * alpha + tl.sum(tl.where(y > 0, p, 0.0), axis=1)
        if REVERSE:
            A = alpha * (A + shift * l) + tl.sum(p * dev, axis=1)
            B = alpha * B + tl.sum(p * tl.log(Y + eps), axis=1)
        else:
            A = A + shift * B + tl.sum(Y * dev, axis=1)
            B = B + tl.sum(Y, axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new

    out = out_ptr + (pid_s % subs) * stride_out_seg + gal * stride_out_gal + (offs_m - row_start)
    tl.store(out, m, mask=row_in)
    tl.store(out + stride_out_stat, l, mask=row_in)
    tl.store(out + 2 * stride_out_stat, pos, mask=row_in)
    tl.store(out + 3 * stride_out_stat, A, mask=row_in)
    tl.store(out + 4 * stride_out_stat, B, mask=row_in)
