"""Identity groups, centroids and the rows' dots with them: forward KL's positives' counts and
logit sums outside the N x M loop (issue 27; the launcher, `launch/positives.py`, explains the
terms). A group is found by binary search in a side's ids sorted (`lower_bound`) and named by
its first sorted position, so no numbering pass runs between the sort and these kernels.

    c_k   = sum_{present j: group(j) = k} x_j r_j                 (`_centroid_sums_kernel`)
    cnt_i = #{present j: id_j = id_i},
    lin_i = fp32(<x_i, c_group(i)> r_i) * s log2 e                (`_positives_kernel`)
    rank_i = first position of id_i in all ids sorted             (`_ranks_kernel`)

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


@triton.jit
def lower_bound(sorted_ptr, n, value, in_range, steps, STRICT: tl.constexpr):
    """Per lane: the first position p in [0, n) of the ascending ``sorted_ptr[0:n]`` with
    sorted[p] >= value (STRICT: > value), n where there is none. ``steps`` >= bit length of n:
    each step halves every lane's interval [lo, hi)."""
    lo = tl.zeros(value.shape, dtype=tl.int64)
    hi = tl.zeros(value.shape, dtype=tl.int64) + n
    for _ in range(steps):
        active = in_range & (lo < hi)
        mid = (lo + hi) // 2
        v = tl.load(sorted_ptr + mid, mask=active, other=0)
        right = (v <= value) if STRICT else (v < value)
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit(do_not_specialize=["n_rows", "D", "steps"])
def _centroid_sums_kernel(
    x_ptr, sx_gal, sx_row, sx_d, msk, s_msk_gal, s_msk, r_ptr, s_r_gal, ids_ptr, s_ids_gal, srt_ptr, c_ptr,
    n_rows, D, steps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (row blocks, galleries). Adds x_j r_j of each present row j of gallery k (the
    ``*_gal`` strides step a side's tensors by gallery: 0 for the queries) to row
    ``k n_rows + lower_bound(its ids sorted, id_j)`` of the float64 centroids ``c``
    [galleries n_rows, D] (zeroed by the caller); ``srt`` [galleries, n_rows] int64: each
    gallery's ids sorted, ``ids`` int64."""
    k = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    keep = present(msk, k * s_msk_gal, s_msk, rows, row_in)
    r = tl.load(r_ptr + k * s_r_gal + rows, mask=keep, other=0.0).to(tl.float64)
    ids = tl.load(ids_ptr + k * s_ids_gal + rows, mask=keep, other=0)
    grp = k * n_rows + lower_bound(srt_ptr + k * n_rows, n_rows, ids, keep, steps, STRICT=False)
    x_row = x_ptr + k * sx_gal + rows[:, None] * sx_row
    c_row = c_ptr + grp[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        on = keep[:, None] & (d < D)[None, :]
        x = tl.load(x_row + d[None, :] * sx_d, mask=on, other=0.0).to(tl.float64)
        tl.atomic_add(c_row + d[None, :], x * r[:, None], mask=on)


@triton.jit(do_not_specialize=["n_rows", "n_cols", "D", "steps"])
def _positives_kernel(
    x_ptr, sx_gal, sx_row, sx_d, msk, s_msk_gal, s_msk, r_ptr, s_r_gal, ids_ptr, s_ids_gal,
    srt_ptr, s_srt_gal, before_ptr, s_before_gal, c_ptr, cnt_ptr, lin_ptr, n_rows, n_cols, D, steps,
    scale_ptr, scale_value, WANT_LIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (row blocks, galleries). Rows i of gallery k of one side against the columns of the
    other side's gallery k' (``s_*_gal`` 0 where that side is shared: the queries), whose ids
    sorted are ``srt[k' : n_cols]`` (int64, ``ids`` int64 too): the positives are the sorted
    range [lo, hi) of id_i. Writes, at ``k n_rows + i``, cnt = their present count (hi - lo, or
    from ``before`` [k', n_cols + 1] int32: present columns before each sorted position, when the
    columns have a mask) into ``cnt`` for every row, and (WANT_LIN) lin = fp32(<x_i, c_lo> r_i) s log2 e
    into ``lin``: 0 where the row is absent or cnt = 0 (absent rows may hold anything, NaN
    included, and are not read). ``c`` [galleries' n_cols, D] float64 (`_centroid_sums_kernel`
    of the columns' side: a group is its gallery's offset, k' n_cols = k ``s_srt_gal``, plus its
    first sorted position); ``scale_ptr`` None: the scale is ``scale_value``."""
    k = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    ids = tl.load(ids_ptr + k * s_ids_gal + rows, mask=row_in, other=0)
    srt = srt_ptr + k * s_srt_gal
    lo = lower_bound(srt, n_cols, ids, row_in, steps, STRICT=False)
    hi = lower_bound(srt, n_cols, ids, row_in, steps, STRICT=True)
    if before_ptr is not None:
        before = before_ptr + k * s_before_gal
        cnt = (tl.load(before + hi, mask=row_in, other=0) - tl.load(before + lo, mask=row_in, other=0)).to(tl.float32)
    else:
        cnt = (hi - lo).to(tl.float32)
    tl.store(cnt_ptr + k * n_rows + rows, cnt, mask=row_in)
    if WANT_LIN:
        has = present(msk, k * s_msk_gal, s_msk, rows, row_in) & (cnt > 0)
        r = tl.load(r_ptr + k * s_r_gal + rows, mask=has, other=0.0).to(tl.float64)
        x_row = x_ptr + k * sx_gal + rows[:, None] * sx_row
        c_row = c_ptr + (k * s_srt_gal + tl.where(has, lo, 0))[:, None] * D      # group k' n_cols + lo
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


@triton.jit(do_not_specialize=["n", "steps"])
def _ranks_kernel(ids_ptr, srt_ptr, rank_ptr, n, steps, BLOCK: tl.constexpr):
    """rank_i = lower_bound(srt, id_i) as int32 for the n int64 ``ids``, ``srt`` the same ids
    sorted: equal ranks exactly where the ids are equal."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = idx < n
    ids = tl.load(ids_ptr + idx, mask=on, other=0)
    tl.store(rank_ptr + idx, lower_bound(srt_ptr, n, ids, on, steps, STRICT=False).to(tl.int32), mask=on)
