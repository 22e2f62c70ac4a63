"""The loss as ``torch.library`` operators, for ``torch.compile(fullgraph=True)``.

``sdm_triton::forward`` and ``sdm_triton::backward`` run a backend's forward and backward,
as `autograd.SDMFunction` does in eager mode; ``register_autograd`` connects them. They
are ``triton_op``s: the compiler traces their bodies (the Triton launches go through
``wrap_triton``, launch.py), so the compiled graph launches the kernels itself, and the
backward gets the forward's state as saved tensors (no recomputation of the preparation).
The public API uses these operators only while ``torch.compile`` traces; eager calls go
straight to the autograd Function (no dispatcher round trip).

Non-tensor options travel as plain values (str / float / int / bool); the kernel config as
its canonical name (``KernelConfig.name()``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.library import register_autograd, triton_op

from . import dispatch
from .backend import ForwardOut
from .options import KernelConfig, SDMOptions
from .problem import Problem


def _problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction, combine,
             reduction, normalize, config, workspace_bytes, galleries, scalar_value, return_stats) -> Problem:
    opts = SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction, normalize=normalize)
    return Problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, opts, KernelConfig.parse(config),
                   workspace_bytes, galleries, scalar_value, return_stats)


@triton_op("sdm_triton::forward", mutates_args=())
def sdm_forward_op(
    q: Tensor, g: Tensor, q_ids: Optional[Tensor], g_ids: Optional[Tensor], labels: Optional[Tensor],
    q_mask: Optional[Tensor], g_mask: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
    kl: str, eps: float, direction: str, combine: str, reduction: str, normalize: bool, backend: str,
    config: str, workspace_bytes: int, galleries: int, scalar_value: bool, return_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, List[Tensor]]:
    """(value, rows, valid, red, state): `backend.ForwardOut`, the state as a list."""
    p = _problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction, combine,
                 reduction, normalize, config, workspace_bytes, galleries, scalar_value, return_stats)
    with torch.autocast(q.device.type, enabled=False):
        out = dispatch.pick_backend(backend, q).forward(p)
    return out.value, out.rows, out.valid, out.red, list(out.state)


@triton_op("sdm_triton::backward", mutates_args=())
def sdm_backward_op(
    d_value: Optional[Tensor], d_rows: Optional[Tensor], rows: Tensor, valid: Tensor, red: Tensor,
    state: List[Tensor], q: Tensor, g: Tensor, q_ids: Optional[Tensor], g_ids: Optional[Tensor],
    labels: Optional[Tensor], q_mask: Optional[Tensor], g_mask: Optional[Tensor], scale: Optional[Tensor],
    scale_value: float, kl: str, eps: float, direction: str, combine: str, reduction: str, normalize: bool,
    backend: str, config: str, workspace_bytes: int, galleries: int, scalar_value: bool,
    want_q: bool, want_g: bool, want_scale: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dg, d_scale); a gradient that was not asked for comes back as an empty tensor."""
    p = _problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction, combine,
                 reduction, normalize, config, workspace_bytes, galleries, scalar_value, False)
    out = ForwardOut(None, rows, valid, red, tuple(state))
    with torch.autocast(q.device.type, enabled=False):
        dq, dg, d_scale = dispatch.pick_backend(backend, q).backward(p, out, d_value, d_rows,
                                                                    (want_q, want_g, want_scale))
    empty = q.new_empty(0)
    return (dq if dq is not None else empty, dg if dg is not None else empty,
            d_scale.reshape(()) if d_scale is not None else empty.float())


# the forward's arguments after the tensors (positions in sdm_forward_op's signature)
_OPTION_SLICE = slice(8, 21)


def _setup_context(ctx, inputs, output):
    value, rows, valid, red, state = output
    q, g, q_ids, g_ids, labels, q_mask, g_mask, scale = inputs[:8]
    ctx.save_for_backward(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, rows, valid, red, *state)
    ctx.options = inputs[_OPTION_SLICE]
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(valid, red)


def _backward(ctx, d_value, d_rows, _d_valid, _d_red, _d_state):
    q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, rows, valid, red, *state = ctx.saved_tensors
    (scale_value, kl, eps, direction, combine, reduction, normalize, backend, config, workspace_bytes,
     galleries, scalar_value, _return_stats) = ctx.options
    want_q, want_g, want_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[7]
    dq, dg, d_scale = sdm_backward_op(
        d_value, d_rows, rows, valid, red, state, q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value,
        kl, eps, direction, combine, reduction, normalize, backend, config, workspace_bytes, galleries,
        scalar_value, want_q, want_g, want_scale)
    grads = [dq if want_q else None, dg if want_g else None] + [None] * 5
    grads.append(d_scale.to(scale.dtype) if want_scale else None)
    return tuple(grads) + (None,) * 13


register_autograd("sdm_triton::forward", _backward, setup_context=_setup_context)


def sdm_forward(p: Problem, backend_name: str):
    """The forward op on a problem: (value, rows, valid, red)."""
    o = p.options
    value, rows, valid, red, _state = sdm_forward_op(
        p.q, p.g, p.q_ids, p.g_ids, p.labels, p.q_mask, p.g_mask, p.scale, p.scale_value, o.kl, float(o.eps),
        o.direction, o.combine, o.reduction, o.normalize, backend_name, p.config.name(), p.workspace_bytes,
        p.galleries, p.scalar_value, p.return_stats)
    return value, rows, valid, red
