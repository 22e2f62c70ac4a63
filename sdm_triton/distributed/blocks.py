"""The global layout's pieces shared by both strategies (`allgather.py`, `ring.py`).

Rank r holds the rows q_r [N_r, D] and g_r [M_r, D] of the global batch (q = all q_r,
g = all g_r in rank order). A *block problem* is a `Problem` of q_r against some gallery
rows (all of g for allgather, one block g_s for ring) with K = 1; its softmax rows are
q_r's (NDR index 0 .. N_r - 1, over this problem's columns only) and the gallery rows'
(N_r + j, over q_r only). The backend's primitives (`sdm_triton.backend`) do the math:

    forward   label masses over the GLOBAL batch (dense labels; identity labels too for a
              backend that needs them) -> prepare -> statistics of each block problem ->
              the partials of each softmax row merged over every column block (concatenated
              along the segment axis) -> finish -> global sums and valid counts (all-reduce)
    backward  each row's weight from the global counts (`reduction.gradient_weights`), then each block
              problem's backward with those weights and the rows' state from the forward,
              its dq / dg as fp32 (compute dtype) partials summed over blocks and ranks
              before the one cast to the input dtype.

Statistics run with one column segment per side (``KernelConfig.segments = 1``), so that
every block problem's partial has the same shape on every rank: the merge across blocks
and ranks supplies the segments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..autograd import without_autocast
from ..backend import RED
from ..options import SDMRowLosses, SDMStats, compute_dtype
from ..problem import Problem
from ..reduction import add_label_masses, reduced_value, row_norms, stats_from_red
from .comm import Comm, all_reduce
from .metadata import Call

#: The global totals (float64) are the first NUM_TOTALS rows of a backend's reduction buffer
#: (`backend.RED_FIELDS`: sums and valid counts of both directions, and the sums of the
#: positives' softmax mass over valid rows, with return_stats), indexed by `backend.RED` too.
NUM_TOTALS = RED.pos_g2q + 1


@dataclasses.dataclass
class Setup:
    """What a strategy needs, beyond the validated call."""

    call: Call
    comm: Comm
    scale_t: Optional[torch.Tensor]   # the logit scale as a tensor on q's device, or None ...
    scale_value: float                # ... and then this float

    @property
    def ct(self) -> torch.dtype:
        return compute_dtype(self.call.q.dtype)

    @property
    def factor(self) -> float:
        """What the q and g gradients are multiplied by (the gradient convention)."""
        return float(self.comm.world) if self.call.grad_convention == "ddp" else 1.0

    def problem(self, g, g_ids, g_mask, labels) -> Problem:
        """q_r (this rank's rows) against the gallery rows ``g``: a block problem (module doc)."""
        c = self.call
        config = dataclasses.replace(c.config, segments=1)
        return Problem(q=c.q, g=g, q_ids=c.q_ids, g_ids=g_ids, labels=labels, q_mask=c.q_mask, g_mask=g_mask,
                       scale=self.scale_t, scale_value=self.scale_value, options=c.opts, config=config,
                       workspace_bytes=c.workspace_bytes, galleries=1, scalar_value=True,
                       return_stats=c.return_stats)

    def gallery_meta(self, dim: int) -> torch.Tensor:
        """This rank's gallery rows' ids (0 without ids) and presence as one int64 tensor, for one
        collective: [M_r, 2] (``dim`` 1) or [2, M_r] (``dim`` 0). `gallery_columns` reads it back."""
        c = self.call
        m_r, dev = c.g.shape[0], c.g.device
        g_keep = c.g_mask if c.g_mask is not None else torch.ones(m_r, dtype=torch.bool, device=dev)
        ids = c.g_ids.to(torch.int64) if c.g_ids is not None else torch.zeros(m_r, dtype=torch.int64, device=dev)
        return torch.stack([ids, g_keep.to(torch.int64)], dim)

    def gallery_columns(self, meta: torch.Tensor):
        """(ids or None, presence) of gallery rows from their `gallery_meta` [2, M] (any ranks')."""
        return (meta[0] if self.call.g_ids is not None else None), meta[1] != 0

    def needs_masses(self) -> bool:
        return self.call.labels is not None or self.call.backend.needs_id_masses

    def s_ok(self) -> torch.Tensor:
        """True where the scale is finite and > 0 (a bad scale tensor makes the loss NaN)."""
        dev = self.call.q.device
        if self.scale_t is None:
            return torch.ones((), dtype=torch.bool, device=dev)
        return torch.isfinite(self.scale_t) & (self.scale_t > 0)


def label_masses(setup: Setup, g_ids_all: Optional[torch.Tensor], g_keep_all: torch.Tensor):
    """(masses of q_r's rows [2, N_r], of every gallery row [2, M]): (ysum, sum y ln y) of each
    softmax row over the global batch's present pairs. q_r's rows are complete here (the labels
    [N_r, M] or the gathered ids cover every column); a gallery row's sums over q_r are summed
    over the ranks (all-reduce). Bad dense weights (< 0, NaN, inf) give NaN, as in the
    backends. Chunked over columns (``workspace_bytes``)."""
    c, comm, ct = setup.call, setup.comm, setup.ct
    n, m = c.q.shape[0], g_keep_all.shape[0]
    dev = c.q.device
    q_keep = c.q_mask if c.q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
    q_masses = torch.zeros((2, n), dtype=ct, device=dev)
    g_masses = torch.zeros((2, m), dtype=ct, device=dev)
    width = max(1, min(m, c.workspace_bytes // (4 * max(n, 1) * torch.empty((), dtype=ct).element_size())))
    add_label_masses(q_masses, g_masses, c.labels, c.q_ids, g_ids_all, q_keep, g_keep_all, width, ct)
    return q_masses, all_reduce(g_masses, comm)


def reduce_value(setup: Setup, totals: torch.Tensor) -> torch.Tensor:
    """The loss of the global batch from the global totals (as kernels/finish.py reduces one problem)."""
    value = reduced_value(setup.call.opts, totals).to(setup.ct)
    return torch.where(setup.s_ok(), value, torch.full_like(value, math.nan))


class GlobalLoss(torch.autograd.Function):
    """(q_r, g_r, logit scale) -> (value, this rank's rows' losses [N_r + M_r], their validity,
    global totals) through a strategy object (`allgather.Allgather`, `ring.Ring`), which keeps
    what its backward needs. Every rank backpropagates (the backward runs collectives)."""

    @staticmethod
    def forward(ctx, q, g, scale, strategy):
        with without_autocast(q.device.type):
            value, rows, valid, totals = strategy.forward()
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(valid, totals)
        ctx.save_for_backward(q, g, scale)     # PyTorch's version check: q, g modified in place -> error
        ctx.strategy = strategy
        return value, rows, valid, totals

    @staticmethod
    @once_differentiable
    def backward(ctx, d_value, d_rows, _d_valid, _d_totals):
        ctx.saved_tensors                      # raises if q or g was modified in place
        want = tuple(ctx.needs_input_grad[:3])
        with without_autocast(ctx.strategy.setup.call.q.device.type):
            dq, dg, d_scale = ctx.strategy.backward(d_value, d_rows, want)
        return dq, dg, d_scale, None


def run_global(strategy_cls, setup: Setup):
    """The global layout's result (value, SDMRowLosses, and SDMStats if asked for)."""
    c = setup.call
    o = c.opts
    strategy = strategy_cls(setup)
    value, rows, valid, totals = GlobalLoss.apply(c.q, c.g, setup.scale_t, strategy)
    n = c.q.shape[0]
    if o.reduction == "none":
        out = SDMRowLosses(rows[:n] if o.wants_q2g else None, rows[n:] if o.wants_g2q else None,
                           valid[:n] if o.wants_q2g else None, valid[n:] if o.wants_g2q else None)
    else:
        out = value
    if not c.return_stats:
        return out
    return out, global_stats(setup, totals)


def global_stats(setup: Setup, totals: torch.Tensor) -> SDMStats:
    """SDMStats of the global batch: counts and positive mass from the global totals; the present
    samples' feature norms from this rank's rows (one SUM and one MAX all-reduce)."""
    c, comm = setup.call, setup.comm
    sums, maxes = [], []
    for x, mask in ((c.q, c.q_mask), (c.g, c.g_mask)):
        nx = row_norms(x.detach().float())              # no overflow from norms of 2^64
        keep = mask if mask is not None else torch.ones_like(nx, dtype=torch.bool)
        kept = torch.where(keep, nx, torch.zeros_like(nx))
        sums += [kept.sum().double(), keep.sum().double()]
        maxes.append(kept.max())
    sums = all_reduce(torch.stack(sums), comm)
    maxes = all_reduce(torch.stack(maxes), comm, torch.distributed.ReduceOp.MAX)
    return stats_from_red(totals.detach(), (sums[0] / sums[1].clamp_min(1)).float(), maxes[0],
                          (sums[2] / sums[3].clamp_min(1)).float(), maxes[1], dtype=setup.ct)
