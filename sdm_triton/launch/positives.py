"""The positives' terms of forward KL with identity labels, outside the statistics loop (issue 27).

With identity labels, a softmax row i (a q row against gallery k, or a row of gallery k
against the queries) needs of its positives only their count and the sum of their log2-domain
logits (`kernels/stats.py`, slots cnt and lin):

    cnt_i = #{present j : id_j = id_i}
    lin_i = sum_{present j: id_j = id_i} t_ij = (<x_i, c_id(i)> r_i) s log2 e,   c_k = sum_{present j: id_j = k} x_j r_j

(x the raw features, r the inverse norms of the preparation pass): O((N + K M) D)
work beside the N x M loop, which then computes the log-sum-exps alone. Identities are
grouped by sorting (ids are any integers, int64 ones included: no hashing, no torch.unique
and no host synchronisation); each column side's centroids are sums over its group, each row
looks its identity up by binary search.

Rounding: the centroids and the dots are accumulated in float64 and lin rounded to fp32 once
before the scale (so that the order of the scatter's additions, an atomic one on a GPU, changes
no bit but at a rounding tie, ~2^-29 of the values). lin_i is thus a different evaluation of
sum_j t_ij than the tiles' (a few units of fp32 roundoff times |t| apart, the error the float64
comparison allows a logit, `testing._compare`); the loss clamp of `finish.py` keeps forward KL
>= 0 where the two evaluations of a perfect fit differ in the last bits. The backward does not
read lin (dL/dS = P - Y).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..kernels.positives import _positive_mass_kernel
from ..kernels.stats import NUM_STATS, SLOT_M, SLOT_NEG
from ..kernels.tiles import LOG2E
from ..problem import Problem
from .policy import interpreting
from .tiles import _cdiv, _dot_precision, _per_problem, _stats_tiles, _traceable

_SLOT_M, _SLOT_NEG = SLOT_M.value, SLOT_NEG.value


def _scale_log2e(p: Problem):
    """s log2 e as the statistics kernel forms it: the fp32 scale times fp32 log2 e, rounded."""
    if p.scale is not None:
        return p.scale.detach().to(torch.float32) * np.float32(LOG2E.value).item()
    return float(np.float32(p.scale_value) * np.float32(LOG2E.value))


F64 = torch.float64


def _present(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` in float64 with absent samples' rows 0 (they may hold anything, NaN included)."""
    return torch.where(keep[..., None], x.to(F64), 0.0)


class _Order(NamedTuple):
    """The ids of both sides as int64 (ids compare by value) and each column side's sorted order:
    ``g_ids`` [K, M], ``q_ids`` [N]; (sorted ids, perm: sorted position -> column) of the
    galleries [K, M] and of the queries [1, N]."""
    q_ids: torch.Tensor
    g_ids: torch.Tensor
    g_sorted: Tuple[torch.Tensor, torch.Tensor]
    q_sorted: Tuple[torch.Tensor, torch.Tensor]


@_per_problem
def _order(p: Problem) -> _Order:
    """`_Order` of a problem, sorted once for the centroids and the gather."""
    q_ids = p.q_ids.to(torch.int64)
    g_ids = p.g_ids.to(torch.int64).expand(p.galleries, p.m)
    return _Order(q_ids, g_ids, torch.sort(g_ids, dim=-1), torch.sort(q_ids[None], dim=-1))


def _groups(sorted_ids: torch.Tensor, perm: torch.Tensor, col_x, col_keep: torch.Tensor):
    """The identity groups of a column side, batched over galleries: its ids sorted, ``sorted_ids``
    and ``perm`` [B, C] (`_Order`), ``col_x`` [B, C, D] float64 (rows x_j r_j, 0 where absent;
    None: no centroids wanted), ``col_keep`` [B, C] bool. Returns (sorted ids [B, C], group of
    each sorted position [B, C] (global: b C + local), present count per group [B C], centroid
    per group [B C, D] or None)."""
    b, c = sorted_ids.shape
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    base = torch.arange(b, device=sorted_ids.device)[:, None] * c
    group_sorted = torch.cumsum(first, dim=-1) - 1 + base          # [B, C]
    group = torch.empty_like(group_sorted).scatter_(-1, perm, group_sorted)   # of each column as given
    counts = torch.zeros(b * c, dtype=torch.float32, device=sorted_ids.device)
    counts.index_add_(0, group.reshape(-1), col_keep.reshape(-1).to(torch.float32))
    centroids = None
    if col_x is not None:
        d = col_x.shape[-1]
        centroids = torch.zeros(b * c, d, dtype=F64, device=sorted_ids.device)
        centroids.index_add_(0, group.reshape(-1), col_x.reshape(b * c, d))
    return sorted_ids, group_sorted, counts, centroids


def _rows_against(row_ids, row_x, row_r, sorted_ids, group_sorted, counts, centroids, s_log2e):
    """(lin, cnt) [B, R] fp32 of rows with ids ``row_ids`` [B, R], raw rows ``row_x`` [B, R, D]
    (float64) and inverse norms ``row_r`` [B, R] against the column groups of `_groups`; lin None
    (and ``row_x``, ``row_r`` unread: None) where the groups have no centroids."""
    c = sorted_ids.shape[-1]
    at = torch.searchsorted(sorted_ids, row_ids.contiguous()).clamp_(max=c - 1)   # the first column id >= the row's
    found = sorted_ids.gather(-1, at) == row_ids
    group = group_sorted.gather(-1, at)
    cnt = torch.where(found, counts[group], 0.0)
    if centroids is None:
        return None, cnt
    cos = ((row_x * centroids[group]).sum(dim=-1) * row_r).to(torch.float32)   # <x_i, c_id(i)> r_i
    lin = torch.where(found & (cnt > 0), cos * s_log2e, 0.0)
    return lin, cnt


def positives(p: Problem, r: torch.Tensor, want_lin: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(lin, cnt), each [NDR] fp32 in the softmax-row order of `problem.py`, over this problem's
    columns; ``r`` [NR]: the preparation pass's inverse norms (slot PRE_R). ``want_lin`` False
    (reverse KL, whose lin the statistics loop computes without labels): lin is None and no
    centroid is formed, the counts alone."""
    n, m, k, d = p.n, p.m, p.galleries, p.d
    dev = p.q.device
    s_log2e = _scale_log2e(p)
    q_keep = p.q_mask.to(torch.bool) if p.q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
    g_keep = (p.g_mask.to(torch.bool) if p.g_mask is not None
              else torch.ones(m, dtype=torch.bool, device=dev)).expand(k, m)
    g = p.g if p.g.dim() == 3 else p.g.unsqueeze(0)
    order = _order(p)
    q_ids, g_ids = order.q_ids, order.g_ids
    if want_lin:    # the features in float64, 0 where absent (the counts alone need none of it)
        r_q, r_g = r[:n].to(F64), r[n:].view(k, m).to(F64)
        qx = _present(p.q, q_keep)                                       # [N, D]
        gx = _present(g, g_keep).expand(k, m, d)                         # [K, M, D]
        g_cols, q_cols = gx * r_g[..., None], (qx * r_q[:, None])[None]
        q_rows = (qx.expand(k, n, d), r_q.expand(k, n))
        g_rows = (gx.reshape(1, k * m, d), r_g.reshape(1, k * m))
    else:
        g_cols = q_cols = None
        q_rows = g_rows = (None, None)

    # q rows against each gallery: the galleries' identity centroids
    g_groups = _groups(*order.g_sorted, g_cols, g_keep)
    lin_q, cnt_q = _rows_against(q_ids.expand(k, n), *q_rows, *g_groups, s_log2e)
    # each gallery's rows against the queries: the queries' centroids, once
    q_groups = _groups(*order.q_sorted, q_cols, q_keep[None])
    lin_g, cnt_g = _rows_against(g_ids.reshape(1, k * m), *g_rows, *q_groups, s_log2e)
    cnt = torch.cat([cnt_q.reshape(-1), cnt_g.reshape(-1)])
    if not want_lin:
        return None, cnt
    return torch.cat([lin_q.reshape(-1), lin_g.reshape(-1)]), cnt


def _ranges(row_ids: torch.Tensor, sorted_ids: torch.Tensor):
    """Each row's positives as a range [lo, hi) of a column side's sorted ids (`_Order`): rows
    ``row_ids`` [B, R] against ``sorted_ids`` [B, C], or [1, C] shared by every row. Absent
    columns stay in the ranges (the kernel skips them)."""
    rows = row_ids.contiguous()
    if sorted_ids.shape[0] == 1 < rows.shape[0]:          # one sorted side for every gallery's rows
        flat = rows.reshape(-1)
        return (torch.searchsorted(sorted_ids[0], flat).view(rows.shape),
                torch.searchsorted(sorted_ids[0], flat, right=True).view(rows.shape))
    return torch.searchsorted(sorted_ids, rows), torch.searchsorted(sorted_ids, rows, right=True)


def positive_mass(p: Problem, r: torch.Tensor, part: torch.Tensor, segments_q: int, segments_g: int) -> None:
    """Each identity-labelled softmax row's positives' mass, sum_{j positive} 2^(t_ij - M_i), taken
    off the negatives' mass (there: every column's) of the statistics ``part`` [S, NUM_STATS, NDR]
    at the segment of the row's maximum M_i
    (`kernels/positives.py`): the statistics pass (m of every segment) must have run. ``r`` [NR]:
    the preparation pass's inverse norms; ``segments_q`` / ``segments_g``: the segments the q rows
    / gallery rows have in ``part`` (the others hold no statistics of theirs: never read)."""
    n, m, k, d = p.n, p.m, p.galleries, p.d
    order = _order(p)
    sg_gal, sg_row, sg_d = p.g_strides()
    s_gmsk_gal, s_gmsk = p.g_mask_strides()
    s_qmsk = p.q_mask.stride(0) if p.q_mask is not None else 0
    t = _stats_tiles(p)          # the statistics pass's tiles: its logits bit for bit (kernels/positives.py)
    common = dict(part_ptr=part, NDR=p.num_rows, D=d, scale_ptr=p.scale, scale_value=p.scale_value,
                  NUM_STATS=NUM_STATS, SLOT_M=_SLOT_M, SLOT_NEG=_SLOT_NEG,
                  UPCAST=interpreting() and p.q.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(p.q.dtype),
                  BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps,
                  num_stages=t.num_stages)
    q_side = dict(ptr=p.q, gal=0, row=p.q.stride(0), d=p.q.stride(1), msk=p.q_mask, msk_gal=0, msk_s=s_qmsk,
                  r=r[:n], r_gal=0)
    g_side = dict(ptr=p.g, gal=sg_gal, row=sg_row, d=sg_d, msk=p.g_mask, msk_gal=s_gmsk_gal, msk_s=s_gmsk,
                  r=r[n:], r_gal=m)
    # q rows against each gallery's columns, then each gallery's rows against the queries
    (g_sorted, perm_g), (q_sorted, perm_q) = order.g_sorted, order.q_sorted
    lo_q, hi_q = _ranges(order.q_ids.expand(k, n), g_sorted)
    lo_g, hi_g = _ranges(order.g_ids, q_sorted)
    for a, b, lo, hi, perm, dir0, rows, segs in ((q_side, g_side, lo_q, hi_q, perm_g, 0, n, segments_q),
                                                (g_side, q_side, lo_g, hi_g, perm_q, k * n, m, segments_g)):
        _traceable(_positive_mass_kernel)[(_cdiv(rows, t.block_m), k)](
            a_ptr=a["ptr"], sa_gal=a["gal"], sa_row=a["row"], sa_d=a["d"],
            b_ptr=b["ptr"], sb_gal=b["gal"], sb_row=b["row"], sb_d=b["d"],
            a_msk=a["msk"], s_amsk_gal=a["msk_gal"], s_amsk=a["msk_s"],
            b_msk=b["msk"], s_bmsk_gal=b["msk_gal"], s_bmsk=b["msk_s"],
            a_r_ptr=a["r"], s_ar_gal=a["r_gal"], b_r_ptr=b["r"], s_br_gal=b["r_gal"],
            lo_ptr=lo, hi_ptr=hi, perm_ptr=perm, s_perm_gal=perm.stride(0) if perm.shape[0] > 1 else 0,
            dir0=dir0, n_rows=rows, S=segs, **common)
