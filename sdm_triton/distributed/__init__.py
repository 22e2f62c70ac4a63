"""The SDM loss of a batch spread over the ranks of a process group (``torch.distributed``).

    from sdm_triton.distributed import sdm_loss_distributed, SDMLossDistributed
    loss = sdm_loss_distributed(img_local, txt_local, pid_local, logit_scale=scale)   # under DDP / FSDP
    loss.backward()

Each rank passes its local rows; layout "global" (default) gives every rank the loss of the
concatenated batch, exactly the single-process ``sdm_loss`` of it, and layout "local_rows"
TBPS-CLIP's per-rank loss. The default gradient convention, "ddp", is right for
DistributedDataParallel / FSDP, which average gradients over ranks; "unscaled" gives each
rank the plain derivatives of the loss with respect to its tensors (``sdm_loss_distributed``
says which to pick).

Layout of the package:

    api.py         sdm_loss_distributed, SDMLossDistributed
    metadata.py    validation of every argument and the cross-rank agreement check, before
                   any other collective: an error on one rank raises on every rank
    comm.py        the collectives (padded all-gather / reduce-scatter, the ring's
                   point-to-point pattern)
    blocks.py      what both strategies of the global layout share: block problems, global
                   label masses, the global totals and statistics, the autograd Function
                   (their host math is the torch backend's: `sdm_triton.reduction`)
    allgather.py   strategy "allgather"      ring.py   strategy "ring"
    local_rows.py  layout "local_rows" (composes the public sdm_loss)

The strategies compose the backends' primitives (``prepare``, ``statistics``, ``finish``,
``backward``: `sdm_triton.backend`), for the Triton kernels and the torch backend alike.
"""

from .api import SDMLossDistributed, sdm_loss_distributed
from .metadata import GRAD_CONVENTIONS, LAYOUTS, STRATEGIES

__all__ = ["sdm_loss_distributed", "SDMLossDistributed", "STRATEGIES", "LAYOUTS", "GRAD_CONVENTIONS"]
