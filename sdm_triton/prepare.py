"""Per-sample preparation shared by every backend (plain torch, O((N + M) * D), no host sync).

Turns the user's inputs into what the tile computations need for each side:
inverse norms, the softmax domain (mask), and the label mass of each row, so
that Y_ij = y_ij * inv_ysum_i is known before any tile is visited.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from reference.options import NORM_EPS, compute_dtype


@dataclasses.dataclass
class Side:
    """One side of the problem (queries or gallery), seen as the rows of its direction."""

    feats: torch.Tensor           # [n, D] raw features, input dtype (any strides)
    inv_norm: torch.Tensor        # [n] fp32 (float64 for float64 features): 1 / max(|x|, NORM_EPS), or ones when not normalising
    norm: torch.Tensor            # [n] fp32 feature norms (statistics)
    present: torch.Tensor         # [n] bool: the user's mask (softmax domain of the other direction)
    ids: Optional[torch.Tensor]   # [n] int64 identity labels, or None with dense labels
    inv_ysum: torch.Tensor        # [n] fp32: 1 / sum_j y_ij over present columns; 0 for invalid rows
    row_valid: torch.Tensor       # [n] bool: present and has a positive among the present columns
    ylogy: torch.Tensor           # [n] fp32: sum_j Y_ij log Y_ij (forward KL constant), 0 if invalid


def _norms(x: torch.Tensor, normalize: bool):
    norm = torch.linalg.vector_norm(x.to(compute_dtype(x.dtype)), dim=1)
    inv = 1.0 / norm.clamp_min(NORM_EPS) if normalize else torch.ones_like(norm)
    return norm, inv


def _id_counts(a_ids, b_ids, b_present, dtype) -> torch.Tensor:
    """For each a_ids[i], how many present b have the same id. Sort + searchsorted, no sync."""
    sorted_b, order = torch.sort(b_ids)
    present_sorted = b_present[order].to(torch.int64)
    cum = torch.cat([present_sorted.new_zeros(1), present_sorted.cumsum(0)])
    lo = torch.searchsorted(sorted_b, a_ids, right=False)
    hi = torch.searchsorted(sorted_b, a_ids, right=True)
    return (cum[hi] - cum[lo]).to(dtype)


def _finish_side(feats, normalize, present, ids, ysum, ylogy_num):
    norm, inv_norm = _norms(feats, normalize)
    row_valid = present & (ysum > 0)
    safe = torch.where(row_valid, ysum, torch.ones_like(ysum))
    inv_ysum = torch.where(row_valid, 1.0 / safe, torch.zeros_like(ysum))
    # sum_j Y log Y with Y = y / ysum:  (sum_j y log y) / ysum - log ysum
    ylogy = torch.where(row_valid, ylogy_num / safe - torch.log(safe), torch.zeros_like(ysum))
    return Side(feats, inv_norm, norm, present, ids, inv_ysum, row_valid, ylogy)


def prepare_sides(q, g, q_ids, g_ids, labels, q_mask, g_mask, normalize: bool):
    n, m = q.shape[0], g.shape[0]
    ct = compute_dtype(q.dtype)
    q_present = q_mask if q_mask is not None else torch.ones(n, dtype=torch.bool, device=q.device)
    g_present = g_mask if g_mask is not None else torch.ones(m, dtype=torch.bool, device=q.device)
    if labels is None:
        qi, gi = q_ids.to(torch.int64), g_ids.to(torch.int64)
        ysum_q = _id_counts(qi, gi, g_present, ct)
        ysum_g = _id_counts(gi, qi, q_present, ct)
        zeros_q, zeros_g = torch.zeros_like(ysum_q), torch.zeros_like(ysum_g)  # binary: y log y = 0
        side_q = _finish_side(q, normalize, q_present, qi, ysum_q, zeros_q)
        side_g = _finish_side(g, normalize, g_present, gi, ysum_g, zeros_g)
        return side_q, side_g
    y = labels.to(ct) * (q_present[:, None] & g_present[None, :])
    ylogy = torch.xlogy(y, y)
    side_q = _finish_side(q, normalize, q_present, None, y.sum(1), ylogy.sum(1))
    side_g = _finish_side(g, normalize, g_present, None, y.sum(0), ylogy.sum(0))
    return side_q, side_g


def normalized_features(side: Side, dtype: torch.dtype) -> torch.Tensor:
    """x_hat = x * inv_norm in ``dtype`` (the operand of the gradient products)."""
    return (side.feats.to(side.inv_norm.dtype) * side.inv_norm[:, None]).to(dtype)


def normalization_backward(side: Side, d_hat: torch.Tensor, normalize: bool) -> torch.Tensor:
    """dL/dx from dL/dx_hat (fp32) through x_hat = x / max(|x|, eps).

    Where |x| > eps:  dx = inv_norm * (d_hat - x_hat <x_hat, d_hat>); else dx = inv_norm * d_hat.
    """
    if not normalize:
        return d_hat
    x_hat = side.feats.to(d_hat.dtype) * side.inv_norm[:, None]
    radial = (x_hat * d_hat).sum(1, keepdim=True)
    projected = torch.where((side.norm > NORM_EPS)[:, None], d_hat - x_hat * radial, d_hat)
    return projected * side.inv_norm[:, None]
