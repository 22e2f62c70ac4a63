"""K galleries against one anchor: the argument forms every implementation accepts.

ReID5o computes 15 SDM losses a step against one anchor; ``sdm_loss_multi(q, gs, ...)`` takes
the K galleries in one call. Per-gallery arguments may be given stacked, shared, or as
sequences of K tensors:

    gs       [K, M, D] tensor, or K tensors [M, D]
    g_ids    [M] (the same ids for every gallery), [K, M], or K tensors [M]
    labels   [N, M] (shared), [K, N, M], or K tensors [N, M]
    g_mask   [M] (shared), [K, M], or K tensors [M]     (False = sample absent from that gallery)

q, q_ids and q_mask are the anchor's, shared by all galleries. `split_galleries` checks the
structure and returns per-gallery lists (the reference loops over them); `stack_galleries`
returns one tensor per argument (a stacked form is kept as given, a shared one stays
unstacked, a sequence is stacked) for the kernels, which index galleries by stride.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from .options import comparable_ids, resolve_ids

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


def _stacked(name: str, value):
    """``value`` as one tensor: a tensor as given (shared or stacked), a sequence of K tensors
    stacked (its structure checked by `split_galleries`)."""
    if isinstance(value, (list, tuple)):
        given = [v for v in value if v is not None]
        if not given:
            return None
        if len(given) < len(value):
            if name != "g_mask":          # ids / labels missing for a gallery: the per-gallery checks say so
                return None
            # a gallery without a mask: every sample present
            value = [torch.ones_like(given[0]) if v is None else v for v in value]
        return torch.stack(list(value))
    return value


def _shared_ids(g_ids):
    """The one ids tensor every gallery shares (an [M] tensor, or a sequence holding the same
    tensor K times), else None."""
    if isinstance(g_ids, torch.Tensor):
        return g_ids if g_ids.dim() == 1 else None
    if isinstance(g_ids, (list, tuple)) and g_ids and g_ids[0] is not None and all(v is g_ids[0] for v in g_ids):
        return g_ids[0]
    return None


def resolve_gallery_ids(q, args: GalleryArgs, q_ids, g_ids):
    """(q_ids, g_ids as one tensor, per-gallery ids) with ``sdm_loss``'s paired-batch default
    applied to each gallery, as K separate ``sdm_loss`` calls would:

    * q_ids given: a gallery without ids (None, or g_ids not given) shares q_ids, which needs
      N == M (else "g_ids is required").
    * q_ids None: the anchor's ids are the galleries' ids, so all galleries must share one ids
      tensor ([M], or the same tensor K times). Per-gallery ids that may differ (stacked [K, M],
      different tensors) leave the anchor's ids ambiguous: a ValueError asks for q_ids.

    The ids of the anchor and of the galleries are returned of one dtype (`comparable_ids`).
    """
    per = args.g_ids
    if q_ids is None and all(v is None for v in per):
        return None, None, per                          # dense labels (validated later)
    g0 = args.gs[0]
    if q_ids is None:
        shared = _shared_ids(g_ids)
        if shared is None:
            raise ValueError("q_ids is required when the galleries have their own g_ids (stacked [K, M] or "
                             "different tensors per gallery): the anchor's ids would be ambiguous; pass q_ids, "
                             "or one g_ids [M] shared by every gallery")
        q_ids, shared = resolve_ids(q, g0, None, shared)
        q_ids, shared = comparable_ids(q_ids, shared)
        return q_ids, shared, [shared] * args.count
    filled = []
    for k, ids in enumerate(per):
        if ids is None:
            try:
                _, ids = resolve_ids(q, g0, q_ids, None)
            except ValueError as exc:
                where = "g_ids" if g_ids is None else f"g_ids[{k}]"
                raise ValueError(f"{where} is required: {exc}") from None
        filled.append(ids)
    tensors = [t for t in [q_ids, *filled] if isinstance(t, torch.Tensor)]   # others: validate_inputs names them
    mixed = len({t.dtype for t in tensors}) > 1
    if mixed:                                           # compare by value, as `comparable_ids` does
        q_ids, *filled = [t.to(torch.int64) if isinstance(t, torch.Tensor) else t for t in [q_ids, *filled]]
    shared = _shared_ids(filled)
    if shared is not None:
        return q_ids, shared, filled
    if isinstance(g_ids, torch.Tensor) and not mixed:
        return q_ids, g_ids, filled                     # stacked [K, M] as given (any strides)
    return q_ids, (torch.stack(filled) if all(isinstance(t, torch.Tensor) for t in filled) else None), filled


def stack_galleries(gs: Galleries, g_ids=None, labels=None, g_mask=None):
    """(g [K, M, D], labels, g_mask, K, per-gallery arguments) with each per-gallery argument
    as one tensor (shared forms unstacked, stride 0 over the galleries in the kernels). The ids
    are `resolve_gallery_ids`'."""
    args = split_galleries(gs, g_ids, labels, g_mask)
    k = args.count
    g = gs if isinstance(gs, torch.Tensor) else torch.stack(list(gs))
    return g, _stacked("labels", labels), _stacked("g_mask", g_mask), k, args
