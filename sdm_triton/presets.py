"""Named settings that reproduce published users of the SDM loss (docs/contract.md, "Settings of published users").

    from sdm_triton.presets import preset_loss, preset_kwargs
    loss = preset_loss("irra", image_feats, text_feats, pids, pids)
    loss = sdm_loss(image_feats, text_feats, pids, pids, **preset_kwargs("irra"))

Each preset is checked against a transcription of the published code in
``tests/test_presets.py``. Convention: ``q`` = image features, ``g`` = text
features, so ``q2g`` is the papers' i2t direction and ``g2q`` their t2i.

    name       divergence  eps   scale                     reduction                      source
    irra       reverse     1e-8  50 (tau 0.02)             mean(i2t) + mean(t2i)          anosorae/IRRA model/objectives.py::compute_sdm
    tbps_clip  reverse     1e-2  learnable, clamped <= 100 (mean(i2t) + mean(t2i)) / 2    Flame-Chasers/TBPS-CLIP model/tbps_model.py (ritc)
    rde        reverse     1e-8  50 (tau 0.02)             per sample i2t[i] + t2i[i]     QinYang79/RDE model/objectives.py::compute_sdm_per
    seed       forward     -     1/tau, tau in [0.15, 0.5] (mean + mean) / 2, masks       the seed write-up (docs/contract.md)
    clip       forward     -     learnable (init 1/0.07)   (CE(i2t) + CE(t2i)) / 2        CLIP; IRRA model/objectives.py::compute_itc

Where the published code and these presets part (each pinned by a test):

* IRRA normalises its target with ``labels / labels.sum(dim=1)`` (no keepdim), i.e. column
  ``j`` by row sum ``j``. For identity labels that equals the row normalisation; for its
  ``image_id`` soft labels it does only when the image groups inside a person have equal
  sizes. ``labels=`` here is always normalised per row (SPEC).
* TBPS-CLIP across ranks compares local rows with all-gathered columns in each direction:
  ``0.5 * (sdm(img_loc, txt_all, direction="q2g") + sdm(txt_loc, img_all, direction="q2g"))``
  with ``preset_kwargs("tbps_clip")``; single-process it is one call with ``direction="both"``.
* The seed clamps its target at ``eps = 1e-6`` before ``F.kl_div``, adding at most
  ``M * 1e-6 * (|log 1e-6| + max |log P|)`` per row; the preset is the exact forward KL.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from .options import SDMOptions


@dataclasses.dataclass(frozen=True)
class SDMPreset:
    """Options of ``sdm_loss`` that reproduce one published user.

    ``per_sample``: the loss is ``q2g[i] + g2q[i]`` per sample (square, paired batches;
    RDE), optionally reduced with per-sample weights. ``unique_ids``: every row is its
    own identity (CLIP); ``preset_loss`` fills ``q_ids = g_ids = arange(N)`` if none are given.
    """

    name: str
    kl: str
    eps: float
    temperature: float
    combine: str
    direction: str = "both"
    reduction: str = "mean"
    per_sample: bool = False
    unique_ids: bool = False
    source: str = ""

    def __post_init__(self):
        SDMOptions(kl=self.kl, eps=self.eps, direction=self.direction, combine=self.combine,
                   reduction=self.reduction)  # validates the option values

    def kwargs(self, **overrides) -> dict:
        """Keyword arguments for ``sdm_loss`` (sdm_triton's or the reference's), with overrides."""
        out = dict(kl=self.kl, eps=self.eps, temperature=self.temperature, direction=self.direction,
                   combine=self.combine, reduction=self.reduction)
        out.update(overrides)
        return out


def seed_temperature(tau: float = 0.2, low: float = 0.15, high: float = 0.5) -> float:
    """The seed's temperature rule: ``clamp(tau, 0.15, 0.5)``.

    The seed computed ``clamp(tau * mean ||q_hat||, 0.15, 0.5)`` on already normalised
    features, whose mean norm is 1, so the rule is a clamp of ``tau``. Returns a float
    (``sdm_loss(temperature=...)``); the scale is ``1 / tau``.
    """
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    return min(max(tau, low), high)


def tbps_logit_scale(log_scale: torch.Tensor, max_scale: float = 100.0) -> torch.Tensor:
    """TBPS-CLIP's learnable scale: ``exp(log_scale)`` clamped at ``max_scale``, straight-through.

    TBPS-CLIP writes ``s = self.logit_scale.exp(); s.data = torch.clamp(s.data, max=100)``.
    Assigning ``.data`` changes the value used downstream but not the graph: ``exp``'s
    backward still holds the unclamped result, so the gradient reaching ``log_scale`` is
    ``dL/ds (at s = 100) * exp(log_scale)``. This returns the same value and gradient
    without touching ``.data``. Pass it as ``logit_scale=``.
    """
    if not isinstance(log_scale, torch.Tensor) or log_scale.dim() != 0:
        raise ValueError("log_scale must be a 0-dim tensor (the log of the logit scale)")
    if not max_scale > 0:
        raise ValueError(f"max_scale must be > 0, got {max_scale}")
    scale = log_scale.exp()
    return scale - (scale - scale.clamp(max=max_scale)).detach()


PRESETS = {
    p.name: p for p in (
        SDMPreset("irra", kl="reverse", eps=1e-8, temperature=0.02, combine="sum",
                  source="anosorae/IRRA model/objectives.py::compute_sdm"),
        SDMPreset("tbps_clip", kl="reverse", eps=1e-2, temperature=0.07, combine="mean",
                  source="Flame-Chasers/TBPS-CLIP model/tbps_model.py (ritc loss; ritc_eps 1e-2 in "
                         "config/config.yaml); pass logit_scale=tbps_logit_scale(log_param)"),
        SDMPreset("rde", kl="reverse", eps=1e-8, temperature=0.02, combine="sum", reduction="none",
                  per_sample=True,
                  source="QinYang79/RDE 2024-CVPR-RDE/model/objectives.py::compute_sdm_per, compute_rbs"),
        SDMPreset("seed", kl="forward", eps=1e-8, temperature=seed_temperature(0.2), combine="mean",
                  source="the seed write-up: sdm_loss_stable, masks for missing modalities"),
        SDMPreset("clip", kl="forward", eps=1e-8, temperature=0.07, combine="mean", unique_ids=True,
                  source="CLIP's symmetric cross-entropy (IRRA compute_itc)"),
    )
}


def get_preset(name: str) -> SDMPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}") from None


def preset_kwargs(name: str, **overrides) -> dict:
    """``sdm_loss`` keyword arguments of preset ``name``, with ``overrides`` applied."""
    return get_preset(name).kwargs(**overrides)


def preset_loss(name: str, q: torch.Tensor, g: torch.Tensor, q_ids: Optional[torch.Tensor] = None,
                g_ids: Optional[torch.Tensor] = None, *, sample_weights: Optional[torch.Tensor] = None,
                loss_fn: Optional[Callable] = None, **overrides):
    """The loss of preset ``name``; ``overrides`` go to ``sdm_loss`` (masks, ``logit_scale``, ``backend``).

    ``loss_fn`` is the SDM implementation to call (default ``sdm_triton.sdm_loss``; pass
    ``reference.sdm_loss`` for the oracle, dropping sdm_triton-only overrides).

    * ``unique_ids`` presets (clip) use ``arange(N)`` as ids when none are given (``N == M``).
    * ``per_sample`` presets (rde) return the ``[N]`` per-sample losses ``q2g[i] + g2q[i]``
      (invalid rows count 0), or with ``sample_weights`` RDE's weighted mean
      ``sum(w * loss) / sum(w)``. Needs ``N == M``. The per-sample form is what these presets
      are: ``reduction`` (other than ``"none"``), ``direction`` (other than ``"both"``) and
      ``combine`` (other than ``"sum"``) overrides are a ValueError naming them, not a silent change of meaning; reduce the
      returned ``[N]`` losses yourself (``.mean()``) or pass ``sample_weights``.
    * ``sample_weights``: a tensor of shape ``[N]`` on ``q``'s device (float, integer or bool);
      anything else (a list, another shape or device) is a TypeError / ValueError naming
      ``sample_weights`` before any loss is computed. Weights summing to 0 (all zero) give 0.
      A negative or non-finite weight is a bad value only the device can see: the result is
      NaN (computed on the device, no host synchronisation), or with ``check_values=True`` a
      ValueError naming ``sample_weights``.
    """
    preset = get_preset(name)
    if loss_fn is None:
        from .api import sdm_loss as loss_fn
    if preset.per_sample:
        _check_per_sample_arguments(preset, q, g, sample_weights, overrides)
    elif sample_weights is not None:
        raise ValueError(f"sample_weights applies to per-sample presets only, not {name!r}")
    if preset.unique_ids and q_ids is None and g_ids is None and overrides.get("labels") is None:
        if q.shape[0] != g.shape[0]:
            raise ValueError(f"preset {name!r} pairs row i with column i: needs N == M, got {q.shape[0]} and {g.shape[0]}")
        q_ids = g_ids = torch.arange(q.shape[0], device=q.device)
    out = loss_fn(q, g, q_ids, g_ids, **preset.kwargs(**overrides))
    if not preset.per_sample:
        return out
    rows, stats = out if isinstance(out, tuple) and not hasattr(out, "q2g") else (out, None)
    per = rows.q2g + rows.g2q
    if sample_weights is not None:
        w = sample_weights.to(per.dtype)
        total = w.sum()
        per = (w * per).sum() / torch.where(total > 0, total, torch.ones_like(total))
        # SPEC: a bad value only the device sees makes the result NaN (no host synchronisation)
        bad = (w < 0).any() | ~torch.isfinite(w).all()
        per = torch.where(bad, torch.full_like(per, math.nan), per)
    return per if stats is None else (per, stats)


def _check_per_sample_arguments(preset: SDMPreset, q, g, sample_weights, overrides) -> None:
    """Host-visible checks of a per-sample preset's call, made before any loss is computed."""
    name = preset.name
    # combine: the per-sample form adds the two directions whatever combine says (RDE's
    # i2t[i] + t2i[i]); a "mean" would be ignored silently
    for key, fixed in (("reduction", "none"), ("direction", "both"), ("combine", preset.combine)):
        if key in overrides and overrides[key] != fixed:
            raise ValueError(f"preset {name!r} returns per-sample losses q2g[i] + g2q[i]: {key} must be "
                             f"{fixed!r}, got {overrides[key]!r} (reduce the returned [N] losses yourself, "
                             "or pass sample_weights for the weighted mean)")
    if isinstance(q, torch.Tensor) and isinstance(g, torch.Tensor) and q.dim() >= 1 and g.dim() >= 1 \
            and q.shape[0] != g.shape[0]:
        raise ValueError(f"preset {name!r} adds q2g[i] + g2q[i]: needs N == M and direction='both', "
                         f"got N={q.shape[0]}, M={g.shape[0]}")
    if sample_weights is None:
        return
    if not isinstance(sample_weights, torch.Tensor):
        raise TypeError(f"sample_weights must be a torch.Tensor of shape [N], got {type(sample_weights).__name__}")
    if sample_weights.is_complex():
        raise TypeError(f"sample_weights must be a real (float, integer or bool) tensor, got {sample_weights.dtype}")
    n = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() >= 1 else None
    if sample_weights.dim() != 1 or (n is not None and sample_weights.shape[0] != n):
        raise ValueError(f"sample_weights must have shape ({n},), got {tuple(sample_weights.shape)}")
    if isinstance(q, torch.Tensor) and sample_weights.device != q.device:
        raise ValueError(f"sample_weights is on {sample_weights.device} but the features are on {q.device}")
    if overrides.get("check_values", False) is True:
        w = sample_weights.double()
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("sample_weights must be finite and >= 0 (a negative or non-finite weight)")


__all__ = ["SDMPreset", "PRESETS", "get_preset", "preset_kwargs", "preset_loss",
           "seed_temperature", "tbps_logit_scale"]
