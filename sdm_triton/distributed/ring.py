"""strategy="ring": the gallery blocks travel around the ranks; nothing of size M x D is gathered.

Step k of P on rank r holds the block of rank s = r - k (features [M_s, D]; ids and presence
as one int64 [2, M_s]) and runs the block problem B_s = q_r against g_s (`blocks.py`) while
the next block arrives (point-to-point, `comm.ring_pass`).

Forward:
    label masses over the global batch (dense labels, or a backend that needs them for ids:
        ids and presence of every gallery row are all-gathered for them, [M] int64)
    per block: prepare(B_s) -> statistics(B_s): q_r's statistics over g_s's columns (kept:
        P segments after the ring) and g_s's over q_r (they travel with the block, one more
        segment per rank, and come home after P steps)
    finish(B_r) with P segments for both sides: this rank's q rows and g rows complete
    global totals: all-reduce of this rank's sums and counts
Backward:
    row weights (global counts) of this rank's rows; the gallery rows' weights and the state
    of their softmax rows (`Backend.row_state`) travel with the block
    per block: backward(B_s) with q_r's state and g_s's: dq_r accumulated in fp32 over the
        blocks, g_s's fp32 partial gradient travels with the block, summed, and comes home
Memory: O((N_r + max M_s) D) per rank for features plus O(P (N_r + M_r)) for the partials.
"""

from __future__ import annotations

import torch

from ..backend import NUM_STATS, RED
from ..reduction import cast_gradient, gradient_weights
from .blocks import NUM_TOTALS, Setup, label_masses, reduce_value
from .comm import all_gather_rows, all_reduce, ring_pass


class Ring:
    def __init__(self, setup: Setup):
        self.setup = setup

    # ----------------------------------------------------------------------------- blocks
    def _block_problem(self, s: int, block):
        """B_s from a travelling block [features, int64 (ids, presence), ...]."""
        c, comm = self.setup.call, self.setup.comm
        feats, meta = block[0], block[1]
        labels = None
        if c.labels is not None:
            off = comm.g_offset(s)
            labels = c.labels[:, off:off + comm.g_sizes[s]]
        return self.setup.problem(feats, *self.setup.gallery_columns(meta), labels)

    def _masses(self, s: int):
        """Label masses [2, N_r + M_s] of B_s's softmax rows (None: the backend computes them)."""
        if self.q_masses is None:
            return None
        off = self.setup.comm.g_offset(s)
        return torch.cat([self.q_masses, self.g_masses[:, off:off + self.setup.comm.g_sizes[s]]], 1)

    def _block_like(self, s: int, extra=()):
        c, comm = self.setup.call, self.setup.comm
        m_s = comm.g_sizes[s]
        return [((m_s, c.q.shape[1]), c.q.dtype), ((2, m_s), torch.int64)] + [(shape(m_s), dt) for shape, dt in extra]

    # ----------------------------------------------------------------------------- forward
    def forward(self):
        s = self.setup
        c, comm, be, ct = s.call, s.comm, s.call.backend, s.ct
        n = c.q.shape[0]
        self.own = [c.g.contiguous(), s.gallery_meta(0)]
        self.q_masses = self.g_masses = None
        if s.needs_masses():
            meta_all = all_gather_rows(self.own[1].T, comm.g_sizes, comm)                   # [M, 2]
            self.q_masses, self.g_masses = label_masses(s, *s.gallery_columns(meta_all.T))
        q_parts = []

        def compute(blk_rank, block):
            B = self._block_problem(blk_rank, block)
            prepared = be.prepare(B, self._masses(blk_rank))
            part = be.statistics(B, prepared).partial                 # one segment per side
            q_parts.append(part[:1, :, :n])
            if blk_rank == comm.rank:
                self.B, self.prepared = B, prepared
            return part[:1, :, n:]

        g_parts = ring_pass(comm, self.own, self._block_like, compute, lambda acc, mine: torch.cat([acc, mine]),
                            lambda blk_rank, count: ((count, NUM_STATS, comm.g_sizes[blk_rank]), ct))
        merged = torch.cat([torch.cat(q_parts), g_parts.to(ct)], 2).contiguous()     # [P, NUM_STATS, N_r + M_r]
        out = be.finish(self.B, merged, comm.world, comm.world, self.prepared)
        red = out.red[:, 0].to(torch.float64)
        if not c.return_stats:      # the positives' mass: not computed
            red = torch.cat([red[:RED.pos_q2g], torch.zeros_like(red[RED.pos_q2g:NUM_TOTALS])])
        totals = all_reduce(red[:NUM_TOTALS].clone(), comm)
        self.out, self.totals = out, totals
        return reduce_value(s, totals), out.rows.clone(), out.valid.clone(), totals

    # ----------------------------------------------------------------------------- backward
    def backward(self, d_value, d_rows, want):
        s = self.setup
        c, comm, be, ct = s.call, s.comm, s.call.backend, s.ct
        n, d = c.q.shape
        want_q, want_g, want_scale = want
        w = gradient_weights(c.opts, self.totals[:, None], self.out.valid, n, d_value, d_rows, ct)
        state = be.row_state(self.B, self.out)                        # [F, N_r + M_r]
        n_fields = state.shape[0]
        q_state, w_q = state[:, :n], w[:n]
        block = self.own + [torch.cat([state[:, n:], w[None, n:]]).contiguous()]
        acc = {"dq": None, "ds": None}

        def compute(blk_rank, blk):
            B = self._block_problem(blk_rank, blk)
            prepared = be.prepare(B, self._masses(blk_rank))
            vec = blk[2]
            out_B = be.state_from_rows(B, prepared, torch.cat([q_state, vec[:n_fields]], 1))
            dq, dg, ds = be.backward(B, out_B, None, torch.cat([w_q, vec[n_fields]]), (want_q, want_g, want_scale),
                                     partial_grads=True)
            if want_q:
                acc["dq"] = dq if acc["dq"] is None else acc["dq"].add_(dq)
            if want_scale:
                acc["ds"] = ds if acc["ds"] is None else acc["ds"] + ds
            return dg

        dg = ring_pass(comm, block, lambda r: self._block_like(r, [(lambda m_s: (n_fields + 1, m_s), ct)]), compute,
                       lambda acc_in, mine: acc_in.add_(mine),
                       lambda r, count: ((comm.g_sizes[r], d), ct) if want_g else None)
        d_scale = None
        if want_scale:
            d_scale = all_reduce(acc["ds"].reshape(1).to(ct), comm)[0].to(s.scale_t.dtype)
        return (cast_gradient(acc["dq"] if want_q else None, c.q.dtype, s.factor),
                cast_gradient(dg if want_g else None, c.g.dtype, s.factor), d_scale)
