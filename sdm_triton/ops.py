"""The SDM row losses as ``torch.library`` custom ops, for ``torch.compile(fullgraph=True)``.

``sdm_triton::sdm_rows`` (forward) and ``sdm_triton::sdm_rows_backward`` run the same
``autograd.rows_forward`` / ``rows_backward`` as the eager ``SDMRowsFunction``; fake
implementations give the compiler output shapes without running kernels, and
``register_autograd`` connects the two. The public API uses these ops only while
``torch.compile`` traces (``torch.compiler.is_compiling()``): in eager mode the
dispatcher round trip costs more than the loss at IRRA batch sizes (measured with
``python -m bench``), so eager calls go straight to the autograd.Function.

Non-tensor options travel as plain values (the schema allows str / float / bool / int).
Backward recomputes the per-sample preparation (norms, label masses: O((N + M) * D)),
since a custom op cannot hold Python objects between forward and backward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .options import SDMOptions, compute_dtype

from .autograd import rows_backward, rows_forward, scale_tensor
from .prepare import prepare_sides

_ROWS = "sdm_triton::sdm_rows"
_ROWS_BWD = "sdm_triton::sdm_rows_backward"


def _options(kl: str, eps: float, normalize: bool) -> SDMOptions:
    return SDMOptions(kl=kl, eps=eps, normalize=normalize)


def _tiles(backend: str, q: Tensor, tile_config: str):
    from .api import _pick_tiles  # api imports this module
    return _pick_tiles(backend, q, tile_config or None)


@torch.library.custom_op(_ROWS, mutates_args=())
def sdm_rows(q: Tensor, g: Tensor, logit_scale: Optional[Tensor], scale_value: float,
             q_ids: Optional[Tensor], g_ids: Optional[Tensor], labels: Optional[Tensor],
             q_mask: Optional[Tensor], g_mask: Optional[Tensor],
             kl: str, eps: float, normalize: bool, backend: str, tile_config: str, workspace_bytes: int,
             galleries: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss_q, loss_g, valid_q, valid_g, pos_q, pos_g, lse_q, lse_g); q-side [K, N] for K > 1 galleries."""
    outputs, _ = rows_forward(q, g, logit_scale, scale_value, q_ids, g_ids, labels, q_mask, g_mask,
                              _options(kl, eps, normalize), _tiles(backend, q, tile_config), workspace_bytes,
                              galleries)
    return outputs


@sdm_rows.register_fake
def _sdm_rows_fake(q, g, logit_scale, scale_value, q_ids, g_ids, labels, q_mask, g_mask,
                   kl, eps, normalize, backend, tile_config, workspace_bytes, galleries):
    ct = compute_dtype(q.dtype)
    n, m = q.shape[0], g.shape[0]
    shape_q = (n,) if galleries == 1 else (galleries, n)
    rows_q, rows_g = q.new_empty(shape_q, dtype=ct), g.new_empty((m,), dtype=ct)
    return (rows_q, rows_g, q.new_empty(shape_q, dtype=torch.bool), g.new_empty((m,), dtype=torch.bool),
            q.new_empty(shape_q, dtype=ct), g.new_empty((m,), dtype=ct),
            q.new_empty(shape_q, dtype=torch.float64), g.new_empty((m,), dtype=torch.float64))  # lse: float64


@torch.library.custom_op(_ROWS_BWD, mutates_args=())
def sdm_rows_backward(d_loss_q: Tensor, d_loss_g: Tensor, q: Tensor, g: Tensor, logit_scale: Optional[Tensor],
                      scale_value: float, q_ids: Optional[Tensor], g_ids: Optional[Tensor],
                      labels: Optional[Tensor], q_mask: Optional[Tensor], g_mask: Optional[Tensor],
                      lse_q: Tensor, lse_g: Tensor, loss_q: Tensor, loss_g: Tensor,
                      kl: str, eps: float, normalize: bool, backend: str, tile_config: str,
                      workspace_bytes: int, galleries: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dg, d_scale); d_scale is a 0-dim compute-dtype tensor (0 when there is no logit_scale)."""
    opts = _options(kl, eps, normalize)
    side_q, side_g = prepare_sides(q, g, q_ids, g_ids, labels, q_mask, g_mask, normalize, galleries)
    scale_t = scale_tensor(logit_scale, scale_value, compute_dtype(q.dtype), q.device)
    want_scale = logit_scale is not None
    dq, dg, d_scale = rows_backward(side_q, side_g, scale_t, labels, opts, _tiles(backend, q, tile_config),
                                    workspace_bytes, lse_q, lse_g, loss_q, loss_g, d_loss_q, d_loss_g,
                                    True, True, want_scale)
    if d_scale is None:
        d_scale = loss_q.new_zeros(())
    return dq, dg, d_scale


@sdm_rows_backward.register_fake
def _sdm_rows_backward_fake(d_loss_q, d_loss_g, q, g, logit_scale, scale_value, q_ids, g_ids, labels,
                            q_mask, g_mask, lse_q, lse_g, loss_q, loss_g, kl, eps, normalize, backend,
                            tile_config, workspace_bytes, galleries):
    return torch.empty_like(q), torch.empty_like(g), loss_q.new_empty(())


def _setup_context(ctx, inputs, output):
    (q, g, logit_scale, scale_value, q_ids, g_ids, labels, q_mask, g_mask,
     kl, eps, normalize, backend, tile_config, workspace_bytes, galleries) = inputs
    loss_q, loss_g, _, _, _, _, lse_q, lse_g = output
    ctx.save_for_backward(q, g, logit_scale, q_ids, g_ids, labels, q_mask, g_mask, lse_q, lse_g, loss_q, loss_g)
    ctx.values = (scale_value, kl, eps, normalize, backend, tile_config, workspace_bytes, galleries)


def _backward(ctx, d_loss_q, d_loss_g, *_unused):
    q, g, logit_scale, q_ids, g_ids, labels, q_mask, g_mask, lse_q, lse_g, loss_q, loss_g = ctx.saved_tensors
    scale_value, kl, eps, normalize, backend, tile_config, workspace_bytes, galleries = ctx.values
    if d_loss_q is None:
        d_loss_q = torch.zeros_like(loss_q)
    if d_loss_g is None:
        d_loss_g = torch.zeros_like(loss_g)
    dq, dg, d_scale = sdm_rows_backward(d_loss_q, d_loss_g, q, g, logit_scale, scale_value, q_ids, g_ids,
                                        labels, q_mask, g_mask, lse_q, lse_g, loss_q, loss_g,
                                        kl, eps, normalize, backend, tile_config, workspace_bytes, galleries)
    d_logit_scale = d_scale.to(logit_scale.dtype) if logit_scale is not None else None
    return (dq, dg, d_logit_scale) + (None,) * 13


sdm_rows.register_autograd(_backward, setup_context=_setup_context)
