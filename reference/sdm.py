"""The reference SDM loss: plain PyTorch, the N x M matrix materialised on purpose.

This is the oracle every backend is tested against (docs/contract.md). It favours
readability over speed and memory: absent samples are removed by indexing, the
similarity matrix and the label distribution are built in full, and each
divergence is written as its textbook formula.

    q_hat = q / max(|q|, NORM_EPS),  g_hat likewise        (optional)
    S     = s * q_hat @ g_hat.T                            (fp32, or float64 for float64 inputs)
    P_i   = softmax(S_i)   over valid columns
    Y_i   = y_i / sum(y_i) over valid columns; the row is valid if sum(y_i) > 0
    forward:  L_i = KL(Y_i || P_i) = sum_j Y_ij (log Y_ij - log P_ij)     (0 log 0 = 0)
    reverse:  L_i = sum_j P_ij (log P_ij - log(Y_ij + eps))
    the g -> q direction is the same on S.T, y.T with the masks swapped.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sdm_triton.options import (
    NORM_EPS,
    SDMOptions,
    check_values,
    SDMRowLosses,
    comparable_ids,
    compute_dtype,
    resolve_ids,
    resolve_scale,
    validate_inputs,
)


def sdm_loss(
    q: torch.Tensor,
    g: torch.Tensor,
    q_ids: Optional[torch.Tensor] = None,
    g_ids: Optional[torch.Tensor] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    q_mask: Optional[torch.Tensor] = None,
    g_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.02,
    logit_scale: Optional[torch.Tensor] = None,
    kl: str = "forward",
    eps: float = 1e-8,
    direction: str = "both",
    combine: str = "mean",
    reduction: str = "mean",
    normalize: bool = True,
):
    """SDM loss between query features ``q`` [N, D] and gallery features ``g`` [M, D].

    Returns a 0-dim tensor (fp32, or float64 for float64 inputs), or for
    ``reduction="none"`` an :class:`SDMRowLosses` of per-row losses and masks.
    See docs/contract.md for the definition of every argument. ``logit_scale`` (a
    0-dim tensor) takes precedence over ``temperature`` (``s = 1 / temperature``).
    The reference validates values too (it synchronises): labels must be
    non-negative, features finite, a tensor logit_scale positive.
    """
    opts = SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine,
                      reduction=reduction, normalize=normalize)
    q_ids, g_ids = resolve_ids(q, g, q_ids, g_ids)
    validate_inputs(q, g, q_ids, g_ids, labels, q_mask, g_mask)
    q_ids, g_ids = comparable_ids(q_ids, g_ids)
    scale = resolve_scale(temperature, logit_scale, q)
    check_values(q, g, labels, scale, q_mask, g_mask)
    return _sdm_materialised(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, opts)


def _sdm_materialised(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, opts: SDMOptions):
    # fp32 (float64) math even inside a torch.autocast region: the seed's lesson
    with torch.autocast(q.device.type, enabled=False):
        return _sdm_fp32(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, opts)


def _sdm_fp32(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, opts: SDMOptions):
    n, m = q.shape[0], g.shape[0]
    ct = compute_dtype(q.dtype)
    q_keep = q_mask if q_mask is not None else torch.ones(n, dtype=torch.bool, device=q.device)
    g_keep = g_mask if g_mask is not None else torch.ones(m, dtype=torch.bool, device=q.device)
    # An absent sample is removed as if it were not in the batch, before anything touches its
    # features: they may hold anything (NaN included) and get a zero gradient.
    rows = q_keep.nonzero().squeeze(1)
    cols = g_keep.nonzero().squeeze(1)
    qf, gf = q.index_select(0, rows).to(ct), g.index_select(0, cols).to(ct)
    if opts.normalize:
        qf = F.normalize(qf, dim=1, eps=NORM_EPS)
        gf = F.normalize(gf, dim=1, eps=NORM_EPS)
    s = scale.to(ct) if isinstance(scale, torch.Tensor) else scale
    sim_kept = s * (qf @ gf.T)                                             # [N_kept, M_kept]

    if labels is not None:
        y_kept = labels.index_select(0, rows).index_select(1, cols).to(ct)
    else:
        y_kept = (q_ids.index_select(0, rows)[:, None] == g_ids.index_select(0, cols)[None, :]).to(ct)

    loss_q2g = valid_q2g = loss_g2q = valid_g2q = None
    if opts.wants_q2g:
        kept_loss, kept_valid = _one_direction(sim_kept, y_kept, opts)
        loss_q2g, valid_q2g = _scatter_rows(kept_loss, kept_valid, rows, n)
    if opts.wants_g2q:
        kept_loss, kept_valid = _one_direction(sim_kept.T, y_kept.T, opts)
        loss_g2q, valid_g2q = _scatter_rows(kept_loss, kept_valid, cols, m)
    return _reduce(loss_q2g, valid_q2g, loss_g2q, valid_g2q, opts)


def _reduce(loss_q2g, valid_q2g, loss_g2q, valid_g2q, opts: SDMOptions):
    """SPEC step 6, written out on its own (the package's reduction is tested against it):
    each direction asked for is the mean of its valid rows' losses (0 without a valid row) or
    their sum; two directions are averaged (combine="mean") or added (combine="sum")."""
    if opts.reduction == "none":
        return SDMRowLosses(loss_q2g, loss_g2q, valid_q2g, valid_g2q)
    directions = [(loss, valid) for loss, valid in ((loss_q2g, valid_q2g), (loss_g2q, valid_g2q))
                  if loss is not None]
    values = []
    for loss, valid in directions:
        kept = torch.where(valid, loss, torch.zeros_like(loss)).sum()
        values.append(kept if opts.reduction == "sum" else kept / valid.sum().clamp_min(1))
    total = values[0] if len(values) == 1 else values[0] + values[1]
    if len(values) == 2 and opts.combine == "mean":
        total = total / 2
    return total


def _one_direction(sim: torch.Tensor, y: torch.Tensor, opts: SDMOptions):
    """Per-row loss of softmax(sim) against the label distribution y / sum(y), rows of sim."""
    y_sum = y.sum(dim=1, keepdim=True)
    valid = y_sum.squeeze(1) > 0
    label_dist = y / torch.where(y_sum > 0, y_sum, torch.ones_like(y_sum))  # Y, zero rows stay 0
    log_p = F.log_softmax(sim, dim=1)
    if opts.reverse:
        p = log_p.exp()
        loss = (p * (log_p - torch.log(label_dist + opts.eps))).sum(dim=1)
    else:
        positive = label_dist > 0
        # 0 * log 0 = 0; the where keeps log() away from zeros so no NaN reaches autograd.
        safe = torch.where(positive, label_dist, torch.ones_like(label_dist))
        loss = torch.where(positive, label_dist * (torch.log(safe) - log_p), torch.zeros_like(log_p)).sum(dim=1)
        # KL >= 0 exactly; fp rounding can leave -1e-7. Clamp the value, keep the gradient.
        loss = loss + (loss.clamp_min(0) - loss).detach()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, valid


def _scatter_rows(kept_loss, kept_valid, kept_index, length):
    loss = kept_loss.new_zeros(length).index_add(0, kept_index, kept_loss)
    valid = torch.zeros(length, dtype=torch.bool, device=kept_loss.device)
    valid = valid.index_put((kept_index,), kept_valid)
    return loss, valid


class SDMLoss(torch.nn.Module):
    """``nn.Module`` holding the options of :func:`sdm_loss` (reference implementation)."""

    def __init__(self, *, temperature: float = 0.02, kl: str = "forward", eps: float = 1e-8,
                 direction: str = "both", combine: str = "mean", reduction: str = "mean",
                 normalize: bool = True):
        super().__init__()
        SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine,
                   reduction=reduction, normalize=normalize)  # fail early on bad options
        resolve_scale(temperature, None, torch.empty(0))
        self.temperature = temperature
        self.options = dict(kl=kl, eps=eps, direction=direction, combine=combine,
                            reduction=reduction, normalize=normalize)

    def forward(self, q, g, q_ids=None, g_ids=None, *, labels=None, q_mask=None, g_mask=None,
                logit_scale=None):
        return sdm_loss(q, g, q_ids, g_ids, labels=labels, q_mask=q_mask, g_mask=g_mask,
                        temperature=self.temperature, logit_scale=logit_scale, **self.options)

    def extra_repr(self):
        return f"temperature={self.temperature}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
