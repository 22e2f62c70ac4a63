"""Forward in one launch (issue 28): preparation, statistics, finish and the reduction, for
problems whose row blocks alone are enough programs (training batch sizes).

The staged forward (prep.py -> stats.py -> finish.py) takes three launches, each a few
microseconds of host time, and at N = 64-1024 a step costs what the host spends. Here a
program owns BLOCK_M rows of one side (q rows against gallery k, or rows of gallery k against
the queries) and every column of the other side, and does all of it:

    1. norms: r, c, |x| of its own rows and of every column it reads (prep.py's `write_norms`);
       with dense labels, its rows' label masses (`write_label_masses`)
    2. statistics: the online softmax over all its columns (stats.py's `_stats_rows`, one segment)
    3. finish: its rows' losses, validity and saved state (finish.py's `_finish_rows`), and its
       rows' sums (losses, valid count, positive mass) into its own slot of ``sums``
    4. the last program to finish (an atomic ticket) sums the slots in program order and writes
       each gallery's value and reduction rows (finish.py's `write_reduction`), then sets the
       ticket counter back to 0 for the next launch

Norms without another launch: a sample's norm is needed by the program that owns it as a row
and by every program that reads it as a column. Every program computes the norms it reads
itself and stores them (programs store the same bits to the same addresses): each side's
samples go through one call of `write_norms` in this kernel, over the same blocks of BLOCK_M
samples in every program (the q side's ``for`` loop and the gallery side's), so a sample's
norm is the same computation, bit for bit, whichever program makes it; the backward reads the
stored values and rebuilds the forward's logits exactly. A program reads back only what its own
threads stored, after a barrier.

The ticket (``count_ptr``, one int32 per device and stream, 0 between launches): each
program stores its results, passes a barrier (every thread's stores done), then takes a ticket
with an acquire-release atomic; the program that draws the last one sees every other program's
slot. Programs never wait for each other, so this also runs under the CPU interpreter, which
runs the programs one after another.
"""

import triton
import triton.language as tl

from .finish import _finish_rows, anchor_norm_stats, write_norm_stats, write_reduction
from .prep import write_label_masses, write_norms
from .stats import side_rows
from .tiles import FLT_MIN, LOG2E, as_f32, load_scale

#: Floats per program in ``sums``: the sum of its rows' losses, their valid count, their positive mass.
NUM_SUMS = tl.constexpr(3)


@triton.jit(do_not_specialize=["N", "M", "K", "n_q_programs"])
def _single_forward_kernel(
    q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d,
    q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
    q_ids, s_qid, g_ids, s_gid_gal, s_gid,
    lab, sl_q, sl_gal, sl_g,
    pre_ptr, lab_ptr, scale_ptr, part_ptr, rows_ptr, valid_ptr, saved_ptr, sums_ptr, red_ptr, value_ptr,
    count_ptr,
    N, M, K, n_q_programs, D, scale_value, eps,
    REVERSE: tl.constexpr, DENSE: tl.constexpr, WANT_POS: tl.constexpr, WANT_Q2G: tl.constexpr,
    WANT_G2Q: tl.constexpr, MEAN: tl.constexpr, COMBINE_MEAN: tl.constexpr, STATS: tl.constexpr,
    NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KP: tl.constexpr,
):
    """Grid: (row blocks of q x galleries), then (galleries x row blocks of gallery rows), as
    the staged statistics pass with one segment. BLOCK_K: the statistics' feature step (the
    backward's); BLOCK_KP: the norms' (prep.py's). ``part`` [1, NUM_STATS, NDR], ``sums``
    [programs, NUM_SUMS]; the rest as finish.py's."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    NR = N + K * M
    NDR = K * N + K * M
    q_blocks = tl.cdiv(N, BLOCK_M)
    g_blocks = tl.cdiv(M, BLOCK_M)
    is_q = pid < n_q_programs
    pg = pid - n_q_programs
    k = tl.where(is_q, pid % K, pg // g_blocks).to(tl.int64)
    block = tl.where(is_q, pid // K, pg % g_blocks).to(tl.int64)
    row0 = block * BLOCK_M

    # 1. norms: the q side's own block (q programs) or every q block (gallery programs), then
    # gallery k's every block (q programs) or own block; one call of write_norms per side
    q_first = tl.where(is_q, block, 0)
    q_last = tl.where(is_q, block + 1, q_blocks)
    for b in range(q_first, q_last):
        write_norms(q_ptr, sq_row, sq_d, q_msk, 0, s_qmsk, pre_ptr, NR, 0, b * BLOCK_M, N, D,
                    NORMALIZE, BLOCK_M, BLOCK_KP)
    g_first = tl.where(is_q, 0, block)
    g_last = tl.where(is_q, g_blocks, block + 1)
    for b in range(g_first, g_last):
        write_norms(g_ptr + k * sg_gal, sg_row, sg_d, g_msk, k * s_gmsk_gal, s_gmsk, pre_ptr, NR, N + k * M,
                    b * BLOCK_M, M, D, NORMALIZE, BLOCK_M, BLOCK_KP)
    if DENSE:
        if is_q:
            write_label_masses(q_msk, 0, s_qmsk, g_msk, k * s_gmsk_gal, s_gmsk, lab, k * sl_gal, sl_q, sl_g,
                               lab_ptr, NDR, k * N, row0, N, M, BLOCK_M, BLOCK_N)
        else:
            write_label_masses(g_msk, k * s_gmsk_gal, s_gmsk, q_msk, 0, s_qmsk, lab, k * sl_gal, sl_g, sl_q,
                               lab_ptr, NDR, K * N + k * M, row0, M, N, BLOCK_M, BLOCK_N)
    tl.debug_barrier()       # this program's threads read what the others stored

    # 2. statistics over every column (one segment: part[0])
    s = load_scale(scale_ptr, scale_value)
    s_log2e = s * LOG2E
    eps = as_f32(eps)
    if is_q:
        side_rows(q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d, q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
               q_ids, s_qid, g_ids, s_gid_gal, s_gid, lab, sl_q, sl_gal, sl_g, pre_ptr, lab_ptr, part_ptr,
               N, M, K, k, row0, 0, M, D, s_log2e, eps, True, REVERSE, DENSE, WANT_POS, not DENSE, not DENSE,
               UPCAST, DOT_PRECISION, INDEX, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        side_rows(q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d, q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
                     q_ids, s_qid, g_ids, s_gid_gal, s_gid, lab, sl_q, sl_gal, sl_g, pre_ptr, lab_ptr, part_ptr,
                     N, M, K, k, row0, 0, N, D, s_log2e, eps, False, REVERSE, DENSE, WANT_POS, not DENSE, not DENSE,
                     UPCAST, DOT_PRECISION, INDEX, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.debug_barrier()

    # 3. finish this program's rows (one segment), their sums into its slot
    s_ok = (s >= FLT_MIN) & (s < float("inf"))
    ln_eps = tl.log(eps)
    if is_q:
        sum_l, cnt, pos = _finish_rows(
            part_ptr=part_ptr, S=1, NDR=NDR, lab_ptr=lab_ptr, msk=q_msk, moff=row0 * s_qmsk, s_msk=s_qmsk,
            dir0=k * N + row0, n=tl.minimum(BLOCK_M, N - row0), s_ok=s_ok, eps=eps, ln_eps=ln_eps,
            rows_ptr=rows_ptr, valid_ptr=valid_ptr, saved_ptr=saved_ptr,
            REVERSE=REVERSE, DENSE=DENSE, WANT_POS=WANT_POS, BLOCK=BLOCK_M)
    else:
        sum_l, cnt, pos = _finish_rows(
            part_ptr=part_ptr, S=1, NDR=NDR, lab_ptr=lab_ptr, msk=g_msk, moff=k * s_gmsk_gal + row0 * s_gmsk,
            s_msk=s_gmsk, dir0=K * N + k * M + row0, n=tl.minimum(BLOCK_M, M - row0), s_ok=s_ok, eps=eps,
            ln_eps=ln_eps, rows_ptr=rows_ptr, valid_ptr=valid_ptr, saved_ptr=saved_ptr,
            REVERSE=REVERSE, DENSE=DENSE, WANT_POS=WANT_POS, BLOCK=BLOCK_M)
    slot = sums_ptr + pid * NUM_SUMS
    tl.store(slot, sum_l)
    tl.store(slot + 1, cnt)
    tl.store(slot + 2, pos)

    # 4. the ticket: every thread's stores are done (barrier), then one acquire-release atomic
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if ticket == n_programs - 1:
        _reduce_slots(sums_ptr, pre_ptr, red_ptr, value_ptr, q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
                      N, M, K, NR, n_q_programs, q_blocks, g_blocks, s_ok,
                      WANT_Q2G, WANT_G2Q, MEAN, COMBINE_MEAN, STATS, BLOCK_M)
        tl.atomic_xchg(count_ptr, 0)


@triton.jit
def _reduce_slots(sums_ptr, pre_ptr, red_ptr, value_ptr, q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
                  N, M, K, NR, n_q_programs, q_blocks, g_blocks, s_ok,
                  WANT_Q2G: tl.constexpr, WANT_G2Q: tl.constexpr, MEAN: tl.constexpr,
                  COMBINE_MEAN: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    """The last program: per gallery, the programs' slots summed in program order (q programs
    b * K + k, then gallery programs), the value and the reduction rows. Volatile loads: the
    slots were stored by other programs (read past this SM's L1)."""
    q_sum, q_cnt, q_max = anchor_norm_stats(pre_ptr, NR, q_msk, s_qmsk, N, STATS, BLOCK)
    for k in range(0, K):
        sq, cq, pq = _slot_sums(sums_ptr, k, K, 0, q_blocks, BLOCK)
        sg, cg, pg = _slot_sums(sums_ptr, n_q_programs + k * g_blocks, 1, 0, g_blocks, BLOCK)
        write_reduction(red_ptr, value_ptr, k, K, sq, cq, pq, sg, cg, pg, s_ok,
                        WANT_Q2G, WANT_G2Q, MEAN, COMBINE_MEAN, STATS)
        if STATS:
            write_norm_stats(pre_ptr, NR, red_ptr, k, K, q_sum, q_cnt, q_max, g_msk, k * s_gmsk_gal, s_gmsk,
                             N + k * M, M, BLOCK)


@triton.jit
def _slot_sums(sums_ptr, first, step, b0, b1, BLOCK: tl.constexpr):
    """The slots of programs first + b * step, b in [b0, b1), summed: (losses, valid count,
    positive mass), in a fixed order."""
    sum_l = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.float32)
    pos = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(b0, b1, BLOCK):
        b = c0 + tl.arange(0, BLOCK)
        slot = sums_ptr + (first + b * step) * NUM_SUMS
        b_in = b < b1
        sum_l += tl.load(slot, mask=b_in, other=0.0, volatile=True)
        cnt += tl.load(slot + 1, mask=b_in, other=0.0, volatile=True)
        pos += tl.load(slot + 2, mask=b_in, other=0.0, volatile=True)
    return tl.sum(sum_l, axis=0), tl.sum(cnt, axis=0), tl.sum(pos, axis=0)
