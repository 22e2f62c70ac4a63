"""layout="local_rows": TBPS-CLIP's loss of each rank's rows against all gathered columns.

Rank r's value: q_r against all of g (q2g) and g_r against all of q (g2q), each reduced over
rank r's valid rows only, so values differ between ranks. Composed from the public
``sdm_loss`` (direction "q2g" of each problem) on features gathered with a differentiable
all-gather, whose backward sums the gathered rows' gradients over the ranks (reduce-scatter).

The objective J is the mean over ranks of the per-rank values. Each rank backpropagates its
own value, so after the reduce-scatter rank r's features hold sum_r' d value_r' / d(its rows)
= P dJ/d(its rows): what "ddp" asks for (DDP divides by P); "unscaled" multiplies by 1 / P.
A logit_scale tensor gets the mean over ranks of d value_r / ds = dJ/ds on every rank.
"""

from __future__ import annotations

import torch

from ..api import sdm_loss
from ..backend import RED
from ..options import SDMRowLosses, SDMStats
from .blocks import NUM_TOTALS, Setup, global_stats
from .comm import AllGatherRows, GradScale, ReplicatedMean, all_gather_rows, all_reduce, all_to_all_columns


def local_rows_loss(setup: Setup):
    c, comm = setup.call, setup.comm
    o = c.opts
    factor = 1.0 if c.grad_convention == "ddp" else 1.0 / comm.world
    q_in = GradScale.apply(c.q, factor)
    g_in = GradScale.apply(c.g, factor)
    q_all = AllGatherRows.apply(q_in, comm.q_sizes, comm)
    g_all = AllGatherRows.apply(g_in, comm.g_sizes, comm)
    dev = c.q.device
    q_present = c.q_mask if c.q_mask is not None else torch.ones(c.q.shape[0], dtype=torch.bool, device=dev)
    g_present = c.g_mask if c.g_mask is not None else torch.ones(c.g.shape[0], dtype=torch.bool, device=dev)
    q_mask_all = all_gather_rows(q_present.to(torch.uint8), comm.q_sizes, comm).bool()
    g_mask_all = all_gather_rows(g_present.to(torch.uint8), comm.g_sizes, comm).bool()
    kw = dict(kl=o.kl, eps=o.eps, direction="q2g", reduction=o.reduction, normalize=o.normalize,
              backend=c.backend_name, return_stats=c.return_stats, kernel_config=c.config,
              workspace_bytes=c.workspace_bytes)
    if c.logit_scale is not None:
        scale = c.logit_scale
        kw["logit_scale"] = ReplicatedMean.apply(scale, comm) if isinstance(scale, torch.Tensor) else scale
    else:
        kw["temperature"] = c.temperature
    if c.labels is None:
        ids_q = dict(q_ids=c.q_ids, g_ids=all_gather_rows(c.g_ids.to(torch.int64), comm.g_sizes, comm))
        ids_g = dict(q_ids=c.g_ids, g_ids=all_gather_rows(c.q_ids.to(torch.int64), comm.q_sizes, comm))
    else:
        ids_q = dict(labels=c.labels)
        ids_g = dict(labels=all_to_all_columns(c.labels, comm))
    parts = {}
    if o.wants_q2g:
        parts["q2g"] = sdm_loss(q_in, g_all, q_mask=q_present, g_mask=g_mask_all, **ids_q, **kw)
    if o.wants_g2q:
        parts["g2q"] = sdm_loss(g_in, q_all, q_mask=g_present, g_mask=q_mask_all, **ids_g, **kw)
    stats = {}
    if c.return_stats:
        stats = {k: v[1] for k, v in parts.items()}
        parts = {k: v[0] for k, v in parts.items()}
    if o.reduction == "none":
        out = SDMRowLosses(*(parts[k].q2g if k in parts else None for k in ("q2g", "g2q")),
                           *(parts[k].q2g_valid if k in parts else None for k in ("q2g", "g2q")))
    else:
        values = list(parts.values())
        out = values[0] if len(values) == 1 else (
            0.5 * (values[0] + values[1]) if o.combine == "mean" else values[0] + values[1])
    if not c.return_stats:
        return out
    return out, _local_rows_stats(setup, stats)


def _local_rows_stats(setup: Setup, stats: dict) -> SDMStats:
    """Statistics of all ranks' rows: valid counts and positive mass summed over the ranks."""
    ct = next(iter(stats.values())).pos_prob_q2g.dtype
    dev = setup.call.q.device
    totals = torch.zeros(NUM_TOTALS, dtype=torch.float64, device=dev)
    for k, valid, pos in (("q2g", RED.valid_q2g, RED.pos_q2g), ("g2q", RED.valid_g2q, RED.pos_g2q)):
        st = stats.get(k)          # each part's rows are its problem's q rows (direction "q2g")
        if st is not None:
            totals[valid] = st.valid_q2g.double()
            totals[pos] = st.pos_prob_q2g.double() * st.valid_q2g.double()
    all_reduce(totals, setup.comm)
    out = global_stats(setup, totals)
    return SDMStats(out.valid_q2g, out.valid_g2q, out.pos_prob_q2g.to(ct), out.pos_prob_g2q.to(ct),
                    out.q_norm_mean, out.q_norm_max, out.g_norm_mean, out.g_norm_max)
