"""Identity centroids and the rows' dots with them: forward KL's positives' logit sums outside the
N x M loop (issue 27; the launcher, `launch/positives.py`, explains the terms).

    c_k   = sum_{present j: group(j) = k} x_j r_j                 (`_centroid_sums_kernel`)
    lin_i = fp32(<x_i, c_group(i)> r_i) * s log2 e                (`_centroid_dots_kernel`)

(x the raw features of either side, r the preparation pass's inverse norms). Both in float64:
the products x_j r_j are exact there, the sums' rounding (2^-53) cannot show in lin, which is
rounded to fp32 once, but at a rounding tie; so the order of the atomic additions, which a GPU
does not fix, changes no bit but at a tie. One pass over each side's features, where the torch
operations they replace made about fourteen passes over float64 copies of them (1030 MiB at
N = 32768, D = 512, and ~1 ms of the 7.5 ms forward on an H100: bench/NOTES.md 38).
"""

import triton
import triton.language as tl

from .tiles import LOG2E, load_scale, present


@triton.jit(do_not_specialize=["n_rows", "D"])
def _centroid_sums_kernel(
    x_ptr, sx_gal, sx_row, sx_d, msk, s_msk_gal, s_msk, r_ptr, s_r_gal, grp_ptr, c_ptr, n_rows, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (row blocks, galleries). Adds x_j r_j of each present row j of gallery k (the
    ``*_gal`` strides step a side's tensors by gallery: 0 for the queries) to row
    ``grp[k n_rows + j]`` of the float64 centroids ``c`` [groups, D] (zeroed by the caller)."""
    k = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    keep = present(msk, k * s_msk_gal, s_msk, rows, row_in)
    r = tl.load(r_ptr + k * s_r_gal + rows, mask=keep, other=0.0).to(tl.float64)
    grp = tl.load(grp_ptr + k * n_rows + rows, mask=keep, other=0)
    x_row = x_ptr + k * sx_gal + rows[:, None] * sx_row
    c_row = c_ptr + grp[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        on = keep[:, None] & (d < D)[None, :]
        x = tl.load(x_row + d[None, :] * sx_d, mask=on, other=0.0).to(tl.float64)
        tl.atomic_add(c_row + d[None, :], x * r[:, None], mask=on)


@triton.jit(do_not_specialize=["n_rows", "D"])
def _centroid_dots_kernel(
    x_ptr, sx_gal, sx_row, sx_d, msk, s_msk_gal, s_msk, r_ptr, s_r_gal, grp_ptr, c_ptr, lin_ptr, n_rows, D,
    scale_ptr, scale_value, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (row blocks, galleries). For a present row i of gallery k with a group,
    ``grp[k n_rows + i]`` >= 0: lin = fp32(<x_i, c_grp> r_i) * s log2 e into ``lin[k n_rows + i]``;
    0 for the others (a group -1: no present positive; absent rows may hold anything, NaN
    included, and are not read). ``scale_ptr`` None: the scale is ``scale_value``."""
    k = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    grp = tl.load(grp_ptr + k * n_rows + rows, mask=row_in, other=-1)
    has = present(msk, k * s_msk_gal, s_msk, rows, row_in) & (grp >= 0)
    r = tl.load(r_ptr + k * s_r_gal + rows, mask=has, other=0.0).to(tl.float64)
    x_row = x_ptr + k * sx_gal + rows[:, None] * sx_row
    c_row = c_ptr + tl.where(has, grp, 0)[:, None] * D
    acc = tl.zeros((BLOCK_M,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        on = has[:, None] & (d < D)[None, :]
        x = tl.load(x_row + d[None, :] * sx_d, mask=on, other=0.0).to(tl.float64)
        c = tl.load(c_row + d[None, :], mask=on, other=0.0)
        acc += tl.sum(x * c, axis=1)
    cos = (acc * r).to(tl.float32)                                   # <x_i, c> r_i, rounded once
    s_log2e = load_scale(scale_ptr, scale_value) * LOG2E             # as the statistics pass forms it
    tl.store(lin_ptr + k * n_rows + rows, tl.where(has, cos * s_log2e, 0.0), mask=row_in)
