"""strategy="allgather": every rank gathers all gallery rows and runs q_r against all of them.

Forward (rank r; one block problem L = q_r against all M gallery rows, `blocks.py`):
    all-gather g (features; ids and presence as one int64 [M, 2])
    label masses over the global batch (dense labels, or a backend that needs them for ids)
    prepare(L) -> statistics(L): the q_r rows' statistics are complete (every column is
        here); the gallery rows' cover q_r only -> all-gather them ([P, NUM_STATS, M], one
        segment per rank) -> finish(L) with one segment for the q rows and P for the gallery
        rows: every rank holds the losses and state of its q rows and of ALL gallery rows
        (the same numbers on every rank)
    global totals: the q rows' sums and counts all-reduced; the gallery rows' are global already
Backward:
    row weights (global counts) of this rank's rows; the gallery rows' all-gathered
    backward(L) with those weights: dq_r complete, dg of all M rows partial (fp32) ->
    reduce-scatter -> this rank's dg rows; dL/ds all-reduced
Memory: O(M D) per rank for the gathered g (kept for the backward) plus O(P M) for the
partials and O(M D) fp32 for dg's partial in the backward.
"""

from __future__ import annotations

import torch

from ..backend import NUM_STATS, RED
from ..reduction import cast_gradient, gradient_weights
from .blocks import Setup, label_masses, reduce_value
from .comm import all_gather_rows, all_reduce, reduce_scatter_rows


class Allgather:
    def __init__(self, setup: Setup):
        self.setup = setup

    def forward(self):
        s = self.setup
        c, comm, be = s.call, s.comm, s.call.backend
        n, m_r = c.q.shape[0], c.g.shape[0]
        dev = c.q.device
        g_all = all_gather_rows(c.g, comm.g_sizes, comm)                                     # [M, D]
        g_ids_all, g_keep_all = s.gallery_columns(all_gather_rows(s.gallery_meta(1), comm.g_sizes, comm).T)
        m = g_all.shape[0]
        masses = None
        if s.needs_masses():
            q_masses, g_masses = label_masses(s, g_ids_all, g_keep_all)
            masses = torch.cat([q_masses, g_masses], 1)
        L = s.problem(g_all, g_ids_all, g_keep_all, c.labels)
        prepared = be.prepare(L, masses)
        part = be.statistics(L, prepared).partial                      # one segment per side
        g_parts = all_gather_rows(part[:1, :, n:], [1] * comm.world, comm)    # [P, NUM_STATS, M]
        merged = torch.empty((comm.world, NUM_STATS, n + m), dtype=part.dtype, device=dev)
        merged[0, :, :n] = part[0, :, :n]
        merged[:, :, n:] = g_parts
        out = be.finish(L, merged, 1, comm.world, prepared)

        red = out.red[:, 0].to(torch.float64)
        want_pos = c.return_stats
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        q_tot = all_reduce(torch.stack([red[RED.sum_q2g], red[RED.valid_q2g], red[RED.pos_q2g] if want_pos else zero]),
                           comm)
        # in RED's order: sum_q2g, valid_q2g, sum_g2q, valid_g2q, pos_q2g, pos_g2q
        totals = torch.stack([q_tot[0], q_tot[1], red[RED.sum_g2q], red[RED.valid_g2q], q_tot[2],
                              red[RED.pos_g2q] if want_pos else zero])
        g0 = n + comm.g_offset(comm.rank)
        rows = torch.cat([out.rows[:n], out.rows[g0:g0 + m_r]])
        valid = torch.cat([out.valid[:n], out.valid[g0:g0 + m_r]])
        self.L, self.out, self.totals = L, out, totals
        return reduce_value(s, totals), rows, valid, totals

    def backward(self, d_value, d_rows, want):
        s = self.setup
        c, comm, be = s.call, s.comm, s.call.backend
        n, m_r = c.q.shape[0], c.g.shape[0]
        want_q, want_g, want_scale = want
        L, out = self.L, self.out
        g0 = n + comm.g_offset(comm.rank)
        valid = torch.cat([out.valid[:n], out.valid[g0:g0 + m_r]])
        w = gradient_weights(c.opts, self.totals[:, None], valid, n, d_value, d_rows, s.ct)
        w_rows = torch.cat([w[:n], all_gather_rows(w[n:], comm.g_sizes, comm)])
        dq, dg_all, d_scale = be.backward(L, out, None, w_rows, (want_q, want_g, want_scale), partial_grads=True)
        dg = reduce_scatter_rows(dg_all, comm.g_sizes, comm) if want_g else None
        if want_scale:
            d_scale = all_reduce(d_scale.reshape(1).to(s.ct), comm)[0].to(s.scale_t.dtype)
        return (cast_gradient(dq if want_q else None, c.q.dtype, s.factor),
                cast_gradient(dg, c.g.dtype, s.factor), d_scale if want_scale else None)
