"""The positives' terms of forward KL with identity labels, outside the statistics loop (issue 27).

With identity labels, a softmax row i (a q row against gallery k, or a row of gallery k
against the queries) needs of its positives only their count and the sum of their log2-domain
logits (`kernels/stats.py`, slots cnt and lin):

    cnt_i = #{present j : id_j = id_i}
    lin_i = sum_{present j: id_j = id_i} t_ij = (<x_i, c_id(i)> r_i) s log2 e,   c_k = sum_{present j: id_j = k} x_j r_j

(x the raw features, r the inverse norms of the preparation pass): O((N + K M) D)
work beside the N x M loop, which then computes the log-sum-exps alone. Identities are
grouped by sorting (ids are any integers, int64 ones included: no hashing, no torch.unique
and no host synchronisation) and counted here; each row looks its identity's group up by
binary search; the centroids (sums over each group) and the rows' dots with them are two
kernels (`kernels/centroids.py`), one pass over each side's features.

Rounding: the centroids and the dots are accumulated in float64 and lin rounded to fp32 once
before the scale (so that the order of the centroids' additions, atomic ones on a GPU, changes
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

import torch

from ..kernels.centroids import _centroid_dots_kernel, _centroid_sums_kernel
from ..problem import Problem, _gallery_row_strides
from .policy import table_tiles
from .tiles import _cdiv, _per_problem, _traceable


F64 = torch.float64


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


def _numbers(sorted_ids: torch.Tensor) -> torch.Tensor:
    """Ids sorted along the last dimension numbered 0, 1, ... by distinct id along it."""
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    return torch.cumsum(first, dim=-1) - 1


def _unsorted(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x`` in sorted order (``perm``: sorted position -> position as given) put back in the
    order given, along the last dimension."""
    return torch.empty_like(x).scatter_(-1, perm, x)


class _Groups(NamedTuple):
    """The identity groups of a column side, batched over galleries (`_groups`): its ids sorted
    [B, C], the group of each sorted position and of each column as given [B, C] (global
    numbers: b C + local), the present count per group [B C]."""
    sorted_ids: torch.Tensor
    group_sorted: torch.Tensor
    group: torch.Tensor
    counts: torch.Tensor


def _groups(sorted_ids: torch.Tensor, perm: torch.Tensor, col_keep: torch.Tensor) -> _Groups:
    """`_Groups` of a column side from its ids sorted, ``sorted_ids`` and ``perm`` [B, C]
    (`_Order`), and its presence ``col_keep`` [B, C] bool."""
    b, c = sorted_ids.shape
    base = torch.arange(b, device=sorted_ids.device)[:, None] * c   # global numbers: b C + local
    group_sorted = _numbers(sorted_ids) + base
    group = _unsorted(group_sorted, perm)                            # of each column as given
    counts = torch.zeros(b * c, dtype=torch.float32, device=sorted_ids.device)
    counts.index_add_(0, group.reshape(-1), col_keep.reshape(-1).to(torch.float32))
    return _Groups(sorted_ids, group_sorted, group, counts)


def _rows_against(row_ids: torch.Tensor, groups: _Groups) -> Tuple[torch.Tensor, torch.Tensor]:
    """(group, cnt) [B, R] of rows with ids ``row_ids`` [B, R] against a column side's `_Groups`:
    each row's group (int64; -1 where it has no present positive) and its count (fp32)."""
    c = groups.sorted_ids.shape[-1]
    at = torch.searchsorted(groups.sorted_ids, row_ids.contiguous()).clamp_(max=c - 1)   # the first id >= the row's
    found = groups.sorted_ids.gather(-1, at) == row_ids
    group = groups.group_sorted.gather(-1, at)
    cnt = torch.where(found, groups.counts[group], 0.0)
    return torch.where(found & (cnt > 0), group, -1), cnt


class _Side(NamedTuple):
    """One side's features, presence and inverse norms as `kernels/centroids.py` reads them,
    each with its stride between galleries first (0 where the side is shared: the queries)."""
    x: torch.Tensor
    sx: Tuple[int, int, int]
    msk: Optional[torch.Tensor]
    s_msk: Tuple[int, int]
    r: torch.Tensor
    s_r_gal: int


def _side_args(side: _Side) -> dict:
    """A `_Side` as both kernels of `kernels/centroids.py` name it."""
    return dict(x_ptr=side.x, sx_gal=side.sx[0], sx_row=side.sx[1], sx_d=side.sx[2], msk=side.msk,
                s_msk_gal=side.s_msk[0], s_msk=side.s_msk[1], r_ptr=side.r, s_r_gal=side.s_r_gal)


def _sides(p: Problem, r: torch.Tensor) -> Tuple[_Side, _Side]:
    """(queries, galleries) as `_Side`s; ``r`` [NR] the preparation pass's inverse norms."""
    s_qmsk = p.q_mask.stride(0) if p.q_mask is not None else 0
    return (_Side(p.q, (0, *p.q.stride()), p.q_mask, (0, s_qmsk), r[:p.n], 0),
            _Side(p.g, p.g_strides(), p.g_mask, p.g_mask_strides(), r[p.n:], p.m))


def _centroids(side: _Side, group: torch.Tensor, n_groups: int, d: int, rows: int, galleries: int) -> torch.Tensor:
    """c [n_groups, D] float64: each group's sum of x_j r_j over the present rows of ``side``
    (``rows`` per gallery), ``group`` [galleries, rows] (`_Groups.group`)."""
    t = table_tiles("centroids")
    c = torch.zeros(n_groups, d, dtype=F64, device=side.x.device)
    _traceable(_centroid_sums_kernel)[(_cdiv(rows, t.block_m), galleries)](
        **_side_args(side), grp_ptr=group, c_ptr=c, n_rows=rows, D=d,
        BLOCK_M=t.block_m, BLOCK_D=t.block_k, num_warps=t.num_warps)
    return c


def _dots(p: Problem, side: _Side, group: torch.Tensor, c: torch.Tensor, lin: torch.Tensor, rows: int) -> None:
    """``lin`` [K rows] = fp32(<x_i, c_group(i)> r_i) s log2 e of ``side``'s rows of each gallery,
    ``group`` [K, rows] (`_rows_against`), 0 where a row has no group or is absent."""
    t = table_tiles("centroids")
    _traceable(_centroid_dots_kernel)[(_cdiv(rows, t.block_m), p.galleries)](
        **_side_args(side), grp_ptr=group, c_ptr=c, lin_ptr=lin, n_rows=rows, D=p.d, scale_ptr=p.scale,
        scale_value=p.scale_value, BLOCK_M=t.block_m, BLOCK_D=t.block_k, num_warps=t.num_warps)


def positives(p: Problem, r: torch.Tensor, want_lin: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(lin, cnt), each [NDR] fp32 in the softmax-row order of `problem.py`, over this problem's
    columns; ``r`` [NR]: the preparation pass's inverse norms (slot PRE_R). ``want_lin`` False
    (reverse KL, whose lin the statistics loop computes without labels): lin is None and no
    centroid is formed, the counts alone."""
    n, m, k, d = p.n, p.m, p.galleries, p.d
    dev = p.q.device
    q_keep = p.q_mask.to(torch.bool) if p.q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
    g_keep = (p.g_mask.to(torch.bool) if p.g_mask is not None
              else torch.ones(m, dtype=torch.bool, device=dev)).expand(k, m)
    order = _order(p)
    # q rows against each gallery's identity groups; each gallery's rows against the queries'
    g_groups = _groups(*order.g_sorted, g_keep)
    grp_q, cnt_q = _rows_against(order.q_ids.expand(k, n), g_groups)
    q_groups = _groups(*order.q_sorted, q_keep[None])
    grp_g, cnt_g = _rows_against(order.g_ids.reshape(1, k * m), q_groups)
    cnt = torch.cat([cnt_q.reshape(-1), cnt_g.reshape(-1)])
    if not want_lin:
        return None, cnt
    q_side, g_side = _sides(p, r)
    lin = torch.empty(p.num_rows, dtype=torch.float32, device=dev)
    # one side's float64 centroids at a time (each is [groups, D], 8 bytes an element)
    c = _centroids(g_side, g_groups.group, k * m, d, m, k)           # each gallery's identity centroids
    _dots(p, q_side, grp_q, c, lin[:k * n], n)
    del c
    c = _centroids(q_side, q_groups.group, n, d, n, 1)               # the queries', once
    _dots(p, g_side, grp_g, c, lin[k * n:], m)
    return lin, cnt


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
    rank = _unsorted(_numbers(sorted_ids), perm).to(torch.int32)
    return rank[:p.n], rank[p.n:].view(g_ids.shape)


def ids_as_ranks(p: Problem, args: dict) -> dict:
    """A launch's `_side_args` with the identity labels replaced by their int32 `ranks`: the
    compares of the N x M loops (the statistics pass's negatives' mass, the chunked backward's
    labels) on the centroids path."""
    q_rank, g_rank = ranks(p)
    s_gid_gal, s_gid = _gallery_row_strides(g_rank)
    return dict(args, q_ids=q_rank, s_qid=q_rank.stride(0), g_ids=g_rank, s_gid_gal=s_gid_gal, s_gid=s_gid)
