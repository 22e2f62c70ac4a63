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

The negatives' softmax mass (reverse KL's loss, ``return_stats``) has no such form: it stays a
compare inside the loop, of int32 ranks (`ranks`) rather than the ids.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..kernels.tiles import LOG2E
from ..problem import Problem, _gallery_row_strides
from .tiles import _per_problem


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
    """`_Order` of a problem, sorted once for its centroids and counts."""
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


@_per_problem
def ranks(p: Problem) -> Tuple[torch.Tensor, torch.Tensor]:
    """The identity labels of both sides as int32 ranks in one numbering (equal ranks exactly
    where the ids are equal, by value): (q ranks [N], gallery ranks shaped as ``p.g_ids``).

    The statistics loop compares ids only where it needs the negatives' softmax mass (reverse
    KL, ``return_stats``): a pair by pair sum that no quantity outside the loop can stand in
    for (l - pos cancels where the positives hold almost all of a row's mass: bench/NOTES.md 37,
    38). Ranks make that compare an int32 one (the int64 ids' loads and compares cost 1.5 ms per
    direction more at N = 32768: ../shared/yardsticks/stats_pass.py). One sort of the N + K M ids,
    no host synchronisation."""
    q_ids = p.q_ids.to(torch.int64)
    g_ids = p.g_ids.to(torch.int64)
    ids = torch.cat([q_ids, g_ids.reshape(-1)])
    sorted_ids, perm = torch.sort(ids)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    rank_sorted = (torch.cumsum(first, dim=0) - 1).to(torch.int32)
    rank = torch.empty_like(rank_sorted).scatter_(0, perm, rank_sorted)
    return rank[:p.n], rank[p.n:].view(g_ids.shape)


def ids_as_ranks(p: Problem, args: dict) -> dict:
    """A launch's `_side_args` with the identity labels replaced by their int32 `ranks`: the
    compares of the N x M loops (the statistics pass's negatives' mass, the chunked backward's
    labels) on the centroids path."""
    q_rank, g_rank = ranks(p)
    s_gid_gal, s_gid = _gallery_row_strides(g_rank)
    return dict(args, q_ids=q_rank, s_qid=q_rank.stride(0), g_ids=g_rank, s_gid_gal=s_gid_gal, s_gid=s_gid)
