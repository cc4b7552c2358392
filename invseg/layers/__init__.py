"""Spectrally normalized layers and the once-per-step spectral-state update (DESIGN §1d, §1f).

Layers:   SNDepthwiseConv, SNPointwiseConv, SNDSConv, SNLinear, SNConv (full conv, for stems) (spatial_dims 1/2/3; method
          "fft" | "naive" | "torch" | "none"; scaling "hard" | "soft")
Scaling:  LipschitzScale
Updates:  update_spectral_state, attach_spectral_update, SpectralUpdater, spectral_state_frozen, spectral_layers,
          fused_spectral_scales (all SN layers of a model normalized group by group in one forward)
Ops:      depthwise_conv (F.conv{d}d(groups=C) with a fast CPU backward)
Helpers:  SpectralNormLayer (base class), conv_fn, METHODS, SCALINGS
"""

from .base import (
    METHODS,
    SCALINGS,
    LipschitzScale,
    SpectralNormLayer,
    SpectralUpdater,
    attach_spectral_update,
    spectral_layers,
    spectral_state_frozen,
    update_spectral_state,
)
from .depthwise_op import depthwise_conv
from .fused import fused_spectral_scales
from .sn_conv import SNDepthwiseConv, SNDSConv, SNPointwiseConv, conv_fn
from .sn_full_conv import SNConv
from .sn_linear import SNLinear

__all__ = [
    "SNDepthwiseConv",
    "SNPointwiseConv",
    "SNDSConv",
    "SNLinear",
    "SNConv",
    "LipschitzScale",
    "SpectralNormLayer",
    "update_spectral_state",
    "attach_spectral_update",
    "SpectralUpdater",
    "spectral_state_frozen",
    "spectral_layers",
    "fused_spectral_scales",
    "depthwise_conv",
    "conv_fn",
    "METHODS",
    "SCALINGS",
]
