"""Training-stability companions of the SDM loss (docs/contract.md, "Training helpers").

The seed's run went unstable in three ways this module addresses:

* loss spikes were judged against a mean or a raw MAD that is ~0 early on, so every
  small wobble counted as a spike: :class:`SpikeDetector` is a robust detector
  (median + k * 1.4826 * MAD over a window, with a warm-up, a MAD floor and a
  relative margin);
* feature norms drifted to 18-20: :func:`feature_norm_penalty` keeps them in a band
  around a target, ``w * mean(relu(| ||f|| - target | - band) ** 2)``;
* a NaN turned into a silent zero loss: :func:`check_finite` raises instead (opt-in,
  because it reads device memory).

Nothing here imports Triton.
"""

from __future__ import annotations

import collections
import math
import numbers
import statistics
from collections.abc import Iterable, Mapping
from typing import Optional, Sequence

import torch

#: 1 / Phi^-1(3/4): scales a MAD to the standard deviation of a normal distribution.
MAD_TO_SIGMA = 1.4826


class SpikeDetector:
    """Robust loss-spike detector over a sliding window of recent losses.

    ``update(loss)`` judges ``loss`` against the window of the losses *before* it::

        med   = median(window)
        mad   = median(|window - med|)
        spike = loss > med + k * 1.4826 * max(mad, mad_floor)      (robust z-score above k)
                and loss > med + rel_margin * |med|                (and a relative jump)

    No step is judged until the window holds ``warmup`` losses. The seed's defaults:
    window 100, ``k = 6``, warm-up 20, MAD floor 0.05, relative margin 15%.

    Design choices:

    * The floor keeps a nearly constant series (MAD ~ 0, typical early in training or
      after convergence) from flagging every tiny bump; the relative margin does the same
      for losses of large magnitude where the floor is small. ``|med|`` keeps the margin
      meaningful for the reverse-KL loss, which can sit slightly below zero.
    * A spike still enters the window. A single spike cannot move a median, so the
      detector stays sharp, but a lasting level shift is accepted as the new normal once
      it fills half the window, instead of being flagged forever.
    * While the loss still falls fast, the window spans the decay and its MAD is large, so
      only large spikes count then; the threshold tightens as the curve flattens.
    * A non-finite loss is always a spike and never enters the window (it would make the
      median meaningless).

    Counters ``steps`` (losses seen) and ``spikes`` (of which spikes) survive
    ``state_dict`` / ``load_state_dict``, so a resumed run keeps its statistics.
    ``load_state_dict`` checks the whole state before changing anything: a missing key
    (``"history"``, ``"steps"``, ``"spikes"``) is a ValueError naming it (no defaults: a state
    without its counters is not one this class wrote), and so is a non-finite loss in the
    history (it would make the threshold NaN and switch detection off) or a counter that is
    not an integer ``>= 0`` (``spikes <= steps``).

    ``update`` takes a real Python number (int or float, not bool) or a 0-dim real tensor;
    anything else (a string, a list, a tensor with more than one element) is a TypeError.
    Passing a device tensor synchronises.
    """

    def __init__(self, window: int = 100, k: float = 6.0, warmup: int = 20,
                 mad_floor: float = 0.05, rel_margin: float = 0.15):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 1 <= warmup <= window:
            raise ValueError(f"warmup must be an int in [1, window={window}], got {warmup!r}")
        for name, value in (("k", k), ("mad_floor", mad_floor), ("rel_margin", rel_margin)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.window = window
        self.k = float(k)
        self.warmup = warmup
        self.mad_floor = float(mad_floor)
        self.rel_margin = float(rel_margin)
        self._history: collections.deque = collections.deque(maxlen=window)
        self.steps = 0
        self.spikes = 0

    def threshold(self) -> Optional[float]:
        """The value a loss must exceed to be a spike now, or ``None`` during the warm-up."""
        if len(self._history) < self.warmup:
            return None
        med = statistics.median(self._history)
        mad = statistics.median(abs(x - med) for x in self._history)
        robust = med + self.k * MAD_TO_SIGMA * max(mad, self.mad_floor)
        relative = med + self.rel_margin * abs(med)
        return max(robust, relative)

    def update(self, loss: float) -> bool:
        """Record ``loss``; return whether it is a spike relative to the losses before it."""
        loss = _as_loss(loss)
        self.steps += 1
        if not math.isfinite(loss):
            self.spikes += 1
            return True
        threshold = self.threshold()
        is_spike = threshold is not None and loss > threshold
        self._history.append(loss)
        self.spikes += int(is_spike)
        return is_spike

    @property
    def history(self) -> list:
        """The losses in the window, oldest first (a copy)."""
        return list(self._history)

    @property
    def spike_rate(self) -> float:
        return self.spikes / self.steps if self.steps else 0.0

    def reset(self) -> None:
        """Forget the window and the counters (for example after a learning-rate restart)."""
        self._history.clear()
        self.steps = 0
        self.spikes = 0

    def state_dict(self) -> dict:
        return {"history": list(self._history), "steps": self.steps, "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict (from state_dict()), got {type(state).__name__}")
        for key in ("history", "steps", "spikes"):
            if key not in state:
                raise ValueError(f"state has no {key!r} entry (expected the keys 'history', 'steps', 'spikes' "
                                 "of SpikeDetector.state_dict())")
        raw = state["history"]
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
            raise TypeError(f"state['history'] must be a list of losses, got {type(raw).__name__}")
        history = []
        for i, x in enumerate(raw):
            if isinstance(x, bool) or not isinstance(x, numbers.Real):
                raise TypeError(f"state['history'][{i}] must be a real number, got {type(x).__name__}")
            if not math.isfinite(x):
                raise ValueError(f"state['history'][{i}] is {x}: the window holds finite losses only "
                                 "(a non-finite one would make the threshold NaN)")
            history.append(float(x))
        counters = {}
        for key in ("steps", "spikes"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"state[{key!r}] must be an int >= 0, got {value!r}")
            counters[key] = int(value)
        if counters["spikes"] > counters["steps"]:
            raise ValueError(f"state['spikes'] = {counters['spikes']} exceeds state['steps'] = {counters['steps']}")
        self._history = collections.deque(history[-self.window:], maxlen=self.window)
        self.steps = counters["steps"]
        self.spikes = counters["spikes"]

    def __repr__(self):
        return (f"SpikeDetector(window={self.window}, k={self.k}, warmup={self.warmup}, "
                f"mad_floor={self.mad_floor}, rel_margin={self.rel_margin}; "
                f"steps={self.steps}, spikes={self.spikes})")


def _as_loss(loss) -> float:
    """``SpikeDetector.update``'s argument as a float: a real number or a 0-dim real tensor."""
    if isinstance(loss, torch.Tensor):
        if loss.dim() != 0 or loss.dtype == torch.bool or loss.is_complex():
            raise TypeError(f"loss must be a real number or a 0-dim real tensor, got a {loss.dtype} tensor "
                            f"of shape {tuple(loss.shape)}")
        return float(loss)
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"loss must be a real number or a 0-dim real tensor, got {type(loss).__name__}")
    return float(loss)


def feature_norm_penalty(features: torch.Tensor, target: float = 8.0, band: float = 2.0,
                         weight: float = 5e-3, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Band penalty on feature norms: ``weight * mean(relu(| ||f|| - target | - band) ** 2)``.

    ``features`` is ``[..., D]`` with ``D >= 1`` (an empty feature dim is a ValueError: there is
    no norm to keep in a band); norms are taken over the last dim. The mean runs over
    present rows only (``mask``, shape ``features.shape[:-1]``, ``True`` = present); it is
    0 when no row is present. Absent rows get a zero gradient and may hold anything, NaN
    included. Computed in fp32 (float64 for float64 input); returns a 0-dim tensor of that
    dtype. Defaults are the seed's (target 8, band 2, weight 5e-3; its second round used
    1e-2). No host synchronisation.
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError("features must be a floating-point tensor")
    if features.dim() < 1:
        raise ValueError("features must have at least one dim (the feature dim)")
    if features.shape[-1] == 0:
        raise ValueError(f"features has an empty feature dim (shape {tuple(features.shape)}): a norm needs D >= 1")
    for name, value in (("target", target), ("band", band), ("weight", weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    ct = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.to(ct)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor")
        if mask.shape != features.shape[:-1]:
            raise ValueError(f"mask must have shape {tuple(features.shape[:-1])}, got {tuple(mask.shape)}")
        # Zero absent rows *before* the norm, so garbage there reaches neither value nor gradient.
        f = torch.where(mask[..., None], f, torch.zeros_like(f))
    norms = torch.linalg.vector_norm(f, dim=-1)
    excess = torch.relu((norms - target).abs() - band)
    per_row = excess * excess
    if mask is None:
        count = per_row.new_tensor(float(max(per_row.numel(), 1)))
    else:
        per_row = torch.where(mask, per_row, torch.zeros_like(per_row))
        count = mask.sum().clamp_min(1).to(ct)
    return weight * per_row.sum() / count


def check_finite(*tensors: Optional[torch.Tensor], names: Optional[Sequence[str]] = None) -> None:
    """Raise ``ValueError`` naming the first input that holds NaN or Inf.

    ``None`` entries are skipped (optional inputs); integer and bool tensors always pass. ``names`` labels the inputs in the message (default ``"tensor 0"``, ...).
    This reads device memory, so it synchronises: call it when you want the check (for
    example under a debug flag), not on every step of a fast loop. It exists because the
    seed's loss turned a NaN into a silent zero, which hides the fault.
    """
    if names is None:
        names = [f"tensor {i}" for i in range(len(tensors))]
    else:
        names = list(names)
        if len(names) != len(tensors):
            raise ValueError(f"got {len(tensors)} tensors but {len(names)} names")
    for name, t in zip(names, tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf) "
                             f"in shape {tuple(t.shape)}")


__all__ = ["SpikeDetector", "feature_norm_penalty", "check_finite", "MAD_TO_SIGMA"]
