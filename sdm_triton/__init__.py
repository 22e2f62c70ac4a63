"""sdm_triton: the SDM (similarity distribution matching) loss, with Triton kernels and a pure-PyTorch backend.

    from sdm_triton import sdm_loss
    loss = sdm_loss(image_feats, text_feats, pids, logit_scale=50.0)   # IRRA's scale; g_ids = pids

The contract (math, masks, properties, precision) is docs/contract.md; ``sdm_triton.reference``
is the oracle. Importing this package does not import Triton: the kernels load on first use.
"""

from ._version import __version__
from .api import BACKENDS, SDMLoss, describe_path, sdm_loss, sdm_loss_multi
from .options import KernelConfig, SDMOptions, SDMRowLosses, SDMStats
from .presets import PRESETS, SDMPreset, get_preset, preset_kwargs, preset_loss, seed_temperature, tbps_logit_scale
from .stability import SpikeDetector, check_finite, feature_norm_penalty

__all__ = [
    "sdm_loss", "sdm_loss_multi", "SDMLoss", "SDMStats", "SDMOptions", "SDMRowLosses", "KernelConfig", "BACKENDS",
    "describe_path", "SpikeDetector", "feature_norm_penalty", "check_finite",
    "SDMPreset", "PRESETS", "get_preset", "preset_kwargs", "preset_loss", "seed_temperature", "tbps_logit_scale",
    "sdm_loss_distributed", "SDMLossDistributed", "__version__",
]


def __getattr__(name):
    # torch.distributed is imported only by whoever uses it
    if name in ("sdm_loss_distributed", "SDMLossDistributed"):
        from . import distributed
        return getattr(distributed, name)
    raise AttributeError(f"module 'sdm_triton' has no attribute {name!r}")
