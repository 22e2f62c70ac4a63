"""The torch backend: `backend.Backend` in plain PyTorch, chunked over columns.

It runs wherever PyTorch runs (the CPU path of ``backend="auto"``, float64 included) and is
an implementation of the loss independent of the Triton kernels, in the natural-log domain
and with two passes instead of online softmax statistics, for the tests. Memory: S is built
for all N query rows and a chunk of C gallery columns at a time ([N, C] in the compute dtype,
C from ``workspace_bytes``), so it stays O((N + M) D + N C).

The forward's primitives (`backend.Backend`), per gallery k, chunk by chunk:
    prepare     q_hat, g_hat, norms, and each softmax row's label mass (ysum, sum y ln y;
                identity labels too: the reverse KL below needs Y_ij = y_ij / ysum_i per pair)
    statistics  pass 1: S = s q_hat g_hat^T; the query rows' (max, sum exp) merged across
                chunks; the gallery rows' softmax over the queries is complete within a chunk,
                their sums now. pass 2: the query rows' sums with their (max, sum exp):
                forward sum_j Y (S - m), reverse sum_j P (ln P - ln(Y + eps)), computed per
                pair (no cancelling difference of two sums). One segment: [1, 5, NDR]
    finish      merge segments (one in a single process: the sums as they are; several when
                the distributed strategies bring those of other column blocks), the losses
    backward    dS = w_i d_ij + w'_j d'_ij (kernels/grad.py), dq_hat += s dS g_hat, dg_hat = s dS^T q_hat
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .backend import NUM_RED, NUM_STATS, RED, ForwardOut, Statistics
from .options import NORM_EPS, NORM_LIMIT, compute_dtype
from .problem import Problem
from .reduction import (add_label_masses, cast_gradient, gradient_weights, ln_unscaled, pair_labels, reduced_value,
                        row_norms)


def _views(p: Problem):
    """Uniform [K, ...] views of the gallery-side tensors (expanded where shared)."""
    k, m = p.galleries, p.m
    g = p.g if p.g.dim() == 3 else p.g.unsqueeze(0)
    g_ids = None if p.g_ids is None else (p.g_ids if p.g_ids.dim() == 2 else p.g_ids.expand(k, m))
    g_mask = None if p.g_mask is None else (p.g_mask if p.g_mask.dim() == 2 else p.g_mask.expand(k, m))
    labels = None if p.labels is None else (p.labels if p.labels.dim() == 3 else p.labels.expand(k, *p.labels.shape))
    return g, g_ids, g_mask, labels


def _normalised(x: torch.Tensor, keep: torch.Tensor, normalize: bool, ct):
    """(x_hat, norm): absent rows become 0 before anything touches them (they may hold NaN).
    In fp32 a row of norm >= 2^64 (its square sum overflows) is NaN, as in the kernels (prep.py);
    its norm, reported by the statistics, is right (`row_norms`)."""
    x = torch.where(keep[:, None], x.to(ct), torch.zeros((), dtype=ct, device=x.device))
    norm = row_norms(x)
    if not normalize:
        return x, norm
    r = 1 / norm.clamp_min(NORM_EPS)
    if ct == torch.float32:
        r = torch.where(norm >= NORM_LIMIT, math.nan, r)
    return x * r[:, None], norm


def _merge_max_sum(m, l, S):
    """Online softmax over columns: (max, sum exp(S - max)) of the rows so far and of S."""
    m_new = torch.maximum(m, S.amax(1))
    safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    alpha = torch.where(torch.isfinite(m), torch.exp(m - safe), torch.zeros_like(m))
    return m_new, l * alpha + torch.exp(S - safe[:, None]).sum(1)


def _safe_m_logl(m, l):
    """(m, log l) with rows that saw no present column set to (0, 0) (they are invalid); NaN stays."""
    ok = l != 0
    return torch.where(ok, m, torch.zeros_like(m)), torch.where(ok, torch.log(torch.where(ok, l, torch.ones_like(l))),
                                                                 torch.zeros_like(l))


class Prepared(NamedTuple):
    """`TorchBackend.prepare`: the normalised features (0 for absent samples), norms, presence,
    label masses [2, NDR] (ysum, sum y ln y) and the scale."""
    q_hat: torch.Tensor      # [N, D] compute dtype
    q_norm: torch.Tensor     # [N]
    q_keep: torch.Tensor     # [N] bool
    g_hat: torch.Tensor      # [K, M, D]
    g_norm: torch.Tensor     # [K, M]
    g_keep: torch.Tensor     # [K, M] bool
    masses: torch.Tensor     # [2, NDR]
    s: torch.Tensor          # 0-dim


class TorchBackend:
    name = "torch"

    @staticmethod
    def check_supported(q: torch.Tensor) -> None:
        return None

    def _chunk_width(self, p: Problem, ct) -> int:
        per_col = 8 * p.n * torch.empty((), dtype=ct).element_size()    # ~8 [N, C] temporaries
        return max(1, min(p.m, p.workspace_bytes // per_col))

    @staticmethod
    def _labels(p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct):
        """y on the pairs of present samples, columns [c0, c1) of gallery k; bad weights -> NaN."""
        return pair_labels(None if labels is None else labels[k], p.q_ids, None if g_ids is None else g_ids[k],
                           q_keep, g_keep, c0, c1, ct)

    # ----------------------------------------------------------------------------- forward
    #: prepare() needs the label masses of identity labels too (module doc: Y_ij inside the log)
    needs_id_masses = True

    def forward(self, p: Problem) -> ForwardOut:
        prepared = self.prepare(p)
        st = self.statistics(p, prepared)
        return self.finish(p, st.partial, st.segments_q, st.segments_g, prepared)

    def prepare(self, p: Problem, label_masses: Optional[torch.Tensor] = None) -> Prepared:
        """Normalised features, norms, presence and the label masses (ysum, ylny) of every softmax
        row: from the labels (chunked: they may be dense [N, M]), or ``label_masses`` [2, NDR]."""
        o = p.options
        n, m, k_count = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        dev = p.q.device
        g3, g_ids, g_mask, labels = _views(p)
        s = p.scale.to(ct) if p.scale is not None else torch.tensor(p.scale_value, dtype=ct, device=dev)
        q_keep = p.q_mask if p.q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
        g_keep = g_mask if g_mask is not None else torch.ones((k_count, m), dtype=torch.bool, device=dev)
        q_hat, q_norm = _normalised(p.q, q_keep, o.normalize, ct)
        g_hats, g_norms = zip(*(_normalised(g3[k], g_keep[k], o.normalize, ct) for k in range(k_count)))
        if label_masses is not None:     # summed over blocks or ranks: may overflow there
            masses = label_masses.to(ct)
            masses = torch.where(torch.isinf(masses), math.nan, masses)
        else:
            masses = torch.zeros((2, p.num_rows), dtype=ct, device=dev)
            width = self._chunk_width(p, ct)
            for k in range(k_count):
                q0, g0 = k * n, k_count * n + k * m
                add_label_masses(masses[:, q0:q0 + n], masses[:, g0:g0 + m], None if labels is None else labels[k],
                                 p.q_ids, None if g_ids is None else g_ids[k], q_keep, g_keep[k], width, ct)
        return Prepared(q_hat, q_norm, q_keep, torch.stack(g_hats), torch.stack(g_norms), g_keep, masses, s)

    def _valid_inv_y(self, p: Problem, prep: Prepared):
        """(valid [NDR], 1 / ysum [NDR], 0 for invalid rows): a row is valid when its sample is
        present and its label mass > 0 (NaN, from bad labels, counts: its NaN reaches the loss)."""
        keep = torch.cat([prep.q_keep.repeat(p.galleries), prep.g_keep.reshape(-1)])
        ysum = prep.masses[0]
        valid = keep & ((ysum > 0) | torch.isnan(ysum))
        return valid, torch.where(valid, 1 / torch.where(valid, ysum, 1), 0)

    def statistics(self, p: Problem, prep: Prepared) -> Statistics:
        """One segment per side: [1, NUM_STATS, NDR] (module doc). Per softmax row, over this
        problem's present columns, with the row's own (m, l) over these columns:

            m     max_j S_ij                       (-inf: no present column)
            l     sum_j exp(S_ij - m)
            x     forward: sum_j Y_ij (S_ij - m)   reverse: sum_j P_ij (ln P_ij - ln(Y_ij + eps))
            pos   sum_{j: y_ij > 0} P_ij
            ysum  sum_j Y_ij                       (forward: to move x to another m when merging)

        with P_ij = exp(S_ij - m) / l the softmax over these columns and Y_ij = y_ij / ysum_i
        (the row's label mass over ALL columns, from prepare). The query rows take two passes
        over the column chunks (the softmax's (m, l) first, then the sums with them); a gallery
        row's softmax over the queries is complete within a chunk."""
        o = p.options
        n, m, k_count = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        dev = p.q.device
        _, g_ids, _, labels = _views(p)
        s = prep.s
        q_keep = prep.q_keep
        _, inv_y = self._valid_inv_y(p, prep)
        width = self._chunk_width(p, ct)
        part = torch.zeros((1, NUM_STATS, p.num_rows), dtype=ct, device=dev)
        for k in range(k_count):
            g_keep, g_hat = prep.g_keep[k], prep.g_hat[k]
            qi = slice(k * n, (k + 1) * n)
            g0 = k_count * n + k * m
            # pass 1: the query rows' (m, l) merged across chunks; the gallery rows complete per chunk
            m_q = torch.full((n,), -math.inf, dtype=ct, device=dev)
            l_q = torch.zeros(n, dtype=ct, device=dev)
            for c0 in range(0, m, width):
                c1 = min(m, c0 + width)
                S = s * (prep.q_hat @ g_hat[c0:c1].T)                              # [N, C]
                m_q, l_q = _merge_max_sum(m_q, l_q, S.masked_fill(~g_keep[None, c0:c1], -math.inf))
                y = self._labels(p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct)
                St = S.T.masked_fill(~q_keep[None, :], -math.inf)                 # [C, N]
                mc, lc = _merge_max_sum(torch.full_like(St[:, 0], -math.inf), torch.zeros_like(St[:, 0]), St)
                part[0, :, g0 + c0:g0 + c1] = torch.stack(
                    [mc, lc, *self._row_sums(St, *_safe_m_logl(mc, lc), y.T, inv_y[g0 + c0:g0 + c1], o)])
            # pass 2: the query rows' sums with their (m, l)
            m_safe, logl_q = _safe_m_logl(m_q, l_q)
            sums = torch.zeros((3, n), dtype=ct, device=dev)
            for c0 in range(0, m, width):
                c1 = min(m, c0 + width)
                S = (s * (prep.q_hat @ g_hat[c0:c1].T)).masked_fill(~g_keep[None, c0:c1], -math.inf)
                y = self._labels(p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct)
                sums += torch.stack(self._row_sums(S, m_safe, logl_q, y, inv_y[qi], o))
            part[0, :, qi] = torch.cat([torch.stack([m_q, l_q]), sums])
        return Statistics(part, 1, 1)

    @staticmethod
    def _row_sums(S, m, logl, y, iy, o):
        """(x, pos, ysum) of `statistics` for a chunk, with the rows' (m, log l). ln P = (S - m) -
        log l: S - m is exact near the row's maximum, where the small differences of P - Y live."""
        # the softmax domain: absent columns hold -inf; a NaN (a present sample's NaN feature) stays in
        domain = S != -math.inf
        shifted = torch.where(domain, S - m[:, None], torch.zeros_like(S))
        log_p = torch.where(domain, shifted - logl[:, None], torch.zeros_like(S))
        p = torch.where(domain, log_p.exp(), torch.zeros_like(S))
        Y = y * iy[:, None]
        if o.reverse:
            x = (p * (log_p - torch.log(Y + o.eps))).sum(1)
        else:
            x = (Y * shifted).sum(1)
        pos = torch.where(y > 0, p, torch.zeros_like(p)).sum(1)
        return x, pos, Y.sum(1)

    def finish(self, p: Problem, partial: torch.Tensor, segments_q: int, segments_g: int,
               prepared: Prepared) -> ForwardOut:
        """Merge the segments (module doc), then per-row losses, validity, reduction, state:

            m = max_s m_s,  l = sum_s l_s e^(m_s - m),  w_s = l_s e^(m_s - m) / l
            forward:  sum_j Y_ij (S_ij - m) = sum_s x_s + ysum_s (m_s - m),
                      L = ln l - that + sum_j Y ln Y       (>= 0: clamped, NaN stays)
            reverse:  L = sum_s w_s (x_s + ln w_s),        pos = sum_s w_s pos_s

        (one segment: w = 1, the loss of the two passes as they are). A segment without
        present columns (l_s = 0) takes no part."""
        o = p.options
        prep = prepared
        n, m, k_count = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        dev = p.q.device
        kn = k_count * n
        s = prep.s
        s_ok = torch.isfinite(s) & (s > 0)
        nan = torch.full((), math.nan, dtype=ct, device=dev)
        zero = torch.zeros((), dtype=ct, device=dev)
        merged = [self._merge(partial[:segments_q, :, :kn], o), self._merge(partial[:segments_g, :, kn:], o)]
        row_m, row_logl, body, pos = (torch.cat(x) for x in zip(*merged))
        valid, inv_y = self._valid_inv_y(p, prep)
        ysum, ylny = prep.masses[0], prep.masses[1]
        if o.reverse:
            loss = body
        else:
            safe = torch.where(ysum > 0, ysum, torch.ones_like(ysum))
            ln_ysum = torch.log(safe) if p.labels is None else ln_unscaled(safe)   # (add_label_masses)
            loss = row_logl - body + ylny / safe - ln_ysum
            loss = torch.where(loss < 0, zero, loss)                 # KL >= 0; NaN stays
        loss = torch.where(s_ok, loss, nan)
        rows = torch.where(valid, loss, zero)
        row_m = torch.where(valid, row_m, zero)
        row_logl = torch.where(valid, row_logl, zero)

        red = torch.zeros((NUM_RED, k_count), dtype=ct, device=dev)
        q_norm_kept = torch.where(prep.q_keep, prep.q_norm, 0)
        for k in range(k_count):
            qi = slice(k * n, (k + 1) * n)
            gi = slice(kn + k * m, kn + (k + 1) * m)
            for field, x in ((RED.sum_q2g, rows[qi].sum()), (RED.valid_q2g, valid[qi].sum()),
                             (RED.sum_g2q, rows[gi].sum()), (RED.valid_g2q, valid[gi].sum()),
                             (RED.pos_q2g, torch.where(valid[qi], pos[qi], 0).sum()),
                             (RED.pos_g2q, torch.where(valid[gi], pos[gi], 0).sum())):
                red[field, k] = x
            g_norm_kept = torch.where(prep.g_keep[k], prep.g_norm[k], 0)
            for mean, top, kept, keep in ((RED.q_norm_mean, RED.q_norm_max, q_norm_kept, prep.q_keep),
                                          (RED.g_norm_mean, RED.g_norm_max, g_norm_kept, prep.g_keep[k])):
                red[mean, k] = kept.sum() / keep.sum().clamp_min(1)
                red[top, k] = kept.max()
        value = torch.where(s_ok, reduced_value(o, red), nan)
        if p.scalar_value:
            value = value[0]
        return ForwardOut(value, rows, valid, red, (row_m, row_logl, inv_y, prep.g_hat, prep.q_hat, s))

    @staticmethod
    def _merge(part: torch.Tensor, o):
        """(m, log l, body, pos) of rows from their segments [S, NUM_STATS, R] (`finish`); (0, 0)
        for (m, log l) of a row without any present column."""
        m_s, l_s, x_s, pos_s, y_s = part.unbind(1)
        empty = l_s == 0                                                    # NaN is not empty: it stays
        m = torch.where(empty, -math.inf, m_s).amax(0)
        l = torch.where(empty, 0, l_s * torch.exp(m_s - m)).sum(0)
        m_safe, logl = _safe_m_logl(m, l)
        if part.shape[0] == 1:                                              # one segment: w = 1 exactly
            return m_safe, logl, x_s[0], pos_s[0]
        zero = torch.zeros((), dtype=part.dtype, device=part.device)
        log_w = torch.log(torch.where(empty, 1, l_s)) + (m_s - m) - logl
        w = torch.where(empty, zero, torch.exp(log_w))
        if o.reverse:
            body = torch.where(empty, zero, w * (x_s + log_w)).sum(0)
        else:
            body = torch.where(empty, zero, x_s + y_s * (m_s - m)).sum(0)
        return m_safe, logl, body, (w * pos_s).sum(0)

    # ----------------------------------------------------------------------------- per-row state
    def row_state(self, p: Problem, out: ForwardOut) -> torch.Tensor:
        """[5, NDR]: m, log l, 1 / ysum (the backward's state), loss, validity."""
        row_m, row_logl, inv_y = out.state[:3]
        return torch.stack([row_m, row_logl, inv_y, out.rows.to(row_m.dtype), out.valid.to(row_m.dtype)])

    def state_from_rows(self, p: Problem, prepared: Prepared, rows: torch.Tensor) -> ForwardOut:
        red = torch.zeros((NUM_RED, p.galleries), dtype=rows.dtype, device=rows.device)
        return ForwardOut(None, rows[3], rows[4] != 0, red,
                          (rows[0], rows[1], rows[2], prepared.g_hat, prepared.q_hat, prepared.s))

    # ----------------------------------------------------------------------------- backward
    def backward(self, p: Problem, out: ForwardOut, d_value, d_rows, want, partial_grads: bool = False):
        want_q, want_g, want_scale = want
        o = p.options
        n, m, k_count = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        dev = p.q.device
        row_m, row_logl, inv_y, g_hats, q_hat, s = out.state
        g3, g_ids, g_mask, labels = _views(p)
        q_keep = p.q_mask if p.q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
        w = gradient_weights(o, out.red, out.valid, n, d_value, d_rows, ct)
        width = self._chunk_width(p, ct)
        dq_hat = torch.zeros((n, p.d), dtype=ct, device=dev)
        dg_hat = torch.zeros((k_count, m, p.d), dtype=ct, device=dev)
        d_s = torch.zeros((), dtype=ct, device=dev)
        zero = torch.zeros((), dtype=ct, device=dev)
        for k in range(k_count):
            g_keep = g_mask[k] if g_mask is not None else torch.ones(m, dtype=torch.bool, device=dev)
            qi = slice(k * n, (k + 1) * n)
            gi0 = k_count * n + k * m
            for c0 in range(0, m, width):
                c1 = min(m, c0 + width)
                gj = slice(gi0 + c0, gi0 + c1)
                cos = q_hat @ g_hats[k][c0:c1].T
                S = s * cos
                both = q_keep[:, None] & g_keep[None, c0:c1]
                y = self._labels(p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct)
                on_r = both & (inv_y[qi] != 0)[:, None]
                on_c = both & (inv_y[gj] != 0)[None, :]
                log_p = torch.where(on_r, (S - row_m[qi][:, None]) - row_logl[qi][:, None], zero)
                log_pc = torch.where(on_c, (S - row_m[gj][None, :]) - row_logl[gj][None, :], zero)
                P, Pc = log_p.exp(), log_pc.exp()
                Y, Yc = y * inv_y[qi][:, None], y * inv_y[gj][None, :]
                if o.reverse:
                    d_r = P * (log_p - torch.log(Y + o.eps) - out.rows[qi].to(ct)[:, None])
                    d_c = Pc * (log_pc - torch.log(Yc + o.eps) - out.rows[gj].to(ct)[None, :])
                else:
                    d_r, d_c = P - Y, Pc - Yc
                dS = torch.where(on_r, w[qi][:, None] * d_r, zero) + torch.where(on_c, w[gj][None, :] * d_c, zero)
                if want_q:
                    dq_hat += s * (dS @ g_hats[k][c0:c1])
                if want_g:
                    dg_hat[k, c0:c1] = s * (dS.T @ q_hat)
                if want_scale:
                    d_s = d_s + torch.where(both, dS * cos, zero).sum()
        dq = self._input_gradient(p.q, q_hat, q_keep, dq_hat, o.normalize, partial_grads) if want_q else None
        dg = None
        if want_g:
            g_keep_all = g_mask if g_mask is not None else torch.ones((k_count, m), dtype=torch.bool, device=dev)
            dg = torch.stack([self._input_gradient(g3[k], g_hats[k], g_keep_all[k], dg_hat[k], o.normalize,
                                                   partial_grads)
                              for k in range(k_count)])
            dg = dg.reshape(p.g.shape)
        return dq, dg, (d_s if want_scale else None)

    @staticmethod
    def _input_gradient(x, x_hat, keep, d_hat, normalize, partial=False):
        """F.normalize's backward (d / max(|x|, eps) projected off x_hat), 0 for absent rows; in
        x's dtype (rounded: past the dtype's range it is inf, as GradScaler expects), or left in the
        compute dtype when ``partial``."""
        ct = d_hat.dtype
        xf = torch.where(keep[:, None], x.to(ct), torch.zeros((), dtype=ct, device=x.device))
        if normalize:
            norm = row_norms(xf)
            radial = (x_hat * d_hat).sum(1, keepdim=True)
            g = torch.where((norm > NORM_EPS)[:, None], d_hat - x_hat * radial, d_hat) / norm.clamp_min(NORM_EPS)[:, None]
        else:
            g = d_hat
        g = torch.where(keep[:, None], g, torch.zeros((), dtype=ct, device=x.device))
        return g if partial else cast_gradient(g, x.dtype)
