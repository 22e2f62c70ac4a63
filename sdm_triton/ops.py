"""The loss as ``torch.library`` operators, for ``torch.compile(fullgraph=True)``.

Two pairs of operators run a backend's forward and backward, as `autograd.SDMFunction`
does in eager mode, connected by ``register_autograd``:

    sdm_triton::forward / backward              the Triton backend, as ``triton_op``s: the
                                                compiler traces their bodies (the launches go
                                                through ``wrap_triton``, sdm_triton.launch), so the
                                                compiled graph launches the kernels itself
    sdm_triton::forward_torch / backward_torch  the torch backend, as opaque ``custom_op``s
                                                (its chunk loops stay out of the graph and its
                                                numbers are eager's, bit for bit)

The backward gets the forward's state as saved tensors (no recomputation). The public API
uses these operators only while ``torch.compile`` traces; eager calls go straight to the
autograd Function (no dispatcher round trip). The loss's options travel as one string, their canonical name
(``SDMOptions.name()``), the kernel config likewise (``KernelConfig.name()``); both are parsed
once per name. The operators take the problem's fields in `Problem`'s order (`_FIELDS`, read
from its definition: torch.library infers the schema from the signature `_signed` gives),
flattened by `operator_args` and read back into a `Problem` by `_problem`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op, register_autograd, triton_op

from . import dispatch
from .backend import NUM_RED, ForwardOut
from .options import KernelConfig, SDMOptions, check_values, compute_dtype
from .problem import Problem

#: Why ``check_values=True`` cannot be part of a compiled graph (torch.compile's error shows it
#: under ``fullgraph=True``).
CHECK_VALUES_UNDER_COMPILE = (
    "sdm_triton: check_values=True reads the feature, label and logit_scale values on the host (a "
    "synchronisation), which a compiled graph cannot hold: torch.compile runs the check eagerly at a "
    "graph break, and torch.compile(fullgraph=True) refuses it. Under fullgraph=True pass "
    "check_values=False (a bad value then gives a NaN loss) and check the inputs outside the compiled "
    "function, e.g. with sdm_triton.check_finite")


def _compiler_disabled(fn, reason: str):
    try:   # torch >= 2.7 shows the reason in its error
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:
        return torch.compiler.disable(fn)


#: ``check_values=True`` while torch.compile traces (api.py): the check branches on device values,
#: so it cannot be traced; it runs outside the graph, eagerly, at a graph break, and raises the
#: same ValueError as in eager mode (the rest of the call stays in the graph). Under
#: ``fullgraph=True`` the compiler refuses the call while tracing, with the reason above. Built
#: here, not in api.py: ``torch.compiler.disable`` imports torch._dynamo, which this module
#: (imported only while compiling) does anyway.
check_values_outside_the_graph = _compiler_disabled(check_values, CHECK_VALUES_UNDER_COMPILE)

# Triton's presence is a constant while torch.compile traces `dispatch.resolve_name` (called, not
# traced). Marked here: a compiling call imports this module before it resolves the backend's
# name, and only such a call does (the mark's import of torch._dynamo costs ``import sdm_triton`` 1 s).
torch.compiler.assume_constant_result(dispatch._triton_importable)


#: How each type of `Problem` field travels through the operators: (its type in their signature,
#: what turns the field into that argument, what turns the argument back). The options and the
#: kernel config travel as their canonical names, parsed once per name.
_TRAVEL = {
    "torch.Tensor": (Tensor, None, None),
    "Optional[torch.Tensor]": (Optional[Tensor], None, None),
    "float": (float, None, None),
    "int": (int, None, None),
    "bool": (bool, None, None),
    "SDMOptions": (str, SDMOptions.name, SDMOptions.parse),
    "KernelConfig": (str, KernelConfig.name, KernelConfig.parse),
}
#: (name, argument type, to argument, from argument) of the problem's fields, in `Problem`'s order:
#: both operators of a pair take them (the backward after its own leading arguments). A field
#: added to `Problem` travels without an edit here (unless of a new type).
_FIELDS = tuple((f.name, *_TRAVEL[f.type]) for f in dataclasses.fields(Problem) if f.init)
#: the position of each field among the operators' problem arguments
_AT = {name: i for i, (name, *_) in enumerate(_FIELDS)}
#: the positions of the tensors among them (saved for the backward)
_TENSORS = tuple(i for i, (_, kind, _, _) in enumerate(_FIELDS) if kind in (Tensor, Optional[Tensor]))


def operator_args(p: Problem) -> tuple:
    """The operators' problem arguments of ``p``: the inverse of `_problem`."""
    return tuple(getattr(p, name) if to_arg is None else to_arg(getattr(p, name)) for name, _, to_arg, _ in _FIELDS)


def _problem(args) -> Problem:
    """The `Problem` of the operators' problem arguments: the inverse of `operator_args`."""
    return Problem(**{name: value if from_arg is None else from_arg(value)
                      for (name, _, _, from_arg), value in zip(_FIELDS, args)})


def _signed(fn, leading, trailing, returns):
    """``fn`` with the signature torch.library infers the operator's schema from: the ``leading``
    (name, type) arguments, the problem's fields, the ``trailing`` ones."""
    params = [*leading, *((name, kind) for name, kind, _, _ in _FIELDS), *trailing]
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind) for name, kind in params],
        return_annotation=returns)
    return fn


def _forward_function(body: Callable[[Problem], Tuple]):
    """``body(problem)`` as a function of the forward operators' arguments, the problem's fields.
    Outputs: (value, rows, valid, red, state), `backend.ForwardOut` with the state as a list."""
    def forward(*args):
        return body(_problem(args))
    return _signed(forward, (), (), Tuple[Tensor, Tensor, Tensor, Tensor, List[Tensor]])


def _backward_function(body: Callable[..., Tuple]):
    """``body(problem, forward_out, d_value, d_rows, want)`` as a function of the backward
    operators' arguments: the gradients of (value, rows), the forward's outputs but the value,
    the forward's arguments, and which of (dq, dg, d_scale) to compute. Outputs (dq, dg,
    d_scale); a gradient that was not asked for comes back as an empty tensor."""
    def backward(d_value, d_rows, rows, valid, red, state, *args):
        *fields, want_q, want_g, want_scale = args
        return body(_problem(fields), ForwardOut(None, rows, valid, red, tuple(state)), d_value, d_rows,
                    (want_q, want_g, want_scale))
    leading = (("d_value", Optional[Tensor]), ("d_rows", Optional[Tensor]), ("rows", Tensor), ("valid", Tensor),
               ("red", Tensor), ("state", List[Tensor]))
    trailing = (("want_q", bool), ("want_g", bool), ("want_scale", bool))
    return _signed(backward, leading, trailing, Tuple[Tensor, Tensor, Tensor])


def _launches(backend: str):
    """The Triton backend's launches are traced (wrap_triton) inside these operators only."""
    if backend == "triton":
        from .launch import traceable_launches
        return traceable_launches()
    return contextlib.nullcontext()


def _unaliased(outputs, inputs):
    """``outputs`` with a copy of each tensor that shares memory with one of ``inputs`` or with an
    earlier output: a custom operator's outputs may alias neither (the torch backend's state can
    hold the scale itself, its q_hat and g_hat are views of one buffer, and so are its dq and dg),
    nor start inside a buffer where the fake implementation's start at 0. Real tensors only (it
    reads their storage)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    result = []
    for t in outputs:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t.storage_offset():
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        result.append(t)
    return result


def _run_forward(backend: str):
    def run(p: Problem):
        with torch.autocast(p.q.device.type, enabled=False), _launches(backend):
            out = dispatch.pick_backend(backend, p.q).forward(p)
        if backend == "torch":     # opaque, on real tensors (the Triton backend's body is traced)
            value, rows, valid, red, *state = _unaliased((out.value, out.rows, out.valid, out.red, *out.state),
                                                         operator_args(p))
            return value, rows, valid, red, state
        # an operator's outputs may not alias its inputs (a state may hold the scale itself)
        state = [t.clone() if (p.scale is not None and t is p.scale) else t for t in out.state]
        return out.value, out.rows, out.valid, out.red, state
    return run


def _run_backward(backend: str):
    def run(p: Problem, out: ForwardOut, d_value, d_rows, want):
        with torch.autocast(p.q.device.type, enabled=False), _launches(backend):
            dq, dg, d_scale = dispatch.pick_backend(backend, p.q).backward(p, out, d_value, d_rows, want)
        empty = p.q.new_empty(0)
        grads = (dq if dq is not None else empty, dg if dg is not None else empty,
                 d_scale.reshape(()).float() if d_scale is not None else empty.float())
        if backend == "torch":     # its dq and dg can be views of one buffer
            grads = tuple(_unaliased(grads, (*operator_args(p), d_value, d_rows, out.rows, out.valid, out.red,
                                             *out.state)))
        return grads
    return run


def _forward_fake(p: Problem):
    """The torch backend's forward on fake tensors: the outputs' shapes and dtypes."""
    ct = compute_dtype(p.q.dtype)
    q, n, m, d, k, ndr = p.q, p.n, p.m, p.d, p.galleries, p.num_rows
    value = q.new_empty(() if p.scalar_value else (k,), dtype=ct)
    rows, valid = q.new_empty(ndr, dtype=ct), q.new_empty(ndr, dtype=torch.bool)
    red = q.new_empty((NUM_RED, k), dtype=ct)
    state = [q.new_empty(ndr, dtype=ct), q.new_empty(ndr, dtype=ct), q.new_empty(ndr, dtype=ct),
             q.new_empty((k, m, d), dtype=ct), q.new_empty((n, d), dtype=ct), q.new_empty((), dtype=ct)]
    return value, rows, valid, red, state


def _backward_fake(p: Problem, out: ForwardOut, d_value, d_rows, want):
    want_q, want_g, want_scale = want
    empty = p.q.new_empty(0)
    return (torch.empty_like(p.q) if want_q else empty, torch.empty_like(p.g) if want_g else empty,
            p.q.new_empty((), dtype=torch.float32) if want_scale else empty.float())


# the Triton backend: triton_op, traced by the compiler (its launches through wrap_triton)
sdm_forward_op = triton_op("sdm_triton::forward", _forward_function(_run_forward("triton")), mutates_args=())
sdm_backward_op = triton_op("sdm_triton::backward", _backward_function(_run_backward("triton")), mutates_args=())

# the torch backend: opaque custom_op, with fake (meta) implementations for the compiler
sdm_forward_torch_op = custom_op("sdm_triton::forward_torch", _forward_function(_run_forward("torch")),
                                 mutates_args=())
sdm_forward_torch_op.register_fake(_forward_function(_forward_fake))
sdm_backward_torch_op = custom_op("sdm_triton::backward_torch", _backward_function(_run_backward("torch")),
                                  mutates_args=())
sdm_backward_torch_op.register_fake(_backward_function(_backward_fake))


# ------------------------------------------------------------------ autograd of both

def _make_backward(backward_op):
    def backward(ctx, d_value, d_rows, _d_valid, _d_red, _d_state):
        saved = ctx.saved_tensors
        args = list(ctx.settings)
        for i, t in zip(_TENSORS, saved):
            args[i] = t
        rows, valid, red, *state = saved[len(_TENSORS):]
        want_q, want_g, want_scale = (ctx.needs_input_grad[_AT[name]] for name in ("q", "g", "scale"))
        dq, dg, d_scale = backward_op(d_value, d_rows, rows, valid, red, state, *args, want_q, want_g, want_scale)
        grads = [None] * len(_FIELDS)
        grads[_AT["q"]] = dq if want_q else None
        grads[_AT["g"]] = dg if want_g else None
        grads[_AT["scale"]] = d_scale.to(args[_AT["scale"]].dtype) if want_scale else None
        return tuple(grads)
    return backward


def _setup_context(ctx, inputs, output):
    _value, rows, valid, red, state = output
    ctx.save_for_backward(*(inputs[i] for i in _TENSORS), rows, valid, red, *state)
    # the arguments that are not tensors (scale_value, options, config, ...), in place; None for the tensors
    ctx.settings = tuple(None if i in _TENSORS else x for i, x in enumerate(inputs))
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(valid, red)


register_autograd("sdm_triton::forward", _make_backward(sdm_backward_op), setup_context=_setup_context)
register_autograd("sdm_triton::forward_torch", _make_backward(sdm_backward_torch_op), setup_context=_setup_context)


def forward_op(backend_name: str):
    """The forward operator of a resolved backend name ("triton" or "torch"); it takes
    `operator_args` of the problem."""
    return sdm_forward_op if backend_name == "triton" else sdm_forward_torch_op
