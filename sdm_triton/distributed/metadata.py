"""Validation of one rank's call and the cross-rank agreement check, before any other collective.

A rank that raised while every other rank entered a collective would leave them waiting
until the group's timeout. So a call first validates every argument the host can see
(`check_local`: types, shapes, devices, option strings, ``workspace_bytes``,
``kernel_config``, the backend, the scale), catching the error instead of raising it, then
all ranks exchange one small metadata vector (`exchange`): whether the rank's arguments were
valid, its local sizes, and what must agree across ranks (D, dtype, options, the logit
scale's value, the requires_grad flags that decide whether the backward's collectives run).
After the exchange every rank knows the same things and raises together: the failing rank
its own TypeError / ValueError, the others a ValueError naming the failing ranks.
``check_values=True`` reads the values on each rank and exchanges the outcome the same way
(`check_values_everywhere`).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import dispatch
from ..options import (
    KernelConfig,
    SDMOptions,
    as_kernel_config,
    check_choice,
    check_values as _check_values,
    comparable_ids,
    resolve_ids,
    resolve_scale,
    validate_flag,
    validate_inputs,
    validate_workspace_bytes,
)
from .comm import Comm, all_gather_rows, all_gather_single

STRATEGIES = ("allgather", "ring")
LAYOUTS = ("global", "local_rows")
#: "ddp" (default): q, g gradients times the world size, right after DDP / FSDP averaging;
#: "unscaled": each rank's q, g get d(objective)/d(its rows) as they are (`sdm_loss_distributed`).
GRAD_CONVENTIONS = ("ddp", "unscaled")
#: earlier name of "unscaled" (the default of 0.1), still accepted
GRAD_CONVENTION_ALIASES = {"global": "unscaled"}
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}


@dataclasses.dataclass(frozen=True)
class Call:
    """One rank's validated arguments (ids resolved: the paired-batch default applied)."""

    q: torch.Tensor
    g: torch.Tensor
    q_ids: Optional[torch.Tensor]
    g_ids: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    q_mask: Optional[torch.Tensor]
    g_mask: Optional[torch.Tensor]
    temperature: float
    logit_scale: Union[None, float, torch.Tensor]
    scale: Union[float, torch.Tensor]        # resolve_scale: a float, or a 0-dim tensor on q's device
    opts: SDMOptions
    backend_name: str                        # as the caller gave it ("auto", "triton", "torch")
    backend: Any                             # the backend object it resolves to on this rank
    strategy: str
    layout: str
    grad_convention: str                     # canonical ("ddp" or "unscaled")
    check_values: bool
    return_stats: bool
    config: KernelConfig
    workspace_bytes: int


def grad_convention_name(value) -> str:
    """The canonical name of a grad_convention (an alias maps to it); ValueError otherwise."""
    if isinstance(value, str) and value in GRAD_CONVENTION_ALIASES:
        return GRAD_CONVENTION_ALIASES[value]
    return check_choice("grad_convention", value, GRAD_CONVENTIONS)


def check_options(*, strategy, layout, grad_convention, temperature, logit_scale, kl, eps, direction, combine,
                  reduction, normalize, backend, check_values, return_stats, kernel_config, workspace_bytes,
                  features: Optional[torch.Tensor] = None):
    """Every argument that is not a tensor of the batch (also used by `SDMLossDistributed` at
    construction). Returns (options, canonical grad_convention, KernelConfig)."""
    check_choice("strategy", strategy, STRATEGIES)
    check_choice("layout", layout, LAYOUTS)
    convention = grad_convention_name(grad_convention)
    if layout == "local_rows" and strategy != "allgather":
        raise ValueError("layout='local_rows' gathers the other side's features: use strategy='allgather'")
    opts = SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction, normalize=normalize)
    dispatch.check_backend_name(backend)
    validate_flag("check_values", check_values)
    validate_flag("return_stats", return_stats)
    validate_workspace_bytes(workspace_bytes)
    config = as_kernel_config(kernel_config)
    resolve_scale(temperature, logit_scale, features if features is not None else torch.empty(0), move=False)
    return opts, convention, config


def check_local(q, g, q_ids, g_ids, labels, q_mask, g_mask, *, strategy, layout, grad_convention, temperature,
                logit_scale, kl, eps, direction, combine, reduction, normalize, backend, check_values,
                return_stats, kernel_config, workspace_bytes) -> Call:
    """This rank's arguments, validated without reading device memory; raises TypeError /
    ValueError naming the argument. ``labels`` is [N_local, M_global]: its width is checked
    against the global M after the exchange."""
    opts, convention, config = check_options(
        strategy=strategy, layout=layout, grad_convention=grad_convention, temperature=temperature,
        logit_scale=logit_scale, kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction,
        normalize=normalize, backend=backend, check_values=check_values, return_stats=return_stats,
        kernel_config=kernel_config, workspace_bytes=workspace_bytes,
        features=q if isinstance(q, torch.Tensor) else None)
    probe = labels
    if isinstance(labels, torch.Tensor) and isinstance(q, torch.Tensor) and isinstance(g, torch.Tensor):
        if labels.dim() != 2 or labels.shape[0] != q.shape[0] or labels.shape[1] < 1:
            raise ValueError(f"labels must have shape [N_local, M_global] = [{q.shape[0]}, sum of every rank's "
                             f"g rows] (this rank's rows of the global label matrix), got {tuple(labels.shape)}")
        if g.dim() == 2:   # the width is checked against the global M after the metadata exchange
            probe = labels[:, :1].expand(labels.shape[0], g.shape[0])
    if labels is None:
        q_ids, g_ids = resolve_ids(q, g, q_ids, g_ids)
    validate_inputs(q, g, q_ids, g_ids, probe, q_mask, g_mask)
    q_ids, g_ids = comparable_ids(q_ids, g_ids)
    be = dispatch.pick_backend(backend, q)
    scale = resolve_scale(temperature, logit_scale, q)
    return Call(q, g, q_ids, g_ids, labels, q_mask, g_mask, temperature, logit_scale, scale, opts, backend, be,
                strategy, layout, convention, check_values, return_stats, config, workspace_bytes)


def _crc(value) -> int:
    return zlib.crc32(repr(value).encode())


def _exchange_device(group, q) -> torch.device:
    """Where the metadata vector lives: the device the group's backend communicates from."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" or not isinstance(q, torch.Tensor):
        return torch.device("cpu")
    return q.device


def _fields(call: Call):
    """(name, this rank's value as an int, shown value) compared across ranks."""
    q, logit_scale = call.q, call.logit_scale
    grad_on = torch.is_grad_enabled()
    flags = (grad_on and q.requires_grad, grad_on and call.g.requires_grad,
             grad_on and isinstance(logit_scale, torch.Tensor) and logit_scale.requires_grad)
    options = dict(kl=call.opts.kl, eps=float(call.opts.eps), direction=call.opts.direction,
                   combine=call.opts.combine, reduction=call.opts.reduction, normalize=call.opts.normalize,
                   strategy=call.strategy, layout=call.layout, grad_convention=call.grad_convention,
                   backend=call.backend.name, check_values=call.check_values, return_stats=call.return_stats,
                   temperature=None if logit_scale is not None else float(call.temperature))
    fields = [("D", q.shape[1], q.shape[1]), ("dtype", _DTYPE_CODES[q.dtype], str(q.dtype)),
              ("device type", _crc(q.device.type), q.device.type),
              ("label kind (ids or labels)", int(call.labels is not None),
               "labels" if call.labels is not None else "ids"),
              ("requires_grad of (q, g, logit_scale)", flags[0] + 2 * flags[1] + 4 * flags[2], flags)]
    return fields + [(k, _crc(v), v) for k, v in options.items()]


_NUM_FIELDS = 5 + 13


def exchange(group, call: Optional[Call], error: Optional[BaseException]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """All-gather (ok, N_r, M_r, label width, fields..., logit scale bits) and check agreement on
    every rank; raise on every rank if any rank's arguments were invalid or ranks disagree.
    The one host synchronisation of a call (the uneven sizes allocate the buffers). Returns
    every rank's (N_r, ...), (M_r, ...)."""
    ok = error is None
    q = call.q if ok else None
    device = _exchange_device(group, q)
    world = dist.get_world_size(group)
    fields = _fields(call) if ok else [("", 0, None)] * _NUM_FIELDS
    assert len(fields) == _NUM_FIELDS
    head = [int(ok), q.shape[0] if ok else 0, call.g.shape[0] if ok else 0,
            call.labels.shape[1] if ok and call.labels is not None else -1]
    meta = torch.tensor(head + [v for _, v, _ in fields], dtype=torch.int64, device=device)
    scale_bits = torch.zeros(1, dtype=torch.int64, device=device)
    if ok and call.logit_scale is not None:   # the value of the logit scale must agree as well (no host read here)
        s = call.logit_scale
        s = s.detach().to(device=device, dtype=torch.float64) if isinstance(s, torch.Tensor) else \
            torch.tensor(float(s), dtype=torch.float64, device=device)
        scale_bits = s.reshape(1).view(torch.int64)
    meta = torch.cat([meta, scale_bits])
    out = torch.empty(world * meta.numel(), dtype=torch.int64, device=device)
    all_gather_single(out, meta, group=group)
    table = out.view(world, -1).tolist()     # the one host synchronisation of the call

    if error is not None:
        raise error
    bad = [r for r, row in enumerate(table) if row[0] == 0]
    if bad:
        raise ValueError(f"sdm_loss_distributed: rank(s) {bad} rejected their inputs (see the error raised "
                         "there); every rank stops")
    names = [f[0] for f in fields] + ["logit_scale value"]
    shown = [f[2] for f in fields] + [None]
    for i, name in enumerate(names):
        col = [row[4 + i] for row in table]
        if len(set(col)) > 1:
            this = f" (this rank: {shown[i]!r})" if shown[i] is not None else ""
            per_rank = f"; per rank: {col}" if name == "D" else ""
            raise ValueError(f"sdm_loss_distributed: ranks disagree on {name}{this}{per_rank}. "
                             "Every rank must pass the same D, dtype, device type, options and logit scale, "
                             "and the same requires_grad for q, g and logit_scale")
    q_sizes = tuple(row[1] for row in table)
    g_sizes = tuple(row[2] for row in table)
    widths = [row[3] for row in table]
    if call.labels is not None and any(w != sum(g_sizes) for w in widths):
        raise ValueError(f"sdm_loss_distributed: labels must be [N_local, M_global] with M_global = "
                         f"{sum(g_sizes)} (the g rows of all ranks); label widths per rank: {widths}")
    return q_sizes, g_sizes


def check_values_everywhere(call: Call, comm: Comm) -> None:
    """``check_values=True``: each rank reads its values (present samples' features, labels on
    pairs of present samples, a logit-scale tensor) and every rank raises if any rank found a
    problem. The label columns' presence is that of every rank's g rows (gathered)."""
    g_mask_all = None
    if call.labels is not None:   # every rank gathers (the label kind agrees), before any check can raise
        present = call.g_mask if call.g_mask is not None else \
            torch.ones(call.g.shape[0], dtype=torch.bool, device=call.g.device)
        g_mask_all = all_gather_rows(present.to(torch.uint8), comm.g_sizes, comm).bool()
    error = None
    try:
        _check_values(call.q, call.g, None, call.scale, call.q_mask, call.g_mask)
        if g_mask_all is not None:
            # the features were checked above: empty stand-ins, so that only the labels are read
            _check_values(call.q.new_zeros((call.q.shape[0], 0)), call.q.new_zeros((g_mask_all.shape[0], 0)),
                          call.labels, None, call.q_mask, g_mask_all)
    except ValueError as exc:
        error = exc
    flag = torch.tensor([int(error is not None)], dtype=torch.int64, device=call.q.device)
    bad = [r for r, f in enumerate(all_gather_rows(flag, [1] * comm.world, comm).tolist()) if f]
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"sdm_loss_distributed: check_values found a problem on rank(s) {bad} (see the error "
                         "raised there); every rank stops")
