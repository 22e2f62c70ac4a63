"""Reference SDM loss in plain PyTorch (no Triton): the oracle for tests and benchmarks.

Users can import it in their own tests without a GPU or Triton::

    from sdm_triton.reference import sdm_loss
"""

from sdm_triton.options import NORM_EPS, SDMOptions, SDMRowLosses
from .sdm import SDMLoss, sdm_loss
from .galleries import sdm_loss_multi

__all__ = ["sdm_loss", "sdm_loss_multi", "SDMLoss", "SDMOptions", "SDMRowLosses", "NORM_EPS"]
