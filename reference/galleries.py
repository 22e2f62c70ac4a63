"""K galleries against one anchor: ``sdm_loss_multi`` (ReID5o computes 15 SDM losses a step
against one anchor). Gallery k's loss is exactly ``sdm_loss(q, g_k, ...)``; this module holds
the argument handling every implementation shares and the reference, a loop over galleries.

Per-gallery arguments may be given stacked or as sequences of K tensors:

    gs       [K, M, D] tensor, or K tensors [M, D]
    g_ids    [M] (the same ids for every gallery), [K, M], or K tensors [M]
    labels   [N, M] (shared), [K, N, M], or K tensors [N, M]
    g_mask   [M] (shared), [K, M], or K tensors [M]     (False = sample absent from that gallery)

q, q_ids and q_mask are the anchor's, shared by all galleries.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from sdm_triton.options import SDMRowLosses
from .sdm import sdm_loss

Galleries = Union[torch.Tensor, Sequence[torch.Tensor]]


class GalleryArgs(NamedTuple):
    """The per-gallery arguments as lists of K (None where not given)."""

    gs: List[torch.Tensor]
    g_ids: List[Optional[torch.Tensor]]
    labels: List[Optional[torch.Tensor]]
    g_mask: List[Optional[torch.Tensor]]

    @property
    def count(self) -> int:
        return len(self.gs)


def _per_gallery(name: str, value, count: int, shared_dim: int) -> List[Optional[torch.Tensor]]:
    """``value`` as K tensors: a sequence of K, a stacked tensor (dim shared_dim + 1), or one
    tensor shared by all galleries (dim shared_dim)."""
    if value is None:
        return [None] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} galleries")
        return list(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a sequence of {count} tensors, got {type(value).__name__}")
    if value.dim() == shared_dim + 1:
        if value.shape[0] != count:
            raise ValueError(f"{name} stacks {value.shape[0]} galleries, but there are {count} "
                             f"(shape {tuple(value.shape)})")
        return list(value.unbind(0))
    if value.dim() == shared_dim:
        return [value] * count
    raise ValueError(f"{name} must have {shared_dim} dims (shared by the galleries) or {shared_dim + 1} "
                     f"(one per gallery), got shape {tuple(value.shape)}")


def split_galleries(gs: Galleries, g_ids=None, labels=None, g_mask=None) -> GalleryArgs:
    """Check the gallery arguments' structure (counts, equal sizes) and return them per gallery.

    Each gallery's own checks (shapes against q, dtypes, devices) are ``validate_inputs``'.
    """
    if isinstance(gs, torch.Tensor):
        if gs.dim() != 3:
            raise ValueError(f"gs must be a [K, M, D] tensor or a sequence of [M, D] tensors, "
                             f"got shape {tuple(gs.shape)}")
        galleries = list(gs.unbind(0))
    elif isinstance(gs, (list, tuple)):
        galleries = list(gs)
        for k, g in enumerate(galleries):
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"gs[{k}] must be a torch.Tensor, got {type(g).__name__}")
    else:
        raise TypeError(f"gs must be a [K, M, D] tensor or a sequence of [M, D] tensors, got {type(gs).__name__}")
    if not galleries:
        raise ValueError("gs holds no gallery (K = 0)")
    count = len(galleries)
    shapes = {tuple(g.shape) for g in galleries}
    if len(shapes) != 1:
        raise ValueError(f"every gallery must have the same shape [M, D], got {sorted(shapes)}")
    return GalleryArgs(galleries, _per_gallery("g_ids", g_ids, count, 1),
                       _per_gallery("labels", labels, count, 2), _per_gallery("g_mask", g_mask, count, 1))


def stack_results(results):
    """K results of ``sdm_loss``: a [K] tensor, or for reduction="none" one SDMRowLosses of
    [K, N] and [K, M] fields."""
    if isinstance(results[0], SDMRowLosses):
        return SDMRowLosses(*(None if parts[0] is None else torch.stack(parts) for parts in zip(*results)))
    return torch.stack(results)


def sdm_loss_multi(q: torch.Tensor, gs: Galleries, q_ids=None, g_ids=None, *, labels=None, q_mask=None,
                   g_mask=None, **options):
    """The SDM loss of ``q`` against each of K galleries: ``[sdm_loss(q, g_k, ...) for k]`` stacked.

    Returns a [K] tensor (one loss per gallery; ``.sum()`` for ReID5o's total), or for
    ``reduction="none"`` an SDMRowLosses with [K, N] and [K, M] fields. ``options``: every
    keyword of ``sdm_loss`` (temperature, logit_scale, kl, eps, direction, combine,
    reduction, normalize). The reference computes the K losses one by one.
    """
    args = split_galleries(gs, g_ids, labels, g_mask)
    return stack_results([sdm_loss(q, g, q_ids, ids, labels=lab, q_mask=q_mask, g_mask=mask, **options)
                          for g, ids, lab, mask in zip(*args)])
