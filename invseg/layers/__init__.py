"""Spectrally normalized layers and the once-per-step spectral-state update (DESIGN §1d, §1f–§1h).

Layers:   SNDepthwiseConv, SNPointwiseConv, SNDSConv, SNLinear, SNConv (full conv, for stems) (spatial_dims 1/2/3;
          method "fft" | "naive" | "torch" | "none"; sn_mode "reparam" | "project"; scaling "hard" | "soft")
Scaling:  LipschitzScale
Updates:  update_spectral_state, attach_spectral_update, SpectralUpdater, spectral_state_frozen, spectral_layers
Inspect:  SpectralInfo (``layer.spectral_info()``), spectral_summary
Ops:      depthwise_conv (F.conv{d}d(groups=C) with a fast CPU backward)
Helpers:  SpectralNormLayer (base class), METHODS, SCALINGS, SN_MODES
"""

from .base import (
    CERTIFIED_PATHS,
    METHODS,
    SCALINGS,
    SN_MODES,
    LipschitzScale,
    SpectralInfo,
    SpectralNormLayer,
    spectral_layers,
    spectral_state_frozen,
)
from .depthwise_op import depthwise_conv
from .sn_conv import SNDepthwiseConv, SNDSConv, SNPointwiseConv
from .sn_full_conv import SNConv
from .sn_linear import SNLinear
from .update import SpectralUpdater, attach_spectral_update, update_spectral_state

__all__ = [
    "SNDepthwiseConv",
    "SNPointwiseConv",
    "SNDSConv",
    "SNLinear",
    "SNConv",
    "LipschitzScale",
    "SpectralInfo",
    "SpectralNormLayer",
    "spectral_summary",
    "update_spectral_state",
    "attach_spectral_update",
    "SpectralUpdater",
    "spectral_state_frozen",
    "spectral_layers",
    "depthwise_conv",
    "METHODS",
    "SCALINGS",
    "SN_MODES",
    "CERTIFIED_PATHS",
]


def spectral_summary(module) -> list[tuple[str, SpectralInfo]]:
    """``(name, layer.spectral_info())`` for every SN layer of ``module``, in module order."""
    return [(name, m.spectral_info()) for name, m in module.named_modules() if isinstance(m, SpectralNormLayer)]
