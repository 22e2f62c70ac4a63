"""Online-softmax statistics: merging partial tiles and turning them into row losses.

A partial statistic for one row over some set of columns is 5 numbers
(see kernels/tile_stats.py):

    m    max of S over the columns
    l    sum exp(S - m)
    pos  sum over positives of exp(S - m)
    A    forward: sum Y (S - m)            reverse: sum exp(S - m)(S - m)
    B    forward: sum Y                    reverse: sum exp(S - m) log(Y + eps)

Partials over disjoint column sets merge exactly (this is how tiles, column
chunks and, later, ranks combine), and the merged statistics give

    lse     = m + log l
    forward = log l - A + sum Y log Y           (= LSE - sum Y S + sum Y log Y, since sum Y = 1)
    reverse = A / l - log l - B / l             (= E_P[S] - LSE - E_P[log(Y + eps)])
"""

from __future__ import annotations

import torch

NUM_STATS = 5
M, L, POS, A, B = range(NUM_STATS)


def merge_partials(part: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Merge [5, K, n] partial statistics over K disjoint column sets into [5, n]."""
    m_k = part[M]
    m = m_k.amax(0)
    shift = m_k - m                      # <= 0; -1e30-ish for empty partials (then l = B = 0)
    alpha = torch.exp(shift)
    out = torch.empty_like(part[:, 0])
    out[M] = m
    out[L] = (alpha * part[L]).sum(0)
    out[POS] = (alpha * part[POS]).sum(0)
    if reverse:
        out[A] = (alpha * (part[A] + shift * part[L])).sum(0)
        out[B] = (alpha * part[B]).sum(0)
    else:
        out[A] = (part[A] + shift * part[B]).sum(0)
        out[B] = part[B].sum(0)
    return out


def merge_two(x: torch.Tensor, y: torch.Tensor, reverse: bool) -> torch.Tensor:
    return merge_partials(torch.stack([x, y], dim=1), reverse)


def finish_rows(stats: torch.Tensor, row_valid: torch.Tensor, ylogy: torch.Tensor, reverse: bool):
    """Row losses (0 for invalid rows), log-sum-exps and positive probability from merged stats."""
    l = stats[L]
    safe_l = torch.where(row_valid, l, torch.ones_like(l))
    log_l = torch.log(safe_l)
    if reverse:
        loss = (stats[A] - stats[B]) / safe_l - log_l
    else:
        # KL >= 0 exactly; rounding can leave -1e-7, which the clamp removes.
        loss = (log_l - stats[A] + ylogy).clamp_min(0.0)
    zero = torch.zeros_like(loss)
    loss = torch.where(row_valid, loss, zero)
    # float64: m + log l in fp32 would absorb a log l below ulp(m) (~1e-5 at m ~ 200), and
    # the backward's S - lse would lose exactly the small probabilities it differentiates.
    lse = torch.where(row_valid, stats[M].double() + log_l.double(), zero.double())
    pos_prob = torch.where(row_valid, stats[POS] / safe_l, zero)
    return loss, lse, pos_prob


def split_lse(lse: torch.Tensor, ct: torch.dtype):
    """lse (float64, or already ``ct``) as hi + lo in the compute dtype ``ct``.

    The backward forms S - hi - lo: S - hi is exact near the row maximum, where the
    log-probabilities whose small differences make the gradient live. For float64
    compute (the torch backend on float64 inputs) hi is lse itself and lo is 0.
    """
    hi = lse.to(ct)
    if ct == torch.float64 or lse.dtype == ct:
        return hi, torch.zeros_like(hi)
    return hi, (lse - hi.to(lse.dtype)).to(ct)
