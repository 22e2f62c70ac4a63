"""Per-sample preparation shared by every backend (plain torch, O((N + M) * D), no host sync).

Turns the user's inputs into what the tile computations need for each side:
inverse norms, the softmax domain (mask), and the label mass of each row, so
that Y_ij = y_ij * inv_ysum_i is known before any tile is visited.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .options import NORM_EPS, compute_dtype


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
    # (inv_ysum, row_valid, ylogy are [K, n] when the other side is K galleries: prepare_sides)

    @property
    def galleries(self) -> int:
        """K, the galleries the other side's columns form for this side's rows (1: one softmax)."""
        return self.inv_ysum.shape[0] if self.inv_ysum.dim() == 2 else 1


def _norms(x: torch.Tensor, normalize: bool):
    norm = torch.linalg.vector_norm(x.to(compute_dtype(x.dtype)), dim=1)
    inv = 1.0 / norm.clamp_min(NORM_EPS) if normalize else torch.ones_like(norm)
    return norm, inv


def _id_counts(a_ids, b_ids, b_present, dtype, galleries: int = 1) -> torch.Tensor:
    """For each a_ids[i], how many present b have the same id: [n_a], or [K, n_a] counted in
    each of the K equal consecutive parts of b (galleries). Sort + searchsorted, no sync."""
    b_ids, b_present = b_ids.view(galleries, -1), b_present.view(galleries, -1)
    sorted_b, order = torch.sort(b_ids, dim=1)
    present_sorted = b_present.gather(1, order).to(torch.int64)
    cum = torch.cat([present_sorted.new_zeros(galleries, 1), present_sorted.cumsum(1)], dim=1)
    a = a_ids.expand(galleries, -1).contiguous()
    lo = torch.searchsorted(sorted_b, a, right=False)
    hi = torch.searchsorted(sorted_b, a, right=True)
    counts = (cum.gather(1, hi) - cum.gather(1, lo)).to(dtype)
    return counts if galleries > 1 else counts[0]


def _finish_side(feats, normalize, present, ids, ysum, ylogy_num):
    norm, inv_norm = _norms(feats, normalize)
    row_valid = present & (ysum > 0)
    safe = torch.where(row_valid, ysum, torch.ones_like(ysum))
    inv_ysum = torch.where(row_valid, 1.0 / safe, torch.zeros_like(ysum))
    # sum_j Y log Y with Y = y / ysum:  (sum_j y log y) / ysum - log ysum
    ylogy = torch.where(row_valid, ylogy_num / safe - torch.log(safe), torch.zeros_like(ysum))
    return Side(feats, inv_norm, norm, present, ids, inv_ysum, row_valid, ylogy)


def prepare_sides(q, g, q_ids, g_ids, labels, q_mask, g_mask, normalize: bool, galleries: int = 1):
    """The two sides of the problem. ``galleries`` = K > 1: ``g`` (with g_ids, g_mask and the
    columns of labels) is K galleries of M / K rows concatenated, each its own softmax domain
    for q's rows: q's inv_ysum, row_valid and ylogy are then [K, N] (one row per gallery)."""
    n, m = q.shape[0], g.shape[0]
    ct = compute_dtype(q.dtype)
    q_present = q_mask if q_mask is not None else torch.ones(n, dtype=torch.bool, device=q.device)
    g_present = g_mask if g_mask is not None else torch.ones(m, dtype=torch.bool, device=q.device)
    if labels is None:
        qi, gi = q_ids.to(torch.int64), g_ids.to(torch.int64)
        ysum_q = _id_counts(qi, gi, g_present, ct, galleries)
        ysum_g = _id_counts(gi, qi, q_present, ct)
        zeros_q, zeros_g = torch.zeros_like(ysum_q), torch.zeros_like(ysum_g)  # binary: y log y = 0
        side_q = _finish_side(q, normalize, q_present, qi, ysum_q, zeros_q)
        side_g = _finish_side(g, normalize, g_present, gi, ysum_g, zeros_g)
        return side_q, side_g
    # Row and column sums of y and y log y over the present pairs, a block of rows at a time:
    # the caller's labels are [N, M], but our compute-dtype copies of them stay O(block * M).
    y_rows = torch.empty((galleries, n), dtype=ct, device=q.device)
    ylogy_rows = torch.empty_like(y_rows)
    y_cols = torch.zeros(m, dtype=ct, device=q.device)
    ylogy_cols = torch.zeros_like(y_cols)
    block = max(1, LABEL_BLOCK_ELEMENTS // m)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        y = labels[r0:r1].to(ct) * (q_present[r0:r1, None] & g_present[None, :])
        ylogy = torch.xlogy(y, y)
        # [rows, K * M'] -> per gallery [K, rows]
        y_rows[:, r0:r1] = y.view(r1 - r0, galleries, -1).sum(2).T
        ylogy_rows[:, r0:r1] = ylogy.view(r1 - r0, galleries, -1).sum(2).T
        y_cols += y.sum(0)
        ylogy_cols += ylogy.sum(0)
    if galleries == 1:
        y_rows, ylogy_rows = y_rows[0], ylogy_rows[0]
    side_q = _finish_side(q, normalize, q_present, None, y_rows, ylogy_rows)
    side_g = _finish_side(g, normalize, g_present, None, y_cols, ylogy_cols)
    return side_q, side_g


#: Elements of the dense labels converted at once in `prepare_sides` (16 MiB of fp32).
LABEL_BLOCK_ELEMENTS = 1 << 22


#: Rows per block for the backward's O(rows * D) elementwise temporaries (fp32 copies of the
#: features, projections), so they stay ~8192 * D * 4 bytes instead of scaling with N.
ROW_BLOCK = 8192


def row_blocks(n: int):
    return [(r0, min(n, r0 + ROW_BLOCK)) for r0 in range(0, n, ROW_BLOCK)]


def product_operand(side: Side, dtype: torch.dtype):
    """(x', p, c): the backward products' operand for one side and its row factors.

    2^e is the power of two just above 1 / inv_norm = max(|x|, eps) (torch.frexp), so
    x' = x * 2^-e in ``dtype`` is exact (a power-of-two scaling, computed in fp32 where
    2^-e cannot overflow, to rows of norm in [0.5, 1)), p = inv_norm * 2^e in (1, 2] gives
    x_hat = p * x' exactly, and c = 2^-e turns u = p * dL/dx_hat into dL/dx
    (input_gradient).
    """
    pw = row_powers(side.inv_norm)
    c = 1.0 / pw
    x = torch.empty(side.feats.shape, dtype=dtype, device=side.feats.device)
    for r0, r1 in row_blocks(x.shape[0]):
        x[r0:r1] = side.feats[r0:r1].to(pw.dtype) * c[r0:r1, None]
    return x, side.inv_norm * pw, c


def row_powers(inv_norm: torch.Tensor) -> torch.Tensor:
    """2^e per row, the power of two just above 1 / inv_norm (see product_operand)."""
    return torch.ldexp(torch.ones_like(inv_norm), torch.frexp(1.0 / inv_norm).exponent)


def input_gradient(side: Side, u: torch.Tensor, c: torch.Tensor, factor, normalize: bool,
                   dtype: torch.dtype, rows=None) -> torch.Tensor:
    """dL/dx in ``dtype`` for the rows [r0, r1) of ``side`` (all when ``rows`` is None), from
    u = p * dL/dx_hat / factor (fp32 [r1 - r0, D]; p, c from product_operand), through
    x_hat = x / max(|x|, eps), block of rows by block of rows:

        dL/dx = inv_norm * (d_hat - x_hat <x_hat, d_hat>) = c * (u' - x_hat <x_hat, u'>)  where |x| > eps,
        dL/dx = inv_norm * d_hat = c * u'                                                   elsewhere,

    with u' = factor * u, since inv_norm / p = c. Without normalisation x_hat = x, inv_norm = 1
    and dL/dx = c * u'. Values beyond a half dtype's range saturate (cast_saturating).
    """
    r0, r1 = rows if rows is not None else (0, side.feats.shape[0])
    out = torch.empty((r1 - r0, u.shape[1]), dtype=dtype, device=u.device)
    for b0, b1 in row_blocks(r1 - r0):
        g = u[b0:b1] * (factor * c[r0 + b0:r0 + b1, None].to(u.dtype))
        if normalize:
            x_hat = side.feats[r0 + b0:r0 + b1].to(u.dtype) * side.inv_norm[r0 + b0:r0 + b1, None].to(u.dtype)
            radial = (x_hat * g).sum(1, keepdim=True)
            g = torch.where((side.norm[r0 + b0:r0 + b1] > NORM_EPS)[:, None], g - x_hat * radial, g)
        out[b0:b1] = cast_saturating(g, dtype)
    return out


def cast_saturating(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a gradient to the input dtype; values beyond its range saturate instead of becoming inf.

    Only reachable in fp16 for (near-)zero feature vectors, whose gradient is 1/NORM_EPS-scaled.
    """
    if dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        x = x.clamp(-big, big)
    return x.to(dtype)
