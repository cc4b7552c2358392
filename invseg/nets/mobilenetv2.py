"""MobileNetV2 (Sandler et al., 2018) without batch norm, every layer spectrally normalized (paper §4.3).

The architecture is torchvision's (inverted residuals, ReLU6, width multiplier, channels rounded to
multiples of ``round_nearest``) with batch norm removed and every conv/linear layer replaced by its SN
counterpart: 17 depthwise convs (13 unit-stride, 4 stride-2), the pointwise expansions and projections,
the 1×1 head conv and the classifier. An inverted residual's depthwise conv, ReLU6 and linear projection
form a DS conv with an activation between its parts (:class:`~invseg.layers.SNDSConv`, paper Table 6:
"Activations depthwise separable convolutions: ReLU6").

The stem is a *full* 3×3 stride-2 convolution (3 → 32 channels), neither depthwise nor pointwise. It is
normalized by :class:`SNConv`, which extends the DFT argument of DESIGN §1a/§1b to multi-channel convs:
for a circulant conv on a grid ``M`` (``s | M``) the operator is block-diagonal in frequency and

    ||S||₂ = max_ω ||B_ω||₂ / s^{d/2},   B_ω = [Θ̂^M(ω + q·M/s)]_{q ∈ {0..s-1}^d}   (Cout × Cin·s^d),

with ``Θ̂^M(j)`` the ``Cout × Cin`` matrix of the filters' DFTs on ``M``; for zero padding every grid
``M >= N + p`` with ``s | M`` gives an upper bound (the minimum over a few is taken). Why not the naive
full-operator power method for the stem: its state is one input image per layer (3·224² floats = 588 KiB
on ImageNet), above the whole network's state budget of DESIGN §3 (≤ 64 KB); the DFT bound keeps ``3d``
integers, is a certified upper bound (the power method converges from below), and costs one FFT of the
``Cout·Cin`` filters per optimizer step (96 filters on a 226² grid for ImageNet, ~40 MB transient).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from invseg.layers import METHODS, SNConv, SNDSConv, SNLinear, SNPointwiseConv
from invseg.utils import check_int, check_positive, check_spatial_dims

from .registry import register_model
from .resnet_ds import count_layers, depthwise_layers

__all__ = [
    "MobileNetV2",
    "InvertedResidual",
    "SNConv",
    "make_divisible",
    "INVERTED_RESIDUAL_SETTING",
    "depthwise_layers",
    "count_layers",
]

#: (expansion t, output channels c, repeats n, first stride s) per stage (Sandler et al., Table 2).
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding: the nearest multiple of ``divisor`` (at least ``min_value``,
    default ``divisor``), never more than 10 % below ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual without batch norm: pointwise expansion + ReLU6 (omitted when
    ``expand_ratio == 1``), then a DS conv = depthwise 3×3 (stride ``stride``) + ReLU6 + linear pointwise
    projection; identity residual when ``stride == 1`` and the channels match.

    With SN on, expansion and DS conv are each ``K``-Lipschitz: the block is at most ``K²``-Lipschitz
    (``K² + 1`` with the residual; ``K`` and ``K + 1`` without expansion).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels, out_channels: channel counts.
        stride: depthwise stride.
        expand_ratio: hidden channels = ``round(in_channels · expand_ratio)``.
        exact_pointwise: exact (SVD) norms for the pointwise layers (default False).
        sn_method: ``"fft"`` (default), ``"naive"``, ``"torch"`` or ``"none"`` for every SN layer of the block.
        **sn: ``K``, ``scaling``, ``s_init``, ``eps``, ``sn_mode`` for every SN layer of the block.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int, expand_ratio: float,
                 exact_pointwise: bool = False, sn_method: str = "fft", **sn):
        super().__init__()
        sn = dict(sn, method=sn_method)  # the layers' own name of the SN method
        hidden = int(round(in_channels * expand_ratio))
        if hidden < 1:
            raise ValueError(f"expand_ratio must give at least one hidden channel, got {expand_ratio!r}")
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.expand = (
            SNPointwiseConv(spatial_dims, in_channels, hidden, exact=exact_pointwise, **sn)
            if expand_ratio != 1 else None
        )
        self.conv = SNDSConv(spatial_dims, hidden, out_channels, kernel_size=3, stride=stride,
                             activation=nn.ReLU6(), exact_pointwise=exact_pointwise, **sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else F.relu6(self.expand(x))
        out = self.conv(out)
        return x + out if self.use_res_connect else out


@register_model("mobilenetv2")
class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision's architecture) without batch norm, every layer spectrally normalized.

    Layers: :class:`SNConv` stem 3×3 stride 2 ``in_channels → 32·w`` + ReLU6; 17 :class:`InvertedResidual`
    blocks (settings :data:`INVERTED_RESIDUAL_SETTING`: 17 depthwise convs, 4 of them stride 2);
    pointwise head ``→ 1280·max(1, w)`` + ReLU6; global average pool; dropout; :class:`~invseg.layers.SNLinear`
    classifier. Channel counts are ``make_divisible(c · width_mult, round_nearest)``.

    Spectral normalization (paper §4.3, Table 4/6): depthwise convs by the DFT bound at their input size,
    pointwise layers and the classifier by the warm-start power method (tolerance ``eps``), the stem by
    the multi-channel DFT bound; every layer scaled by the same ``K`` (hard, or soft ``K·tanh(s)``; the
    paper trains with soft scaling, K = 10–40, s_init = 3 or 0.5). Call
    :func:`invseg.layers.update_spectral_state` once per optimizer step.

    Args:
        num_classes: number of logits (default 1000).
        width_mult: channel multiplier (default 1.0; > 0).
        K: Lipschitz constant per layer (> 0, default 1).
        scaling: ``"hard"`` (default) or ``"soft"``.
        s_init: initial ``s`` of soft scaling (default 3).
        sn_method: ``"fft"`` (default), ``"naive"``, ``"torch"``, or ``"none"`` (no normalization: the timing
            baseline with the same architecture).
        eps: power-method tolerance (paper: 0.01).
        dropout: dropout probability before the classifier (default 0.2, in [0, 1)).
        in_channels: input channels (default 3).
        round_nearest: channel rounding (default 8).
        spatial_dims: 2 (default); 1 and 3 give the same network on 1D/3D inputs.
        exact_pointwise: normalize the pointwise layers and the classifier by their exact (SVD) norm at
            every update instead of the certified warm-start power method (default False, the paper's
            method; see :class:`~invseg.nets.ResNet34DS`).
        sn_mode: ``"reparam"`` or ``"project"`` (the paper's protocol; see :class:`~invseg.nets.ResNet34DS`).

    Input: ``(B, in_channels, *N)``, any ``N >= 2`` (ImageNet: 224, stages at 112/56/28/14/7). Output:
    logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        K: float = 1.0,
        scaling: str = "hard",
        s_init: float = 3.0,
        sn_method: str = "fft",
        eps: float = 1e-2,
        dropout: float = 0.2,
        in_channels: int = 3,
        round_nearest: int = 8,
        spatial_dims: int = 2,
        exact_pointwise: bool = False,
        sn_mode: str = "reparam",
    ):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes")
        self.in_channels = check_int(in_channels, "in_channels")
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        check_positive(width_mult, "width_mult")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        check_int(round_nearest, "round_nearest")
        self.width_mult = float(width_mult)
        if sn_method not in METHODS:
            raise ValueError(f"sn_method must be one of {METHODS}, got {sn_method!r}")
        sn = dict(K=check_positive(K, "K"), scaling=scaling, s_init=s_init, eps=eps, sn_mode=sn_mode)
        layer_sn = dict(sn, method=sn_method)  # the layers' own name of the SN method
        ex = bool(exact_pointwise)

        channels = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        self.stem = SNConv(d, in_channels, channels, kernel_size=3, stride=2, **layer_sn)
        blocks = []
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                blocks.append(InvertedResidual(d, channels, out, s if i == 0 else 1, t, ex, sn_method, **sn))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = SNPointwiseConv(d, channels, self.last_channel, exact=ex, **layer_sn)
        self.dropout = nn.Dropout(dropout)
        self.classifier = SNLinear(self.last_channel, num_classes, exact=ex, **layer_sn)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, last_channel)``."""
        x = F.relu6(self.stem(x))
        x = F.relu6(self.head(self.blocks(x)))
        return x.mean(dim=tuple(range(2, x.dim())))  # global average pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.forward_features(x)))
