"""sdm_triton: fused Triton kernels for the SDM loss (see SPEC.md), with a chunked torch fallback.

    from sdm_triton import sdm_loss
    loss = sdm_loss(image_feats, text_feats, pids, pids, temperature=0.02)
"""

from ._version import __version__
from .options import SDMOptions, SDMRowLosses

from .api import BACKENDS, SDMLoss, SDMStats, sdm_loss, sdm_loss_multi
from .presets import PRESETS, SDMPreset, get_preset, preset_kwargs, preset_loss, seed_temperature, tbps_logit_scale
from .stability import SpikeDetector, check_finite, feature_norm_penalty

__all__ = [
    "sdm_loss", "sdm_loss_multi", "SDMLoss", "SDMStats", "SDMOptions", "SDMRowLosses", "BACKENDS",
    "SpikeDetector", "feature_norm_penalty", "check_finite",
    "SDMPreset", "PRESETS", "get_preset", "preset_kwargs", "preset_loss", "seed_temperature", "tbps_logit_scale",
    "sdm_loss_distributed",
]


def __getattr__(name):
    # torch.distributed is imported only by whoever uses it
    if name == "sdm_loss_distributed":
        from .distributed import sdm_loss_distributed
        return sdm_loss_distributed
    raise AttributeError(name)
