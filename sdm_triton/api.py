"""Public API: ``sdm_loss``, ``sdm_loss_multi`` and ``SDMLoss``.

Each call: validate (types, shapes, dtypes, devices only: no host synchronisation) ->
one `problem.Problem` -> the backend (`dispatch.py`) under one autograd Function
(`autograd.py`; a ``torch.library`` op while ``torch.compile`` traces, `ops.py`) -> the
returned value, per-row losses or statistics, as views of the kernels' outputs.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional, Union

import torch

from . import dispatch
from .autograd import SDMFunction
from .backend import RED
from .galleries import Galleries, resolve_gallery_ids, stack_galleries
from .options import (
    KernelConfig,
    SDMOptions,
    SDMRowLosses,
    SDMStats,
    as_kernel_config,
    check_values as _check_values,
    comparable_ids,
    resolve_ids,
    resolve_scale,
    validate_features,
    validate_flag,
    validate_inputs,
    validate_workspace_bytes,
)
from .problem import Problem
from .reduction import stats_from_red

BACKENDS = dispatch.BACKENDS
#: Bound on the chunked backward's workspace (and the torch backend's chunks), in bytes.
DEFAULT_WORKSPACE_BYTES = 64 * 2**20


@functools.lru_cache(maxsize=256, typed=True)   # typed: eps=True must not hit eps=1.0
def _cached_options(kl, eps, direction, combine, reduction, normalize) -> SDMOptions:
    return SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction,
                      normalize=normalize)


def _options(kl, eps, direction, combine, reduction, normalize) -> SDMOptions:
    """Options validated once per combination (a training loop calls with the same ones); built
    afresh while torch.compile traces (it does not follow the cache)."""
    if torch.compiler.is_compiling():
        return SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction,
                          normalize=normalize)
    try:
        return _cached_options(kl, eps, direction, combine, reduction, normalize)
    except TypeError:   # an unhashable option value: validate it uncached (it raises)
        return SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction,
                          normalize=normalize)


def sdm_loss(
    q: torch.Tensor,
    g: torch.Tensor,
    q_ids: Optional[torch.Tensor] = None,
    g_ids: Optional[torch.Tensor] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    q_mask: Optional[torch.Tensor] = None,
    g_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.02,
    logit_scale: Union[None, float, torch.Tensor] = None,
    kl: str = "forward",
    eps: float = 1e-8,
    direction: str = "both",
    combine: str = "mean",
    reduction: str = "mean",
    normalize: bool = True,
    backend: str = "auto",
    check_values: bool = False,
    return_stats: bool = False,
    kernel_config: Union[None, str, KernelConfig] = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
):
    """SDM loss of query features ``q`` [N, D] against gallery features ``g`` [M, D].

    Same arguments and semantics as ``sdm_triton.reference.sdm_loss`` (docs/contract.md), plus:

    backend:         "auto" (Triton kernels for CUDA tensors, the torch backend otherwise),
                     "triton" or "torch".
    check_values:    also check (a host synchronisation) that present samples' features are
                     finite, labels of present pairs finite and >= 0, a logit_scale tensor > 0;
                     a ValueError names the problem. Without it such values give a NaN loss.
                     Under torch.compile the check runs at a graph break (same ValueError);
                     torch.compile(fullgraph=True) refuses it while tracing, naming check_values.
    return_stats:    return ``(loss, SDMStats)``.
    kernel_config:   expert knobs of the Triton kernels (``KernelConfig`` or its name), for
                     benchmarks and tests.
    workspace_bytes: bound on the large-problem backward's workspace; memory beyond inputs and
                     gradients is O(N + M) plus O((N + M) D) operands plus this.
    """
    opts = _options(kl, eps, direction, combine, reduction, normalize)
    config = _check_call(q, temperature, logit_scale, backend, check_values, return_stats, kernel_config,
                         workspace_bytes)
    q_ids, g_ids = resolve_ids(q, g, q_ids, g_ids)
    validate_inputs(q, g, q_ids, g_ids, labels, q_mask, g_mask)
    q_ids, g_ids = comparable_ids(q_ids, g_ids)
    p = _problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, temperature=temperature, logit_scale=logit_scale,
                 options=opts, config=config, workspace_bytes=workspace_bytes, galleries=1, scalar_value=True,
                 return_stats=return_stats)
    return _compute(p, backend, check_values)


def sdm_loss_multi(
    q: torch.Tensor,
    gs: Galleries,
    q_ids: Optional[torch.Tensor] = None,
    g_ids=None,
    *,
    labels=None,
    q_mask: Optional[torch.Tensor] = None,
    g_mask=None,
    temperature: float = 0.02,
    logit_scale: Union[None, float, torch.Tensor] = None,
    kl: str = "forward",
    eps: float = 1e-8,
    direction: str = "both",
    combine: str = "mean",
    reduction: str = "mean",
    normalize: bool = True,
    backend: str = "auto",
    check_values: bool = False,
    return_stats: bool = False,
    kernel_config: Union[None, str, KernelConfig] = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
):
    """SDM losses of one anchor ``q`` [N, D] against K galleries, in one call.

    Returns a [K] tensor whose k-th entry equals ``sdm_loss(q, gs[k], q_ids, g_ids[k], ...)``
    (``.sum()`` is ReID5o's total of 15 losses), or for ``reduction="none"`` an SDMRowLosses
    with [K, N] and [K, M] fields. ``gs``: a [K, M, D] tensor or K tensors [M, D]; ``g_ids``,
    ``labels``, ``g_mask``: one shared by all galleries ([M], [N, M], [M]), stacked
    ([K, M], [K, N, M], [K, M]) or K tensors (``sdm_triton.galleries``). Other arguments as
    in :func:`sdm_loss`; ``return_stats=True`` also returns an SDMStats whose fields are [K]
    (one per gallery; the anchor's norms 0-dim). The kernels run all K galleries in the
    launches of one loss.
    """
    opts = _options(kl, eps, direction, combine, reduction, normalize)
    config = _check_call(q, temperature, logit_scale, backend, check_values, return_stats, kernel_config,
                         workspace_bytes)
    validate_features(q)
    g, labels, g_mask, k, per_gallery = stack_galleries(gs, g_ids, labels, g_mask)
    q_ids, g_ids, ids_k = resolve_gallery_ids(q, per_gallery, q_ids, g_ids)
    for g_k, ids, labels_k, mask_k in zip(per_gallery.gs, ids_k, per_gallery.labels, per_gallery.g_mask):
        validate_inputs(q, g_k, q_ids, ids, labels_k, q_mask, mask_k)
    p = _problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, temperature=temperature, logit_scale=logit_scale,
                 options=opts, config=config, workspace_bytes=workspace_bytes, galleries=k, scalar_value=False,
                 return_stats=return_stats)
    return _compute(p, backend, check_values)


def _check_call(q, temperature, logit_scale, backend, check_values, return_stats, kernel_config,
                workspace_bytes) -> KernelConfig:
    """Every host-visible argument beyond the tensors, checked before any tensor op runs."""
    if isinstance(q, torch.Tensor):
        resolve_scale(temperature, logit_scale, q, move=False)
    dispatch.check_backend_name(backend)
    validate_flag("check_values", check_values)
    validate_flag("return_stats", return_stats)
    validate_workspace_bytes(workspace_bytes)
    return as_kernel_config(kernel_config)


def _problem(q, g, q_ids, g_ids, labels, q_mask, g_mask, *, temperature, logit_scale, options, config,
             workspace_bytes, galleries, scalar_value, return_stats) -> Problem:
    """The call's `Problem` (validated arguments), its logit scale resolved on the features'
    device: a 0-dim tensor, or a float (``scale_value``)."""
    scale = resolve_scale(temperature, logit_scale, q)
    scale_t = scale if isinstance(scale, torch.Tensor) else None
    return Problem(q=q, g=g, q_ids=q_ids, g_ids=g_ids, labels=labels, q_mask=q_mask, g_mask=g_mask, scale=scale_t,
                   scale_value=float(scale) if scale_t is None else 0.0, options=options, config=config,
                   workspace_bytes=workspace_bytes, galleries=galleries, scalar_value=scalar_value,
                   return_stats=return_stats)


def _compute(p: Problem, backend: str, check_values: bool):
    if torch.compiler.is_compiling():
        # the graph gets the backend's operator (ops.py)
        from . import ops
        if check_values:   # outside the graph, at a graph break (ops.py; it was skipped before issue 26)
            ops.check_values_outside_the_graph(p.q, p.g, p.labels, p.scale if p.scale is not None else p.scale_value,
                                               p.q_mask, p.g_mask)
        value, rows, valid, red, _ = ops.forward_op(dispatch.resolve_name(backend, p.q))(*ops.operator_args(p))
    else:
        be = dispatch.pick_backend(backend, p.q)
        if check_values:
            _check_values(p.q, p.g, p.labels, p.scale if p.scale is not None else p.scale_value, p.q_mask, p.g_mask)
        value, rows, valid, red = SDMFunction.apply(p.q, p.g, p.scale, p, be)
    return _result(p, value, rows, valid, red)


def _result(p: Problem, value, rows, valid, red):
    """What the caller asked for, as views of the backend's outputs (module doc)."""
    o, n, m, k = p.options, p.n, p.m, p.galleries
    if o.reduction != "none" and not p.return_stats:
        return value
    q_shape, g_shape = ((n,), (m,)) if p.scalar_value else ((k, n), (k, m))
    out = value
    if o.reduction == "none":
        q2g, q2g_ok = rows[:k * n].view(q_shape), valid[:k * n].view(q_shape)
        g2q, g2q_ok = rows[k * n:].view(g_shape), valid[k * n:].view(g_shape)
        out = SDMRowLosses(q2g if o.wants_q2g else None, g2q if o.wants_g2q else None,
                           q2g_ok if o.wants_q2g else None, g2q_ok if o.wants_g2q else None)
    if not p.return_stats:
        return out
    return out, _stats(p.scalar_value, red)


def _stats(scalar: bool, red) -> SDMStats:
    red = red.detach()
    per_gallery = red[:, 0] if scalar else red        # the anchor's norms: 0-dim either way
    return stats_from_red(per_gallery, red[RED.q_norm_mean, 0], red[RED.q_norm_max, 0],
                          per_gallery[RED.g_norm_mean], per_gallery[RED.g_norm_max])


class SDMLoss(torch.nn.Module):
    """``nn.Module`` over :func:`sdm_loss`, holding its options (validated at construction)."""

    def __init__(self, *, temperature: float = 0.02, kl: str = "forward", eps: float = 1e-8,
                 direction: str = "both", combine: str = "mean", reduction: str = "mean",
                 normalize: bool = True, backend: str = "auto", check_values: bool = False,
                 kernel_config: Union[None, str, KernelConfig] = None,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
        super().__init__()
        _options(kl, eps, direction, combine, reduction, normalize)       # fail early on bad options
        resolve_scale(temperature, None, torch.empty(0))
        dispatch.check_backend_name(backend)
        validate_flag("check_values", check_values)
        as_kernel_config(kernel_config)
        validate_workspace_bytes(workspace_bytes)
        self.temperature = temperature
        self.options = dict(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction,
                            normalize=normalize, backend=backend, check_values=check_values,
                            kernel_config=kernel_config, workspace_bytes=workspace_bytes)

    def forward(self, q, g, q_ids=None, g_ids=None, *, labels=None, q_mask=None, g_mask=None,
                logit_scale=None, return_stats=False):
        return sdm_loss(q, g, q_ids, g_ids, labels=labels, q_mask=q_mask, g_mask=g_mask,
                        temperature=self.temperature, logit_scale=logit_scale,
                        return_stats=return_stats, **self.options)

    def extra_repr(self):
        shown = {k: v for k, v in self.options.items() if k not in ("kernel_config", "workspace_bytes")}
        return f"temperature={self.temperature}, " + ", ".join(f"{k}={v!r}" for k, v in shown.items())


def describe_path(q, g, q_ids=None, g_ids=None, *, backend: str = "auto", kernel_config=None, galleries: int = 1,
                  **loss_kwargs) -> str:
    """Which implementation ``sdm_loss(q, g, ..., backend=backend)`` runs (for benchmark notes);
    ``galleries``: the K of an ``sdm_loss_multi`` call with ``g`` as its gallery. The path
    depends on the sizes, the dtype and ``kernel_config``; ``loss_kwargs`` are the rest of
    ``sdm_loss``'s keyword arguments (a name it does not take raises TypeError)."""
    unknown = sorted(set(loss_kwargs) - _LOSS_KEYWORDS)
    if unknown:
        raise TypeError(f"describe_path() got keyword arguments that sdm_loss does not take: {unknown}")
    be = dispatch.pick_backend(backend, q)
    if be.name != "triton":
        return be.name
    from .launch import describe_path as triton_path
    p = _problem(q, g, None, None, None, None, None, temperature=1.0, logit_scale=None, options=SDMOptions(),
                 config=as_kernel_config(kernel_config), workspace_bytes=DEFAULT_WORKSPACE_BYTES, galleries=galleries,
                 scalar_value=True, return_stats=False)
    return triton_path(p)


_LOSS_KEYWORDS = frozenset(inspect.signature(sdm_loss).parameters)


__all__ = ["sdm_loss", "sdm_loss_multi", "SDMLoss", "SDMStats", "SDMRowLosses", "BACKENDS", "describe_path"]
