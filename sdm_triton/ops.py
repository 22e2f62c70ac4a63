"""The loss as ``torch.library`` operators, for ``torch.compile(fullgraph=True)``.

Two pairs of operators run a backend's forward and backward, as `autograd.SDMFunction`
does in eager mode, connected by ``register_autograd``:

    sdm_triton::forward / backward              the Triton backend, as ``triton_op``s: the
                                                compiler traces their bodies (the launches go
                                                through ``wrap_triton``, launch.py), so the
                                                compiled graph launches the kernels itself
    sdm_triton::forward_torch / backward_torch  the torch backend, as opaque ``custom_op``s
                                                (its chunk loops stay out of the graph and its
                                                numbers are eager's, bit for bit)

The backward gets the forward's state as saved tensors (no recomputation). The public API
uses these operators only while ``torch.compile`` traces; eager calls go straight to the
autograd Function (no dispatcher round trip). Non-tensor options travel as plain values
(str / float / int / bool), the kernel config as its canonical name (``KernelConfig.name()``).
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op, register_autograd, triton_op

from . import dispatch
from .backend import NUM_RED, ForwardOut
from .options import KernelConfig, SDMOptions, compute_dtype
from .problem import Problem


def _problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction, combine,
             reduction, normalize, config, workspace_bytes, galleries, scalar_value, return_stats) -> Problem:
    opts = SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction, normalize=normalize)
    return Problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, opts, KernelConfig.parse(config),
                   workspace_bytes, galleries, scalar_value, return_stats)


def _launches(backend: str):
    """The Triton backend's launches are traced (wrap_triton) inside these operators only."""
    if backend == "triton":
        from .launch import traceable_launches
        return traceable_launches()
    return contextlib.nullcontext()


def _forward(backend, q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction, combine,
             reduction, normalize, config, workspace_bytes, galleries, scalar_value, return_stats):
    p = _problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction, combine,
                 reduction, normalize, config, workspace_bytes, galleries, scalar_value, return_stats)
    with torch.autocast(q.device.type, enabled=False), _launches(backend):
        out = dispatch.pick_backend(backend, q).forward(p)
    return out.value, out.rows, out.valid, out.red, list(out.state)


def _backward(backend, d_value, d_rows, rows, valid, red, state, q, g, q_ids, g_ids, labels, q_mask, g_mask, scale,
              scale_value, kl, eps, direction, combine, reduction, normalize, config, workspace_bytes, galleries,
              scalar_value, want_q, want_g, want_scale):
    p = _problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction, combine,
                 reduction, normalize, config, workspace_bytes, galleries, scalar_value, False)
    out = ForwardOut(None, rows, valid, red, tuple(state))
    with torch.autocast(q.device.type, enabled=False), _launches(backend):
        dq, dg, d_scale = dispatch.pick_backend(backend, q).backward(p, out, d_value, d_rows,
                                                                    (want_q, want_g, want_scale))
    empty = q.new_empty(0)
    return (dq if dq is not None else empty, dg if dg is not None else empty,
            d_scale.reshape(()).float() if d_scale is not None else empty.float())


# ------------------------------------------------------------------ the Triton backend: triton_op

@triton_op("sdm_triton::forward", mutates_args=())
def sdm_forward_op(
    q: Tensor, g: Tensor, q_ids: Optional[Tensor], g_ids: Optional[Tensor], labels: Optional[Tensor],
    q_mask: Optional[Tensor], g_mask: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
    kl: str, eps: float, direction: str, combine: str, reduction: str, normalize: bool,
    config: str, workspace_bytes: int, galleries: int, scalar_value: bool, return_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, List[Tensor]]:
    """(value, rows, valid, red, state): `backend.ForwardOut`, the state as a list."""
    return _forward("triton", q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction,
                    combine, reduction, normalize, config, workspace_bytes, galleries, scalar_value, return_stats)


@triton_op("sdm_triton::backward", mutates_args=())
def sdm_backward_op(
    d_value: Optional[Tensor], d_rows: Optional[Tensor], rows: Tensor, valid: Tensor, red: Tensor,
    state: List[Tensor], q: Tensor, g: Tensor, q_ids: Optional[Tensor], g_ids: Optional[Tensor],
    labels: Optional[Tensor], q_mask: Optional[Tensor], g_mask: Optional[Tensor], scale: Optional[Tensor],
    scale_value: float, kl: str, eps: float, direction: str, combine: str, reduction: str, normalize: bool,
    config: str, workspace_bytes: int, galleries: int, scalar_value: bool,
    want_q: bool, want_g: bool, want_scale: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dg, d_scale); a gradient that was not asked for comes back as an empty tensor."""
    return _backward("triton", d_value, d_rows, rows, valid, red, state, q, g, q_ids, g_ids, labels, q_mask, g_mask,
                     scale, scale_value, kl, eps, direction, combine, reduction, normalize, config, workspace_bytes,
                     galleries, scalar_value, want_q, want_g, want_scale)


# ------------------------------------------------------------------ the torch backend: opaque custom_op

@custom_op("sdm_triton::forward_torch", mutates_args=())
def sdm_forward_torch_op(
    q: Tensor, g: Tensor, q_ids: Optional[Tensor], g_ids: Optional[Tensor], labels: Optional[Tensor],
    q_mask: Optional[Tensor], g_mask: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
    kl: str, eps: float, direction: str, combine: str, reduction: str, normalize: bool,
    config: str, workspace_bytes: int, galleries: int, scalar_value: bool, return_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, List[Tensor]]:
    out = _forward("torch", q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction,
                   combine, reduction, normalize, config, workspace_bytes, galleries, scalar_value, return_stats)
    # a custom op's outputs may not alias its inputs (the state's scale can be the input itself)
    return out[:4] + ([t.clone() if (scale is not None and t is scale) else t for t in out[4]],)


@sdm_forward_torch_op.register_fake
def _forward_torch_fake(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value, kl, eps, direction, combine,
                        reduction, normalize, config, workspace_bytes, galleries, scalar_value, return_stats):
    ct = compute_dtype(q.dtype)
    n, d = q.shape
    m = g.shape[-2]
    ndr = galleries * (n + m)
    value = q.new_empty(() if scalar_value else (galleries,), dtype=ct)
    rows, valid, red = q.new_empty(ndr, dtype=ct), q.new_empty(ndr, dtype=torch.bool), q.new_empty((NUM_RED, galleries), dtype=ct)
    state = [q.new_empty(ndr, dtype=ct), q.new_empty(ndr, dtype=ct), q.new_empty(ndr, dtype=ct),
             q.new_empty((galleries, m, d), dtype=ct), q.new_empty((n, d), dtype=ct), q.new_empty((), dtype=ct)]
    return value, rows, valid, red, state


@custom_op("sdm_triton::backward_torch", mutates_args=())
def sdm_backward_torch_op(
    d_value: Optional[Tensor], d_rows: Optional[Tensor], rows: Tensor, valid: Tensor, red: Tensor,
    state: List[Tensor], q: Tensor, g: Tensor, q_ids: Optional[Tensor], g_ids: Optional[Tensor],
    labels: Optional[Tensor], q_mask: Optional[Tensor], g_mask: Optional[Tensor], scale: Optional[Tensor],
    scale_value: float, kl: str, eps: float, direction: str, combine: str, reduction: str, normalize: bool,
    config: str, workspace_bytes: int, galleries: int, scalar_value: bool,
    want_q: bool, want_g: bool, want_scale: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dg, ds = _backward("torch", d_value, d_rows, rows, valid, red, state, q, g, q_ids, g_ids, labels, q_mask,
                           g_mask, scale, scale_value, kl, eps, direction, combine, reduction, normalize, config,
                           workspace_bytes, galleries, scalar_value, want_q, want_g, want_scale)
    return dq, dg, ds


@sdm_backward_torch_op.register_fake
def _backward_torch_fake(d_value, d_rows, rows, valid, red, state, q, g, q_ids, g_ids, labels, q_mask, g_mask, scale,
                         scale_value, kl, eps, direction, combine, reduction, normalize, config, workspace_bytes,
                         galleries, scalar_value, want_q, want_g, want_scale):
    empty = q.new_empty(0)
    return (torch.empty_like(q) if want_q else empty, torch.empty_like(g) if want_g else empty,
            q.new_empty((), dtype=torch.float32) if want_scale else empty.float())


# ------------------------------------------------------------------ autograd of both

# the forward's arguments after the tensors (positions in the forward ops' signatures)
_OPTION_SLICE = slice(8, 20)


def _make_backward(backward_op):
    def backward(ctx, d_value, d_rows, _d_valid, _d_red, _d_state):
        q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, rows, valid, red, *state = ctx.saved_tensors
        (scale_value, kl, eps, direction, combine, reduction, normalize, config, workspace_bytes,
         galleries, scalar_value, _return_stats) = ctx.options
        want_q, want_g, want_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[7]
        dq, dg, d_scale = backward_op(
            d_value, d_rows, rows, valid, red, state, q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, scale_value,
            kl, eps, direction, combine, reduction, normalize, config, workspace_bytes, galleries, scalar_value,
            want_q, want_g, want_scale)
        grads = [dq if want_q else None, dg if want_g else None] + [None] * 5
        grads.append(d_scale.to(scale.dtype) if want_scale else None)
        return tuple(grads) + (None,) * 12
    return backward


def _setup_context(ctx, inputs, output):
    value, rows, valid, red, state = output
    q, g, q_ids, g_ids, labels, q_mask, g_mask, scale = inputs[:8]
    ctx.save_for_backward(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, rows, valid, red, *state)
    ctx.options = inputs[_OPTION_SLICE]
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(valid, red)


register_autograd("sdm_triton::forward", _make_backward(sdm_backward_op), setup_context=_setup_context)
register_autograd("sdm_triton::forward_torch", _make_backward(sdm_backward_torch_op), setup_context=_setup_context)


def forward_op(backend_name: str):
    """The forward operator of a resolved backend name ("triton" or "torch")."""
    return sdm_forward_op if backend_name == "triton" else sdm_forward_torch_op
