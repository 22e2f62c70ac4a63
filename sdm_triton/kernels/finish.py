"""Forward, last step: merge the segments' statistics, per-row losses, the reduction (one program).

Merging partial statistics over disjoint column segments (shift_s = m_s - m, alpha_s = 2^shift_s):

    m = max_s m_s,  l = sum alpha_s l_s,  neg = sum alpha_s neg_s,  logy = sum alpha_s logy_s
    forward KL:  lin = sum_s lin_s            reverse KL:  lin = sum_s alpha_s (lin_s + shift_s l_s)

Row losses (log2-domain statistics, `stats.py`; ysum: the merged count of positives with
identity labels, or with dense labels ysum, ylny from `prep.py`):

    forward:          L = ln2 (m + log2 l - lin / ysum) + ylny / ysum - ln ysum     (clamped at 0: KL >= 0;
                      dense: ylny and ln ysum of the unscaled labels, options.LABEL_SCALE)
    reverse, ids:     L = ln2 (lin / l - log2 l) - [P+ ln(1/ysum + eps) + P- ln eps],
                      P- = neg / l (the negatives' mass as summed: stats.py), P+ = 1 - P-
    reverse, dense:   L = ln2 (lin / l - log2 l) - logy / l

(written with ln l = ln2 log2 l, the accurate logarithm: lg2.approx errs by ~2^-22).
A row is valid when its sample is present and ysum > 0 (a NaN ysum, from bad labels, counts
as valid so that its NaN reaches the loss). A bad logit scale (<= 0, NaN, inf) makes every
loss NaN. Written per softmax row: the loss, validity, and what the backward needs (m, 1 / l,
1 / ysum: 0 for invalid rows, ln l); per gallery k: the sums and counts of valid rows of both
directions, the positive mass, the present samples' norm statistics, and the value asked for.
"""

import triton
import triton.language as tl

from .slots import (LAB_YLNY, LAB_YSUM, PRE_NORM, RED_G_NORM_MAX, RED_G_NORM_MEAN, RED_POS_G2Q, RED_POS_Q2G,
                    RED_Q_NORM_MAX, RED_Q_NORM_MEAN, RED_SUM_G2Q, RED_SUM_Q2G, RED_VALID_G2Q, RED_VALID_Q2G,
                    STATE_INV_L, STATE_INV_YSUM, STATE_LN_L, STATE_M)
from .stats import NUM_STATS, SLOT_CNT, SLOT_L, SLOT_LIN, SLOT_LOGY, SLOT_M, SLOT_NEG
from .tiles import FLT_MIN, LN2, as_f32, ln_precise, ln_unscaled, load_scale, present


@triton.jit
def _finish_rows(
    part_ptr, S, NDR, lab_ptr, msk, moff, s_msk, dir0, n, s_ok, eps, ln_eps,
    rows_ptr, valid_ptr, saved_ptr,
    REVERSE: tl.constexpr, DENSE: tl.constexpr, WANT_POS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Rows dir0 .. dir0 + n of the direction-row space, merged over S segments: returns (sum
    of losses, valid count, sum of positive probabilities) over them."""
    sum_l = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_pos = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK).to(tl.int64)
        i_in = i < n
        idx = dir0 + i
        m = tl.full((BLOCK,), -float("inf"), dtype=tl.float32)
        for s in range(0, S):
            m = tl.maximum(m, tl.load(part_ptr + s * (NUM_STATS * NDR) + SLOT_M * NDR + idx, mask=i_in, other=0.0))
        l = tl.zeros((BLOCK,), dtype=tl.float32)
        lin = tl.zeros((BLOCK,), dtype=tl.float32)
        neg = tl.zeros((BLOCK,), dtype=tl.float32)
        logy = tl.zeros((BLOCK,), dtype=tl.float32)
        npos = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, S):
            base = part_ptr + s * (NUM_STATS * NDR) + idx
            shift = tl.load(base + SLOT_M * NDR, mask=i_in, other=0.0) - m
            alpha = tl.exp2(shift)
            l_s = tl.load(base + SLOT_L * NDR, mask=i_in, other=0.0)
            l += alpha * l_s
            if REVERSE:
                lin += alpha * (tl.load(base + SLOT_LIN * NDR, mask=i_in, other=0.0) + shift * l_s)
                if DENSE:
                    logy += alpha * tl.load(base + SLOT_LOGY * NDR, mask=i_in, other=0.0)
            else:
                lin += tl.load(base + SLOT_LIN * NDR, mask=i_in, other=0.0)
            if not DENSE:
                npos += tl.load(base + SLOT_CNT * NDR, mask=i_in, other=0.0)
            if WANT_POS:
                neg += alpha * tl.load(base + SLOT_NEG * NDR, mask=i_in, other=0.0)
        if DENSE:
            ysum = tl.load(lab_ptr + LAB_YSUM * NDR + idx, mask=i_in, other=0.0)
        else:
            ysum = npos
        valid = present(msk, moff, s_msk, i, i_in) & ((ysum > 0) | (ysum != ysum))
        safe_l = tl.where(valid & (l > 0), l, 1.0)
        safe_y = tl.where(valid, ysum, 1.0)
        ln_l = ln_precise(safe_l)        # once per row: the accurate log, not lg2.approx
        # the softmax mass of the negatives and of the positives: the negatives' as summed (accurate
        # where the positives hold almost all of it: reverse KL multiplies it by ln eps), stats.py
        p_neg = neg / safe_l
        p_pos = 1.0 - p_neg
        if REVERSE:
            loss = LN2 * (lin / safe_l) - ln_l
            if DENSE:
                loss -= logy / safe_l
            else:
                loss -= p_pos * tl.log(1.0 / safe_y + eps) + p_neg * ln_eps
        else:
            if DENSE:   # the label terms with unscaled logarithms (prep.py, options.LABEL_SCALE)
                ylny = tl.load(lab_ptr + LAB_YLNY * NDR + idx, mask=i_in, other=0.0)
                loss = LN2 * (m - lin / safe_y) + ln_l + (ylny / safe_y - ln_unscaled(safe_y))
            else:
                loss = LN2 * (m - lin / safe_y) + ln_l - ln_precise(safe_y)
            loss = tl.where(loss < 0, 0.0, loss)          # KL >= 0 exactly; keeps NaN
        loss = tl.where(s_ok, loss, float("nan"))
        loss = tl.where(valid, loss, 0.0)
        tl.store(rows_ptr + idx, loss, mask=i_in)
        tl.store(valid_ptr + idx, valid.to(tl.int8), mask=i_in)
        tl.store(saved_ptr + STATE_M * NDR + idx, m, mask=i_in)
        tl.store(saved_ptr + STATE_INV_L * NDR + idx, 1.0 / safe_l, mask=i_in)
        tl.store(saved_ptr + STATE_INV_YSUM * NDR + idx, tl.where(valid, 1.0 / safe_y, 0.0), mask=i_in)
        tl.store(saved_ptr + STATE_LN_L * NDR + idx, ln_l, mask=i_in)
        sum_l += loss
        cnt += valid.to(tl.float32)
        if WANT_POS:   # (else neg is 0 and the statistics' slots stay 0)
            sum_pos += tl.where(valid, p_pos, 0.0)
    return tl.sum(sum_l, axis=0), tl.sum(cnt, axis=0), tl.sum(sum_pos, axis=0)


@triton.jit
def _norm_stats(pre_ptr, NR, msk, moff, s_msk, s0, n, BLOCK: tl.constexpr):
    """(sum, count, max) of the present samples' norms among samples s0 .. s0 + n."""
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.float32)
    top = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK).to(tl.int64)
        keep = present(msk, moff, s_msk, i, i < n)
        x = tl.load(pre_ptr + PRE_NORM * NR + s0 + i, mask=keep, other=0.0)
        total += x
        cnt += keep.to(tl.float32)
        top = tl.maximum(top, x)
    return tl.sum(total, axis=0), tl.sum(cnt, axis=0), tl.max(top, axis=0)


@triton.jit(do_not_specialize=["N", "M", "K", "S_q", "S_g"])
def _finish_kernel(
    part_ptr, pre_ptr, lab_ptr, q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk, scale_ptr,
    rows_ptr, valid_ptr, saved_ptr, red_ptr, value_ptr,
    N, M, K, S_q, S_g, scale_value, eps,
    REVERSE: tl.constexpr, DENSE: tl.constexpr, WANT_Q2G: tl.constexpr, WANT_G2Q: tl.constexpr,
    MEAN: tl.constexpr, COMBINE_MEAN: tl.constexpr, STATS: tl.constexpr, WANT_POS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    NR = N + K * M
    NDR = K * N + K * M
    s = load_scale(scale_ptr, scale_value)
    # a usable scale is a normal fp32 number: below 2^-126 the backward's 1 / (s log2 e) overflows
    s_ok = (s >= FLT_MIN) & (s < float("inf"))
    eps = as_f32(eps)
    ln_eps = tl.log(eps)
    q_sum, q_cnt, q_max = anchor_norm_stats(pre_ptr, NR, q_msk, s_qmsk, N, STATS, BLOCK)
    for k in range(0, K):
        gmoff = k * s_gmsk_gal
        sq, cq, pq = _finish_rows(
            part_ptr=part_ptr, S=S_q, NDR=NDR, lab_ptr=lab_ptr, msk=q_msk, moff=0, s_msk=s_qmsk,
            dir0=k * N, n=N, s_ok=s_ok, eps=eps, ln_eps=ln_eps,
            rows_ptr=rows_ptr, valid_ptr=valid_ptr, saved_ptr=saved_ptr,
            REVERSE=REVERSE, DENSE=DENSE, WANT_POS=WANT_POS, BLOCK=BLOCK)
        sg, cg, pg = _finish_rows(
            part_ptr=part_ptr, S=S_g, NDR=NDR, lab_ptr=lab_ptr, msk=g_msk, moff=gmoff, s_msk=s_gmsk,
            dir0=K * N + k * M, n=M, s_ok=s_ok, eps=eps, ln_eps=ln_eps,
            rows_ptr=rows_ptr, valid_ptr=valid_ptr, saved_ptr=saved_ptr,
            REVERSE=REVERSE, DENSE=DENSE, WANT_POS=WANT_POS, BLOCK=BLOCK)
        write_reduction(red_ptr, value_ptr, k, K, sq, cq, pq, sg, cg, pg, s_ok,
                        WANT_Q2G, WANT_G2Q, MEAN, COMBINE_MEAN, STATS)
        if STATS:
            write_norm_stats(pre_ptr, NR, red_ptr, k, K, q_sum, q_cnt, q_max, g_msk, gmoff, s_gmsk, N + k * M, M, BLOCK)


@triton.jit
def write_reduction(red_ptr, value_ptr, k, K, sq, cq, pq, sg, cg, pg, s_ok,
                    WANT_Q2G: tl.constexpr, WANT_G2Q: tl.constexpr, MEAN: tl.constexpr,
                    COMBINE_MEAN: tl.constexpr, STATS: tl.constexpr):
    """Gallery k's value from its directions' sums of losses (sq, sg) and valid counts (cq, cg),
    and its reduction rows (the positive masses pq, pg with STATS)."""
    a = sq
    b = sg
    if MEAN:
        a = sq / tl.maximum(cq, 1.0)
        b = sg / tl.maximum(cg, 1.0)
    value = 0.0
    if WANT_Q2G:
        value += a
    if WANT_G2Q:
        value += b
    if WANT_Q2G and WANT_G2Q and COMBINE_MEAN:
        value = 0.5 * value
    tl.store(value_ptr + k, tl.where(s_ok, value, float("nan")))
    red = red_ptr + k
    tl.store(red + RED_SUM_Q2G * K, sq)
    tl.store(red + RED_VALID_Q2G * K, cq)
    tl.store(red + RED_SUM_G2Q * K, sg)
    tl.store(red + RED_VALID_G2Q * K, cg)
    if STATS:
        tl.store(red + RED_POS_Q2G * K, pq)
        tl.store(red + RED_POS_G2Q * K, pg)


@triton.jit
def anchor_norm_stats(pre_ptr, NR, q_msk, s_qmsk, N, STATS: tl.constexpr, BLOCK: tl.constexpr):
    """(sum, count, max) of the present q rows' norms with STATS (`write_norm_stats` takes them),
    else zeros."""
    q_sum = 0.0
    q_cnt = 0.0
    q_max = 0.0
    if STATS:
        q_sum, q_cnt, q_max = _norm_stats(pre_ptr, NR, q_msk, 0, s_qmsk, 0, N, BLOCK)
    return q_sum, q_cnt, q_max


@triton.jit
def write_norm_stats(pre_ptr, NR, red_ptr, k, K, q_sum, q_cnt, q_max, g_msk, gmoff, s_gmsk, g0, M,
                     BLOCK: tl.constexpr):
    """Gallery k's norm rows of the reduction: the anchor's (summed beforehand, `_norm_stats`)
    and those of the gallery's present samples g0 .. g0 + M."""
    g_sum, g_cnt, g_max = _norm_stats(pre_ptr, NR, g_msk, gmoff, s_gmsk, g0, M, BLOCK)
    red = red_ptr + k
    tl.store(red + RED_Q_NORM_MEAN * K, q_sum / tl.maximum(q_cnt, 1.0))
    tl.store(red + RED_Q_NORM_MAX * K, q_max)
    tl.store(red + RED_G_NORM_MEAN * K, g_sum / tl.maximum(g_cnt, 1.0))
    tl.store(red + RED_G_NORM_MAX * K, g_max)
