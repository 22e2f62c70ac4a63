"""Tile helpers shared by the kernel families (inlined by Triton into each kernel).

Index spaces every kernel uses (see `sdm_triton/problem.py` for how the host builds them):

    samples         q rows 0..N-1, then gallery k's rows N + k*M + j           (NR = N + K*M)
    direction rows  q->g rows of gallery k: k*N + i, then g->q rows K*N + k*M + j   (NDR = K*N + K*M)

A q row has one softmax per gallery (its "direction rows" k*N + i); a gallery row has one
softmax over the queries. Per-sample vectors (inverse norm r, power-of-two scale c, norm)
live in the sample space, per-softmax vectors (label mass, statistics, losses) in the
direction-row space.

Logits are kept in the log2 domain: t_ij = <a_i, b_j> * (r_i * r_j) * (s * log2 e), so the
softmax uses exp2. ``r_i * r_j`` is formed first: the product commutes exactly, so a tile
computed with rows and columns swapped gives the same t bit for bit.
"""

import math
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import options as _contract

#: Triton's CPU interpreter (read at import, as Triton reads it): numpy has no libdevice, and
#: computes every product and sum rounded on its own (no contraction into FMAs).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

#: The running row maximum starts at NEG_BIG, and an absent column's logit is ABSENT, below it:
#: exp2(ABSENT - m) = 0 even while a row has seen no present column (m = NEG_BIG), so such a row
#: keeps l = 0 and the online rescale (m - m') l never meets -inf * 0 (NaN). Both finite: a
#: row whose every column is absent stays NaN-free (it is invalid anyway).
NEG_BIG = tl.constexpr(-1.0e38)
ABSENT = tl.constexpr(-3.0e38)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: The smallest normal fp32 number: a usable scale and the floor of the fp16 workspace scale.
FLT_MIN = tl.constexpr(_contract.FLT_MIN)


@triton.jit
def as_f32(x):
    """A float scalar argument in fp32. Eager launches type a Python float as fp32, but Inductor
    (torch.compile) types it as fp64, and an fp64 scalar would turn every value it touches, the
    loop-carried statistics included, into fp64 (issue 18): every float enters the math as fp32.
    (The interpreter hands a Python float over as it is; its ops take it as fp32.)"""
    if INTERPRETED:
        return x
    return tl.cast(x, tl.float32)


@triton.jit
def load_scale(scale_ptr, scale_value):
    """The logit scale s in fp32: the tensor behind ``scale_ptr`` when given, else ``scale_value``."""
    s = as_f32(scale_value)
    if scale_ptr is not None:
        s = tl.load(scale_ptr).to(tl.float32)
    return s


@triton.jit
def log2_logits(dot, ra, rb, s_log2e):
    """(cos, t) of a [BLOCK_M, BLOCK_N] tile: cos_ij = <a_i, b_j> r_i r_j and the log2-domain
    logit t = cos * s log2 e, rounded once to fp32.

    The forward's statistics and the backward's recomputation must see the same t bit for bit.
    On the GPU a product followed by a subtraction (t - m) may be contracted into one FMA, which
    skips t's rounding: the backward's exp2(t - m) then differs from the forward's by u |t|
    (1e-4 in P at |t| ~ 6000: issue 18's exact-logit failures). ``mul.rn`` is never contracted."""
    cos = dot * (ra[:, None] * rb[None, :])
    return cos, _times_rounded(cos, s_log2e)


@triton.jit
def _times_rounded(x, y):
    """x * y rounded on its own: never contracted into an FMA with what follows (`log2_logits`)."""
    if INTERPRETED:
        return x * y
    return libdevice.mul_rn(x, y)


#: fp32 "ieee" dots: the length of one FMA chain (`_dot_tile_fp32`). 16 was as accurate and cost
#: 35% of the fp32 statistics pass on an H100 (bench/NOTES.md 23).
FP32_CHAIN = tl.constexpr(32)


@triton.jit
def dot_tile(a_ptr, sa_row, sa_d, rows, row_in, b_ptr, sb_row, sb_d, cols, col_in, D,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """<a_i, b_j> for a [BLOCK_M, BLOCK_N] tile, fp32 accumulation over D in BLOCK_K steps.

    Half inputs go to the tensor cores as they are (a product of two half values is exact in
    fp32); fp32 inputs use ``DOT_PRECISION`` ("ieee" or "tf32", the caller's matmul
    precision), "ieee" through `_dot_tile_fp32`. ``UPCAST``: the CPU interpreter computes a
    bf16 dot wrongly, so it gets fp32 copies (exact). Out-of-range rows and columns load as 0.
    """
    if a_ptr.dtype.element_ty == tl.float32 and DOT_PRECISION == "ieee":
        return _dot_tile_fp32(a_ptr, sa_row, sa_d, rows, row_in, b_ptr, sb_row, sb_d, cols, col_in, D,
                              BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a, b = _dot_operands(a_ptr, sa_row, sa_d, rows, row_in, b_ptr, sb_row, sb_d, cols, col_in, D, offs_k)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = _logit_mma(a, b, acc, DOT_PRECISION)
    return acc


@triton.jit
def _logit_mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b for the logit tiles. On the GPU tl.dot (fp32 at ``DOT_PRECISION``; half
    inputs on the tensor cores). Under the CPU interpreter the products are summed along the
    features by numpy's reduction instead of its matmul: each element then takes the same
    operations whatever its position in the tile and whichever operand holds it (numpy's sgemm
    rounds a row differently at another row position: bench/NOTES.md 31), so a tile of swapped
    operands, or one cut at other rows, has the statistics loop's logits bit for bit, as the
    tensor cores' do."""
    if INTERPRETED:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def _dot_operands(a_ptr, sa_row, sa_d, rows, row_in, b_ptr, sb_row, sb_d, cols, col_in, D, offs_k):
    """The [BLOCK_M, len(offs_k)] and [len(offs_k), BLOCK_N] operand tiles of features offs_k."""
    k_in = offs_k < D
    a = tl.load(a_ptr + rows[:, None] * sa_row + offs_k[None, :] * sa_d,
                mask=row_in[:, None] & k_in[None, :], other=0.0)
    b = tl.load(b_ptr + cols[None, :] * sb_row + offs_k[:, None] * sb_d,
                mask=col_in[None, :] & k_in[:, None], other=0.0)
    return a, b


@triton.jit
def _dot_tile_fp32(a_ptr, sa_row, sa_d, rows, row_in, b_ptr, sb_row, sb_d, cols, col_in, D,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`dot_tile` for fp32 inputs at "ieee" precision, as accurate as a BLAS sgemm.

    Triton computes an fp32 "ieee" dot with FMAs, one chain per output element along the whole
    D when the accumulator is carried through ``tl.dot``: for the same-signed products of
    (anti-)aligned rows its error grows like D u, 3-4x PyTorch's cosine error at D = 160-512
    (bench/NOTES.md 23; issue 26). Here each step of FP32_CHAIN features is a dot of its own, and
    the steps' sums are added with Kahan's compensation, so the error stays at a few u whatever D.
    The step starts its chain at ``lost`` (what the running sum has lost so far) instead of 0:
    that is Kahan's ``y = part - c`` for free (``lost`` = -c), and a dot whose accumulator is no zero
    constant is not folded by Triton's combiner, which rewrites ``acc + dot(a, b, 0)`` into
    ``dot(a, b, acc)``, the one long chain again. The result does not depend on BLOCK_K (the
    backwards rebuild S bit for bit whatever their tiles)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lost = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)            # the sum's rounding error so far
    for k0 in range(0, D, FP32_CHAIN):
        offs_k = k0 + tl.arange(0, FP32_CHAIN)
        a, b = _dot_operands(a_ptr, sa_row, sa_d, rows, row_in, b_ptr, sb_row, sb_d, cols, col_in, D, offs_k)
        y = _logit_mma(a, b, lost, "ieee")                          # this step's sum, plus what was lost
        total = acc + y
        lost = y - (total - acc)                                    # exact: what rounding total lost of y
        acc = total
    return acc


@triton.jit
def present(msk_ptr, off, s_msk, idx, in_range):
    """The user's mask at ``off + idx * s_msk`` (True where no mask was given), False out of
    range. (Offsets travel as integers: a helper cannot return a None pointer.)"""
    keep = in_range
    if msk_ptr is not None:
        keep = in_range & (tl.load(msk_ptr + off + idx * s_msk, mask=in_range, other=0) != 0)
    return keep


@triton.jit
def load_ids(ids_ptr, off, s_id, idx, in_range):
    """Identity labels as int64 values, int32 ones as they are: ids of two integer dtypes compare
    by value (Triton would promote int8 vs uint8 to uint8, making -1 equal 255; int32 against
    int64 promotes to int64, by value), and two int32 sides (the ranks of `positives.ranks`)
    compare in int32, the cheaper compare inside the N x M loop."""
    ids = tl.load(ids_ptr + off + idx * s_id, mask=in_range, other=0)
    if ids_ptr.dtype.element_ty != tl.int32:
        ids = ids.to(tl.int64)
    return ids


@triton.jit
def same_ids(ai, b_ids, b_off, sb_id, cols, col_in):
    """[BLOCK_M, BLOCK_N] bool: id_i == id_j, the rows' ids ``ai`` (`row_ids`) against those of
    columns ``cols`` (loaded where ``col_in``)."""
    bi = load_ids(b_ids, b_off, sb_id, cols, col_in)
    return ai[:, None] == bi[None, :]


@triton.jit
def row_ids(a_ids, off, sa_id, rows, row_in, DENSE: tl.constexpr):
    """The rows' identity labels (loaded once per program; 0 with dense labels)."""
    if DENSE:
        ids = tl.zeros(rows.shape, dtype=tl.int64)
    else:
        ids = load_ids(a_ids, off, sa_id, rows, row_in)
    return ids


#: Dense labels are multiplied by 2^24 as they are loaded (exact): only Y = y / ysum matters,
#: and the scaling keeps ysum and 1 / ysum normal fp32 numbers for subnormal labels (all ~1e-42
#: gave 1 / ysum = inf, then NaN). Its price in range (from ~1e29, a NaN loss): options.LABEL_SCALE.
LABEL_SCALE = tl.constexpr(_contract.LABEL_SCALE)
LN_LABEL_SCALE = tl.constexpr(math.log(_contract.LABEL_SCALE))


@triton.jit
def load_labels(lab, off, sl_row, sl_col, rows, cols, both):
    """Dense labels y_ij * LABEL_SCALE in fp32 on a [BLOCK_M, BLOCK_N] tile, 0 outside ``both``."""
    y = tl.load(lab + off + rows[:, None] * sl_row + cols[None, :] * sl_col, mask=both, other=0)
    return y.to(tl.float32) * LABEL_SCALE


@triton.jit
def label_tile(ai, b_ids, b_off, sb_id, lab, lab_off, sl_row, sl_col, rows, cols, col_in, both, DENSE: tl.constexpr):
    """y_ij in fp32 on the [BLOCK_M, BLOCK_N] tile, 0 outside ``both`` (pairs of present samples).

    ids: y = [id_i == id_j] (``ai`` from `row_ids`); dense labels: the caller's weights (any
    float dtype or bool, any strides) times LABEL_SCALE. Bad dense values (negative, NaN, inf) pass through:
    the preparation pass turns them into a NaN label mass, so the loss becomes NaN.
    """
    if DENSE:
        y = load_labels(lab, lab_off, sl_row, sl_col, rows, cols, both)
    else:
        y = same_ids(ai, b_ids, b_off, sb_id, cols, col_in).to(tl.float32)
    return tl.where(both, y, 0.0)


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32: bit arithmetic, so the CPU
    interpreter (which converts bf16 wrongly) computes what the GPU does."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def split_hi_lo(w, HALF: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``w`` as hi + lo, two values of the half dtype: w = hi + lo to ~16 bits (hi exact,
    lo rounded).

    bf16: hi is w with the low 16 mantissa bits cleared (exact in bf16); fp16: hi is w rounded
    to fp16. Returned in HALF, or with ``UPCAST`` (the CPU interpreter's bf16, whose conversions
    it gets wrong) as fp32 holding the same values, rounded by bit arithmetic.
    """
    if HALF == tl.bfloat16:
        hi32 = (w.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    else:
        hi32 = w.to(HALF).to(tl.float32)
    if UPCAST:
        return hi32, round_bf16(w - hi32)
    return hi32.to(HALF), (w - hi32).to(HALF)


@triton.jit
def pow2_below(x):
    """2^-e with 2^e the power of two just above ``x`` > 0 (so x * 2^-e lies in [0.5, 1)),
    built from the exponent bits: exact, whatever the accuracy of log2."""
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126          # x in [2^(e-1), 2^e)
    e = tl.minimum(tl.maximum(e, -125), 126)
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def ln_precise(x):
    """ln x to fp32 accuracy: libdevice's logf on the GPU (tl.log is lg2.approx there, ~2^-22
    absolute); the CPU interpreter's tl.log is numpy's, already exact (it has no libdevice)."""
    if INTERPRETED:
        out = tl.log(x)
    else:
        out = libdevice.log(x)
    return out


@triton.jit
def ln_unscaled(y):
    """ln(y / LABEL_SCALE) of scaled dense weights or masses y > 0, to fp32 accuracy: the label
    terms of forward KL take the logarithms of unscaled weights (options.LABEL_SCALE says why).
    The division is exact unless it leaves the normal range (where the GPU would flush it)."""
    small = y < FLT_MIN * LABEL_SCALE
    return tl.where(small, ln_precise(y) - LN_LABEL_SCALE, ln_precise(y * (1.0 / LABEL_SCALE)))


@triton.jit
def logit_dot(a_ptr, sa_row, sa_d, rows, row_in, b_ptr, sb_row, sb_d, cols, col_in, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`dot_tile` of a logit tile, its rows queries or gallery samples.

    The backwards rebuild t and take exp2(t - m) with the forward's row maxima m of both
    softmaxes: a tile of q rows uses the maxima of gallery rows, which the forward computed on
    tiles of gallery rows, the operands swapped, and the chunked backward's tiles cut the rows
    and columns where the forward's did not. That needs <q_i, g_j> bit for bit whichever side
    is the A operand and wherever the pair sits in the tile: one rounding of
    difference is a factor 2^(u |t|) in P, and at |t| ~ 1e6 (temperature 1e-6) or 1e22
    (normalize=False, features ~1e20) that is a softmax off by percents, or exp2 of a large
    positive number: inf (issue 26.4). On the GPU `dot_tile` is so already: an fp32 output is
    an FMA chain over the same products in D order whichever operand holds them, and a
    tensor-core step adds the same products per element (tools/gpu_diag_26_edges.py measures
    the swap). Under the CPU interpreter `_logit_mma` sums the products by numpy's reduction,
    which is so too (numpy's matmul is neither: bench/NOTES.md 31)."""
    return dot_tile(a_ptr=a_ptr, sa_row=sa_row, sa_d=sa_d, rows=rows, row_in=row_in,
                    b_ptr=b_ptr, sb_row=sb_row, sb_d=sb_d, cols=cols, col_in=col_in, D=D,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, UPCAST=UPCAST, DOT_PRECISION=DOT_PRECISION)
