"""The host-side math of the reduction and of the rows' weights, in one place.

The torch backend (one problem, K galleries) and the distributed strategies (a global batch
split over ranks, K = 1) compute the same few things outside the per-pair loops; both call
these. The reduction rows ([NUM_RED, K] ``ForwardOut.red``, or the distributed global totals,
its first rows) are indexed by name (`backend.RED`).

    pair_labels        y on a block of pairs: identity or dense labels, 0 where a sample is
                       absent, NaN for a bad dense weight (< 0, NaN, inf)
    add_label_masses   each softmax row's label mass (ysum, sum y ln y) over one gallery's
                       columns, chunked
    ln_unscaled        ln(y / LABEL_SCALE) of a scaled dense weight or label mass
    label_ylny         y ln(y / LABEL_SCALE) of scaled dense weights (their masses' second row)
    reduced_value      the loss from the reduction's sums and valid counts (kernels/finish.py)
    gradient_weights   each softmax row's weight in dL/dS from the gradients of the value and
                       of the rows (kernels/grad.py computes the same in its ``row_weights``)
    cast_gradient      a gradient summed in the compute dtype, in its input's dtype
    row_norms          each row's norm, also where its square sum overflows the dtype
    may_apply          whether a rarely applying guard must be computed (CPU: only where it applies)
    stats_from_red     `SDMStats` from the reduction's counts and positive mass
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .backend import RED, option_coefficients
from .options import LABEL_SCALE, SDMOptions, SDMStats

#: the valid counts' rows of the reduction, (valid_q2g, valid_g2q), as one strided view
VALID_ROWS = slice(RED.valid_q2g, RED.valid_g2q + 1, RED.valid_g2q - RED.valid_q2g)
assert tuple(range(RED.valid_q2g, RED.valid_g2q + 1, RED.valid_g2q - RED.valid_q2g)) == (RED.valid_q2g, RED.valid_g2q)


def pair_labels(labels: Optional[torch.Tensor], q_ids: Optional[torch.Tensor], g_ids: Optional[torch.Tensor],
                q_keep: Optional[torch.Tensor], g_keep: Optional[torch.Tensor], c0: int, c1: int, ct) -> torch.Tensor:
    """y [..., N, c1 - c0] of the q rows against columns [c0, c1) of one gallery, or of a stack of
    galleries (leading axes of ``labels`` [..., N, M], ``g_ids`` and ``g_keep`` [..., M]): from
    ``labels`` when given (times LABEL_SCALE, as the kernels read them: Y = y / ysum is unchanged,
    and subnormal weights keep 1 / ysum finite), else ``q_ids`` [N] == ``g_ids``; 0 on a pair
    with an absent sample (``q_keep`` [N], ``g_keep``; None: every sample present), NaN for a bad
    dense weight."""
    if labels is not None:
        y = labels[..., c0:c1].to(ct) * LABEL_SCALE
        # bad: < 0, NaN or inf (isfinite alone dispatches four ops)
        y = y.masked_fill(~(y >= 0) | (y == math.inf), math.nan)
    else:
        y = (q_ids[:, None] == g_ids[..., None, c0:c1]).to(ct)
    if q_keep is not None:
        y = torch.where(q_keep[:, None], y, 0)
    if g_keep is not None:
        y = torch.where(g_keep[..., None, c0:c1], y, 0)
    return y


def ln_unscaled(y: torch.Tensor) -> torch.Tensor:
    """ln(y / LABEL_SCALE) of scaled dense weights y > 0 (options.LABEL_SCALE): the division is
    exact unless it leaves the normal range, where ln y - ln LABEL_SCALE is taken instead."""
    small = y < torch.finfo(y.dtype).tiny * LABEL_SCALE
    return torch.where(small, torch.log(y) - math.log(LABEL_SCALE), torch.log(y * (1 / LABEL_SCALE)))


def label_ylny(y: torch.Tensor) -> torch.Tensor:
    """y ln(y / LABEL_SCALE) of scaled dense weights, elementwise: 0 where y = 0, NaN stays."""
    pos = y > 0
    return torch.where(pos, y * ln_unscaled(y.masked_fill(~pos, 1)), y * 0)


def add_label_masses(q_masses: torch.Tensor, g_masses: torch.Tensor, labels, q_ids, g_ids, q_keep, g_keep,
                     width: int, ct) -> None:
    """Add the q rows' label masses over one gallery's columns to ``q_masses`` [2, N] and write
    the gallery rows' (over the q rows) to ``g_masses`` [2, M] (ysum, then sum y ln y), ``width``
    columns at a time (`pair_labels` for the arguments). Dense labels: ysum of the scaled
    weights, sum y ln(y / LABEL_SCALE) (options.LABEL_SCALE); identity labels: the count, 0."""
    m = g_keep.shape[0]
    for c0 in range(0, m, width):
        c1 = min(m, c0 + width)
        y = pair_labels(labels, q_ids, g_ids, q_keep, g_keep, c0, c1, ct)
        ylny = torch.zeros_like(y) if labels is None else label_ylny(y)
        q_masses[0] += y.sum(1)
        q_masses[1] += ylny.sum(1)
        g_masses[0, c0:c1] = y.sum(0)
        g_masses[1, c0:c1] = ylny.sum(0)
    # a mass past the compute dtype's range is NaN, never a finite loss (kernels/prep.py)
    for masses in (q_masses, g_masses):
        masses.copy_(torch.where(torch.isinf(masses), math.nan, masses))


def reduced_value(o: SDMOptions, red: torch.Tensor) -> torch.Tensor:
    """The loss of each gallery ([K] from red [., K]; 0-dim from a vector of totals): each
    direction's sum, over its valid count for reduction="mean", weighted (`option_coefficients`)."""
    coef_q, coef_g = option_coefficients(o)
    if o.reduction == "mean":
        part_q = red[RED.sum_q2g] / red[RED.valid_q2g].clamp_min(1)
        part_g = red[RED.sum_g2q] / red[RED.valid_g2q].clamp_min(1)
    else:
        part_q, part_g = red[RED.sum_q2g], red[RED.sum_g2q]
    return coef_q * part_q + coef_g * part_g


def gradient_weights(o: SDMOptions, red: torch.Tensor, valid: torch.Tensor, n: int, d_value, d_rows,
                     ct, masked: bool = True) -> torch.Tensor:
    """w [K (n + m)] of softmax rows laid out as a problem's (the n q rows of each of the K
    galleries, then each gallery's m rows): ``d_value[k] * coefficient / (gallery k's valid
    count in red [., K] if reduction="mean") + d_rows``, 0 for an invalid row (``valid``).
    ``d_value`` [K] (or 0-dim for K = 1) and ``d_rows`` may be None: no gradient. ``masked=False``:
    an invalid row's weight is left as computed, for a caller that zeroes its pairs itself."""
    k = red.shape[-1]
    m = valid.shape[0] // k - n
    w = None
    if d_value is not None:
        c = direction_weights(o, red, d_value, ct)
        if n == m:
            w = c.expand(2, k, n).reshape(-1)
        else:
            w = torch.cat([c[0].expand(k, n).flatten(), c[1].expand(k, m).flatten()])
    if d_rows is not None:
        w = d_rows.to(ct) if w is None else w + d_rows.to(ct)
    if w is None:
        return torch.zeros(valid.shape[0], dtype=ct, device=valid.device)
    return w.masked_fill(~valid, 0) if masked else w


def direction_weights(o: SDMOptions, red: torch.Tensor, d_value, ct,
                      counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """c [2 (q rows, gallery rows), K, 1] (broadcast): the weight of every row of a direction and
    gallery from the value's gradient ``d_value`` [K] (or 0-dim), `gradient_weights` without the
    rows' own gradients. ``counts``: red's valid counts clamped at 1, [2, K, 1] in ``ct``, when the
    caller kept them (the torch backend's forward divided by them): the same numbers."""
    k = red.shape[-1]
    coef_q, coef_g = option_coefficients(o)
    c = d_value.reshape(1, k, 1).to(ct)
    # one product when the directions' coefficients agree, none when both are 1
    if coef_q != coef_g:
        c = torch.cat([coef_q * c, coef_g * c])
    elif coef_q != 1:
        c = coef_q * c
    if o.reduction == "mean":
        c = c / (counts if counts is not None else red[VALID_ROWS, :, None].clamp_min(1).to(ct))
    return c.expand(2, k, 1)


def cast_gradient(x: Optional[torch.Tensor], dtype: torch.dtype, factor: float = 1.0) -> Optional[torch.Tensor]:
    """A gradient summed in the compute dtype, times ``factor``, in the input's ``dtype``, rounded
    to nearest: past the dtype's range it is inf, as PyTorch's own ops give it (GradScaler skips
    the step; the kernels store the same). None stays None."""
    if x is None:
        return None
    if factor != 1.0:
        x = x * factor
    return x.to(dtype)


def row_norms(x: torch.Tensor, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """|x_i| of each row of ``x`` [R, D] in x's dtype, also where the square sum passes the dtype's
    range (fp32: norms from 2^64, say 3.5e20 with ``normalize=False``): there again with the row
    scaled by 2^-100 (exact), as kernels/prep.py does; the components this takes below the normal
    range are < 2^-90 of such a norm. On a GPU both are computed (no host synchronisation); on
    the CPU the second only where a norm overflowed (`may_apply`). Inf and NaN features stay inf
    and NaN. ``norm``: ``vector_norm(x, dim=1)`` when the caller has it."""
    if norm is None:
        norm = torch.linalg.vector_norm(x, dim=1)
    overflowed = torch.isinf(norm)
    if not may_apply(overflowed):
        return norm
    scaled = torch.linalg.vector_norm(x * 2.0**-100, dim=1) * 2.0**100
    return torch.where(overflowed, scaled, norm)


def may_apply(flags: torch.Tensor) -> bool:
    """Whether a guard that rarely applies (``flags``: where it does) must be computed. On the CPU,
    outside torch.compile's tracing, reading ``flags.any()`` costs no device synchronisation, and
    a guard that applies nowhere is skipped: the result is the same, bit for bit, and the torch
    backend's small problems are bound by such per-op costs (issue 28). Elsewhere it is always
    computed: branching on a CUDA value would synchronise, and a traced graph cannot branch."""
    if flags.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    return bool(flags.any())


def stats_from_red(red: torch.Tensor, q_norm_mean, q_norm_max, g_norm_mean, g_norm_max,
                   dtype: Optional[torch.dtype] = None) -> SDMStats:
    """SDMStats: valid counts and the positives' mean softmax mass from the reduction rows
    ``red`` (detached; any trailing shape), the feature norms as given; the positive mass in
    ``dtype`` when given."""
    n_q, n_g = red[RED.valid_q2g], red[RED.valid_g2q]
    pos_q, pos_g = red[RED.pos_q2g] / n_q.clamp_min(1), red[RED.pos_g2q] / n_g.clamp_min(1)
    if dtype is not None:
        pos_q, pos_g = pos_q.to(dtype), pos_g.to(dtype)
    return SDMStats(valid_q2g=n_q.to(torch.int64), valid_g2q=n_g.to(torch.int64), pos_prob_q2g=pos_q,
                    pos_prob_g2q=pos_g, q_norm_mean=q_norm_mean, q_norm_max=q_norm_max, g_norm_mean=g_norm_mean,
                    g_norm_max=g_norm_max)
