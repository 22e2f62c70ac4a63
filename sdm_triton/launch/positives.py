"""The positives' terms of forward KL with identity labels, outside the statistics loop (issue 27).

With identity labels, a softmax row i (a q row against gallery k, or a row of gallery k
against the queries) needs of its positives only their count and the sum of their log2-domain
logits (`kernels/stats.py`, slots cnt and lin):

    cnt_i = #{present j : id_j = id_i}
    lin_i = sum_{present j: id_j = id_i} t_ij = (<x_i, c_id(i)> r_i) s log2 e,   c_k = sum_{present j: id_j = k} x_j r_j

(x the raw features, r the inverse norms of the preparation pass): O((N + K M) D)
work beside the N x M loop, which then computes the log-sum-exps alone. Identities are
grouped by sorting each column side's ids (ids are any integers, int64 ones included: no
hashing, no torch.unique and no host synchronisation); everything after the sort is two
kernels per direction (`kernels/centroids.py`), which find a row's group by binary search in
the sorted ids and name it by its first sorted position: the centroids (sums over each group),
then each row's count (the length of its id's sorted range) and dot with its centroid. A
direction is one sort and two launches (with a column mask, three torch ops more for the
present counts), where the torch operations they replace were about twenty (~1 ms of host time
a forward at N = 16384 on an H100: bench/NOTES.md 40).

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

from ..kernels.centroids import _centroid_sums_kernel, _positives_kernel, _ranks_kernel
from ..problem import Problem, _gallery_row_strides
from .policy import table_tiles
from .tiles import _cdiv, _per_problem, _traceable


F64 = torch.float64


class _Order(NamedTuple):
    """The ids of both sides as int64 (ids compare by value): ``q_ids`` [N], ``g_ids`` [K, M]
    (strides as given: a gallery stride 0 where the galleries share ids), and each side's ids
    sorted, contiguous: ``q_sorted`` [1, N], ``g_sorted`` [K, M]; ``g_perm`` / ``q_perm``: sorted
    position -> row."""
    q_ids: torch.Tensor
    g_ids: torch.Tensor
    q_sorted: torch.Tensor
    q_perm: torch.Tensor
    g_sorted: torch.Tensor
    g_perm: torch.Tensor


@_per_problem
def _order(p: Problem) -> _Order:
    """`_Order` of a problem, sorted once for its centroids and counts."""
    q_ids = p.q_ids.to(torch.int64)
    g_ids = p.g_ids.to(torch.int64).expand(p.galleries, p.m)
    q_sorted, q_perm = torch.sort(q_ids[None], dim=-1)
    g_sorted, g_perm = torch.sort(g_ids, dim=-1)
    return _Order(q_ids, g_ids, q_sorted, q_perm, g_sorted, g_perm)


def _present_before(keep: Optional[torch.Tensor], perm: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, C + 1] int32: the present columns before each sorted position of a column side (its
    presence ``keep`` [B, C] bool, ``perm`` its sorted order), so that a sorted range [lo, hi)
    holds before[hi] - before[lo] present columns; None without a mask (every column is present)."""
    if keep is None:
        return None
    counts = torch.cumsum(keep.expand(perm.shape).gather(-1, perm), dim=-1, dtype=torch.int32)
    return torch.nn.functional.pad(counts, (1, 0))          # (no out= into a view: torch.compile)


def _steps(n: int) -> int:
    """Binary search steps over n sorted values (`kernels/centroids.lower_bound`)."""
    return max(1, n.bit_length())


class _Side(NamedTuple):
    """One side's features, presence, inverse norms and int64 ids as `kernels/centroids.py` reads
    them, each with its stride between galleries first (0 where the side is shared: the queries)."""
    x: torch.Tensor
    sx: Tuple[int, int, int]
    msk: Optional[torch.Tensor]
    s_msk: Tuple[int, int]
    r: torch.Tensor
    s_r_gal: int
    ids: torch.Tensor
    s_ids_gal: int


def _side_args(side: _Side) -> dict:
    """A `_Side` as the kernels of `kernels/centroids.py` name it."""
    return dict(x_ptr=side.x, sx_gal=side.sx[0], sx_row=side.sx[1], sx_d=side.sx[2], msk=side.msk,
                s_msk_gal=side.s_msk[0], s_msk=side.s_msk[1], r_ptr=side.r, s_r_gal=side.s_r_gal,
                ids_ptr=side.ids, s_ids_gal=side.s_ids_gal)


def _sides(p: Problem, r: torch.Tensor, order: _Order) -> Tuple[_Side, _Side]:
    """(queries, galleries) as `_Side`s; ``r`` [NR] the preparation pass's inverse norms."""
    s_qmsk = p.q_mask.stride(0) if p.q_mask is not None else 0
    g_ids = order.g_ids
    if g_ids.stride(-1) != 1:     # ids of a gallery read as a row: make them one
        g_ids = g_ids.contiguous()
    return (_Side(p.q, (0, *p.q.stride()), p.q_mask, (0, s_qmsk), r[:p.n], 0, order.q_ids.contiguous(), 0),
            _Side(p.g, p.g_strides(), p.g_mask, p.g_mask_strides(), r[p.n:], p.m, g_ids, g_ids.stride(0)))


def _centroids(side: _Side, srt: torch.Tensor, d: int, rows: int, galleries: int) -> torch.Tensor:
    """c [galleries rows, D] float64: each group's sum of x_j r_j over the present rows of
    ``side`` (``rows`` per gallery), at its gallery's offset plus its first position in the
    gallery's ids sorted, ``srt`` [galleries, rows]."""
    t = table_tiles("centroids")
    c = torch.zeros(galleries * rows, d, dtype=F64, device=side.x.device)
    _traceable(_centroid_sums_kernel)[(_cdiv(rows, t.block_m), galleries)](
        **_side_args(side), srt_ptr=srt, c_ptr=c, n_rows=rows, D=d, steps=_steps(rows),
        BLOCK_M=t.block_m, BLOCK_D=t.block_k, num_warps=t.num_warps)
    return c


def _row_terms(p: Problem, side: _Side, rows: int, srt: torch.Tensor, before: Optional[torch.Tensor],
               c: Optional[torch.Tensor], cnt: torch.Tensor, lin: Optional[torch.Tensor]) -> None:
    """``cnt`` and (``lin`` given) ``lin`` [K rows] of ``side``'s rows of each gallery against the
    other side's ids sorted ``srt`` [1 or K, C] (its `_present_before` counts, its centroids ``c``):
    `kernels/centroids._positives_kernel`."""
    t = table_tiles("centroids")
    n_cols = srt.shape[-1]
    _traceable(_positives_kernel)[(_cdiv(rows, t.block_m), p.galleries)](
        **_side_args(side), srt_ptr=srt, s_srt_gal=n_cols if srt.shape[0] > 1 else 0,
        before_ptr=before, s_before_gal=(n_cols + 1) if before is not None and before.shape[0] > 1 else 0,
        c_ptr=c, cnt_ptr=cnt, lin_ptr=lin, n_rows=rows, n_cols=n_cols, D=p.d, steps=_steps(n_cols),
        scale_ptr=p.scale, scale_value=p.scale_value, WANT_LIN=lin is not None,
        BLOCK_M=t.block_m, BLOCK_D=t.block_k, num_warps=t.num_warps)


def positives(p: Problem, r: torch.Tensor, cnt: torch.Tensor, lin: Optional[torch.Tensor] = None) -> None:
    """The positives' count ``cnt`` and (``lin`` given) logit sum ``lin``, each [NDR] fp32 in the
    softmax-row order of `problem.py`, over this problem's columns; ``r`` [NR]: the preparation
    pass's inverse norms (slot PRE_R). ``lin`` None (reverse KL, whose lin the statistics loop
    computes without labels): no centroid is formed, the counts alone."""
    n, m, k, d = p.n, p.m, p.galleries, p.d
    order = _order(p)
    q_side, g_side = _sides(p, r, order)
    g_before = _present_before(None if p.g_mask is None else p.g_mask.to(torch.bool).expand(k, m), order.g_perm)
    q_before = _present_before(None if p.q_mask is None else p.q_mask.to(torch.bool)[None], order.q_perm)
    # q rows against each gallery's identity groups, one side's float64 centroids at a time
    # (each is [groups, D], 8 bytes an element)
    c = _centroids(g_side, order.g_sorted, d, m, k) if lin is not None else None
    _row_terms(p, q_side, n, order.g_sorted, g_before, c, cnt[:k * n], None if lin is None else lin[:k * n])
    del c
    # each gallery's rows against the queries' groups (the queries' centroids, once)
    c = _centroids(q_side, order.q_sorted, d, n, 1) if lin is not None else None
    _row_terms(p, g_side, m, order.q_sorted, q_before, c, cnt[k * n:], None if lin is None else lin[k * n:])


@_per_problem
def ranks(p: Problem) -> Tuple[torch.Tensor, torch.Tensor]:
    """The identity labels of both sides as int32 ranks in one numbering (equal ranks exactly
    where the ids are equal, by value): (q ranks [N], gallery ranks shaped as ``p.g_ids``).

    The statistics loop compares ids only where it needs the negatives' softmax mass (reverse
    KL, ``return_stats``): a pair by pair sum that no quantity outside the loop can stand in
    for (l - pos cancels where the positives hold almost all of a row's mass: bench/NOTES.md 37,
    38). Ranks make that compare an int32 one (the int64 ids' loads and compares cost 1.5 ms per
    direction more at N = 32768: ../shared/yardsticks/stats_pass.py). One sort of the N + K M ids
    and one launch (a rank is an id's first position in them sorted), no host synchronisation."""
    g_ids = p.g_ids
    ids = torch.cat([p.q_ids.to(torch.int64), g_ids.to(torch.int64).reshape(-1)])
    sorted_ids = torch.sort(ids).values
    rank = torch.empty(ids.shape, dtype=torch.int32, device=ids.device)
    block = table_tiles("ranks").block_m
    _traceable(_ranks_kernel)[(_cdiv(ids.numel(), block),)](
        ids_ptr=ids, srt_ptr=sorted_ids, rank_ptr=rank, n=ids.numel(), steps=_steps(ids.numel()), BLOCK=block)
    return rank[:p.n], rank[p.n:].view(g_ids.shape)


def ids_as_ranks(p: Problem, args: dict) -> dict:
    """A launch's `_side_args` with the identity labels replaced by their int32 `ranks`: the
    compares of the N x M loops (the statistics pass's negatives' mass, the chunked backward's
    labels) on the centroids path."""
    q_rank, g_rank = ranks(p)
    s_gid_gal, s_gid = _gallery_row_strides(g_rank)
    return dict(args, q_ids=q_rank, s_qid=q_rank.stride(0), g_ids=g_rank, s_gid_gal=s_gid_gal, s_gid=s_gid)
