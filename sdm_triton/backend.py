"""What a backend computes, written down: the interface between autograd and the kernels.

A backend takes a `problem.Problem` and computes, in the forward, every softmax row's loss
and the reduced value, keeping what its backward needs; in the backward, the gradients of
q, g and the logit scale from the gradients of the two differentiable outputs. Tensors
follow the index spaces of `problem.py` (NDR softmax rows: q against each gallery, then
each gallery's rows against q).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple

import torch

from .problem import Problem

#: rows of ``ForwardOut.red`` [NUM_RED, K] (kernels/finish.py writes them in this order)
RED_FIELDS = ("sum_q2g", "valid_q2g", "sum_g2q", "valid_g2q", "pos_q2g", "pos_g2q",
              "q_norm_mean", "q_norm_max", "g_norm_mean", "g_norm_max")
NUM_RED = len(RED_FIELDS)


class ForwardOut(NamedTuple):
    value: torch.Tensor     # [K] (0-dim when problem.scalar_value): the reduced loss, differentiable
    rows: torch.Tensor      # [NDR] per-row losses (0 for invalid rows), differentiable
    valid: torch.Tensor     # [NDR] bool
    red: torch.Tensor       # [NUM_RED, K] per-gallery sums, valid counts, positive mass, norm statistics
    state: Tuple[torch.Tensor, ...]   # what the backward needs (backend-specific, saved for backward)


class Backend(Protocol):
    """A way to compute the SDM loss (`sdm_triton.launch.TritonBackend`, `torch_backend.TorchBackend`)."""

    name: str

    def check_supported(self, q: torch.Tensor) -> None:
        """Raise TypeError / ValueError if this backend cannot take ``q`` (dtype, device)."""

    def forward(self, p: Problem) -> ForwardOut:
        """Losses of every softmax row, their reduction and the state for the backward.
        No host synchronisation."""

    def backward(self, p: Problem, out: ForwardOut, d_value: Optional[torch.Tensor],
                 d_rows: Optional[torch.Tensor], want: Tuple[bool, bool, bool]
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(dq, dg, d_scale) from the gradients of ``out.value`` and ``out.rows`` (either may be
        None: no gradient); ``want`` says which of the three are needed. dq, dg have the
        shapes and dtypes of p.q, p.g; d_scale is 0-dim fp32 (or None)."""


def reduction_coefficients(p: Problem) -> Tuple[float, float]:
    """The weight each direction's (summed or averaged) loss has in the value: 0 if not asked for,
    0.5 when two directions combine by mean."""
    o = p.options
    half = 0.5 if (o.wants_q2g and o.wants_g2q and o.combine == "mean") else 1.0
    return (half if o.wants_q2g else 0.0), (half if o.wants_g2q else 0.0)
