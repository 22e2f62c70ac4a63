"""What a backend computes, written down: the interface between autograd and the kernels.

A backend takes a `problem.Problem` and computes, in the forward, every softmax row's loss
and the reduced value, keeping what its backward needs; in the backward, the gradients of
q, g and the logit scale from the gradients of the two differentiable outputs. Tensors
follow the index spaces of `problem.py` (NDR softmax rows: q against each gallery, then
each gallery's rows against q).

The forward is three primitives, which the distributed strategies (`sdm_triton.distributed`)
compose over blocks of columns held by different ranks:

    prepare      per-sample norms (and, with dense labels, each softmax row's label mass)
    statistics   partial statistics of every softmax row over THIS problem's columns
    finish       merge any number of partials of the same rows, per-row losses, reduction

``forward(p)`` is ``finish(p, *statistics(p, prepare(p)), prepare(p))``. Two layout facts
are shared by both backends, and are all that distributed code relies on (K = 1):

* a partial is a tensor [S, NUM_STATS, NDR] in the compute dtype: S column segments, the
  softmax rows on the last axis. Statistics of disjoint column sets of the same rows merge
  by concatenation along the segment axis; the q rows' part is ``partial[..., :K*N]`` and the
  gallery rows' part ``partial[..., K*N:]``. What the NUM_STATS entries mean is the backend's
  own business (log2 domain and online rescaling in the Triton kernels, natural log and
  two passes in the torch backend): a partial goes back to the backend that made it;
* ``row_state(p, out)`` is [F, NDR]: every per-softmax-row quantity the backward reads (a
  row's loss, validity, softmax normaliser, label mass), again with the rows on the last
  axis, and ``state_from_rows`` rebuilds a ForwardOut for the backward of a problem from
  its prepared samples and such rows. So the backward of a block (q_r against a gallery
  block g_s) can run with the q rows' state of one problem and the gallery rows' state of
  another.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple, Optional, Protocol, Tuple

import torch

from .problem import Problem

#: rows of ``ForwardOut.red`` [NUM_RED, K] (kernels/finish.py writes them in this order)
RED_FIELDS = ("sum_q2g", "valid_q2g", "sum_g2q", "valid_g2q", "pos_q2g", "pos_g2q",
              "q_norm_mean", "q_norm_max", "g_norm_mean", "g_norm_max")
NUM_RED = len(RED_FIELDS)
#: the row of each field, by name: ``red[RED.valid_q2g]``
RED = collections.namedtuple("RedRows", RED_FIELDS)(*range(NUM_RED))
#: entries per softmax row and segment of a partial (kernels/stats.py, torch_backend.py)
NUM_STATS = 5


class ForwardOut(NamedTuple):
    value: torch.Tensor     # [K] (0-dim when problem.scalar_value): the reduced loss, differentiable
    rows: torch.Tensor      # [NDR] per-row losses (0 for invalid rows), differentiable
    valid: torch.Tensor     # [NDR] bool
    red: torch.Tensor       # [NUM_RED, K] per-gallery sums, valid counts, positive mass, norm statistics
                            # (the torch backend fills the norm rows only for problem.return_stats)
    state: Tuple[torch.Tensor, ...]   # what the backward needs (backend-specific, saved for backward)


class Statistics(NamedTuple):
    """What ``statistics`` returns: the q rows' statistics are in segments [0, segments_q) of
    ``partial``, the gallery rows' in [0, segments_g) (the other entries are not read)."""
    partial: torch.Tensor   # [S, NUM_STATS, NDR], S >= max(segments_q, segments_g)
    segments_q: int
    segments_g: int


class Backend(Protocol):
    """A way to compute the SDM loss (`sdm_triton.launch.TritonBackend`, `torch_backend.TorchBackend`)."""

    name: str
    #: True: ``prepare`` needs the label masses of identity labels too when the problem's
    #: columns are only part of the batch (the torch backend: its reverse KL reads Y_ij =
    #: y_ij / ysum_i per pair). False: it counts the positives in its statistics, which merge
    #: like the other statistics (the Triton backend).
    needs_id_masses: bool

    def check_supported(self, q: torch.Tensor) -> None:
        """Raise TypeError / ValueError if this backend cannot take ``q`` (dtype, device)."""

    def forward(self, p: Problem) -> ForwardOut:
        """Losses of every softmax row, their reduction and the state for the backward:
        ``prepare`` -> ``statistics`` -> ``finish``. No host synchronisation."""

    def prepare(self, p: Problem, label_masses: Optional[torch.Tensor] = None) -> Any:
        """Per-sample data (norms, ...) and, with dense labels, each softmax row's label mass.

        ``label_masses`` [2, NDR] (ysum, sum y ln y of each softmax row, compute dtype): given
        from outside when this problem's columns are only part of the batch (the masses are
        sums over ALL columns: the distributed strategies pass global ones); used for dense
        labels, and for identity labels when ``needs_id_masses``. None: computed from ``p``."""

    def statistics(self, p: Problem, prepared: Any) -> Statistics:
        """Partial statistics of every softmax row over this problem's columns (module doc)."""

    def finish(self, p: Problem, partial: torch.Tensor, segments_q: int, segments_g: int,
               prepared: Any) -> ForwardOut:
        """Merge the first ``segments_q`` segments of ``partial`` for the q rows and the first
        ``segments_g`` for the gallery rows; per-row losses, validity, the reduction over this
        problem's rows (``red``, ``value``) and the backward's state."""

    def backward(self, p: Problem, out: ForwardOut, d_value: Optional[torch.Tensor],
                 d_rows: Optional[torch.Tensor], want: Tuple[bool, bool, bool],
                 partial_grads: bool = False,
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(dq, dg, d_scale) from the gradients of ``out.value`` and ``out.rows`` (either may be
        None: no gradient); ``want`` says which of the three are needed. A row's weight is
        ``d_value[k] * coefficient / (valid count in out.red if reduction="mean") + d_rows[row]``,
        0 for an invalid row: with ``d_value=None`` the weights are ``d_rows`` alone. dq, dg have
        the shapes and dtypes of p.q, p.g; with ``partial_grads`` they stay in the compute
        dtype (fp32, float64 for float64 features), not rounded or clamped to the input dtype,
        so that the gradients of several problems (blocks, ranks) can be summed before one
        cast (the normalisation's backward is linear in the accumulated products). d_scale is
        0-dim in the compute dtype (or None): this problem's pairs' part of dL/ds."""

    def row_state(self, p: Problem, out: ForwardOut) -> torch.Tensor:
        """[F, NDR] compute dtype: every per-softmax-row quantity of ``out`` that the backward
        reads (module doc)."""

    def state_from_rows(self, p: Problem, prepared: Any, rows: torch.Tensor) -> ForwardOut:
        """A ForwardOut that ``backward(p, ..., d_value=None, ...)`` takes, from ``prepare(p)``
        and per-row state [F, NDR] (``row_state`` of the problems the rows come from); its
        value and reduction are not filled."""


def option_coefficients(o) -> Tuple[float, float]:
    """The weight each direction's (summed or averaged) loss has in the value under options ``o``
    (``SDMOptions``): 0 if not asked for, 0.5 when two directions combine by mean."""
    half = 0.5 if (o.wants_q2g and o.wants_g2q and o.combine == "mean") else 1.0
    return (half if o.wants_q2g else 0.0), (half if o.wants_g2q else 0.0)
