"""Public API: ``sdm_loss`` and ``SDMLoss``, with backend dispatch and the final reduction in torch."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from .reference.galleries import Galleries, split_galleries
from .options import (
    SDMOptions,
    SDMRowLosses,
    SDMStats,
    check_values as _check_values,
    resolve_ids,
    resolve_scale,
    validate_inputs,
)

from . import ops
from .autograd import DEFAULT_WORKSPACE_BYTES, SDMRowsFunction
from .torch_backend import TorchTiles

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def _triton_tiles(config_name: Optional[str]):
    from .launch import TILE_CONFIGS, TritonTiles  # imports triton: only when asked for
    if config_name is None:
        return TritonTiles()
    if config_name not in TILE_CONFIGS:
        raise ValueError(f"unknown tile config {config_name!r}; choose from {sorted(TILE_CONFIGS)}")
    return TritonTiles(TILE_CONFIGS[config_name], config_name)


def _pick_tiles(backend: str, q: torch.Tensor, tile_config: Optional[str]):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "auto":
        backend = "triton" if (q.is_cuda and q.dtype != torch.float64) else "torch"
    if backend == "torch":
        return TorchTiles()
    tiles = _triton_tiles(tile_config)
    tiles.check_supported(q)
    return tiles


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
    logit_scale: Optional[torch.Tensor] = None,
    kl: str = "forward",
    eps: float = 1e-8,
    direction: str = "both",
    combine: str = "mean",
    reduction: str = "mean",
    normalize: bool = True,
    backend: str = "auto",
    check_values: bool = False,
    return_stats: bool = False,
    tile_config: Optional[str] = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
):
    """SDM loss of query features ``q`` [N, D] against gallery features ``g`` [M, D].

    Same arguments and semantics as ``reference.sdm_loss`` (see SPEC.md), plus:

    backend:         "auto" (Triton kernels for CUDA tensors, the chunked torch backend otherwise),
                     "triton" or "torch".
    check_values:    also check that features are finite, labels >= 0 and a tensor logit_scale > 0.
                     These checks read device memory (a host synchronisation), so they are off by default.
    return_stats:    return ``(loss, SDMStats)``.
    tile_config:     name of a Triton tile variant (``sdm_triton.launch.TILE_CONFIGS``), for benchmarks.
    workspace_bytes: bound on the per-chunk workspace; memory beyond inputs and gradients is
                     O(N + M) plus this.
    """
    opts = SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine,
                      reduction=reduction, normalize=normalize)
    q_ids, g_ids = resolve_ids(q, g, q_ids, g_ids)
    validate_inputs(q, g, q_ids, g_ids, labels, q_mask, g_mask)
    scale = resolve_scale(temperature, logit_scale, q)
    if check_values:
        _check_values(q, g, labels, scale, q_mask, g_mask)
    tiles = _pick_tiles(backend, q, tile_config)
    rows = _row_losses(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, opts, tiles, tile_config, workspace_bytes)
    return _reduce(rows, opts, return_stats, q, g, q_mask, g_mask)


def _row_losses(q, g, q_ids, g_ids, labels, q_mask, g_mask, scale, opts, tiles, tile_config, workspace_bytes,
                galleries: int = 1):
    """(loss_q, loss_g, valid_q, valid_g, pos_q, pos_g) of the per-row losses (q-side [K, N] with K galleries)."""
    logit_scale_t = scale if isinstance(scale, torch.Tensor) else None
    scale_value = 0.0 if logit_scale_t is not None else scale
    if torch.compiler.is_compiling():
        # torch.compile sees one custom op with a registered backward (no graph break)
        return ops.sdm_rows(
            q, g, logit_scale_t, scale_value, q_ids, g_ids, labels, q_mask, g_mask, opts.kl, float(opts.eps),
            opts.normalize, tiles.name, tile_config or "", int(workspace_bytes), int(galleries))[:6]
    return SDMRowsFunction.apply(q, g, logit_scale_t, scale_value, q_ids, g_ids, labels, q_mask, g_mask, opts,
                                 tiles, workspace_bytes, galleries)


def _reduce(rows, opts: SDMOptions, return_stats: bool, q, g, q_mask, g_mask):
    """The returned value from the per-row losses (reduced along the last dim), with SDMStats
    when asked; ``rows`` = (loss_q, loss_g, valid_q, valid_g, pos_q, pos_g)."""
    loss_q, loss_g, valid_q, valid_g, pos_q, pos_g = rows
    out = reduce_rows(
        loss_q if opts.wants_q2g else None, valid_q if opts.wants_q2g else None,
        loss_g if opts.wants_g2q else None, valid_g if opts.wants_g2q else None, opts)
    if not return_stats:
        return out
    return out, _stats(q, g, q_mask, g_mask, valid_q, valid_g, pos_q, pos_g)


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
    logit_scale: Optional[torch.Tensor] = None,
    kl: str = "forward",
    eps: float = 1e-8,
    direction: str = "both",
    combine: str = "mean",
    reduction: str = "mean",
    normalize: bool = True,
    backend: str = "auto",
    check_values: bool = False,
    return_stats: bool = False,
    tile_config: Optional[str] = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
):
    """SDM losses of one anchor ``q`` [N, D] against K galleries, in one call.

    Returns a [K] tensor whose k-th entry equals ``sdm_loss(q, gs[k], q_ids, g_ids[k], ...)``
    (``.sum()`` is ReID5o's total of 15 losses), or for ``reduction="none"`` an SDMRowLosses
    with [K, N] and [K, M] fields. ``gs``: a [K, M, D] tensor or K tensors [M, D]; ``g_ids``,
    ``labels``, ``g_mask``: one shared by all galleries ([M], [N, M], [M]), stacked
    ([K, M], [K, N, M], [K, M]) or K tensors (``reference.galleries``). Other arguments as
    in :func:`sdm_loss`; ``return_stats=True`` also returns an SDMStats whose fields are [K]
    (one per gallery; the anchor's norms 0-dim).

    The galleries are concatenated into one [K * M, D] problem whose row softmax runs per
    gallery: the Triton kernels do all K in the launches of one loss (two-pass tile configs;
    the one-pass ones raise), where K separate calls pay K times the launches and the
    per-sample preparation.
    """
    opts = SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine,
                      reduction=reduction, normalize=normalize)
    args = split_galleries(gs, g_ids, labels, g_mask)
    for g_k, ids_k, labels_k, mask_k in zip(*args):
        validate_inputs(q, g_k, q_ids, ids_k, labels_k, q_mask, mask_k)
    k_count, m = args.count, args.gs[0].shape[0]
    g = gs.reshape(k_count * m, -1) if isinstance(gs, torch.Tensor) else torch.cat(args.gs)
    g_ids_all = torch.cat(args.g_ids) if args.g_ids[0] is not None else None
    labels_all = torch.cat(args.labels, dim=1) if args.labels[0] is not None else None
    g_mask_all = None
    if any(t is not None for t in args.g_mask):
        g_mask_all = torch.cat([t if t is not None else torch.ones(m, dtype=torch.bool, device=q.device)
                                for t in args.g_mask])
    scale = resolve_scale(temperature, logit_scale, q)
    if check_values:
        _check_values(q, g, labels_all, scale)
    tiles = _pick_tiles(backend, q, tile_config)
    rows = _row_losses(q, g, q_ids, g_ids_all, labels_all, q_mask, g_mask_all, scale, opts, tiles, tile_config,
                       workspace_bytes, galleries=k_count)
    # one row of losses per gallery on both sides (the q side comes back [N] when K = 1)
    rows = [t.view(k_count, -1) for t in rows]
    g_mask_k = g_mask_all.view(k_count, m) if g_mask_all is not None else None
    return _reduce(rows, opts, return_stats, q, g.reshape(k_count, m, -1), q_mask, g_mask_k)


def _masked_mean_max(x: torch.Tensor, keep: Optional[torch.Tensor]):
    """Mean and max of ``x`` over its last dim, over the kept entries (0 where none is kept)."""
    x = x.detach().float()
    if keep is None:
        return x.mean(-1), x.amax(-1)
    kept = torch.where(keep, x, torch.zeros_like(x))
    return kept.sum(-1) / keep.sum(-1).clamp_min(1), kept.amax(-1)


def _stats(q, g, q_mask, g_mask, valid_q, valid_g, pos_q, pos_g) -> SDMStats:
    """SDMStats along the last dim: 0-dim fields, or [K] ones for K galleries (g [K, M, D],
    g_mask and the rows' tensors [K, rows]; q's norms stay 0-dim: one anchor)."""
    nq = torch.linalg.vector_norm(q.detach().float(), dim=-1)
    ng = torch.linalg.vector_norm(g.detach().float(), dim=-1)
    q_mean, q_max = _masked_mean_max(nq, q_mask)
    g_mean, g_max = _masked_mean_max(ng, g_mask)
    n_q, n_g = valid_q.sum(-1), valid_g.sum(-1)
    return SDMStats(
        valid_q2g=n_q, valid_g2q=n_g,
        pos_prob_q2g=pos_q.sum(-1) / n_q.clamp_min(1), pos_prob_g2q=pos_g.sum(-1) / n_g.clamp_min(1),
        q_norm_mean=q_mean, q_norm_max=q_max, g_norm_mean=g_mean, g_norm_max=g_max)


class SDMLoss(torch.nn.Module):
    """``nn.Module`` over :func:`sdm_loss`, holding its options."""

    def __init__(self, *, temperature: float = 0.02, kl: str = "forward", eps: float = 1e-8,
                 direction: str = "both", combine: str = "mean", reduction: str = "mean",
                 normalize: bool = True, backend: str = "auto"):
        super().__init__()
        SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction,
                   normalize=normalize)  # fail early on bad options
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        self.temperature = temperature
        self.options = dict(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction,
                            normalize=normalize, backend=backend)

    def forward(self, q, g, q_ids=None, g_ids=None, *, labels=None, q_mask=None, g_mask=None,
                logit_scale=None, return_stats=False):
        return sdm_loss(q, g, q_ids, g_ids, labels=labels, q_mask=q_mask, g_mask=g_mask,
                        temperature=self.temperature, logit_scale=logit_scale,
                        return_stats=return_stats, **self.options)

    def extra_repr(self):
        return f"temperature={self.temperature}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


__all__ = ["sdm_loss", "sdm_loss_multi", "SDMLoss", "SDMStats", "SDMRowLosses", "BACKENDS"]


def reduce_rows(loss_q2g, valid_q2g, loss_g2q, valid_g2q, opts: SDMOptions):
    """Reduce per-row losses (invalid rows already 0) along the last dim to the returned value."""
    if opts.reduction == "none":
        return SDMRowLosses(loss_q2g, loss_g2q, valid_q2g, valid_g2q)
    parts = []
    for loss, valid in ((loss_q2g, valid_q2g), (loss_g2q, valid_g2q)):
        if loss is None:
            continue
        total = loss.sum(-1)
        if opts.reduction == "mean":
            total = total / valid.sum(-1).clamp_min(1).to(loss.dtype)
        parts.append(total)
    if len(parts) == 1:
        return parts[0]
    out = parts[0] + parts[1]
    return 0.5 * out if opts.combine == "mean" else out
