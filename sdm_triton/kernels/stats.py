"""Forward: online softmax statistics of every softmax row, both directions in one launch.

A program owns BLOCK_M rows of one side (q rows against gallery k, or rows of gallery k
against the queries) and one segment of the other side's columns, and walks the segment
in [BLOCK_M, BLOCK_N] tiles, FlashAttention's online softmax in the log2 domain
(t = S * log2 e, `tiles.py`), over the present columns only:

    m' = max(m, max_j t_ij),  alpha = 2^(m - m'),  p_ij = 2^(t_ij - m')
    l'   = alpha l + sum_j p_ij
    forward KL:   lin' = lin + sum_j y_ij t_ij                          (no rescale)
    reverse KL:   lin' = alpha (lin + (m - m') l) + sum_j p_ij (t_ij - m')
    neg'  = alpha neg + sum_{j: y_ij <= 0} p_ij         (reverse KL with ids; statistics)
    logy' = alpha logy + sum_j p_ij ln(y_ij / ysum_i + eps)   (reverse KL with dense labels)
    cnt'  = cnt + #{j : id_j = id_i}                     (identity labels: the label mass)

and writes the five partial statistics (m, l, lin, neg, logy | cnt) of its rows for its
segment (`finish.py` merges segments and turns them into losses). The negatives' mass, not the
positives': at a good fit the positives hold 1 - delta of the mass, and 1 - pos (which reverse
KL's loss needs, times ln eps) would keep nothing of delta in fp32, while the backward's dS sums
the negatives pair by pair; their row sums must agree (bench/NOTES.md 37). The positives' mass
is l - neg.

Identity labels enter the loop in two ways, by two switches:
  ``LOOP_IDS``    the tile's ids are compared (row id against column id), for the negatives'
                  mass when it is wanted (``WANT_POS``), and for the label terms below;
  ``LOOP_TERMS``  the label terms cnt and forward KL's lin are summed from that compare. Without
                  it (issue 27) they come from outside the N x M loop (`launch/positives.py`:
                  the identity centroids and counts, O((N + M) D) work) and the kernel writes 0
                  for them (the launcher writes segment 0; lin and cnt merge by plain sums).
Without either the loop is the plain online log-sum-exp (m, l), with reverse KL's label-free lin.
The negatives' mass has no form outside the loop (l - pos cancels as 1 - pos does), so it keeps
the compare; its launcher passes int32 ranks for the ids where the terms come from outside
(`positives.ranks`), the cheapest compare.
"""

import triton
import triton.language as tl

from .slots import LAB_YSUM, PRE_R
from .tiles import (ABSENT, LOG2E, NEG_BIG, as_f32, label_tile, load_scale, log2_logits, logit_dot, present,
                    row_ids, same_ids)

NUM_STATS = tl.constexpr(5)   # m, l, lin, neg, logy (dense labels) | cnt (identity labels)
#: The slots of ``out[s]`` (per softmax row: ``slot * NDR + row``), finish.py reads them.
SLOT_M = tl.constexpr(0)
SLOT_L = tl.constexpr(1)
SLOT_LIN = tl.constexpr(2)
SLOT_NEG = tl.constexpr(3)
#: The fifth statistic (slot 4 of ``out[s]``) has two meanings, by DENSE: logy with dense labels
#: (reverse KL only), cnt, the count of positives, with identity labels (their label mass). Each
#: name is used where its meaning holds (here and in finish.py).
SLOT_LOGY = tl.constexpr(4)
SLOT_CNT = tl.constexpr(4)


@triton.jit
def _stats_rows(
    a_ptr, sa_row, sa_d, b_ptr, sb_row, sb_d,
    a_msk, a_moff, s_amsk, b_msk, b_moff, s_bmsk, a_ids, a_ioff, sa_id, b_ids, b_ioff, sb_id,
    lab, lab_off, sl_row, sl_col,
    pre_ptr, NR, a_pre, b_pre, lab_ptr, a_dir, out_ptr, NDR,
    row0, n_rows, col0, col1, D, scale_log2e, eps,
    REVERSE: tl.constexpr, DENSE: tl.constexpr, WANT_POS: tl.constexpr, LOOP_IDS: tl.constexpr,
    LOOP_TERMS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # the labels enter the loop: dense ones always, ids where the loop compares them
    LABELS: tl.constexpr = DENSE or LOOP_IDS
    tl.static_assert(LABELS or not (WANT_POS or LOOP_TERMS), "the negatives' mass and the loop's label terms need the labels")
    rows = (row0 + tl.arange(0, BLOCK_M)).to(INDEX)
    row_in = rows < n_rows
    row_ok = present(a_msk, a_moff, s_amsk, rows, row_in)
    ra = tl.load(pre_ptr + PRE_R * NR + a_pre + rows, mask=row_in, other=0.0)
    ai = row_ids(a_ids, a_ioff, sa_id, rows, row_in, DENSE or not LOOP_IDS)
    inv_ya = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if DENSE and REVERSE:   # Y = y / ysum inside the log: the label mass comes first (prep.py)
        ysum = tl.load(lab_ptr + LAB_YSUM * NDR + a_dir + rows, mask=row_in, other=0.0)
        inv_ya = tl.where(ysum > 0, 1.0 / ysum, 0.0)
    m = tl.full((BLOCK_M,), NEG_BIG, dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lin = tl.zeros((BLOCK_M,), dtype=tl.float32)
    neg = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(col0, col1, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(INDEX)
        col_ok = present(b_msk, b_moff, s_bmsk, cols, cols < col1)
        acc = logit_dot(a_ptr=a_ptr, sa_row=sa_row, sa_d=sa_d, rows=rows, row_in=row_ok,
                        b_ptr=b_ptr, sb_row=sb_row, sb_d=sb_d, cols=cols, col_in=col_ok, D=D,
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION)
        rb = tl.load(pre_ptr + PRE_R * NR + b_pre + cols, mask=col_ok, other=0.0)
        _, t = log2_logits(acc, ra, rb, scale_log2e)                          # [BM, BN], log2 domain
        t = tl.where(col_ok[None, :], t, ABSENT)
        m_new = tl.maximum(m, tl.max(t, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(t - m_new[:, None])
        if REVERSE:     # sum_j P ln P: no labels in it
            lin = alpha * (lin + (m - m_new) * l) + tl.sum(p * (t - m_new[:, None]), axis=1)
        # the labels of the tile: a compare with ids (row_ids); a [BM, BN] load with dense labels.
        # Absent rows need no masking here: they are invalid, finish.py drops them.
        if LABELS:
            if DENSE:
                y = label_tile(ai=ai, b_ids=b_ids, b_off=b_ioff, sb_id=sb_id, lab=lab, lab_off=lab_off,
                               sl_row=sl_row, sl_col=sl_col, rows=rows, cols=cols, col_in=col_ok,
                               both=row_in[:, None] & col_ok[None, :], DENSE=DENSE)
                positive = y > 0
            else:
                positive = same_ids(ai, b_ids, b_ioff, sb_id, cols, col_ok) & col_ok[None, :]
                if LOOP_TERMS:
                    cnt += tl.sum(positive.to(tl.float32), axis=1)
            if REVERSE:
                if DENSE:
                    logy = alpha * logy + tl.sum(p * tl.log(y * inv_ya[:, None] + eps), axis=1)
            elif DENSE:
                lin += tl.sum(y * t, axis=1)
            elif LOOP_TERMS:
                lin += tl.sum(tl.where(positive, t, 0.0), axis=1)
            if WANT_POS:
                neg = alpha * neg + tl.sum(tl.where(positive, 0.0, p), axis=1)
        l = alpha * l + tl.sum(p, axis=1)
        m = m_new
    out = out_ptr + a_dir + rows
    tl.store(out + SLOT_M * NDR, m, mask=row_in)
    tl.store(out + SLOT_L * NDR, l, mask=row_in)
    tl.store(out + SLOT_LIN * NDR, lin, mask=row_in)
    if WANT_POS:
        tl.store(out + SLOT_NEG * NDR, neg, mask=row_in)
    if DENSE and REVERSE:
        tl.store(out + SLOT_LOGY * NDR, logy, mask=row_in)
    if not DENSE:
        tl.store(out + SLOT_CNT * NDR, cnt, mask=row_in)


# Sizes change from batch to batch: no divisibility specialisation on them.
@triton.jit(do_not_specialize=["N", "M", "K", "n_q_programs", "seg_cols_q", "seg_cols_g"])
def _stats_kernel(
    q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d,
    q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
    q_ids, s_qid, g_ids, s_gid_gal, s_gid,
    lab, sl_q, sl_gal, sl_g,
    pre_ptr, lab_ptr, scale_ptr, out_ptr,
    N, M, K, n_q_programs, seg_cols_q, seg_cols_g, D, scale_value, eps,
    REVERSE: tl.constexpr, DENSE: tl.constexpr, WANT_POS: tl.constexpr, LOOP_IDS: tl.constexpr,
    LOOP_TERMS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (row blocks x galleries x segments) of q rows, then (galleries x row blocks x
    segments) of gallery rows. ``out`` is [segments, NUM_STATS, NDR]: program p of a segment
    s writes out[s]. ``scale_ptr`` None: the scale is ``scale_value``."""
    pid = tl.program_id(0)
    NR = N + K * M
    NDR = K * N + K * M
    s_log2e = load_scale(scale_ptr, scale_value) * LOG2E
    eps = as_f32(eps)
    if pid < n_q_programs:
        segs = tl.cdiv(M, seg_cols_q)
        seg = pid % segs
        k = ((pid // segs) % K).to(tl.int64)
        row0 = (pid // (segs * K)).to(tl.int64) * BLOCK_M
        col0 = seg * seg_cols_q
        side_rows(q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d, q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
               q_ids, s_qid, g_ids, s_gid_gal, s_gid, lab, sl_q, sl_gal, sl_g, pre_ptr, lab_ptr,
               out_ptr + seg * (NUM_STATS * NDR), N, M, K, k, row0, col0, tl.minimum(col0 + seg_cols_q, M), D,
               s_log2e, eps, True, REVERSE, DENSE, WANT_POS, LOOP_IDS, LOOP_TERMS, UPCAST, DOT_PRECISION, INDEX,
               BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        p = pid - n_q_programs
        segs = tl.cdiv(N, seg_cols_g)
        seg = p % segs
        m_blocks = tl.cdiv(M, BLOCK_M)
        k = ((p // segs) // m_blocks).to(tl.int64)
        row0 = ((p // segs) % m_blocks).to(tl.int64) * BLOCK_M
        col0 = seg * seg_cols_g
        side_rows(q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d, q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
                     q_ids, s_qid, g_ids, s_gid_gal, s_gid, lab, sl_q, sl_gal, sl_g, pre_ptr, lab_ptr,
                     out_ptr + seg * (NUM_STATS * NDR), N, M, K, k, row0, col0, tl.minimum(col0 + seg_cols_g, N), D,
                     s_log2e, eps, False, REVERSE, DENSE, WANT_POS, LOOP_IDS, LOOP_TERMS, UPCAST, DOT_PRECISION,
                     INDEX, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def side_rows(
    q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d, q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
    q_ids, s_qid, g_ids, s_gid_gal, s_gid, lab, sl_q, sl_gal, sl_g, pre_ptr, lab_ptr, out_ptr,
    N, M, K, k, row0, col0, col1, D, scale_log2e, eps,
    Q_SIDE: tl.constexpr, REVERSE: tl.constexpr, DENSE: tl.constexpr, WANT_POS: tl.constexpr,
    LOOP_IDS: tl.constexpr, LOOP_TERMS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """`_stats_rows` of rows row0 .. row0 + BLOCK_M of one side against columns col0 .. col1 of
    the other, into ``out_ptr`` (one segment's [NUM_STATS, NDR]), the problem's tensors wired as a
    program of that side reads them (this kernel's and the single forward's, kernels/single.py):
    ``Q_SIDE``, q rows against gallery k; else rows of gallery k against the queries."""
    NR = N + K * M
    NDR = K * N + K * M
    if Q_SIDE:
        _stats_rows(
            a_ptr=q_ptr, sa_row=sq_row, sa_d=sq_d, b_ptr=g_ptr + k * sg_gal, sb_row=sg_row, sb_d=sg_d,
            a_msk=q_msk, a_moff=0, s_amsk=s_qmsk, b_msk=g_msk, b_moff=k * s_gmsk_gal, s_bmsk=s_gmsk,
            a_ids=q_ids, a_ioff=0, sa_id=s_qid, b_ids=g_ids, b_ioff=k * s_gid_gal, sb_id=s_gid,
            lab=lab, lab_off=k * sl_gal, sl_row=sl_q, sl_col=sl_g,
            pre_ptr=pre_ptr, NR=NR, a_pre=0, b_pre=N + k * M, lab_ptr=lab_ptr, a_dir=k * N, out_ptr=out_ptr, NDR=NDR,
            row0=row0, n_rows=N, col0=col0, col1=col1, D=D, scale_log2e=scale_log2e, eps=eps,
            REVERSE=REVERSE, DENSE=DENSE, WANT_POS=WANT_POS, LOOP_IDS=LOOP_IDS, LOOP_TERMS=LOOP_TERMS,
            UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, INDEX=INDEX, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K)
    else:
        _stats_rows(
            a_ptr=g_ptr + k * sg_gal, sa_row=sg_row, sa_d=sg_d, b_ptr=q_ptr, sb_row=sq_row, sb_d=sq_d,
            a_msk=g_msk, a_moff=k * s_gmsk_gal, s_amsk=s_gmsk, b_msk=q_msk, b_moff=0, s_bmsk=s_qmsk,
            a_ids=g_ids, a_ioff=k * s_gid_gal, sa_id=s_gid, b_ids=q_ids, b_ioff=0, sb_id=s_qid,
            lab=lab, lab_off=k * sl_gal, sl_row=sl_g, sl_col=sl_q,
            pre_ptr=pre_ptr, NR=NR, a_pre=N + k * M, b_pre=0, lab_ptr=lab_ptr, a_dir=K * N + k * M,
            out_ptr=out_ptr, NDR=NDR,
            row0=row0, n_rows=M, col0=col0, col1=col1, D=D, scale_log2e=scale_log2e, eps=eps,
            REVERSE=REVERSE, DENSE=DENSE, WANT_POS=WANT_POS, LOOP_IDS=LOOP_IDS, LOOP_TERMS=LOOP_TERMS,
            UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION, INDEX=INDEX, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K)
