"""The torch backend: `backend.Backend` in plain PyTorch, dense or chunked over columns.

It runs wherever PyTorch runs (the CPU path of ``backend="auto"``, float64 included) and is
an implementation of the loss independent of the Triton kernels, in the natural-log domain,
for the tests. Two paths, one decision (`TorchBackend.dense`), and a lane of the first:

    dense    the whole S [K, N, M] fits ``workspace_bytes`` (DENSE_TEMPORARIES copies of it):
             built once for every gallery, every softmax row is complete in it, so the
             statistics take one pass with both directions side by side ([2K, N, N] when
             N = M, the q rows' block and the gallery rows' block otherwise), the labels are
             built once (prepare) and the backward is one block, made from the forward's
             pair terms (P and Y, or P and ln P - ln(Y + eps): `_dense_backward`). At small N M
             (training batch sizes on the CPU, N = 64 on a GPU) a call is a fixed number of
             tensor ops, fewer than the plain formula's forward and backward (bench/NOTES.md,
             section 24); on the CPU one host read of the norms' range and of the rows'
             validity lets it skip the guards that apply nowhere (`_host_flags`).
    plain    the dense path of the common training call (`_plain`: `sdm_loss`, N = M, no masks,
             a float scale, on the CPU) where no guard applies, in fewer operations and little
             Python (`_plain_forward`); it hands over to the dense path when one does
    chunked  S for all N query rows and a chunk of C gallery columns of one gallery at a time
             ([N, C] in the compute dtype, C from ``workspace_bytes``), so memory stays
             O((N + M) D + N C); the query rows take two passes (their softmax's (max, sum
             exp) merged across chunks, then the sums with it).

Both paths run the same per-row math (`_max_sum`, `_row_sums`, `_pair_grad`) on blocks with
the softmax over the last axis, and agree to rounding. No host synchronisation in either.

The forward's primitives (`backend.Backend`):
    prepare     q_hat, g_hat, norms, presence, and each softmax row's label mass (ysum, sum
                y ln y; identity labels too: the reverse KL below needs Y_ij = y_ij / ysum_i per
                pair), with each row's validity and 1 / ysum
    statistics  per softmax row: (max, sum exp) of S, then forward sum_j Y (S - m), reverse
                sum_j P (ln P - ln(Y + eps)), computed per pair (no cancelling difference of
                two sums). One segment: [1, 5, NDR]
    finish      merge segments (one in a single process: the sums as they are; several when
                the distributed strategies bring those of other column blocks), the losses
    backward    dS = w_i d_ij + w'_j d'_ij (kernels/grad.py), dq_hat += s dS g_hat, dg_hat = s dS^T q_hat
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .backend import NUM_RED, NUM_STATS, RED, ForwardOut, Statistics, option_coefficients
from .options import NORM_EPS, NORM_LIMIT, compute_dtype
from .problem import Problem
from .reduction import (add_label_masses, cast_gradient, direction_weights, gradient_weights, label_ylny,
                        ln_unscaled, may_apply, pair_labels, row_norms)


#: [K, N, M] temporaries of the compute dtype the dense path holds at once (S, both directions'
#: blocks, their shifted logits, log P, P and labels): it runs when that many fit ``workspace_bytes``.
DENSE_TEMPORARIES = 16


def _views(p: Problem):
    """Uniform [K, ...] views of the gallery-side tensors (expanded where shared), made once per
    call (the forward and the backward of a call share ``p.derived``)."""
    views = p.derived.get("torch_views")
    if views is None:
        k, m = p.galleries, p.m
        g = p.g if p.g.dim() == 3 else p.g.unsqueeze(0)
        g_ids = None if p.g_ids is None else (p.g_ids if p.g_ids.dim() == 2 else p.g_ids.expand(k, m))
        g_mask = None if p.g_mask is None else (p.g_mask if p.g_mask.dim() == 2 else p.g_mask.expand(k, m))
        labels = None if p.labels is None else (p.labels if p.labels.dim() == 3 else
                                                p.labels.expand(k, *p.labels.shape))
        views = p.derived["torch_views"] = (g, g_ids, g_mask, labels)
    return views


def _sample_keep(p: Problem) -> Optional[torch.Tensor]:
    """[N + K M] bool: whether each sample (the q rows, then each gallery's rows) is present, in
    the order the normalised rows are stacked; None without masks. Made once per call."""
    if p.q_mask is None and p.g_mask is None:
        return None
    keep = p.derived.get("torch_keep")
    if keep is None:
        dev = p.q.device
        g_mask = _views(p)[2]
        keep = p.derived["torch_keep"] = torch.cat([
            p.q_mask if p.q_mask is not None else torch.ones(p.n, dtype=torch.bool, device=dev),
            g_mask.reshape(-1) if g_mask is not None else torch.ones(p.galleries * p.m, dtype=torch.bool, device=dev)])
    return keep


def _masked_rows(x: torch.Tensor, keep: Optional[torch.Tensor], ct) -> torch.Tensor:
    """x [R, D] in the compute dtype with absent rows (``keep`` False; None: none) set to 0 before
    anything touches them (they may hold NaN)."""
    x = x.to(ct)
    return x if keep is None else torch.where(keep[:, None], x, 0)


def _host_flags(norm: torch.Tensor, invalid: Optional[torch.Tensor] = None) -> Tuple[bool, bool, bool]:
    """(large, tiny, some_invalid): whether some row norm may be >= NORM_LIMIT (inf and NaN
    included: the overflow and NaN guards of `_normalised`), whether some may be <= NORM_EPS (NaN
    included: the normalisation backward's radial guard), and whether some softmax row may be
    invalid (``invalid`` [NDR] bool, or the label masses ysum [NDR] of a problem without masks,
    whose invalid rows are those of ysum <= 0; None: assume so), which a dense call's masks of
    invalid rows then skip. On the CPU one read of (min, max, any | min) answers all three
    (`reduction.may_apply`: no device to wait for; these guards rarely apply, and skipping one that
    applies nowhere changes no bit). Elsewhere (True, True, True): every guard is computed."""
    if norm.device.type != "cpu" or torch.compiler.is_compiling():
        return True, True, True
    flags = [*torch.aminmax(norm)]
    if invalid is not None:
        # ysum: its least; a NaN mass (a bad label, a valid row) reads as "maybe invalid" (safe)
        flags.append(invalid.amin() if invalid.dtype == norm.dtype else invalid.any().to(norm.dtype))
    read = torch.stack(flags).tolist()                     # NaN propagates to both guards
    if invalid is None:
        some_invalid = True
    elif invalid.dtype == torch.bool:
        some_invalid = read[2] != 0
    else:
        some_invalid = not read[2] > 0
    return not read[1] < NORM_LIMIT, not read[0] > NORM_EPS, some_invalid


def _normalised(x: torch.Tensor, keep: Optional[torch.Tensor], normalize: bool, ct,
                invalid: Optional[torch.Tensor] = None):
    """(x_hat, norm, r, tiny, some_invalid) of rows x [R, D], absent rows 0 (`_masked_rows`):
    r = 1 / max(norm, NORM_EPS) (None without normalisation); ``tiny``, ``some_invalid``
    `_host_flags`' (for the backward, and for the softmax rows ``invalid``: `_host_flags`). In fp32 a row of norm
    >= 2^64 (its square sum overflows) is NaN, as in the kernels (prep.py); its norm, reported by
    the statistics, is right (`row_norms`)."""
    x = _masked_rows(x, keep, ct)
    norm = torch.linalg.vector_norm(x, dim=1)
    large, tiny, some_invalid = _host_flags(norm, invalid)
    if large:                      # the guard for norms whose square sum overflowed
        norm = row_norms(x, norm)
    if not normalize:
        return x, norm, None, tiny, some_invalid
    r = torch.reciprocal(norm.clamp_min(NORM_EPS))      # (1 / x: two ops, reciprocal and mul)
    if ct == torch.float32 and large:
        r = r.masked_fill(norm >= NORM_LIMIT, math.nan)
    return x * r[:, None], norm, r, tiny, some_invalid


def _max_sum(S, bounded=False):
    """(max, sum exp(S - max), S - max) over the last axis: the rows' softmax normaliser in one
    block (max -inf and sum 0 for a row without a present column). ``bounded``: S holds no
    infinity (`_bounded`), so no guard is needed, and S - max is `_row_sums`' shifted logits."""
    m = S.amax(-1)
    shifted = S - (m if bounded else m.masked_fill(~torch.isfinite(m), 0))[..., None]
    return m, torch.exp(shifted).sum(-1), shifted


def _merge_max_sum(m, l, S):
    """Online softmax over the last axis: (max, sum exp(S - max)) of the rows so far and of S."""
    m_new = torch.maximum(m, S.amax(-1))
    safe = torch.where(torch.isfinite(m_new), m_new, 0)
    alpha = torch.where(torch.isfinite(m), torch.exp(m - safe), 0)
    return m_new, l * alpha + torch.exp(S - safe[..., None]).sum(-1)


def _safe_m_logl(m, l, bounded=False):
    """(m, log l) with rows that saw no present column set to (0, 0) (they are invalid); NaN stays.
    ``bounded`` (`_bounded`): every row saw one (l >= 1 or NaN)."""
    if bounded:
        return m, torch.log(l)
    empty = l == 0
    return m.masked_fill(empty, 0), torch.log(l.masked_fill(empty, 1)).masked_fill(empty, 0)


def _row_sums(S, m, logl, y, iy, o, bounded=False, pairs=None, shifted=None, want_pos=True):
    """(x, pos, Y) of `TorchBackend.statistics` for a block S [..., R, C] (softmax over the last
    axis, absent columns -inf), with the rows' (m, log l) [..., R], labels y and 1 / ysum iy [..., R].
    ln P = (S - m) - log l: S - m is exact near the row's maximum, where the small differences of
    P - Y live. ``bounded`` (`_bounded`): no -inf in S, no column outside the softmax. ``pairs``: a
    list that receives the block's (P, ln P - ln(Y + eps)) (reverse) or (P, Y) (forward), the pair
    terms `_pair_grad` would rebuild. ``shifted``: S - m when the caller has it (`_max_sum`, bounded:
    the same m). ``want_pos``: False gives pos None (a statistic only `SDMStats` reads)."""
    if shifted is None:
        shifted = S - m[..., None]
    log_p = shifted - logl[..., None]
    p = log_p.exp()
    if not bounded:
        # the softmax domain: absent columns hold -inf; a NaN (a present sample's NaN feature) stays in
        outside = S == -math.inf
        shifted, log_p, p = shifted.masked_fill(outside, 0), log_p.masked_fill(outside, 0), p.masked_fill(outside, 0)
    Y = y * iy[..., None]
    if o.reverse:
        ratio = log_p - torch.log(Y + o.eps)
        x = (p * ratio).sum(-1)
    else:
        x = (Y * shifted).sum(-1)
    if pairs is not None:
        pairs.append((p, ratio if o.reverse else Y))
    pos = p.masked_fill(~(y > 0), 0).sum(-1) if want_pos else None
    return x, pos, Y


def _pair_grad(S, y, state, off, o, pair=None):
    """w_i dL_i/dS_ij of a block S [..., R, C] (softmax over the last axis) from its rows' state
    [5, ..., R] (m, log l, loss, weight w, 1 / ysum) and labels y; 0 on ``off`` (pairs of an absent
    sample, invalid rows):  forward P - Y,  reverse P (ln P - ln(Y + eps) - L). ``pair``: the
    forward's (P, ln P - ln(Y + eps)) or (P, Y) of this block (`_row_sums`; S and y are then unused):
    the same numbers, from the same state."""
    m, logl, rows, w, iy = state
    if pair is not None:
        P, t = pair
        d = P * (t - rows[..., None]) if o.reverse else P - t
        return (w[..., None] * d).masked_fill(off, 0)
    log_p = (S - m[..., None]) - logl[..., None]     # on ``off`` anything (inf, NaN): not selected below
    P = log_p.exp()
    Y = y * iy[..., None]
    if o.reverse:
        d = P * (log_p - torch.log(Y + o.eps) - rows[..., None])
    else:
        d = P - Y
    return (w[..., None] * d).masked_fill(off, 0)


def _row_losses(p: Problem, logl, body, ysum, ylny):
    """Each softmax row's loss from its ln l and body (`_row_sums`' x): reverse KL the body as it
    is; forward KL ln l - body + sum y ln y / ysum - ln ysum (``ylny`` None: 0, identity labels;
    dense labels' logarithms unscaled, `reduction.label_ylny`), clamped at 0 (KL >= 0; NaN stays)."""
    if p.options.reverse:
        return body
    ln_ysum = torch.log(ysum) if p.labels is None else ln_unscaled(ysum)
    loss = logl - body
    if ylny is not None:
        loss = loss + ylny / ysum
    return (loss - ln_ysum).clamp_min(0)


def _products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [N, D] times each b [K, C, D] transposed: [K, N, C] (one mm for K = 1)."""
    if b.shape[0] == 1:
        return (a @ b[0].T)[None]
    return a @ b.mT


class Prepared(NamedTuple):
    """`TorchBackend.prepare`: the normalised features (0 for absent samples), norms, presence,
    label masses (ysum, sum y ln y), the scale, each softmax row's validity and 1 / ysum (0 for an
    invalid row), and on the dense path the labels of its blocks (`TorchBackend._blocks`)."""
    q_hat: torch.Tensor      # [N, D] compute dtype
    q_norm: torch.Tensor     # [N]
    q_keep: Optional[torch.Tensor]     # [N] bool; None (dense path): every sample present
    g_hat: torch.Tensor      # [K, M, D]
    g_norm: torch.Tensor     # [K, M]
    g_keep: Optional[torch.Tensor]     # [K, M] bool; None (dense path): every sample present
    ysum: torch.Tensor       # [NDR] label mass
    ylny: Optional[torch.Tensor]       # [NDR] sum y ln y; None: 0 (identity labels of this problem)
    s: torch.Tensor          # 0-dim
    valid: torch.Tensor      # [NDR] bool
    invalid: torch.Tensor    # [NDR] bool, ~valid
    inv_y: torch.Tensor      # [NDR]
    labels: Optional[Tuple[torch.Tensor, ...]] = None   # dense path: y of each block
    some_invalid: bool = True      # False: no softmax row is invalid (`_host_flags`: the CPU's dense path)


class DenseRows(NamedTuple):
    """`TorchBackend._dense_statistics`: each softmax row's statistics [NDR] over all its columns,
    the blocks' Y = y / ysum, and their pair terms for the backward (`_dense_backward`). m, l and
    pos are None unless asked for (``partial``: `statistics`; pos also for ``return_stats``)."""
    m: Optional[torch.Tensor]          # max_j S_ij as it is (-inf: no present column)
    l: Optional[torch.Tensor]          # sum_j exp(S_ij - m)
    safe_m: torch.Tensor     # m, 0 for a row without a present column (`_safe_m_logl`)
    logl: torch.Tensor       # ln l, likewise
    x: torch.Tensor          # forward: sum_j Y (S - m); reverse: sum_j P (ln P - ln(Y + eps))
    pos: Optional[torch.Tensor]        # sum_{j: y_ij > 0} P_ij
    Y: Tuple[torch.Tensor, ...]
    pairs: list


class TorchBackend:
    name = "torch"

    @staticmethod
    def check_supported(q: torch.Tensor) -> None:
        return None

    @staticmethod
    def dense(p: Problem) -> bool:
        """The dense path (module doc): DENSE_TEMPORARIES copies of S [K, N, M] fit the workspace."""
        key = "torch_dense"
        if key not in p.derived:
            elt = compute_dtype(p.q.dtype).itemsize
            p.derived[key] = DENSE_TEMPORARIES * p.galleries * p.n * p.m * elt <= p.workspace_bytes
        return p.derived[key]

    def _chunk_width(self, p: Problem, ct) -> int:
        per_col = 8 * p.n * torch.empty((), dtype=ct).element_size()    # ~8 [N, C] temporaries
        return max(1, min(p.m, p.workspace_bytes // per_col))

    @staticmethod
    def _bounded(p: Problem) -> bool:
        """S is finite or NaN, never -inf or +inf, and every sample is present: normalised
        features (|S| <= s, a NaN or inf feature gives NaN) under a float scale (checked on the
        host), no masks. Then every softmax row sees every column, and l >= 1 (or NaN)."""
        return p.options.normalize and p.scale is None and p.q_mask is None and p.g_mask is None

    @staticmethod
    def _blocks(p: Problem, rows_dir: torch.Tensor, cols_dir: torch.Tensor):
        """The dense blocks (module doc) of [K, N, M] tensors for the q rows' softmax (``rows_dir``)
        and the gallery rows' (``cols_dir``): softmax rows on the second last axis in the order of
        the problem's rows, softmax over the last axis."""
        if p.n == p.m:
            return (torch.cat([rows_dir, cols_dir.mT]),)
        return (rows_dir, cols_dir.mT)

    @staticmethod
    def _split_rows(p: Problem, v: torch.Tensor, blocks: int):
        """A [..., NDR] vector of rows as the dense blocks' row vectors."""
        k, n, m = p.galleries, p.n, p.m
        if blocks == 1:
            return (v.unflatten(-1, (2 * k, n)),)
        return (v[..., :k * n].unflatten(-1, (k, n)), v[..., k * n:].unflatten(-1, (k, m)))

    # ----------------------------------------------------------------------------- forward
    #: prepare() needs the label masses of identity labels too (module doc: Y_ij inside the log)
    needs_id_masses = True

    def forward(self, p: Problem) -> ForwardOut:
        if self._plain(p):
            out = self._plain_forward(p)
            if out is not None:
                return out
        prepared = self.prepare(p)
        if prepared.labels is not None:
            # dense: one segment per side, complete: its rows go to the losses as they are (what
            # `finish` of its partial computes, without the partial and its merge)
            r = self._dense_statistics(p, prepared)
            return self._losses(p, prepared, r.safe_m, r.logl, r.x, r.pos, r.pairs)
        st = self.statistics(p, prepared)
        return self.finish(p, st.partial, st.segments_q, st.segments_g, prepared)

    def _plain(self, p: Problem) -> bool:
        """A plain problem (`_plain_forward`): dense, on the CPU (where `_host_flags` reads the
        guards' need), one gallery (`sdm_loss`), N = M, no masks, a float scale, normalised
        features, no statistics asked for: IRRA's and CLIP's training steps."""
        return (p.scalar_value and p.n == p.m and p.q_mask is None and p.g_mask is None and p.scale is None
                and p.options.normalize and not p.return_stats and p.q.device.type == "cpu" and self.dense(p))

    def _plain_forward(self, p: Problem) -> Optional[ForwardOut]:
        """`forward` of a plain problem (`_plain`) where no guard applies: every norm inside
        (NORM_EPS, NORM_LIMIT) and every softmax row valid, which one host read of the norms' range
        and the label masses' least tells (`_host_flags`); else None (the general dense path, which
        computes the guards). The same math as that path (`_max_sum`, `_row_sums`, the losses of
        `_losses`) in fewer tensor operations and much less Python: no masking, the valid counts
        known on the host (N per direction), one [2, N, N] block of both directions. At N = 64 a
        call's host time is its cost (issue 28: the torch backend against the eager formula)."""
        o = p.options
        n = p.n
        ct = compute_dtype(p.q.dtype)
        y = pair_labels(p.labels, p.q_ids, p.g_ids, None, None, 0, n, ct)     # [N, N]
        y2 = torch.cat([y[None], y.T[None]])                                  # [2, N, N]: q rows, gallery rows
        ysum = y2.sum(-1)                                                      # [2, N]
        ylny = None
        if p.labels is not None:      # a mass past the compute dtype's range is NaN (`prepare`)
            if o.reverse:
                ysum = ysum.masked_fill(torch.isinf(ysum), math.nan)
            else:
                masses = torch.stack([ysum, label_ylny(y2).sum(-1)])
                ysum, ylny = masses.masked_fill(torch.isinf(masses), math.nan)
        x = torch.cat([p.q, p.g]).to(ct)
        norm = torch.linalg.vector_norm(x, dim=1)
        large, tiny, some_invalid = _host_flags(norm, ysum)
        if large or tiny or some_invalid:
            return None
        r = torch.reciprocal(norm)                         # (norm > NORM_EPS: the clamp changes nothing)
        x_hat = x * r[:, None]
        p.derived["torch_x_hat"] = (x_hat, norm, r, False)
        q_hat, g_hat = x_hat[:n], x_hat[n:]
        s = torch.full((), p.scale_value, dtype=ct, device=x.device)
        S = torch.mm(q_hat, g_hat.T).mul_(s)
        T = torch.cat([S[None], S.T[None]])                                    # [2, N, N]
        m, l, shifted = _max_sum(T, bounded=True)
        logl = torch.log(l)
        inv_y = ysum.reciprocal()
        pairs = []
        body, _, _ = _row_sums(T, m, logl, y2, inv_y, o, bounded=True, pairs=pairs, shifted=shifted, want_pos=False)
        loss = _row_losses(p, logl, body, ysum, ylny)
        # the reduction: every row valid, N of each direction
        sums = loss.sum(-1)                                                    # [2]: q rows, gallery rows
        coef_q, coef_g = option_coefficients(o)
        part = sums / n if o.reduction == "mean" else sums
        if coef_q == coef_g:
            value = part.sum() if coef_q == 1 else part.sum() * coef_q
        else:
            value = coef_q * part[0] + coef_g * part[1]
        # RED's first rows (sum, valid count) of the q rows, then of the gallery rows; the rest 0
        red = torch.nn.functional.pad(torch.stack([sums, sums.new_full((2,), n)], 1).view(4, 1), (0, 0, 0, NUM_RED - 4))
        rows, m, logl = loss.view(-1), m.view(-1), logl.view(-1)
        p.derived["torch_pairs_state"] = (m, logl, pairs, False, n if o.reduction == "mean" else None)
        valid = torch.ones(2 * n, dtype=torch.bool, device=x.device)
        return ForwardOut(value, rows, valid, red, (m, logl, inv_y.view(-1), g_hat.view(1, n, p.d), q_hat, s))

    def prepare(self, p: Problem, label_masses: Optional[torch.Tensor] = None) -> Prepared:
        """Normalised features, norms, presence, the label masses (ysum, ylny) of every softmax
        row: from the labels (chunked: they may be dense [N, M]), or ``label_masses`` [2, NDR];
        each row's validity and 1 / ysum."""
        o = p.options
        n, m, k_count = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        dev = p.q.device
        g3, g_ids, g_mask, labels = _views(p)
        # (torch.full, not torch.tensor: a tensor from Python data is a blocking host-to-device copy
        # on a GPU, a host synchronisation each call: pytorch/pytorch#190217)
        s = p.scale.to(ct) if p.scale is not None else torch.full((), p.scale_value, dtype=ct, device=dev)
        q_mask = p.q_mask
        q_keep, g_keep = q_mask, g_mask      # the dense path reads None as "every sample present"
        blocks = None
        if self.dense(p):
            y = pair_labels(labels, p.q_ids, g_ids, q_mask, g_mask, 0, m, ct).expand(k_count, n, m)
            blocks = self._blocks(p, y, y)
        else:
            q_keep = q_mask if q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
            g_keep = g_mask if g_mask is not None else torch.ones((k_count, m), dtype=torch.bool, device=dev)
        ylny = None
        if label_masses is not None:     # summed over blocks or ranks: may overflow there
            masses = label_masses.to(ct)
            ysum, ylny = torch.where(torch.isinf(masses), math.nan, masses)
        elif blocks is not None:
            ysum = self._rows_of(b.sum(-1) for b in blocks)
            # (identity labels: y ln y = 0, and the counts cannot overflow.) Only forward KL reads
            # sum y ln y: reverse KL guards the mass alone (a mass past the compute dtype's range
            # is NaN, never a finite loss), ~12 ops fewer
            if labels is not None and not o.reverse:
                masses = torch.stack([ysum, self._rows_of(label_ylny(b).sum(-1) for b in blocks)])
                ysum, ylny = masses.masked_fill(torch.isinf(masses), math.nan)
            elif labels is not None:
                ysum = ysum.masked_fill(torch.isinf(ysum), math.nan)
        else:
            masses = torch.zeros((2, p.num_rows), dtype=ct, device=dev)
            width = self._chunk_width(p, ct)
            for k in range(k_count):
                q0, g0 = k * n, k_count * n + k * m
                add_label_masses(masses[:, q0:q0 + n], masses[:, g0:g0 + m], None if labels is None else labels[k],
                                 p.q_ids, None if g_ids is None else g_ids[k], q_keep, g_keep[k], width, ct)
            ysum, ylny = masses
        invalid = self._invalid(p, ysum, q_mask, g_mask)
        # both sides normalised together: one set of ops for N + K M rows; on the dense path the
        # host read of the norms' range also tells whether any softmax row is invalid
        x = torch.cat([p.q, p.g if p.g.dim() == 2 else p.g.flatten(0, 1)])
        keep = _sample_keep(p)
        # (without masks the invalid rows are those of ysum <= 0: its least answers, no op more)
        flags_of = None if blocks is None else (invalid if keep is not None else ysum)
        x_hat, norm, r, tiny, some_invalid = _normalised(x, keep, o.normalize, ct, flags_of)
        p.derived["torch_x_hat"] = (x_hat, norm, r, tiny)    # the backward's, when its q_hat is this one's view
        q_hat, g_hat = x_hat[:n], x_hat[n:].view(k_count, m, p.d)
        q_norm = g_norm = None           # read by the statistics' norm rows only (`_losses`)
        if p.return_stats:
            q_norm, g_norm = norm[:n], norm[n:].view(k_count, m)
        # 1 / inf = 0 for an invalid row; the others' reciprocal is that of 1 / ysum bit for bit
        inv_y = (ysum.masked_fill(invalid, math.inf) if some_invalid else ysum).reciprocal()
        return Prepared(q_hat, q_norm, q_keep, g_hat, g_norm, g_keep, ysum, ylny, s, ~invalid, invalid, inv_y, blocks,
                        some_invalid)

    @staticmethod
    def _rows_of(block_rows) -> torch.Tensor:
        """The dense blocks' row vectors [..., R] (in block order) as one vector [NDR] of softmax rows."""
        parts = [v.flatten() for v in block_rows]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _invalid(p: Problem, ysum, q_mask, g_mask):
        """[NDR] bool: the softmax rows that are not valid. A row is valid when its sample is present
        and its label mass > 0 (NaN, from bad labels, counts: its NaN reaches the loss)."""
        invalid = ysum <= 0              # NaN is not: it is valid
        if q_mask is not None or g_mask is not None:
            k, n, m = p.galleries, p.n, p.m
            ones = lambda c: torch.ones(c, dtype=torch.bool, device=ysum.device)     # noqa: E731
            keep = torch.cat([q_mask.repeat(k) if q_mask is not None else ones(k * n),
                              g_mask.reshape(-1) if g_mask is not None else ones(k * m)])
            invalid = invalid | ~keep
        return invalid

    def statistics(self, p: Problem, prep: Prepared) -> Statistics:
        """One segment per side: [1, NUM_STATS, NDR] (module doc). Per softmax row, over this
        problem's present columns, with the row's own (m, l) over these columns:

            m     max_j S_ij                       (-inf: no present column)
            l     sum_j exp(S_ij - m)
            x     forward: sum_j Y_ij (S_ij - m)   reverse: sum_j P_ij (ln P_ij - ln(Y_ij + eps))
            pos   sum_{j: y_ij > 0} P_ij
            ysum  sum_j Y_ij                       (forward: to move x to another m when merging)

        with P_ij = exp(S_ij - m) / l the softmax over these columns and Y_ij = y_ij / ysum_i
        (the row's label mass over ALL columns, from prepare). Dense: one pass over the blocks.
        Chunked: the query rows take two passes over the column chunks (the softmax's (m, l)
        first, then the sums with them); a gallery row's softmax over the queries is complete
        within a chunk."""
        if prep.labels is not None:
            r = self._dense_statistics(p, prep, partial=True)
            ysum_s = self._rows_of(Y.sum(-1) for Y in r.Y)
            return Statistics(torch.stack([r.m, r.l, r.x, r.pos, ysum_s])[None], 1, 1)
        o = p.options
        n, m, k_count = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        dev = p.q.device
        _, g_ids, _, labels = _views(p)
        s = prep.s
        q_keep = prep.q_keep
        inv_y = prep.inv_y
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
                mc, lc, _ = _max_sum(St)
                x, pos, Y = _row_sums(St, *_safe_m_logl(mc, lc), y.T, inv_y[g0 + c0:g0 + c1], o)
                part[0, :, g0 + c0:g0 + c1] = torch.stack([mc, lc, x, pos, Y.sum(-1)])
            # pass 2: the query rows' sums with their (m, l)
            m_safe, logl_q = _safe_m_logl(m_q, l_q)
            sums = torch.zeros((3, n), dtype=ct, device=dev)
            for c0 in range(0, m, width):
                c1 = min(m, c0 + width)
                S = (s * (prep.q_hat @ g_hat[c0:c1].T)).masked_fill(~g_keep[None, c0:c1], -math.inf)
                y = self._labels(p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct)
                x, pos, Y = _row_sums(S, m_safe, logl_q, y, inv_y[qi], o)
                sums += torch.stack([x, pos, Y.sum(-1)])
            part[0, :, qi] = torch.cat([torch.stack([m_q, l_q]), sums])
        return Statistics(part, 1, 1)

    @staticmethod
    def _labels(p, k, labels, g_ids, q_keep, g_keep, c0, c1, ct):
        """y on the pairs of present samples, columns [c0, c1) of gallery k; bad weights -> NaN."""
        return pair_labels(None if labels is None else labels[k], p.q_ids, None if g_ids is None else g_ids[k],
                           q_keep, g_keep, c0, c1, ct)

    def _dense_statistics(self, p: Problem, prep: Prepared, partial: bool = False) -> DenseRows:
        """`statistics` in one pass: S [K, N, M] once, its blocks (absent columns -inf), every
        row complete (`DenseRows`). ``partial``: for `statistics` (m, l and pos too); else for
        `forward`, which reads (m, log l) made safe, x, pos for ``return_stats`` only, and keeps
        the pair terms for the backward."""
        o = p.options
        S = prep.s * _products(prep.q_hat, prep.g_hat)                              # [K, N, M]
        rows_dir = S if p.g_mask is None else S.masked_fill(~prep.g_keep[:, None, :], -math.inf)
        cols_dir = S if p.q_mask is None else S.masked_fill(~p.q_mask[None, :, None], -math.inf)
        blocks = self._blocks(p, rows_dir, cols_dir)
        bounded = self._bounded(p)
        want_pos = partial or p.return_stats
        pairs = []
        parts, Ys = [], []
        for T, y, iy in zip(blocks, prep.labels, self._split_rows(p, prep.inv_y, len(blocks))):
            mx, l, shifted = _max_sum(T, bounded)
            m_safe, logl = _safe_m_logl(mx, l, bounded)
            x, pos, Y = _row_sums(T, m_safe, logl, y, iy, o, bounded, pairs, shifted if bounded else None, want_pos)
            parts.append((mx, l, m_safe, logl, x, pos) if partial else (m_safe, logl, x, pos))
            Ys.append(Y)
        # (two blocks, N != M: each row vector is a cat of the two; only those read are made)
        fields = [None if v[0] is None else self._rows_of(v) for v in zip(*parts)]
        if not partial:
            fields = [None, None] + fields
        return DenseRows(*fields, tuple(Ys), pairs)

    def finish(self, p: Problem, partial: torch.Tensor, segments_q: int, segments_g: int,
               prepared: Prepared) -> ForwardOut:
        """Merge the segments (module doc), then per-row losses, validity, reduction, state
        (`_losses`):

            m = max_s m_s,  l = sum_s l_s e^(m_s - m),  w_s = l_s e^(m_s - m) / l
            forward:  sum_j Y_ij (S_ij - m) = sum_s x_s + ysum_s (m_s - m),
                      L = ln l - that + sum_j Y ln Y       (>= 0: clamped, NaN stays)
            reverse:  L = sum_s w_s (x_s + ln w_s),        pos = sum_s w_s pos_s

        (one segment: w = 1, the loss of the pass(es) as they are). A segment without present
        columns (l_s = 0) takes no part."""
        o = p.options
        kn = p.galleries * p.n
        if segments_q == segments_g:
            row_m, row_logl, body, pos = self._merge(partial[:segments_q], o)
        else:
            merged = [self._merge(partial[:segments_q, :, :kn], o), self._merge(partial[:segments_g, :, kn:], o)]
            row_m, row_logl, body, pos = (torch.cat(x) for x in zip(*merged))
        return self._losses(p, prepared, row_m, row_logl, body, pos)

    def _losses(self, p: Problem, prep: Prepared, row_m, row_logl, body, pos, pairs=None) -> ForwardOut:
        """The ForwardOut of rows with their merged (m, log l) ((0, 0) for a row without a present
        column), body (the sums of `finish`'s doc) and positive mass (None: not computed, its
        reduction rows 0; `_dense_statistics` without ``return_stats``): the losses, the reduction
        and the backward's state, every invalid row's entries 0. ``pairs``: the dense blocks' pair
        terms (`_dense_statistics`), which hold for this state: kept for its backward
        (`_saved_pairs`)."""
        o = p.options
        n, m, k_count = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        s = prep.s
        # (forward KL: an invalid row, ysum 0, gets inf or NaN here: the stack below sets it to 0)
        loss = _row_losses(p, row_logl, body, prep.ysum, prep.ylny)
        scale_ok = None
        if p.scale is not None:       # a float scale was checked on the host; NaN fails both tests
            scale_ok = (s > 0) & (s < math.inf)
            loss = torch.where(scale_ok, loss, math.nan)
        # rows, state and the reduction's per-row terms: 0 in invalid rows, one op
        fields = [loss, prep.valid.to(ct), row_m, row_logl] + ([] if pos is None else [pos])
        per_row = torch.stack(fields)
        if prep.some_invalid:
            per_row = per_row.masked_fill(prep.invalid, 0)
        rows, row_m, row_logl = per_row[0], per_row[2], per_row[3]

        # the reduction, every gallery at once: sums [2 (q rows, gallery rows), 2 (loss, valid), K],
        # RED's first four rows as they are (the sum of a transposed view is made contiguous)
        sums_of = per_row[:2] if pos is None else per_row[[0, 1, 4]]
        if n == m:
            sums = sums_of.unflatten(1, (2, k_count, n)).transpose(0, 1).sum(-1)
        else:
            kn = k_count * n
            sums = torch.stack([sums_of[:, :kn].unflatten(1, (k_count, n)).sum(-1),
                                sums_of[:, kn:].unflatten(1, (k_count, m)).sum(-1)])
        red_rows = [sums[:, :2].reshape(4, k_count)]
        if pos is not None:
            red_rows.append(sums[:, 2])                             # pos of the q rows, of the gallery rows
        if p.return_stats:            # the norm rows are read by SDMStats only (api._stats); else 0
            q_kept, g_kept = prep.q_norm, prep.g_norm                                    # [N], [K, M]
            q_count, g_count = n, m
            if prep.q_keep is not None:
                q_kept = torch.where(prep.q_keep, q_kept, 0)
                q_count = prep.q_keep.sum().clamp_min(1).to(ct)
            if prep.g_keep is not None:
                g_kept = torch.where(prep.g_keep, g_kept, 0)
                g_count = prep.g_keep.sum(-1).clamp_min(1).to(ct)
            red_rows.append(torch.stack([(q_kept.sum() / q_count).expand(k_count), q_kept.max().expand(k_count),
                                         g_kept.sum(-1) / g_count, g_kept.amax(-1)]))
        # RED's order: (sum, valid) of the q rows, of the gallery rows, then pos of both, the norms
        red = red_rows[0] if len(red_rows) == 1 else torch.cat(red_rows)
        if red.shape[0] < NUM_RED:
            red = torch.nn.functional.pad(red, (0, 0, 0, NUM_RED - red.shape[0]))
        # the value (`reduction.reduced_value`, from the sums): each direction's [K], weighted
        coef_q, coef_g = option_coefficients(o)
        counts = sums[:, 1].clamp_min(1) if o.reduction == "mean" else None                    # [2, K]
        part = sums[:, 0] / counts if counts is not None else sums[:, 0]
        if pairs is not None:         # for `_dense_backward`: the pairs, and the counts it divides by
            p.derived["torch_pairs_state"] = (row_m, row_logl, pairs, prep.some_invalid,
                                              None if counts is None else counts[..., None])
        if coef_q == coef_g:
            value = (part if coef_q == 1 else part * coef_q).sum(0)
        else:
            value = coef_q * part[0] + coef_g * part[1]
        if scale_ok is not None:
            value = torch.where(scale_ok, value, math.nan)
        if p.scalar_value:
            value = value[0]
        return ForwardOut(value, rows, prep.valid, red, (row_m, row_logl, prep.inv_y, prep.g_hat, prep.q_hat, s))

    @staticmethod
    def _merge(part: torch.Tensor, o):
        """(m, log l, body, pos) of rows from their segments [S, NUM_STATS, R] (`finish`); (0, 0)
        for (m, log l) of a row without any present column."""
        m_s, l_s, x_s, pos_s, y_s = part.unbind(1)
        if part.shape[0] == 1:                                              # one segment: w = 1 exactly
            m_safe, logl = _safe_m_logl(m_s[0], l_s[0])
            return m_safe, logl, x_s[0], pos_s[0]
        empty = l_s == 0                                                    # NaN is not empty: it stays
        m = torch.where(empty, -math.inf, m_s).amax(0)
        l = torch.where(empty, 0, l_s * torch.exp(m_s - m)).sum(0)
        m_safe, logl = _safe_m_logl(m, l)
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
        """Per block of pairs (dense: every gallery's S at once; chunked: a chunk of one gallery's
        columns): dS = w_i d_ij + w'_j d'_ij (`_pair_grad` on the rows' and on the columns' state),
        then the products with the features and the normalisation's backward."""
        want_q, want_g, want_scale = want
        o = p.options
        n, m, k_count = p.n, p.m, p.galleries
        kn = k_count * n
        ct = compute_dtype(p.q.dtype)
        row_m, row_logl, inv_y, g_hats, q_hat, s = out.state
        saved = self._saved_pairs(p, row_m, row_logl)
        if saved is not None:
            return self._dense_backward(p, out, d_value, d_rows, want, partial_grads, *saved)
        g3, g_ids, g_mask, labels = _views(p)
        q_mask = p.q_mask
        w = gradient_weights(o, out.red, out.valid, n, d_value, d_rows, ct)
        # every row quantity the pairs read, q rows [5, K, N] and gallery rows [5, K, M]
        state = torch.stack([row_m, row_logl, out.rows.to(ct), w, inv_y])
        q_state, g_state = state[:, :kn].unflatten(1, (k_count, n)), state[:, kn:].unflatten(1, (k_count, m))
        stacked = self.dense(p) and n == m
        if self.dense(p):
            blocks = [(slice(0, k_count), 0, m)]
        else:
            width = self._chunk_width(p, ct)
            blocks = [(slice(k, k + 1), c0, min(m, c0 + width)) for k in range(k_count) for c0 in range(0, m, width)]
        dq_hat = None
        dg_hat = torch.zeros((k_count, m, p.d), dtype=ct, device=p.q.device) if len(blocks) > 1 else None
        d_s = torch.zeros((), dtype=ct, device=p.q.device) if want_scale else None
        for ks, c0, c1 in blocks:
            g_blk = g_hats[ks, c0:c1]                                               # [Kb, C, D]
            cos = _products(q_hat, g_blk)                                           # [Kb, N, C]
            S = s * cos
            y = pair_labels(None if labels is None else labels[ks], p.q_ids,
                            None if g_ids is None else g_ids[ks], q_mask, None if g_mask is None else g_mask[ks],
                            c0, c1, ct)
            absent = self._absent_pairs(p, ks, c0, c1)
            # off: pairs of invalid rows (1 / ysum = 0) or of an absent sample
            if not stacked:
                qs, gs = q_state[:, ks], g_state[:, ks, c0:c1]                       # [5, Kb, N], [5, Kb, C]
                off_r, off_c = (qs[4] == 0)[..., None], (gs[4] == 0)[..., None, :]
                if absent is not None:
                    off_r, off_c = off_r | absent, off_c | absent
            if stacked:          # the dense square problem: both directions in one [2K, N, N] block
                off = (state.unflatten(1, (2 * k_count, n))[4] == 0)[..., None]
                if absent is not None:
                    absent_k = absent.expand(k_count, n, m)
                    off = off | torch.cat([absent_k, absent_k.mT])
                y_k = y.expand(k_count, n, m)
                d = _pair_grad(torch.cat([S, S.mT]), torch.cat([y_k, y_k.mT]),
                               state.unflatten(1, (2 * k_count, n)), off, o)
                dS = d[:k_count] + d[k_count:].mT
            else:
                dS = _pair_grad(S, y, qs, off_r, o) + _pair_grad(S.mT, y.mT, gs, off_c.mT, o).mT    # [Kb, N, C]
            if want_q:
                part = (dS @ g_blk).sum(0) if dS.shape[0] > 1 else dS[0] @ g_blk[0]
                dq_hat = s * part if dq_hat is None else dq_hat + s * part
            if want_g:
                part = s * ((dS[0].T @ q_hat)[None] if dS.shape[0] == 1 else dS.mT @ q_hat)  # [Kb, C, D]
                if dg_hat is None:
                    dg_hat = part
                else:
                    dg_hat[ks, c0:c1] = part
            if want_scale:
                prod = dS * cos
                d_s = d_s + (prod if absent is None else prod.masked_fill(absent, 0)).sum()
        dq = dg = None
        if want_q and want_g:
            keep = _sample_keep(p)
            saved = p.derived.get("torch_x_hat")
            if saved is not None and saved[0].shape[0] == n + k_count * m and q_hat._base is saved[0] \
                    and g_hats._base is saved[0]:
                # the forward's normalised rows and norms (prepare: the same inputs, saved by autograd)
                x, x_hat, norm = None, saved[0], saved[1]
            else:
                x, x_hat, norm = torch.cat([p.q, g3.reshape(k_count * m, p.d)]), \
                    torch.cat([q_hat, g_hats.reshape(k_count * m, p.d)]), None
            d_x = self._input_gradient(x, x_hat, keep, torch.cat([dq_hat, dg_hat.reshape(k_count * m, p.d)]),
                                       o.normalize, True, norm)
            dq, dg = d_x[:n], d_x[n:].reshape(p.g.shape)
            if not partial_grads:
                dq, dg = cast_gradient(dq, p.q.dtype), cast_gradient(dg, p.g.dtype)
        elif want_q:
            dq = self._input_gradient(p.q, q_hat, q_mask, dq_hat, o.normalize, partial_grads)
        elif want_g:
            dg = self._input_gradient(g3.reshape(k_count * m, p.d), g_hats.reshape(k_count * m, p.d),
                                      None if g_mask is None else g_mask.reshape(-1),
                                      dg_hat.reshape(k_count * m, p.d), o.normalize, partial_grads).reshape(p.g.shape)
        return dq, dg, (d_s if want_scale else None)

    def _dense_backward(self, p: Problem, out: ForwardOut, d_value, d_rows, want, partial_grads, pairs,
                        some_invalid=True, counts=None):
        """`backward` of a dense forward from its pair terms (`_row_sums`: (P, Y) forward, (P, ln P -
        ln(Y + eps)) reverse): per block w_i (P - Y) or w_i P (ln P - ln(Y + eps) - L_i), 0 on the
        pairs of an invalid row or an absent sample; dS = the q rows' block plus the gallery rows'
        transposed; the two products written into one [N + K M, D] buffer, whose rows take the
        normalisation's backward together (times s / max(|x|, eps), one factor per row).
        ``some_invalid`` False (`_host_flags`): no invalid row, and then no mask without absent samples.
        ``counts``: the forward's valid counts, clamped ([2, K, 1]; None: red's, or no mean)."""
        want_q, want_g, want_scale = want
        o = p.options
        n, m, k = p.n, p.m, p.galleries
        ct = compute_dtype(p.q.dtype)
        _, _, _, g_hats, q_hat, s = out.state
        nb = len(pairs)
        # each row's weight; an invalid row's is not read (its pairs are set to 0 below). Without
        # the rows' own gradients it is one number per direction and gallery, broadcast.
        if d_rows is None and d_value is not None:
            c = direction_weights(o, out.red, d_value, ct, counts)                  # [2, K, 1]
            ws = (c.reshape(2 * k, 1),) if nb == 1 else (c[0], c[1])
        else:
            w = gradient_weights(o, out.red, out.valid, n, d_value, d_rows, ct, masked=False)
            ws = self._split_rows(p, w, nb)
        # (each block's rows' validity where some pair is masked, their losses for reverse KL)
        masked = some_invalid or p.q_mask is not None or p.g_mask is not None
        valids = self._split_rows(p, out.valid, nb) if masked else (None,) * nb
        losses = self._split_rows(p, out.rows, nb) if o.reverse else (None,) * nb
        blocks = zip(pairs, ws, valids, losses, self._present_columns(p, nb))
        d = []
        for (P, t), wb, valid, loss, present in blocks:
            term = P * (t - loss[..., None]) if o.reverse else P - t
            term = term * wb[..., None]
            if some_invalid or present is not None:
                keep = valid[..., None] if present is None else valid[..., None] & present
                term = torch.where(keep, term, 0)
            d.append(term)
        dS = d[0][:k] + d[0][k:].mT if nb == 1 else d[0] + d[1].mT                  # [K, N, M]
        d_x = torch.empty((n + k * m, p.d), dtype=ct, device=p.q.device)
        if want_q:
            if k == 1:
                torch.mm(dS[0], g_hats[0], out=d_x[:n])
            else:
                torch.sum(torch.bmm(dS, g_hats), 0, out=d_x[:n])
        if want_g:
            if k == 1:
                torch.mm(dS[0].T, q_hat, out=d_x[n:])
            else:
                torch.bmm(dS.mT, q_hat.expand(k, n, p.d), out=d_x[n:].view(k, m, p.d))
        d_s = None
        if want_scale:
            prod = dS * _products(q_hat, g_hats)
            absent = self._absent_pairs(p)
            d_s = (prod if absent is None else prod.masked_fill(absent, 0)).sum()
        rows = slice(0 if want_q else n, None if want_g else n)
        grad = self._normalise_backward(p, d_x[rows], rows, s)
        if not partial_grads:
            grad = cast_gradient(grad, p.q.dtype)
        dq = grad[:n] if want_q else None
        dg = grad[n - rows.start:].view(p.g.shape) if want_g else None
        return dq, dg, d_s

    @staticmethod
    def _present_columns(p: Problem, blocks: int):
        """Per dense block (`_blocks`), whether each column's sample is present, broadcasting over
        its rows ([..., 1, C] bool); None for each block when every sample is present."""
        if p.q_mask is None and p.g_mask is None:
            return (None,) * blocks
        k, n, m = p.galleries, p.n, p.m
        dev = p.q.device
        g_keep = _views(p)[2]
        g_keep = g_keep if g_keep is not None else torch.ones((k, m), dtype=torch.bool, device=dev)
        q_keep = p.q_mask if p.q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
        rows_dir, cols_dir = g_keep[:, None, :], q_keep.expand(k, 1, n)        # [K, 1, M], [K, 1, N]
        return (torch.cat([rows_dir, cols_dir]),) if blocks == 1 else (rows_dir, cols_dir)

    @staticmethod
    def _absent_pairs(p: Problem, ks: slice = slice(None), c0: int = 0, c1: Optional[int] = None):
        """[Kb, N, C] bool (broadcast): the pairs of galleries ``ks``, columns c0:c1 with an absent
        sample; None when every sample is present."""
        absent = None
        if p.q_mask is not None:
            absent = ~p.q_mask[:, None]
        g_mask = _views(p)[2]
        if g_mask is not None:
            absent_g = ~g_mask[ks, None, c0:c1]
            absent = absent_g if absent is None else absent | absent_g
        return absent

    def _normalise_backward(self, p: Problem, d_hat, rows: slice, s):
        """s times F.normalize's backward of the samples ``rows`` (q's, then the galleries') from
        d_hat = dL/d(x_hat) / s, with the forward's normalised rows and norms (`prepare`): d_hat
        projected off x_hat, over max(|x|, eps); a row of norm <= eps (or NaN) is not projected
        (the guard only where `_host_flags` saw one); 0 for absent samples. In the compute dtype."""
        x_hat, norm, r, tiny = p.derived["torch_x_hat"]
        if p.options.normalize:
            x_hat = x_hat[rows]
            radial = (x_hat * d_hat).sum(1, keepdim=True)
            grad = torch.addcmul(d_hat, x_hat, radial, value=-1)              # d - x_hat (x_hat . d)
            if tiny:
                grad = torch.where(~(norm[rows] > NORM_EPS)[:, None], d_hat, grad)
            grad = grad * (r[rows] * s)[:, None]
        else:
            grad = d_hat * s
        keep = _sample_keep(p)
        if keep is not None:
            grad = torch.where(keep[rows, None], grad, 0)
        return grad

    def _saved_pairs(self, p: Problem, row_m, row_logl):
        """The forward's pair terms of the dense blocks (`_row_sums`), when this backward's state is
        the one `finish` made from them (the same tensors: not a state merged across ranks or rebuilt
        by `state_from_rows`), with the forward's ``some_invalid`` (`Prepared`) and its clamped
        valid counts (`_losses`); else None (the backward rebuilds S and the labels)."""
        saved = p.derived.get("torch_pairs_state")
        if saved is None or not self.dense(p) or saved[0] is not row_m or saved[1] is not row_logl:
            return None
        return saved[2:]

    @staticmethod
    def _input_gradient(x, x_hat, keep, d_hat, normalize, partial=False, norm=None):
        """F.normalize's backward (d / max(|x|, eps) projected off x_hat), 0 for absent rows (``keep``
        False; None: none); in x's dtype (rounded: past the dtype's range it is inf, as GradScaler
        expects), or left in the compute dtype when ``partial``. ``norm``: x's row norms (`row_norms`
        of its present rows) when the caller has them (x is then not read)."""
        ct = d_hat.dtype
        if normalize:
            if norm is None:
                norm = row_norms(_masked_rows(x, keep, ct))
            radial = (x_hat * d_hat).sum(1, keepdim=True)
            g = d_hat - x_hat * radial
            tiny = ~(norm > NORM_EPS)          # rows of norm <= NORM_EPS (and NaN): no projection
            if may_apply(tiny):
                g = torch.where(tiny[:, None], d_hat, g)
            g = g / norm.clamp_min(NORM_EPS)[:, None]
        else:
            g = d_hat
        if keep is not None:
            g = torch.where(keep[:, None], g, 0)
        return g if partial else cast_gradient(g, x.dtype)
