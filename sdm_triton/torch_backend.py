"""The torch backend: `backend.Backend` in plain PyTorch, chunked over columns.

It runs wherever PyTorch runs (the CPU path of ``backend="auto"``, float64 included) and is
an implementation of the loss independent of the Triton kernels, in the natural-log domain
and with two passes instead of online softmax statistics, for the tests. Memory: S is built
for all N query rows and a chunk of C gallery columns at a time ([N, C] in the compute dtype,
C from ``workspace_bytes``), so it stays O((N + M) D + N C).

Per gallery k, chunk by chunk:
    pass 1   S = s q_hat g_hat^T; the query rows' log-sum-exp merged across chunks (logaddexp);
             the gallery rows' softmax over the queries is complete within a chunk: their losses now
    pass 2   the query rows' sums with the final log-sum-exp (forward: sum Y S; reverse: sum P ln P,
             sum P ln(Y + eps)), then their losses
    backward dS = w_i d_ij + w'_j d'_ij (kernels/grad.py), dq_hat += s dS g_hat, dg_hat = s dS^T q_hat
"""

from __future__ import annotations

import math

import torch

from .backend import NUM_RED, ForwardOut, reduction_coefficients
from .options import NORM_EPS, compute_dtype
from .problem import Problem


def _views(p: Problem):
    """Uniform [K, ...] views of the gallery-side tensors (expanded where shared)."""
    k, m = p.galleries, p.m
    g = p.g if p.g.dim() == 3 else p.g.unsqueeze(0)
    g_ids = None if p.g_ids is None else (p.g_ids if p.g_ids.dim() == 2 else p.g_ids.expand(k, m))
    g_mask = None if p.g_mask is None else (p.g_mask if p.g_mask.dim() == 2 else p.g_mask.expand(k, m))
    labels = None if p.labels is None else (p.labels if p.labels.dim() == 3 else p.labels.expand(k, *p.labels.shape))
    return g, g_ids, g_mask, labels


def _normalised(x: torch.Tensor, keep: torch.Tensor, normalize: bool, ct):
    """(x_hat, norm): absent rows become 0 before anything touches them (they may hold NaN)."""
    x = torch.where(keep[:, None], x.to(ct), torch.zeros((), dtype=ct, device=x.device))
    norm = torch.linalg.vector_norm(x, dim=1)
    if not normalize:
        return x, norm
    return x / norm.clamp_min(NORM_EPS)[:, None], norm


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


class TorchBackend:
    name = "torch"

    @staticmethod
    def check_supported(q: torch.Tensor) -> None:
        return None

    def _chunk_width(self, p: Problem, ct) -> int:
        per_col = 8 * p.n * torch.empty((), dtype=ct).element_size()    # ~8 [N, C] temporaries
        return max(1, min(p.m, p.workspace_bytes // per_col))

    def _labels(self, p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct):
        """y on the pairs of present samples, columns [c0, c1) of gallery k; bad weights -> NaN."""
        both = q_keep[:, None] & g_keep[None, c0:c1]
        if labels is not None:
            y = labels[k, :, c0:c1].to(ct)
            y = torch.where((y < 0) | ~torch.isfinite(y), torch.full_like(y, math.nan), y)
        else:
            y = (p.q_ids[:, None] == g_ids[k, None, c0:c1]).to(ct)
        return torch.where(both, y, torch.zeros_like(y))

    def forward(self, p: Problem) -> ForwardOut:
        o = p.options
        n, m, k_count = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        dev = p.q.device
        g3, g_ids, g_mask, labels = _views(p)
        s = p.scale.to(ct) if p.scale is not None else torch.tensor(p.scale_value, dtype=ct, device=dev)
        s_ok = torch.isfinite(s) & (s > 0)
        q_keep = p.q_mask if p.q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
        q_hat, q_norm = _normalised(p.q, q_keep, o.normalize, ct)
        width = self._chunk_width(p, ct)
        ndr = p.num_rows
        rows = torch.zeros(ndr, dtype=ct, device=dev)
        valid = torch.zeros(ndr, dtype=torch.bool, device=dev)
        row_m = torch.zeros(ndr, dtype=ct, device=dev)
        row_logl = torch.zeros(ndr, dtype=ct, device=dev)
        inv_y = torch.zeros(ndr, dtype=ct, device=dev)
        red = torch.zeros((NUM_RED, k_count), dtype=ct, device=dev)
        g_hats = []
        nan = torch.full((), math.nan, dtype=ct, device=dev)
        for k in range(k_count):
            g_keep = g_mask[k] if g_mask is not None else torch.ones(m, dtype=torch.bool, device=dev)
            g_hat, g_norm = _normalised(g3[k], g_keep, o.normalize, ct)
            g_hats.append(g_hat)
            qi = slice(k * n, (k + 1) * n)
            gi = slice(k_count * n + k * m, k_count * n + (k + 1) * m)
            # label masses of both directions (chunked: the labels may be dense [N, M])
            ysum_q = torch.zeros(n, dtype=ct, device=dev)
            ylny_q = torch.zeros(n, dtype=ct, device=dev)
            ysum_g = torch.zeros(m, dtype=ct, device=dev)
            ylny_g = torch.zeros(m, dtype=ct, device=dev)
            for c0 in range(0, m, width):
                c1 = min(m, c0 + width)
                y = self._labels(p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct)
                ylny = torch.xlogy(y, y)
                ysum_q += y.sum(1)
                ylny_q += ylny.sum(1)
                ysum_g[c0:c1] = y.sum(0)
                ylny_g[c0:c1] = ylny.sum(0)
            valid_q = q_keep & ((ysum_q > 0) | torch.isnan(ysum_q))
            valid_g = g_keep & ((ysum_g > 0) | torch.isnan(ysum_g))
            iy_q = torch.where(valid_q, 1 / torch.where(valid_q, ysum_q, 1), 0)
            iy_g = torch.where(valid_g, 1 / torch.where(valid_g, ysum_g, 1), 0)

            # pass 1: the query rows' softmax (m, log l) merged across chunks; the gallery rows'
            # softmax over the queries is complete within a chunk: their losses now
            m_q = torch.full((n,), -math.inf, dtype=ct, device=dev)
            l_q = torch.zeros(n, dtype=ct, device=dev)
            loss_g = torch.zeros(m, dtype=ct, device=dev)
            pos_g = torch.zeros(m, dtype=ct, device=dev)
            m_g = torch.zeros(m, dtype=ct, device=dev)
            logl_g = torch.zeros(m, dtype=ct, device=dev)
            for c0 in range(0, m, width):
                c1 = min(m, c0 + width)
                S = s * (q_hat @ g_hat[c0:c1].T)                                   # [N, C]
                m_q, l_q = _merge_max_sum(m_q, l_q, S.masked_fill(~g_keep[None, c0:c1], -math.inf))
                y = self._labels(p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct)
                St = S.T.masked_fill(~q_keep[None, :], -math.inf)                 # [C, N]
                mc, lc = _merge_max_sum(torch.full_like(St[:, 0], -math.inf), torch.zeros_like(St[:, 0]), St)
                mc, logc = _safe_m_logl(mc, lc)
                part, pos_c = self._row_sums(St, mc, logc, y.T, iy_g[c0:c1], o)
                loss_g[c0:c1] = self._finish_rows(part, mc, logc, ylny_g[c0:c1], ysum_g[c0:c1], o)
                pos_g[c0:c1], m_g[c0:c1], logl_g[c0:c1] = pos_c, mc, logc
            # pass 2: the query rows' sums with the final (m, log l)
            m_q, logl_q = _safe_m_logl(m_q, l_q)
            loss_q = torch.zeros(n, dtype=ct, device=dev)
            pos_q = torch.zeros(n, dtype=ct, device=dev)
            for c0 in range(0, m, width):
                c1 = min(m, c0 + width)
                S = (s * (q_hat @ g_hat[c0:c1].T)).masked_fill(~g_keep[None, c0:c1], -math.inf)
                y = self._labels(p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct)
                part, pos = self._row_sums(S, m_q, logl_q, y, iy_q, o)
                loss_q += part
                pos_q += pos
            loss_q = self._finish_rows(loss_q, m_q, logl_q, ylny_q, ysum_q, o)

            for sl, loss, ok, mx, logl, iy, pos in ((qi, loss_q, valid_q, m_q, logl_q, iy_q, pos_q),
                                                    (gi, loss_g, valid_g, m_g, logl_g, iy_g, pos_g)):
                loss = torch.where(s_ok, loss, nan)
                rows[sl] = torch.where(ok, loss, torch.zeros((), dtype=ct, device=dev))
                valid[sl] = ok
                row_m[sl] = torch.where(ok, mx, 0)
                row_logl[sl] = torch.where(ok, logl, 0)
                inv_y[sl] = iy
            for field, x in ((0, rows[qi].sum()), (1, valid_q.sum()), (2, rows[gi].sum()), (3, valid_g.sum()),
                             (4, torch.where(valid_q, pos_q, 0).sum()), (5, torch.where(valid_g, pos_g, 0).sum())):
                red[field, k] = x
            for field, norms, keep in ((6, q_norm, q_keep), (8, g_norm, g_keep)):
                kept = torch.where(keep, norms, 0)
                red[field, k] = kept.sum() / keep.sum().clamp_min(1)
                red[field + 1, k] = kept.max()
        coef_q, coef_g = reduction_coefficients(p)
        mean = o.reduction == "mean"
        part_q = red[0] / red[1].clamp_min(1) if mean else red[0]
        part_g = red[2] / red[3].clamp_min(1) if mean else red[2]
        value = torch.where(s_ok, coef_q * part_q + coef_g * part_g, nan)
        if p.scalar_value:
            value = value[0]
        return ForwardOut(value, rows, valid, red, (row_m, row_logl, inv_y, torch.stack(g_hats), q_hat, s))

    @staticmethod
    def _row_sums(S, m, logl, y, iy, o):
        """Per-row sums of a chunk with the final (m, log l): forward -sum Y S, reverse
        sum P (ln P - ln(Y + eps)); and the positive mass. ln P = (S - m) - log l: S - m is
        exact near the row's maximum, where the small differences of P - Y live."""
        # the softmax domain: absent columns hold -inf; a NaN (a present sample's NaN feature) stays in
        domain = S != -math.inf
        log_p = torch.where(domain, (S - m[:, None]) - logl[:, None], torch.zeros_like(S))
        p = torch.where(domain, log_p.exp(), torch.zeros_like(S))
        Y = y * iy[:, None]
        if o.reverse:
            part = (p * (log_p - torch.log(Y + o.eps))).sum(1)
        else:
            part = -(Y * torch.where(domain, S - m[:, None], torch.zeros_like(S))).sum(1)
        pos = torch.where(y > 0, p, torch.zeros_like(p)).sum(1)
        return part, pos

    @staticmethod
    def _finish_rows(part, m, logl, ylny, ysum, o):
        """Forward KL: logl - sum Y (S - m) + sum Y ln Y (sum Y = 1), clamped at 0 (KL >= 0; NaN stays)."""
        if o.reverse:
            return part
        safe = torch.where(ysum > 0, ysum, torch.ones_like(ysum))
        loss = logl + part + ylny / safe - torch.log(safe)
        return torch.where(loss < 0, torch.zeros_like(loss), loss)

    def backward(self, p: Problem, out: ForwardOut, d_value, d_rows, want):
        want_q, want_g, want_scale = want
        o = p.options
        n, m, k_count = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        dev = p.q.device
        row_m, row_logl, inv_y, g_hats, q_hat, s = out.state
        g3, g_ids, g_mask, labels = _views(p)
        q_keep = p.q_mask if p.q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
        w = self._weights(p, out, d_value, d_rows, ct)
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
        dq = self._input_gradient(p.q, q_hat, q_keep, dq_hat, o.normalize) if want_q else None
        dg = None
        if want_g:
            g_keep_all = g_mask if g_mask is not None else torch.ones((k_count, m), dtype=torch.bool, device=dev)
            dg = torch.stack([self._input_gradient(g3[k], g_hats[k], g_keep_all[k], dg_hat[k], o.normalize)
                              for k in range(k_count)])
            dg = dg.reshape(p.g.shape)
        return dq, dg, (d_s if want_scale else None)

    @staticmethod
    def _input_gradient(x, x_hat, keep, d_hat, normalize):
        """F.normalize's backward (d / max(|x|, eps) projected off x_hat), 0 for absent rows."""
        ct = d_hat.dtype
        xf = torch.where(keep[:, None], x.to(ct), torch.zeros((), dtype=ct, device=x.device))
        if normalize:
            norm = torch.linalg.vector_norm(xf, dim=1)
            radial = (x_hat * d_hat).sum(1, keepdim=True)
            g = torch.where((norm > NORM_EPS)[:, None], d_hat - x_hat * radial, d_hat) / norm.clamp_min(NORM_EPS)[:, None]
        else:
            g = d_hat
        g = torch.where(keep[:, None], g, torch.zeros((), dtype=ct, device=x.device))
        if x.dtype in (torch.float16, torch.bfloat16):
            big = torch.finfo(x.dtype).max
            g = g.clamp(-big, big)
        return g.to(x.dtype)

    @staticmethod
    def _weights(p: Problem, out: ForwardOut, d_value, d_rows, ct):
        """w per softmax row (kernels/grad.py, row_weights)."""
        n, m, k_count = p.n, p.m, p.galleries
        dev = out.rows.device
        w = torch.zeros(p.num_rows, dtype=ct, device=dev)
        if d_value is not None:
            coef_q, coef_g = reduction_coefficients(p)
            dv = d_value.reshape(k_count).to(ct)
            c_q, c_g = coef_q * dv, coef_g * dv
            if p.options.reduction == "mean":
                c_q = c_q / out.red[1].clamp_min(1)
                c_g = c_g / out.red[3].clamp_min(1)
            w = w + torch.cat([c_q.repeat_interleave(n), c_g.repeat_interleave(m)])
        if d_rows is not None:
            w = w + d_rows.to(ct)
        return torch.where(out.valid, w, torch.zeros((), dtype=ct, device=dev))
