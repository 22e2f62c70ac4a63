"""Autograd for the SDM per-row losses, driving a tile backend over column chunks.

Forward:  prepare both sides -> for each column chunk, tile statistics of both
          directions -> merge -> per-row losses of q->g and g->q (+ lse, kept for backward).
Backward: for each column chunk, the backend writes W = dL/dS scaled by both inverse
          norms into a bounded workspace; products with the raw features give
          inv_norm * dL/dx_hat for both sides, the projection off x_hat gives dL/dq,
          dL/dg; sum dS * cos gives dL/ds.

Outputs are the per-row losses of both directions, so every reduction, a
per-sample weighting and grad_output != 1 are handled by autograd upstream.
No host synchronisation anywhere: the chunking depends on shapes only.
"""

from __future__ import annotations

import torch

from .options import SDMOptions, compute_dtype

from .matmul import addmm_f32, mm_f32
from .prepare import input_gradient, prepare_sides, product_operand
from .stats import NUM_STATS, finish_rows, split_lse

#: Bytes of workspace one chunk may use (dS chunk in backward; partial statistics in forward).
DEFAULT_WORKSPACE_BYTES = 64 * 2**20


def _chunks(n_cols: int, width: int):
    return [(c0, min(n_cols, c0 + width)) for c0 in range(0, n_cols, width)]


def scale_tensor(logit_scale, scale_value, ct: torch.dtype, device) -> torch.Tensor:
    """The logit scale as a detached [1] tensor in the compute dtype (the tile backends' operand)."""
    if logit_scale is not None:
        return logit_scale.detach().to(ct).reshape(1)
    return torch.full((1,), scale_value, dtype=ct, device=device)


def upstream_rows(d_loss, row_valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The upstream gradient of per-row losses in ``like``'s dtype: 0 for invalid rows, zeros if None."""
    if d_loss is None:
        return like.new_zeros(like.shape)
    return torch.where(row_valid, d_loss.to(like.dtype), torch.zeros((), dtype=like.dtype, device=like.device))


def stats_pass(tiles, side_a, side_b, labels, scale_t, opts: SDMOptions, workspace_bytes: int):
    """Tile statistics of rows ``side_a`` against all columns ``side_b``, chunk by chunk.

    Returns the row statistics [5, n_a] merged over every column (complete; [5, K, n_a]
    with K galleries, see prepare.prepare_sides) and the column statistics [5, n_b] over
    the rows of ``side_a`` (complete when ``side_a`` holds every row; a partial to merge
    otherwise, as the distributed path does).
    """
    n, m = side_a.feats.shape[0], side_b.feats.shape[0]
    width = tiles.chunk_columns("stats", n, m, side_a.feats.dtype, workspace_bytes)
    chunks = _chunks(m, width)
    ct = compute_dtype(side_a.feats.dtype)
    row_shape = side_a.inv_ysum.shape     # [n] or [K, n]
    row_parts = torch.empty((NUM_STATS, len(chunks), *row_shape), dtype=ct, device=side_a.feats.device)
    col_stats = torch.empty((NUM_STATS, m), dtype=ct, device=side_a.feats.device)
    for i, (c0, c1) in enumerate(chunks):
        row_parts[:, i], col_stats[:, c0:c1] = tiles.stats(side_a, side_b, labels, scale_t, c0, c1,
                                                           opts.reverse, opts.eps)
    # one merge over the chunks at the end (a [5, chunks, n] buffer), not one per chunk
    if len(chunks) == 1:
        return row_parts[:, 0], col_stats
    merged = tiles.merge(row_parts.view(NUM_STATS, len(chunks), -1), opts.reverse)
    return merged.view(NUM_STATS, *row_shape), col_stats


def grad_pass(tiles, side_a, side_b, labels, scale_t, opts: SDMOptions, lse_a, lse_b, loss_a, loss_b, ga, gb,
              ua, ub, dscale, workspace_bytes: int, a_op=None, b_op=None):
    """Accumulate W @ b' into ``ua``, W.T @ a' into ``ub`` and sum_j dS * cos into ``dscale``.

    W = dS * pa_i * pb_j (kernels/tile_grad.py) comes chunk by chunk from the tile
    backend, given the upstream row gradients ``ga`` [n_a], ``gb`` [n_b]; x' and p are the
    product operands of `prepare.product_operand` (``a_op``, ``b_op`` = (x', p), computed
    here when not given), so ua = pa * dL/da_hat in units of g_max / s, which
    `prepare.input_gradient` turns into dL/da; ``ub`` may also be a callable
    ``(c0, c1, u_chunk)`` that takes each chunk's complete rows (side_a holds every row). ``lse_a``, ``lse_b``: float64
    log-sum-exps, or (hi, lo) pairs from `stats.split_lse`. Any of the three accumulators
    may be None.
    """
    n, m = side_a.feats.shape[0], side_b.feats.shape[0]
    ct = compute_dtype(side_a.feats.dtype)
    gemm_dtype = tiles.gemm_dtype(side_a.feats.dtype) or ct
    a_x, pa = a_op if a_op is not None else product_operand(side_a, gemm_dtype)[:2]
    b_x, pb = b_op if b_op is not None else product_operand(side_b, gemm_dtype)[:2]
    width = tiles.chunk_columns("grad", n, m, side_a.feats.dtype, workspace_bytes)
    lse_a, lse_b = (x if isinstance(x, tuple) else split_lse(x, ct) for x in (lse_a, lse_b))
    for c0, c1 in _chunks(m, width):
        ws, n_parts, ds_cos = tiles.grad(side_a, side_b, labels, scale_t, c0, c1, opts.reverse, opts.eps,
                                         lse_a, lse_b, loss_a, loss_b, ga, gb, pa, pb, dscale is not None)
        # The workspace [n, P * w] holds W's P parts (hi, lo) side by side, so W_hi @ b' + W_lo @ b'
        # is ONE product with K = P * w: one read-modify-write of the fp32 accumulator per chunk.
        if ua is not None:
            b_chunk = b_x[c0:c1]
            addmm_f32(ua, ws, b_chunk if n_parts == 1 else torch.cat([b_chunk] * n_parts))
        if callable(ub):
            ub(c0, c1, _sum_parts(mm_f32(ws.T, a_x, ct), n_parts))
        elif ub is not None:
            if n_parts == 1:
                addmm_f32(ub[c0:c1], ws.T, a_x)
            else:
                ub[c0:c1] += _sum_parts(mm_f32(ws.T, a_x, ub.dtype), n_parts)
        if dscale is not None:
            dscale += ds_cos.to(dscale.dtype)
        # Let this chunk's workspace go before the next chunk allocates its own: bound to `ws`
        # until reassigned, two workspaces were alive at once (+64 MiB at the default budget,
        # the constant gap between predicted and measured backward peaks, bench/NOTES.md §16).
        del ws, ds_cos


def _sum_parts(u: torch.Tensor, n_parts: int) -> torch.Tensor:
    """[P * w, D] products of the P workspace parts -> their sum [w, D]."""
    return u if n_parts == 1 else u.view(n_parts, -1, u.shape[1]).sum(0)


def rows_forward(q, g, logit_scale, scale_value, q_ids, g_ids, labels, q_mask, g_mask,
                 opts: SDMOptions, tiles, workspace_bytes: int, galleries: int = 1):
    """Per-row losses of both directions. Returns (outputs, saved) where outputs =
    (loss_q, loss_g, valid_q, valid_g, pos_q, pos_g, lse_q, lse_g) and saved = (side_q, side_g, scale_t).
    With ``galleries`` = K > 1 (g is K galleries concatenated), the q-side outputs are [K, N].

    Autocast is off inside: the similarities must be computed in fp32 whatever the
    surrounding autocast region asks for (the seed's lesson).
    """
    with torch.autocast(q.device.type, enabled=False):
        side_q, side_g = prepare_sides(q, g, q_ids, g_ids, labels, q_mask, g_mask, opts.normalize, galleries)
        scale_t = scale_tensor(logit_scale, scale_value, compute_dtype(q.dtype), q.device)
        row_state, col_stats = stats_pass(tiles, side_q, side_g, labels, scale_t, opts, workspace_bytes)
        loss_q, lse_q, pos_q = finish_rows(row_state, side_q.row_valid, side_q.ylogy, opts.reverse)
        loss_g, lse_g, pos_g = finish_rows(col_stats, side_g.row_valid, side_g.ylogy, opts.reverse)
    outputs = (loss_q, loss_g, side_q.row_valid, side_g.row_valid, pos_q, pos_g, lse_q, lse_g)
    return outputs, (side_q, side_g, scale_t)


def rows_backward(side_q, side_g, scale_t, labels, opts: SDMOptions, tiles, workspace_bytes: int,
                  lse_q, lse_g, loss_q, loss_g, d_loss_q, d_loss_g, want_q: bool, want_g: bool,
                  want_scale: bool):
    """(dq, dg, d_scale) from the upstream gradients of the per-row losses; each None if not wanted."""
    with torch.autocast(side_q.feats.device.type, enabled=False):
        q = side_q.feats
        n, d = q.shape
        ct = loss_q.dtype   # (lse_* are float64: see stats.finish_rows)
        ga = upstream_rows(d_loss_q, side_q.row_valid, loss_q)
        gb = upstream_rows(d_loss_g, side_g.row_valid, loss_g)
        # Normalise the upstream gradients so dS is O(1): safe to hold in an fp16 workspace.
        g_max = torch.maximum(ga.abs().amax(), gb.abs().amax()).clamp_min(torch.finfo(ct).tiny)
        ga, gb = ga / g_max, gb / g_max

        gemm_dtype = tiles.gemm_dtype(q.dtype) or ct
        q_x, p_q, c_q = product_operand(side_q, gemm_dtype)
        g_x, p_g, c_g = product_operand(side_g, gemm_dtype)
        factor = scale_t * g_max   # dS was divided by g_max; dS/dx_hat carries the scale s
        ua = torch.zeros((n, d), dtype=ct, device=q.device) if want_q else None
        dscale = torch.zeros((n,), dtype=ct, device=q.device) if want_scale else None
        dq = dg = d_scale = None
        if want_g:
            # a column chunk's rows of g are complete once the chunk is done: turn them into
            # dL/dg right away instead of holding an fp32 [M, D] accumulator
            dg = torch.empty(side_g.feats.shape, dtype=side_g.feats.dtype, device=q.device)

            def finish_g(c0, c1, u):
                dg[c0:c1] = input_gradient(side_g, u, c_g, factor, opts.normalize, dg.dtype, rows=(c0, c1))
        grad_pass(tiles, side_q, side_g, labels, scale_t, opts, lse_q, lse_g, loss_q, loss_g, ga, gb,
                  ua, finish_g if want_g else None, dscale, workspace_bytes, (q_x, p_q), (g_x, p_g))
        del q_x, g_x
        if want_q:
            dq = input_gradient(side_q, ua, c_q, factor, opts.normalize, q.dtype)
        if want_scale:
            d_scale = dscale.sum() * g_max
    return dq, dg, d_scale


class SDMRowsFunction(torch.autograd.Function):
    """(q, g, logit_scale) -> per-row losses (q->g [N], g->q [M]), validity, positive probability.

    The eager path (no dispatcher overhead); under torch.compile, `ops.py` registers the
    same two functions as custom ops.
    """

    @staticmethod
    def forward(ctx, q, g, logit_scale, scale_value, q_ids, g_ids, labels, q_mask, g_mask,
                opts: SDMOptions, tiles, workspace_bytes: int, galleries: int = 1):
        outputs, (side_q, side_g, scale_t) = rows_forward(q, g, logit_scale, scale_value, q_ids, g_ids, labels,
                                                          q_mask, g_mask, opts, tiles, workspace_bytes, galleries)
        loss_q, loss_g, valid_q, valid_g, pos_q, pos_g, lse_q, lse_g = outputs
        ctx.sides = (side_q, side_g)
        ctx.labels = labels
        ctx.scale_t = scale_t
        ctx.save_for_backward(lse_q, lse_g, loss_q, loss_g)
        ctx.opts, ctx.tiles, ctx.workspace_bytes = opts, tiles, workspace_bytes
        ctx.scale_dtype = logit_scale.dtype if logit_scale is not None else None
        ctx.mark_non_differentiable(valid_q, valid_g, pos_q, pos_g)
        return loss_q, loss_g, valid_q, valid_g, pos_q, pos_g

    @staticmethod
    def backward(ctx, d_loss_q, d_loss_g, _vq, _vg, _pq, _pg):
        side_q, side_g = ctx.sides
        lse_q, lse_g, loss_q, loss_g = ctx.saved_tensors
        dq, dg, d_scale = rows_backward(side_q, side_g, ctx.scale_t, ctx.labels, ctx.opts, ctx.tiles,
                                        ctx.workspace_bytes, lse_q, lse_g, loss_q, loss_g, d_loss_q, d_loss_g,
                                        *ctx.needs_input_grad[:3])
        if d_scale is not None:
            d_scale = d_scale.to(ctx.scale_dtype)
        return dq, dg, d_scale, None, None, None, None, None, None, None, None, None, None
