"""Autograd: one ``torch.autograd.Function`` over a backend's forward and backward (no math here).

Inputs that can take a gradient: q, g and the logit-scale tensor. Outputs: the reduced value
([K] or 0-dim) and the per-row losses [NDR] (both differentiable: ``reduction="none"`` returns
the rows), the validity [NDR] and the per-gallery reduction buffer (not differentiable).

Everything the backward reads goes through ``save_for_backward``, so modifying q, g, ids,
masks or labels in place between forward and backward raises PyTorch's version-counter
error. A gradient of the gradient (``create_graph=True`` and then differentiating the
result, e.g. a gradient penalty through the loss) raises a clear error instead of returning
wrong numbers. Autocast is off inside: the loss is computed in fp32 whatever the surrounding
region asks for.
"""

from __future__ import annotations

import contextlib

import torch

from .backend import ForwardOut

DOUBLE_BACKWARD = ("sdm_triton: double backward is not supported: the gradient of the SDM loss cannot be "
                   "differentiated again (create_graph=True, e.g. a gradient penalty through the loss)")


def without_autocast(device_type: str):
    """Autocast off around a backend's work: its own products (the chunked backward's cuBLAS
    calls, the torch backend's matmuls) must stay in the precision it chose. No context at all
    when autocast is already off: entering one costs ~10 us, about 4% of a small call's host time."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on a gradient, made to depend on an input that requires grad; differentiating
    it raises (it is applied only under ``create_graph=True``)."""

    @staticmethod
    def forward(ctx, grad, anchor):
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD)


class SDMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, g, scale, problem, backend):
        with without_autocast(q.device.type):
            out = backend.forward(problem)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(out.valid, out.red)
        p = problem
        ctx.save_for_backward(q, g, scale, p.q_ids, p.g_ids, p.labels, p.q_mask, p.g_mask,
                              out.rows, out.valid, out.red, *out.state)
        ctx.problem, ctx.backend = problem, backend
        return out.value, out.rows, out.valid, out.red

    @staticmethod
    def backward(ctx, d_value, d_rows, _d_valid, _d_red):
        # raises if an input was modified in place
        q, g, scale, _q_ids, _g_ids, _labels, _q_mask, _g_mask, rows, valid, red, *state = ctx.saved_tensors
        out = ForwardOut(None, rows, valid, red, tuple(state))
        want = tuple(ctx.needs_input_grad[:3])
        # autograd runs a backward with grad mode off unless create_graph=True: only then is a
        # no_grad context needed (entering one costs a few us of a small call's host time)
        create_graph = torch.is_grad_enabled()
        with (torch.no_grad() if create_graph else contextlib.nullcontext()), without_autocast(q.device.type):
            dq, dg, d_scale = ctx.backend.backward(ctx.problem, out, d_value, d_rows, want)
        if d_scale is not None:
            d_scale = d_scale.to(scale.dtype)
        if create_graph:                     # the gradients may be differentiated
            grads = [(_RefuseDoubleBackward.apply(x, anchor) if x is not None else None)
                     for x, anchor in ((dq, q), (dg, g), (d_scale, scale))]
            dq, dg, d_scale = grads
        return dq, dg, d_scale, None, None
