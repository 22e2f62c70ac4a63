"""sdm_triton: fused Triton kernels for the SDM loss (see SPEC.md), with a chunked torch fallback.

    from sdm_triton import sdm_loss
    loss = sdm_loss(image_feats, text_feats, pids, pids, temperature=0.02)
"""

from reference.options import SDMOptions, SDMRowLosses

from .api import BACKENDS, SDMLoss, SDMStats, sdm_loss

__all__ = ["sdm_loss", "SDMLoss", "SDMStats", "SDMOptions", "SDMRowLosses", "BACKENDS"]
__version__ = "0.1.0"
