"""The positives' softmax mass of identity-labelled rows, by a gather over each row's positives
(issue 27): what reverse KL's loss and the statistics need of the labels, outside the N x M loop.

With identity labels, a softmax row i's positives are the present columns of its identity. The
launcher (`launch/positives.py`) sorts the column side's ids once and gives each row the range
[lo_i, hi_i) of its identity in that order (``perm`` maps a sorted position to its column). A
program owns BLOCK_M rows; it walks their ranges together, one positive of each row per step,
and adds 2^(t_ij - M_i) with

    t_ij = <a_i, b_j> (r_i r_j) s log2 e       (as `tiles.log2_logits` forms it, rounded once)
    M_i  = max_s m_s                           (the statistics' row maxima over the row's segments)

Finish merges a row's segments as neg = sum_s 2^(m_s - M) neg_s (`finish.py`), the negatives'
mass; without ``LOOP_IDS`` the statistics pass wrote each segment's whole l there, and the sum of
the positives comes off the segment s* whose maximum is M (2^0 = 1, no overflow whatever the
spread of the segments). (So neg = l - pos here: where the positives hold almost all of a row's
mass, the centroids path keeps less of the negatives' than the in-loop compare, bench/NOTES.md 37.)

t must be the statistics loop's bit for bit: at a near-perfect fit a row's positive is its
maximum, P = 2^(t - M) = 1, and reverse KL's loss carries pos ln eps: a t one rounding off
(u |t|) would put ~18 u |t| into a loss that should be 0 (measured: 4.8e-5 at s = 50 with a
sum over D in registers). So each step computes a [BLOCK_M, BLOCK_N] logit tile exactly as the
statistics pass does (`tiles.logit_dot`, the same tile shape, BLOCK_K and precision; column c
holds row c's positive) and keeps its diagonal: BLOCK_N times the pairs' work,
O(BLOCK_N sum_i |positives(i)| D), still far below the N x M loop's at the sizes it is for.
"""

import triton
import triton.language as tl

from .tiles import LOG2E, NEG_BIG, load_scale, log2_logit_pairs, logit_dot, present


@triton.jit(do_not_specialize=["n_rows", "S", "NDR", "D"])
def _positive_mass_kernel(
    a_ptr, sa_gal, sa_row, sa_d, b_ptr, sb_gal, sb_row, sb_d,
    a_msk, s_amsk_gal, s_amsk, b_msk, s_bmsk_gal, s_bmsk,
    a_r_ptr, s_ar_gal, b_r_ptr, s_br_gal,
    lo_ptr, hi_ptr, perm_ptr, s_perm_gal,
    part_ptr, S, NDR, dir0, n_rows, D, scale_ptr, scale_value,
    NUM_STATS: tl.constexpr, SLOT_M: tl.constexpr, SLOT_NEG: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (row blocks, galleries). Gallery k's rows of the A side are ``dir0 + k n_rows + i``
    in the direction-row space; ``*_gal`` strides step a side's tensors by gallery (0 where the
    side is shared: the queries). ``lo``/``hi`` [K, n_rows] (contiguous), ``perm`` [K, C].
    The tile shape, BLOCK_K, UPCAST and DOT_PRECISION are the statistics pass's
    (BLOCK_N >= BLOCK_M): each step's logits are a [BLOCK_M, BLOCK_N] tile whose column c holds
    the positive of row c, and t_ij is its diagonal."""
    k = tl.program_id(1).to(tl.int64)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    row_ok = present(a_msk, k * s_amsk_gal, s_amsk, rows, row_in)
    # the same rows as the tile's column lanes (lane c < BLOCK_M: row c's positive)
    lanes = row0 + tl.arange(0, BLOCK_N)
    lane_in = (tl.arange(0, BLOCK_N) < BLOCK_M) & (lanes < n_rows)
    lane_ok = present(a_msk, k * s_amsk_gal, s_amsk, lanes, lane_in)
    s_log2e = load_scale(scale_ptr, scale_value) * LOG2E
    idx = dir0 + k * n_rows + rows
    # the merged row maximum and the segment holding it (the first, on ties)
    m_row = tl.full((BLOCK_M,), NEG_BIG, dtype=tl.float32)
    s_max = tl.zeros((BLOCK_M,), dtype=tl.int64)
    for s in range(0, S):
        m_s = tl.load(part_ptr + s * (NUM_STATS * NDR) + SLOT_M * NDR + idx, mask=row_in, other=NEG_BIG)
        s_max = tl.where(m_s > m_row, s, s_max)
        m_row = tl.maximum(m_row, m_s)
    ranges = lo_ptr + k * n_rows
    lo_m = tl.load(ranges + rows, mask=row_in, other=0)
    count_m = tl.where(row_ok, tl.load(hi_ptr + k * n_rows + rows, mask=row_in, other=0) - lo_m, 0)
    lo_n = tl.load(ranges + lanes, mask=lane_in, other=0)
    hi_n = tl.load(hi_ptr + k * n_rows + lanes, mask=lane_in, other=0)
    count_n = tl.where(lane_ok, hi_n - lo_n, 0)
    r_a = tl.load(a_r_ptr + k * s_ar_gal + rows, mask=row_in, other=0.0)
    diag = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_N)[None, :]
    mass = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(0, tl.max(count_m, axis=0)):
        # Lane c's positive j, its index clamped into the lane's range instead of masked (an empty
        # range reads position 0: a loop step exists only where some row has a positive, so the
        # column side is not empty). Triton 3.6 fails to compile (TritonGPURemoveLayoutConversions:
        # 'mask type matches ptr type') when one predicate masks this vector load and also the
        # tile's column loads; the mask's own load below is keyed on a fresh predicate for the
        # same reason.
        lane_on = j < count_n
        col = tl.load(perm_ptr + k * s_perm_gal + tl.maximum(tl.minimum(lo_n + j, hi_n - 1), 0))
        col_on = lane_on & present(b_msk, k * s_bmsk_gal, s_bmsk, col, col >= 0)   # absent columns: no positives
        acc = logit_dot(a_ptr=a_ptr + k * sa_gal, sa_row=sa_row, sa_d=sa_d, rows=rows, row_in=row_ok,
                        b_ptr=b_ptr + k * sb_gal, sb_row=sb_row, sb_d=sb_d, cols=col, col_in=col_on, D=D,
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST,
                        DOT_PRECISION=DOT_PRECISION)
        # the same positives row by row: the lanes reach the rows only through the tile's diagonal,
        # so the positive's column, presence and norm are read again for the rows (two small
        # vector loads) and only the dot goes through the diagonal
        pos_on = j < count_m
        col_m = tl.load(perm_ptr + k * s_perm_gal + lo_m + j, mask=pos_on, other=0)
        on = present(b_msk, k * s_bmsk_gal, s_bmsk, col_m, pos_on)
        r_b = tl.load(b_r_ptr + k * s_br_gal + col_m, mask=on, other=0.0)
        dot = tl.sum(tl.where(diag, acc, 0.0), axis=1)                          # exact: one term per row
        t_pair = log2_logit_pairs(dot, r_a, r_b, s_log2e)                       # the loop's t, bit for bit
        mass += tl.exp2(tl.where(on, t_pair - m_row, -float("inf")))          # off rows: 2^-inf = 0
    # the statistics pass counted every column as negative (stats.py): the positives come off
    # the negatives' mass of the segment holding the maximum, in its scale (2^(t - m_row))
    neg = part_ptr + s_max * (NUM_STATS * NDR) + SLOT_NEG * NDR + idx
    tl.store(neg, tl.load(neg, mask=row_in, other=0.0) - mass, mask=row_in)
