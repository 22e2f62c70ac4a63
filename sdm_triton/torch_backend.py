"""The chunked pure-PyTorch backend: the tile primitives of `launch.py` with one tile per chunk.

Each chunk materialises S for all N rows and the chunk's columns ([N, C] in
fp32, or float64 for float64 inputs), so memory is O(C * N) with C chosen from
a byte budget. It runs anywhere PyTorch runs (the CPU path of ``backend="auto"``)
and is an independent implementation of the kernels' math for the tests.

Galleries (``a.inv_ysum`` [K, N], see launch.py): a chunk's row statistics are
computed per gallery it touches ([5, K, N], empty statistics for the others), and the
backward reads each column's gallery row of the row-side vectors.
"""

from __future__ import annotations

import torch

from .options import compute_dtype

from .stats import NUM_STATS, merge_partials

NEG_BIG = -1.0e30


class TorchTiles:
    name = "torch"

    @staticmethod
    def check_supported(q: torch.Tensor):
        return None

    def gemm_dtype(self, dtype: torch.dtype):
        """Products in the compute dtype (fp32, or float64 for float64 inputs)."""
        return None

    @staticmethod
    def merge(part: torch.Tensor, reverse: bool) -> torch.Tensor:
        return merge_partials(part, reverse)

    def chunk_columns(self, kind: str, n_rows: int, n_cols: int, dtype: torch.dtype, budget_bytes: int) -> int:
        # About 8 temporaries of [N, C] live at once in the formulas below.
        per_col = 8 * n_rows * torch.empty((), dtype=compute_dtype(dtype)).element_size()
        return max(1, min(n_cols, budget_bytes // per_col))

    def _tile(self, a, b, labels, scale_t, c0, c1):
        ct = compute_dtype(a.feats.dtype)
        dot = a.feats.to(ct) @ b.feats[c0:c1].to(ct).T                              # [N, C]
        cos = dot * a.inv_norm.to(ct)[:, None] * b.inv_norm[c0:c1].to(ct)[None, :]
        S = cos * scale_t.to(ct)
        rv = a.present[:, None]
        cv = b.present[c0:c1][None, :]
        both = rv & cv
        if labels is not None:
            y = labels[:, c0:c1].to(ct)
        else:
            y = (a.ids[:, None] == b.ids[c0:c1][None, :]).to(ct)
        y = torch.where(both, y, torch.zeros_like(y))
        return S, cos, y, rv, cv, both

    @staticmethod
    def _direction_stats(S, y, inv_ysum, domain, dim, reverse, eps):
        """Statistics along ``dim`` (1: rows over columns, 0: columns over rows) of one tile."""
        S_d = torch.where(domain, S, torch.full_like(S, NEG_BIG))
        m = S_d.amax(dim, keepdim=True)
        dev = S_d - m
        p = torch.where(domain, torch.exp(dev), torch.zeros_like(S))
        Y = y * inv_ysum
        out = torch.empty((NUM_STATS, S.shape[1 - dim]), dtype=S.dtype, device=S.device)
        out[0] = m.squeeze(dim)
        out[1] = p.sum(dim)
        out[2] = torch.where(y > 0, p, torch.zeros_like(p)).sum(dim)
        if reverse:
            out[3] = (p * dev).sum(dim)
            out[4] = (p * torch.log(Y + eps)).sum(dim)
        else:
            out[3] = (Y * dev).sum(dim)
            out[4] = Y.sum(dim)
        return out

    def stats(self, a, b, labels, scale_t, c0, c1, reverse, eps):
        S, _, y, rv, cv, _ = self._tile(a, b, labels, scale_t, c0, c1)
        ct = S.dtype
        cols = self._direction_stats(S, y, b.inv_ysum[c0:c1].to(ct)[None, :], rv, 0, reverse, eps)
        if a.galleries == 1:
            return self._direction_stats(S, y, a.inv_ysum.to(ct)[:, None], cv, 1, reverse, eps), cols
        gals, n = a.inv_ysum.shape
        width = b.feats.shape[0] // gals
        rows = torch.zeros((NUM_STATS, gals, n), dtype=ct, device=S.device)
        rows[0] = NEG_BIG        # empty statistics for the galleries this chunk does not touch
        for k in range(c0 // width, (c1 - 1) // width + 1):
            lo, hi = max(c0, k * width) - c0, min(c1, (k + 1) * width) - c0
            rows[:, k] = self._direction_stats(S[:, lo:hi], y[:, lo:hi], a.inv_ysum[k].to(ct)[:, None],
                                               cv[:, lo:hi], 1, reverse, eps)
        return rows, cols

    @staticmethod
    def _row_vectors(a, b, c0, c1, ct, vectors):
        """The row side's vectors as [N, 1], or [N, C] with each column's gallery row when the
        columns are galleries (``a.inv_ysum`` [K, N])."""
        if a.galleries == 1:
            return [v.to(ct)[:, None] for v in vectors]
        width = b.feats.shape[0] // a.galleries
        gal = torch.arange(c0, c1, device=a.inv_ysum.device) // width
        return [v.to(ct)[gal].T for v in vectors]

    def grad(self, a, b, labels, scale_t, c0, c1, reverse, eps, lse_a, lse_b, loss_a, loss_b, ga, gb, pa, pb,
             want_dscale):
        S, cos, y, _, _, both = self._tile(a, b, labels, scale_t, c0, c1)
        ct = S.dtype
        (lse_a_hi, lse_a_lo), (lse_b_hi, lse_b_lo) = lse_a, lse_b
        inv_ya, lse_a_hi, lse_a_lo, loss_a, ga = self._row_vectors(
            a, b, c0, c1, ct, (a.inv_ysum, lse_a_hi, lse_a_lo, loss_a, ga))
        inv_yb = b.inv_ysum[c0:c1].to(ct)[None, :]
        on_r = both & (inv_ya > 0)
        on_c = both & (inv_yb > 0)
        zero = torch.zeros_like(S)
        # lse as hi + lo (stats.split_lse): S - hi is exact near the maximum, then the small lo
        logp_r = torch.where(on_r, (S - lse_a_hi) - lse_a_lo, zero)
        logp_c = torch.where(on_c, (S - lse_b_hi[c0:c1][None, :]) - lse_b_lo[c0:c1][None, :], zero)
        p_r, p_c = torch.exp(logp_r), torch.exp(logp_c)
        Y_r, Y_c = y * inv_ya, y * inv_yb
        if reverse:
            d_r = p_r * (logp_r - torch.log(Y_r + eps) - loss_a)
            d_c = p_c * (logp_c - torch.log(Y_c + eps) - loss_b[c0:c1].to(ct)[None, :])
        else:
            d_r, d_c = p_r - Y_r, p_c - Y_c
        dS = (torch.where(on_r, ga * d_r, zero)
              + torch.where(on_c, gb[c0:c1].to(ct)[None, :] * d_c, zero))
        dscale = (dS * cos).sum(1) if want_dscale else None
        # W = dS * pa_i * pb_j, for the products with x' (prepare.product_operand)
        W = dS * (pa.to(ct)[:, None] * pb[c0:c1].to(ct)[None, :])
        return W, 1, dscale
