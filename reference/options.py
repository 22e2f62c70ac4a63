"""Options and input validation shared by every SDM implementation.

This module depends on PyTorch only (never on Triton), so the reference and the
fast package validate arguments with exactly the same rules and messages.
Validation here never synchronises with the device: it looks at shapes, dtypes
and devices only. Value checks (negative labels, non-finite features) that need
to read device memory live in ``check_values``, which callers opt into.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch

#: ``F.normalize`` semantics: q / max(||q||, NORM_EPS). A zero row stays zero.
NORM_EPS = 1e-12

KL_CHOICES = ("forward", "reverse")
DIRECTION_CHOICES = ("both", "q2g", "g2q")
COMBINE_CHOICES = ("mean", "sum")
REDUCTION_CHOICES = ("mean", "sum", "none")
FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclasses.dataclass(frozen=True)
class SDMOptions:
    """The non-tensor options of the loss, validated once and passed as one object."""

    kl: str = "forward"
    eps: float = 1e-8
    direction: str = "both"
    combine: str = "mean"
    reduction: str = "mean"
    normalize: bool = True

    def __post_init__(self):
        _check_choice("kl", self.kl, KL_CHOICES)
        _check_choice("direction", self.direction, DIRECTION_CHOICES)
        _check_choice("combine", self.combine, COMBINE_CHOICES)
        _check_choice("reduction", self.reduction, REDUCTION_CHOICES)
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(self.normalize).__name__}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)):
            raise TypeError(f"eps must be a float, got {type(self.eps).__name__}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.kl == "reverse" and self.eps <= 0:
            raise ValueError("eps must be > 0 for kl='reverse' (log(Y + eps) is -inf at Y = 0)")

    @property
    def reverse(self) -> bool:
        return self.kl == "reverse"

    @property
    def wants_q2g(self) -> bool:
        return self.direction in ("both", "q2g")

    @property
    def wants_g2q(self) -> bool:
        return self.direction in ("both", "g2q")


class SDMRowLosses(NamedTuple):
    """``reduction="none"``: per-row losses of each direction and their validity.

    Invalid rows (masked, or without any positive among the valid columns) hold 0
    and get no gradient. A direction that was not asked for is ``None``.
    """

    q2g: Optional[torch.Tensor]
    g2q: Optional[torch.Tensor]
    q2g_valid: Optional[torch.Tensor]
    g2q_valid: Optional[torch.Tensor]


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def resolve_scale(temperature, logit_scale, features: torch.Tensor):
    """Return the logit scale ``s`` as a Python float or a 0-dim tensor.

    ``logit_scale`` (a 0-dim tensor, may require grad) takes precedence over
    ``temperature``. A float ``temperature`` must be finite and > 0.
    """
    if logit_scale is not None:
        if not isinstance(logit_scale, torch.Tensor):
            raise TypeError(f"logit_scale must be a 0-dim tensor, got {type(logit_scale).__name__}")
        if logit_scale.dim() != 0:
            raise ValueError(f"logit_scale must be a 0-dim tensor, got shape {tuple(logit_scale.shape)}")
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale must be a floating tensor, got {logit_scale.dtype}")
        if logit_scale.device != features.device:
            raise ValueError(f"logit_scale is on {logit_scale.device} but the features are on {features.device}")
        return logit_scale
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a float; pass a tensor as logit_scale= (= 1 / temperature)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return 1.0 / float(temperature)


def validate_inputs(q, g, q_ids, g_ids, labels, q_mask, g_mask):
    """Shape / dtype / device checks. Raises TypeError or ValueError naming the argument."""
    for name, t in (("q", q), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(t.shape)}")
        if t.dtype not in FEATURE_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); SDM needs at least one row and D >= 1")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q and g must have the same feature dim D, got {q.shape[1]} and {g.shape[1]}")
    if q.dtype != g.dtype:
        raise TypeError(f"q and g must have the same dtype, got {q.dtype} and {g.dtype}")
    if q.device != g.device:
        raise ValueError(f"q and g must be on the same device, got {q.device} and {g.device}")
    n, m = q.shape[0], g.shape[0]

    have_ids = q_ids is not None or g_ids is not None
    if have_ids and labels is not None:
        raise ValueError("pass either q_ids/g_ids or labels, not both")
    if not have_ids and labels is None:
        raise ValueError("pass identity labels (q_ids and g_ids) or a dense labels matrix")
    if have_ids:
        if q_ids is None or g_ids is None:
            raise ValueError("q_ids and g_ids must be given together")
        for name, t, length in (("q_ids", q_ids, n), ("g_ids", g_ids, m)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 1 or t.shape[0] != length:
                raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but the features are on {q.device}")
    else:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.shape != (n, m):
            raise ValueError(f"labels must have shape [{n}, {m}], got {tuple(labels.shape)}")
        if not (labels.is_floating_point() or labels.dtype == torch.bool):
            raise TypeError(f"labels must be a float or bool tensor, got {labels.dtype}")
        if labels.device != q.device:
            raise ValueError(f"labels is on {labels.device} but the features are on {q.device}")

    for name, t, length in (("q_mask", q_mask, n), ("g_mask", g_mask, m)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a bool tensor, got {type(t).__name__}")
        if t.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != length:
            raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but the features are on {q.device}")


def check_values(q, g, labels, scale):
    """Checks that read device memory (they synchronise): finite features, labels >= 0, scale > 0."""
    for name, t in (("q", q), ("g", g)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if labels is not None and labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()):
            raise ValueError("labels contains NaN or Inf")
        if bool((labels < 0).any()):
            raise ValueError("labels must be non-negative")
    if isinstance(scale, torch.Tensor):
        if not bool(torch.isfinite(scale)) or not bool(scale > 0):
            raise ValueError(f"logit_scale must be finite and > 0, got {float(scale)}")


def compute_dtype(features_dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 features (the seed's lesson), float64 for float64."""
    return torch.float64 if features_dtype == torch.float64 else torch.float32


def reduce_rows(loss_q2g, valid_q2g, loss_g2q, valid_g2q, opts: SDMOptions):
    """Reduce per-row losses (invalid rows already 0) to the returned value.

    Each direction: mean over its valid rows (0 when it has none) or sum; the two
    directions combine by ``0.5 * (a + b)`` ("mean") or ``a + b`` ("sum"). Rows run along
    the last dim: losses [K, rows] (K galleries) reduce to [K].
    """
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
