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

import triton
import triton.language as tl
from triton.language.extra import libdevice

#: The running row maximum starts at NEG_BIG, and an absent column's logit is ABSENT, below it:
#: exp2(ABSENT - m) = 0 even while a row has seen no present column (m = NEG_BIG), so such a row
#: keeps l = 0 and the online rescale (m - m') l never meets -inf * 0 (NaN). Both finite: a
#: row whose every column is absent stays NaN-free (it is invalid anyway).
NEG_BIG = tl.constexpr(-1.0e38)
ABSENT = tl.constexpr(-3.0e38)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def dot_tile(a_ptr, sa_row, sa_d, rows, row_in, b_ptr, sb_row, sb_d, cols, col_in, D,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """<a_i, b_j> for a [BLOCK_M, BLOCK_N] tile, fp32 accumulation over D in BLOCK_K steps.

    Half inputs go to the tensor cores as they are (a product of two half values is exact in
    fp32); fp32 inputs use ``DOT_PRECISION`` ("ieee" or "tf32", the caller's matmul
    precision). ``UPCAST``: the CPU interpreter computes a bf16 dot wrongly, so it gets fp32
    copies (exact). Out-of-range rows and columns load as 0.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < D
        a = tl.load(a_ptr + rows[:, None] * sa_row + offs_k[None, :] * sa_d,
                    mask=row_in[:, None] & k_in[None, :], other=0.0)                     # [BM, BK]
        b = tl.load(b_ptr + cols[None, :] * sb_row + offs_k[:, None] * sb_d,
                    mask=col_in[None, :] & k_in[:, None], other=0.0)                     # [BK, BN]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, b, acc)
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
def row_ids(a_ids, off, sa_id, rows, row_in, DENSE: tl.constexpr):
    """The rows' identity labels (loaded once per program; 0 with dense labels)."""
    if DENSE:
        ids = tl.zeros(rows.shape, dtype=tl.int32)
    else:
        ids = tl.load(a_ids + off + rows * sa_id, mask=row_in, other=0)
    return ids


@triton.jit
def label_tile(ai, b_ids, b_off, sb_id, lab, lab_off, sl_row, sl_col, rows, cols, col_in, both, DENSE: tl.constexpr):
    """y_ij in fp32 on the [BLOCK_M, BLOCK_N] tile, 0 outside ``both`` (pairs of present samples).

    ids: y = [id_i == id_j] (``ai`` from `row_ids`); dense labels: the caller's weights (any
    float dtype or bool, any strides). Bad dense values (negative, NaN, inf) pass through:
    the preparation pass turns them into a NaN label mass, so the loss becomes NaN.
    """
    if DENSE:
        y = tl.load(lab + lab_off + rows[:, None] * sl_row + cols[None, :] * sl_col, mask=both,
                    other=0).to(tl.float32)
    else:
        bi = tl.load(b_ids + b_off + cols * sb_id, mask=col_in, other=0)
        y = (ai[:, None] == bi[None, :]).to(tl.float32)
    return tl.where(both, y, 0.0)


@triton.jit
def split_hi_lo(w, HALF: tl.constexpr, IS_BF16: tl.constexpr):
    """fp32 ``w`` as hi + lo in the half dtype: w = hi + lo to ~16 bits (hi exact, lo rounded).

    bf16: hi is w with the low 16 mantissa bits cleared (exact in bf16, and no bf16 -> fp32
    conversion, which the CPU interpreter gets wrong); fp16: hi is w rounded to fp16.
    """
    if IS_BF16:
        hi32 = (w.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
    else:
        hi32 = w.to(HALF).to(tl.float32)
    return hi32.to(HALF), (w - hi32).to(HALF)


@triton.jit
def pow2_below(x):
    """2^-e with 2^e the power of two just above ``x`` > 0 (so x * 2^-e lies in [0.5, 1)),
    built from the exponent bits: exact, whatever the accuracy of log2."""
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126          # x in [2^(e-1), 2^e)
    e = tl.minimum(tl.maximum(e, -125), 126)
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def ln_precise(x, INTERPRETED: tl.constexpr):
    """ln x to fp32 accuracy: libdevice's logf on the GPU (tl.log is lg2.approx there, ~2^-22
    absolute); the CPU interpreter's tl.log is numpy's, already exact (it has no libdevice)."""
    if INTERPRETED:
        out = tl.log(x)
    else:
        out = libdevice.log(x)
    return out
