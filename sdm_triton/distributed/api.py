"""The entry point ``sdm_loss_distributed`` and its module form ``SDMLossDistributed``."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from ..api import DEFAULT_WORKSPACE_BYTES
from ..options import KernelConfig
from . import metadata
from .allgather import Allgather
from .blocks import Setup, run_global
from .comm import Comm
from .local_rows import local_rows_loss
from .ring import Ring


def sdm_loss_distributed(
    q: torch.Tensor,
    g: torch.Tensor,
    q_ids: Optional[torch.Tensor] = None,
    g_ids: Optional[torch.Tensor] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    q_mask: Optional[torch.Tensor] = None,
    g_mask: Optional[torch.Tensor] = None,
    group=None,
    strategy: str = "allgather",
    layout: str = "global",
    grad_convention: str = "ddp",
    temperature: float = 0.02,
    logit_scale: Union[None, float, torch.Tensor] = None,
    kl: str = "forward",
    eps: float = 1e-8,
    direction: str = "both",
    combine: str = "mean",
    reduction: str = "mean",
    normalize: bool = True,
    backend: str = "auto",
    check_values: bool = False,
    return_stats: bool = False,
    kernel_config: Union[None, str, KernelConfig] = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
):
    """SDM loss of the global batch whose rows are spread over the ranks of ``group``.

    Every rank passes its LOCAL rows: ``q`` [N_r, D], ``g`` [M_r, D], ``q_ids`` [N_r] and
    ``g_ids`` [M_r] (or one of them for a paired batch, N_r == M_r), or ``labels`` [N_r, M]
    (this rank's rows of the global label matrix, columns in rank order, M = sum of M_r),
    and masks. The global batch is the concatenation of the ranks' rows in rank order.

    layout="global" (default): every rank returns the loss that ``sdm_triton.sdm_loss``
        gives on the concatenated batch (every option; positives count across ranks).
        ``reduction="none"`` returns this rank's rows' losses (``q2g`` [N_r], ``g2q`` [M_r]).
    layout="local_rows": TBPS-CLIP's loss, a per-rank value: rank r's q rows against all
        gathered g (q2g) and its g rows against all gathered q (g2q), each reduced over rank
        r's valid rows only.

    Gradients (``grad_convention``), with J the objective: the global loss (layout
    "global"; with ``reduction="none"``, the sum over ranks of what each backpropagates),
    or the mean over ranks of the per-rank values (layout "local_rows"):

    * ``"ddp"`` (default): for training with DistributedDataParallel or FSDP, which AVERAGE
      the gradients over ranks. Each rank's q and g receive P * dJ/d(its rows) (P the world
      size), so that after the encoders' gradients are averaged over ranks they are exactly
      dJ/d(parameters); a ``logit_scale`` tensor receives dJ/ds itself on every rank (its
      average is dJ/ds). Call ``loss.backward()`` on every rank and let DDP / FSDP average,
      with no further scaling. (Multiplying the loss by P instead would fix the encoders
      but make logit_scale's gradient P times too large.)
    * ``"unscaled"``: each rank's q and g receive dJ/d(its rows) exactly, not multiplied by
      P, and ``logit_scale`` receives dJ/ds on every rank: the derivatives of J with respect
      to this rank's tensors. For code that consumes the feature gradients itself
      (``torch.autograd.grad`` on the features, model parallelism) or that SUMS the
      encoders' gradients over ranks (then do not sum logit_scale's: it is already complete
      on every rank). Under DDP / FSDP averaging this convention gives encoder gradients
      P times too small. ``"global"`` is its earlier name (accepted).

    strategy (layout "global"):
        "allgather": every rank gathers all of g and runs its q rows against it. Memory
            O(M D) per rank.
        "ring": the g blocks travel around the ranks point-to-point, the next block in
            flight while one is computed. Memory O((N_r + max M_r) D) per rank.
        Both give the single-process numbers up to rounding order.

    group:          the process group (default: the world).
    Other arguments as ``sdm_triton.sdm_loss`` (``return_stats`` gives the global batch's
    statistics; ``kernel_config``'s column segments are not used: the ranks' blocks are the
    segments).

    Requirements and costs:
      * One small metadata all-gather starts every call and is read on the host (the one
        host synchronisation: the uneven sizes allocate the buffers). Every argument is
        validated before it; a local validation error on any rank (``workspace_bytes="64"``
        included), or a disagreement between ranks (D, dtype, options, logit scale value,
        requires_grad flags), raises on EVERY rank: the failing rank its own TypeError /
        ValueError, the others a ValueError naming it. No rank is left in a collective.
      * Every rank must call forward and, if any does, backward (the backward runs
        collectives). ``check_values=True`` exchanges its outcome the same way.
      * The group's backend must support the tensors' device: NCCL for CUDA, gloo for CPU.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sdm_loss_distributed needs an initialised torch.distributed process group")
    group = group if group is not None else dist.group.WORLD
    call = error = None
    try:
        call = metadata.check_local(
            q, g, q_ids, g_ids, labels, q_mask, g_mask, strategy=strategy, layout=layout,
            grad_convention=grad_convention, temperature=temperature, logit_scale=logit_scale, kl=kl, eps=eps,
            direction=direction, combine=combine, reduction=reduction, normalize=normalize, backend=backend,
            check_values=check_values, return_stats=return_stats, kernel_config=kernel_config,
            workspace_bytes=workspace_bytes)
    except Exception as exc:   # noqa: BLE001 -- reported to every rank by the exchange, then raised here
        error = exc
    q_sizes, g_sizes = metadata.exchange(group, call, error)
    comm = Comm(group, dist.get_rank(group), dist.get_world_size(group), q_sizes, g_sizes)
    if call.check_values:
        metadata.check_values_everywhere(call, comm)
    scale_t = call.scale if isinstance(call.scale, torch.Tensor) else None
    setup = Setup(call, comm, scale_t, 0.0 if scale_t is not None else float(call.scale))
    if call.layout == "local_rows":
        return local_rows_loss(setup)
    return run_global(Allgather if call.strategy == "allgather" else Ring, setup)


class SDMLossDistributed(torch.nn.Module):
    """``nn.Module`` over :func:`sdm_loss_distributed`, holding its options.

    The options are validated at construction (on this rank; construction runs no
    collective); each call checks, as the function does, that all ranks agree before any
    collective. The default gradient convention is ``"ddp"`` (see
    :func:`sdm_loss_distributed`): wrap the encoders in DistributedDataParallel / FSDP
    and call ``loss.backward()`` on every rank::

        criterion = SDMLossDistributed(strategy="ring")
        loss = criterion(img_local, txt_local, pid_local, logit_scale=model.logit_scale.exp())
        loss.backward()
    """

    def __init__(self, *, group=None, strategy: str = "allgather", layout: str = "global",
                 grad_convention: str = "ddp", temperature: float = 0.02, kl: str = "forward", eps: float = 1e-8,
                 direction: str = "both", combine: str = "mean", reduction: str = "mean", normalize: bool = True,
                 backend: str = "auto", check_values: bool = False,
                 kernel_config: Union[None, str, KernelConfig] = None,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
        super().__init__()
        options = dict(strategy=strategy, layout=layout, grad_convention=grad_convention, kl=kl, eps=eps,
                       direction=direction, combine=combine, reduction=reduction, normalize=normalize,
                       backend=backend, check_values=check_values, kernel_config=kernel_config,
                       workspace_bytes=workspace_bytes)
        metadata.check_options(temperature=temperature, logit_scale=None, return_stats=False, **options)
        self.group = group
        self.temperature = temperature
        self.options = options

    def forward(self, q, g, q_ids=None, g_ids=None, *, labels=None, q_mask=None, g_mask=None,
                logit_scale=None, return_stats=False):
        return sdm_loss_distributed(q, g, q_ids, g_ids, labels=labels, q_mask=q_mask, g_mask=g_mask,
                                    group=self.group, temperature=self.temperature, logit_scale=logit_scale,
                                    return_stats=return_stats, **self.options)

    def extra_repr(self):
        shown = {k: v for k, v in self.options.items() if k not in ("kernel_config", "workspace_bytes")}
        return f"temperature={self.temperature}, " + ", ".join(f"{k}={v!r}" for k, v in shown.items())
