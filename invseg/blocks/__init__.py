"""Invertible blocks with one contract (``forward`` / ``inverse``) and a memory-efficient backward.

Contract:     InvertibleModule (base class; memcnn.is_invertible_module holds for every block)
Couplings:    AdditiveCoupling, AffineCoupling (one-sided; sub-networks from a constructor callable)
Residual:     InvertibleResidual (y = x + g(x), Lip(g) <= K < 1, fixed-point inverse)
Resampling:   OrthogonalDownsample, OrthogonalUpsample (learnable orthogonal, factor 2 per axis)
Mixing:       InvertibleChannelMixing (orthogonal 1x1 conv)
Skips:        ChannelSplit, ChannelMerge
Sequences:    InvertibleSequence (stack of steps; memory-efficient backward by inversion)
Sub-networks: SNDSSubnet, sn_ds_subnet, ACTIVATIONS (spectrally normalized DS convs)
Checkers:     reconstruction_error, block_error_growth, condition_estimate, gradient_error (results:
              ReconstructionError, StepError, ConditionEstimate, GradientError), precision_available,
              scale_subnet_weights, sub_networks (invseg.blocks.inversion; the trainer's guard uses them)
"""

from invseg.blocks.base import InvertibleModule
from invseg.blocks.coupling import AdditiveCoupling, AffineCoupling
from invseg.blocks.inversion import (
    ConditionEstimate,
    GradientError,
    ReconstructionError,
    StepError,
    block_error_growth,
    condition_estimate,
    gradient_error,
    precision_available,
    reconstruction_error,
    scale_subnet_weights,
    sub_networks,
)
from invseg.blocks.memory import InvertibleSequence
from invseg.blocks.mixing import MIXING_INITS, InvertibleChannelMixing
from invseg.blocks.resampling import RESAMPLING_INITS, OrthogonalDownsample, OrthogonalUpsample
from invseg.blocks.residual import InvertibleResidual
from invseg.blocks.split import ChannelMerge, ChannelSplit
from invseg.blocks.subnet import ACTIVATIONS, SNDSSubnet, SubnetConstructor, sn_ds_subnet

__all__ = [
    "InvertibleModule",
    "AdditiveCoupling",
    "AffineCoupling",
    "InvertibleResidual",
    "OrthogonalDownsample",
    "OrthogonalUpsample",
    "RESAMPLING_INITS",
    "InvertibleChannelMixing",
    "MIXING_INITS",
    "ChannelSplit",
    "ChannelMerge",
    "InvertibleSequence",
    "SNDSSubnet",
    "sn_ds_subnet",
    "SubnetConstructor",
    "ACTIVATIONS",
    "reconstruction_error",
    "block_error_growth",
    "condition_estimate",
    "gradient_error",
    "precision_available",
    "scale_subnet_weights",
    "sub_networks",
    "ReconstructionError",
    "StepError",
    "ConditionEstimate",
    "GradientError",
]
