"""Autograd for the SDM per-row losses, driving a tile backend over column chunks.

Forward:  prepare both sides -> for each column chunk, tile statistics of both
          directions -> merge -> per-row losses of q->g and g->q (+ lse, kept for backward).
Backward: for each column chunk, the backend writes dL/dS into a bounded
          workspace; two matrix products turn it into dL/dq_hat and dL/dg_hat;
          the normalisation backward gives dL/dq, dL/dg; sum dS * cos gives dL/ds.

Outputs are the per-row losses of both directions, so every reduction, a
per-sample weighting and grad_output != 1 are handled by autograd upstream.
No host synchronisation anywhere: the chunking depends on shapes only.
"""

from __future__ import annotations

import torch

from reference.options import SDMOptions, compute_dtype

from .prepare import normalization_backward, normalized_features, prepare_sides
from .stats import NUM_STATS, finish_rows, merge_two

#: Bytes of workspace one chunk may use (dS chunk in backward; partial statistics in forward).
DEFAULT_WORKSPACE_BYTES = 64 * 2**20

_ADDMM_OUT_DTYPE = [True]  # torch.addmm(..., out_dtype=) exists on CUDA in recent PyTorch


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """acc += a @ b with acc's precision for the accumulation (half operands, fp32 acc)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[0] = False
    if a.is_cuda:  # older PyTorch: a half-precision product, accumulated in fp32
        acc.add_((a @ b).to(acc.dtype))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _cast_saturating(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a gradient to the input dtype; values beyond its range saturate instead of becoming inf.

    Only reachable in fp16 for (near-)zero feature vectors, whose gradient is 1/NORM_EPS-scaled.
    """
    if dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        x = x.clamp(-big, big)
    return x.to(dtype)


def _chunks(n_cols: int, width: int):
    return [(c0, min(n_cols, c0 + width)) for c0 in range(0, n_cols, width)]


class SDMRowsFunction(torch.autograd.Function):
    """(q, g, logit_scale) -> per-row losses (q->g [N], g->q [M]), validity, positive probability."""

    @staticmethod
    def forward(ctx, q, g, logit_scale, scale_value, q_ids, g_ids, labels, q_mask, g_mask,
                opts: SDMOptions, tiles, workspace_bytes: int):
        side_q, side_g = prepare_sides(q, g, q_ids, g_ids, labels, q_mask, g_mask, opts.normalize)
        ct = compute_dtype(q.dtype)
        if logit_scale is not None:
            scale_t = logit_scale.detach().to(ct).reshape(1)
        else:
            scale_t = torch.full((1,), scale_value, dtype=ct, device=q.device)
        n, m = q.shape[0], g.shape[0]

        width = tiles.chunk_columns("stats", n, m, q.dtype, workspace_bytes)
        row_state = None
        col_stats = torch.empty((NUM_STATS, m), dtype=ct, device=q.device)
        for c0, c1 in _chunks(m, width):
            rows, cols = tiles.stats(side_q, side_g, labels, scale_t, c0, c1, opts.reverse, opts.eps)
            row_state = rows if row_state is None else merge_two(row_state, rows, opts.reverse)
            col_stats[:, c0:c1] = cols
        loss_q, lse_q, pos_q = finish_rows(row_state, side_q.row_valid, side_q.ylogy, opts.reverse)
        loss_g, lse_g, pos_g = finish_rows(col_stats, side_g.row_valid, side_g.ylogy, opts.reverse)

        ctx.sides = (side_q, side_g)
        ctx.labels = labels
        ctx.scale_t = scale_t
        ctx.save_for_backward(lse_q, lse_g, loss_q, loss_g)
        ctx.opts, ctx.tiles, ctx.workspace_bytes = opts, tiles, workspace_bytes
        ctx.has_logit_scale = logit_scale is not None
        ctx.scale_dtype = logit_scale.dtype if logit_scale is not None else None
        ctx.mark_non_differentiable(side_q.row_valid, side_g.row_valid, pos_q, pos_g)
        return loss_q, loss_g, side_q.row_valid, side_g.row_valid, pos_q, pos_g

    @staticmethod
    def backward(ctx, d_loss_q, d_loss_g, _vq, _vg, _pq, _pg):
        side_q, side_g = ctx.sides
        lse_q, lse_g, loss_q, loss_g = ctx.saved_tensors
        opts, tiles = ctx.opts, ctx.tiles
        q = side_q.feats
        n, m, d = q.shape[0], side_g.feats.shape[0], q.shape[1]
        ct = lse_q.dtype
        zero = torch.zeros((), dtype=ct, device=q.device)
        ga = torch.where(side_q.row_valid, d_loss_q.to(ct), zero) if d_loss_q is not None else lse_q.new_zeros(n)
        gb = torch.where(side_g.row_valid, d_loss_g.to(ct), zero) if d_loss_g is not None else lse_g.new_zeros(m)
        # Normalise the upstream gradients so dS is O(1): safe to hold in an fp16 workspace.
        g_max = torch.maximum(ga.abs().amax(), gb.abs().amax()).clamp_min(torch.finfo(ct).tiny)
        ga, gb = ga / g_max, gb / g_max

        want_q, want_g, want_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ws_dtype = tiles.workspace_dtype(q.dtype)
        q_hat = normalized_features(side_q, ws_dtype)
        g_hat = normalized_features(side_g, ws_dtype)
        dq_hat = torch.zeros((n, d), dtype=ct, device=q.device)
        dg_hat = torch.zeros((m, d), dtype=ct, device=q.device)
        dscale = torch.zeros((n,), dtype=ct, device=q.device) if want_scale else None

        width = tiles.chunk_columns("grad", n, m, q.dtype, ctx.workspace_bytes)
        for c0, c1 in _chunks(m, width):
            ds, ds_cos = tiles.grad(side_q, side_g, ctx.labels, ctx.scale_t, c0, c1, opts.reverse, opts.eps,
                                    lse_q, lse_g, loss_q, loss_g, ga, gb, want_scale)
            if want_q:
                _addmm_fp32(dq_hat, ds, g_hat[c0:c1])
            if want_g:
                _addmm_fp32(dg_hat[c0:c1], ds.T, q_hat)
            if want_scale:
                dscale += ds_cos.to(ct)

        factor = ctx.scale_t * g_max   # dS was divided by g_max; dS/dx_hat carries the scale s
        dq = dg = d_scale = None
        if want_q:
            dq = _cast_saturating(normalization_backward(side_q, dq_hat * factor, opts.normalize), q.dtype)
        if want_g:
            dg = _cast_saturating(normalization_backward(side_g, dg_hat * factor, opts.normalize),
                                  side_g.feats.dtype)
        if want_scale:
            d_scale = (dscale.sum() * g_max).to(ctx.scale_dtype)
        return dq, dg, d_scale, None, None, None, None, None, None, None, None, None
