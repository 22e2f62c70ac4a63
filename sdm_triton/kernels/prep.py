"""Preparation: per-sample norms and per-softmax label masses, both sides in one launch.

For each sample x (a row of q, or of a gallery):

    norm = |x|,   r = 1 / max(norm, NORM_EPS)   (1 when not normalising),
    c    = 2^-e with 2^e the power of two just above max(norm, NORM_EPS)

(``c`` scales a row of the backward's product operands exactly: x' = c x, see grad.py).
With dense labels, for each softmax row (a q row against gallery k, or a gallery row against
the queries), over the present columns j:

    ysum = sum_j y_ij,    ylny = sum_j y_ij ln(y_ij / LABEL_SCALE)   (y_ij scaled: tiles.LABEL_SCALE)

(With identity labels the count of positives is taken by the statistics pass, on the tiles
whose ids it compares anyway: a pass of its own over N x M id pairs cost 7 ms at 32768.)

A negative, NaN or infinite label weight on a pair of present samples makes that row's
ysum NaN, so its loss, and the mean it enters, become NaN on the device (no host sync).

Programs [0, n_q_programs) own BLOCK_M q rows and one gallery k (the k = 0 program also
writes the rows' norms); the others own BLOCK_M rows of one gallery against all queries.
"""

import triton
import triton.language as tl

from .. import options as _contract
from .slots import LAB_YLNY, LAB_YSUM, PRE_C, PRE_NORM, PRE_R
from .tiles import ln_unscaled, load_labels, pow2_below, present

NORM_EPS = tl.constexpr(_contract.NORM_EPS)
#: 2^64: a row at least this long has a square sum past fp32's range, and its raw dots with
#: another such row can overflow: normalised, it gives NaN (never a silently wrong loss).
NORM_LIMIT = tl.constexpr(_contract.NORM_LIMIT)


@triton.jit
def _square_sums(a_ptr, sa_row, sa_d, rows, row_ok, D, scale, SCALED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k (x_k * scale)^2 of the rows (fp32 accumulation; absent rows read as zeros)."""
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(a_ptr + rows[:, None] * sa_row + offs_k[None, :] * sa_d,
                    mask=row_ok[:, None] & (offs_k < D)[None, :], other=0.0).to(tl.float32)
        if SCALED:
            x = x * scale
        sq += tl.sum(x * x, axis=1)
    return sq


@triton.jit
def write_norms(
    a_ptr, sa_row, sa_d, a_msk, a_moff, s_amsk, pre_ptr, NR, a_pre, row0, n_rows, D,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """r, c and the norm of rows row0 .. row0 + BLOCK_M of one side (module doc), into the
    prepared buffer's per-sample slots from sample a_pre."""
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_in = rows < n_rows
    row_ok = present(a_msk, a_moff, s_amsk, rows, row_in)
    # absent rows read as zeros (they may hold anything): norm 0, finite r and c, as a zero row
    sq = _square_sums(a_ptr, sa_row, sa_d, rows, row_ok, D, 1.0, False, BLOCK_M, BLOCK_K)
    norm = tl.sqrt(sq)
    if tl.max(tl.where(row_in, sq, 0.0), axis=0) == float("inf"):
        # rare: some row's square sum overflowed (norm >= 2^64): again, scaled by 2^-100 (exact;
        # components it takes below the normal range are < 2^-90 of such a norm)
        sq_scaled = _square_sums(a_ptr, sa_row, sa_d, rows, row_ok, D, 2.0**-100, True, BLOCK_M, BLOCK_K)
        norm = tl.where(sq == float("inf"), tl.sqrt(sq_scaled) * 2.0**100, norm)
    safe = tl.maximum(norm, NORM_EPS)
    r = 1.0 / safe if NORMALIZE else tl.full((BLOCK_M,), 1.0, tl.float32)
    if NORMALIZE:
        r = tl.where(norm >= NORM_LIMIT, float("nan"), r)
    tl.store(pre_ptr + PRE_R * NR + a_pre + rows, r, mask=row_in)
    tl.store(pre_ptr + PRE_C * NR + a_pre + rows, pow2_below(safe), mask=row_in)
    tl.store(pre_ptr + PRE_NORM * NR + a_pre + rows, norm, mask=row_in)


@triton.jit
def write_label_masses(
    a_msk, a_moff, s_amsk, b_msk, b_moff, s_bmsk, lab, lab_off, sl_row, sl_col,
    lab_ptr, NDR, a_dir, row0, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Dense labels: ysum and ylny (module doc) of softmax rows row0 .. row0 + BLOCK_M of one
    side against the other side's n_cols columns, into the label masses from softmax row a_dir."""
    rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    row_in = rows < n_rows
    row_ok = present(a_msk, a_moff, s_amsk, rows, row_in)
    ysum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ylny = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, n_cols, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = present(b_msk, b_moff, s_bmsk, cols, cols < n_cols)
        both = row_ok[:, None] & col_ok[None, :]
        y = load_labels(lab, lab_off, sl_row, sl_col, rows, cols, both)
        # a bad weight (< 0, NaN, inf) poisons the row: NaN label mass
        bad = (y < 0) | (y != y) | (y == float("inf"))
        y = tl.where(bad, float("nan"), y)
        ysum += tl.sum(y, axis=1)
        # ln of the unscaled weight, accurate (tl.log is lg2.approx on the GPU)
        ylny += tl.sum(tl.where(y > 0, y * ln_unscaled(tl.where(y > 0, y, 1.0)), 0.0), axis=1)
    # a mass past fp32's range (weights near 1e38 / LABEL_SCALE) is NaN, never a finite loss
    ysum = tl.where(tl.abs(ysum) == float("inf"), float("nan"), ysum)
    ylny = tl.where(tl.abs(ylny) == float("inf"), float("nan"), ylny)
    tl.store(lab_ptr + LAB_YSUM * NDR + a_dir + rows, ysum, mask=row_in)
    tl.store(lab_ptr + LAB_YLNY * NDR + a_dir + rows, ylny, mask=row_in)


@triton.jit
def _prep_rows(
    a_ptr, sa_row, sa_d, a_msk, a_moff, s_amsk,
    b_msk, b_moff, s_bmsk, lab, lab_off, sl_row, sl_col,
    pre_ptr, NR, a_pre, lab_ptr, NDR, a_dir,
    row0, n_rows, n_cols, D,
    WRITE_NORMS, NORMALIZE: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if WRITE_NORMS:
        write_norms(a_ptr, sa_row, sa_d, a_msk, a_moff, s_amsk, pre_ptr, NR, a_pre, row0, n_rows, D,
                    NORMALIZE, BLOCK_M, BLOCK_K)
    if DENSE:   # with ids the statistics pass counts the positives on its tiles (stats.py)
        write_label_masses(a_msk, a_moff, s_amsk, b_msk, b_moff, s_bmsk, lab, lab_off, sl_row, sl_col,
                           lab_ptr, NDR, a_dir, row0, n_rows, n_cols, BLOCK_M, BLOCK_N)


# Sizes change from batch to batch: no divisibility specialisation on them.
@triton.jit(do_not_specialize=["N", "M", "K", "n_q_programs"])
def _prep_kernel(
    q_ptr, sq_row, sq_d, g_ptr, sg_gal, sg_row, sg_d,
    q_msk, s_qmsk, g_msk, s_gmsk_gal, s_gmsk,
    lab, sl_q, sl_gal, sl_g,
    pre_ptr, lab_ptr,
    N, M, K, n_q_programs, D,
    NORMALIZE: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    NR = N + K * M
    NDR = K * N + K * M
    if pid < n_q_programs:
        # q rows against gallery k (columns: that gallery's rows)
        k = (pid % K).to(tl.int64)
        row0 = (pid // K).to(tl.int64) * BLOCK_M
        _prep_rows(
            a_ptr=q_ptr, sa_row=sq_row, sa_d=sq_d,
            a_msk=q_msk, a_moff=0, s_amsk=s_qmsk,
            b_msk=g_msk, b_moff=k * s_gmsk_gal, s_bmsk=s_gmsk,
            lab=lab, lab_off=k * sl_gal, sl_row=sl_q, sl_col=sl_g,
            pre_ptr=pre_ptr, NR=NR, a_pre=0, lab_ptr=lab_ptr, NDR=NDR, a_dir=k * N,
            row0=row0, n_rows=N, n_cols=M, D=D,
            WRITE_NORMS=k == 0, NORMALIZE=NORMALIZE, DENSE=DENSE, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    else:
        # rows of gallery k against the queries
        p = pid - n_q_programs
        m_blocks = tl.cdiv(M, BLOCK_M)
        k = (p // m_blocks).to(tl.int64)
        row0 = (p % m_blocks).to(tl.int64) * BLOCK_M
        _prep_rows(
            a_ptr=g_ptr + k * sg_gal, sa_row=sg_row, sa_d=sg_d,
            a_msk=g_msk, a_moff=k * s_gmsk_gal, s_amsk=s_gmsk,
            b_msk=q_msk, b_moff=0, s_bmsk=s_qmsk,
            lab=lab, lab_off=k * sl_gal, sl_row=sl_g, sl_col=sl_q,
            pre_ptr=pre_ptr, NR=NR, a_pre=N + k * M, lab_ptr=lab_ptr, NDR=NDR, a_dir=K * N + k * M,
            row0=row0, n_rows=M, n_cols=N, D=D,
            WRITE_NORMS=True, NORMALIZE=NORMALIZE, DENSE=DENSE, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
