"""K galleries against one anchor: ``sdm_loss_multi`` (ReID5o computes 15 SDM losses a step
against one anchor). Gallery k's loss is exactly ``sdm_loss(q, g_k, ...)``: the reference is a
loop over galleries (the argument forms are checked by ``sdm_triton.galleries``, shared by
every implementation).

Per-gallery arguments may be given stacked or as sequences of K tensors:

    gs       [K, M, D] tensor, or K tensors [M, D]
    g_ids    [M] (the same ids for every gallery), [K, M], or K tensors [M]
    labels   [N, M] (shared), [K, N, M], or K tensors [N, M]
    g_mask   [M] (shared), [K, M], or K tensors [M]     (False = sample absent from that gallery)

q, q_ids and q_mask are the anchor's, shared by all galleries.
"""

from __future__ import annotations

import torch

from sdm_triton.galleries import Galleries, resolve_gallery_ids, split_galleries
from sdm_triton.options import SDMRowLosses, validate_features

from .sdm import sdm_loss


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
    validate_features(q)
    args = split_galleries(gs, g_ids, labels, g_mask)
    q_ids, _, per_ids = resolve_gallery_ids(q, args, q_ids, g_ids)   # the API's rule for missing ids
    return stack_results([sdm_loss(q, g, q_ids, ids, labels=lab, q_mask=q_mask, g_mask=mask, **options)
                          for g, ids, lab, mask in zip(args.gs, per_ids, args.labels, args.g_mask)])
