"""ResNet-34 for CIFAR with depthwise-separable convolutions and no batch norm (paper §4.2, Table 3/5).

Every convolution of the CIFAR ResNet-34 (3×3 stem + [3, 4, 6, 3] BasicBlocks) is a DS conv — a depthwise
3×3 conv followed by a pointwise conv with no activation between — so the network has **33 DS convs**, 3 of
them with stride 2 (the first conv of stages 2, 3 and 4), and one fully connected layer. There is no
batch norm (it changes the Lipschitz constant). With spectral normalization every layer is normalized:
the DS convs part-wise (depthwise by the DFT bound, pointwise by the warm-start power method), the
projection shortcuts and the classifier by the power method, each scaled by the same ``K`` (hard, or soft
``K·tanh(s)``).

This module also holds the layer-inspection helpers :func:`spectral_layer_kind`, :func:`depthwise_layers`
and :func:`count_layers`, shared by :mod:`invseg.nets.mobilenetv2` (tests and the per-layer
bound-accuracy analysis use them).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from invseg.layers import (
    METHODS,
    SNDepthwiseConv,
    SNDSConv,
    SNLinear,
    SNPointwiseConv,
    SpectralNormLayer,
)

from invseg.utils import check_int, check_positive, check_spatial_dims

from .registry import register_model

__all__ = ["ResNet34DS", "BasicBlockDS", "depthwise_layers", "count_layers", "spectral_layer_kind"]

#: Blocks per stage and channels per stage of ResNet-34 (He et al., 2016), CIFAR variant.
RESNET34_BLOCKS = (3, 4, 6, 3)
RESNET34_CHANNELS = (64, 128, 256, 512)


# -- inspection helpers -----------------------------------------------------------------------------


def spectral_layer_kind(module: nn.Module) -> str | None:
    """``"depthwise"``, ``"pointwise"``, ``"linear"``, ``"ds_conv"`` or ``"conv"`` (any other invseg SN
    layer, e.g. a full convolution) for the layers the counts are made of; ``None`` otherwise."""
    if isinstance(module, SNDSConv):
        return "ds_conv"
    if isinstance(module, SNDepthwiseConv):
        return "depthwise"
    if isinstance(module, SNPointwiseConv):
        return "pointwise"
    if isinstance(module, SNLinear):
        return "linear"
    if isinstance(module, SpectralNormLayer):
        return "conv"
    return None


def _stride_label(stride: tuple[int, ...]) -> str:
    return str(stride[0]) if len(set(stride)) == 1 else "x".join(str(s) for s in stride)


def depthwise_layers(model: nn.Module) -> list[SNDepthwiseConv]:
    """The depthwise convolutions of ``model`` in registration order (the forward order for the nets of
    this package)."""
    return [m for m in model.modules() if isinstance(m, SNDepthwiseConv)]


def count_layers(model: nn.Module) -> dict[str, int]:
    """Count the layers of ``model`` by kind and stride.

    Keys: ``"<kind>"`` for every kind of :func:`spectral_layer_kind` present, and ``"<kind>/stride<s>"``
    for the strided kinds (``depthwise``, ``pointwise``, ``conv``, ``ds_conv``; ``s`` is the stride, or
    ``"2x1"``-style when the axes differ). A DS conv's stride is that of its depthwise part, and its two
    parts are also counted as ``depthwise`` and ``pointwise``. Counts do not depend on ``sn_method``.

    Example (ResNet34DS): ``{"ds_conv": 33, "ds_conv/stride1": 30, "ds_conv/stride2": 3, "depthwise": 33,
    ..., "linear": 1}``.
    """
    counts: Counter[str] = Counter()
    for m in model.modules():
        kind = spectral_layer_kind(m)
        if kind is None:
            continue
        counts[kind] += 1
        if kind == "ds_conv":
            counts[f"ds_conv/stride{_stride_label(m.depthwise.stride)}"] += 1
        elif kind != "linear" and hasattr(m, "stride"):
            counts[f"{kind}/stride{_stride_label(tuple(m.stride))}"] += 1
    return dict(sorted(counts.items()))


# -- the network --------------------------------------------------------------------------------------


class BasicBlockDS(nn.Module):
    """ResNet BasicBlock with DS convs and no batch norm: ``relu(f(x) + shortcut(x))`` with
    ``f = DS conv ∘ relu ∘ DS conv``.

    The shortcut is the identity, or — where the block changes the channels or the resolution — a
    spectrally normalized **pointwise conv with the block's stride** (the 1×1 projection of the original
    ResNet). It is not a DS conv, so it does not enter the count of 33 DS convs. With SN on, each DS conv
    and the projection is ``K``-Lipschitz, so the block is at most ``(K² + 1)``- (identity shortcut) or
    ``(K² + K)``-Lipschitz (projection).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels, out_channels: channel counts.
        stride: stride of the first DS conv and of the projection shortcut (default 1).
        exact_pointwise: exact (SVD) norms for the pointwise parts and the projection (default False).
        sn_method: ``"fft"`` (default), ``"naive"``, ``"torch"`` or ``"none"`` for every SN layer of the block.
        **sn: ``K``, ``scaling``, ``s_init``, ``eps``, ``sn_mode`` for every SN layer of the block.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1,
                 exact_pointwise: bool = False, sn_method: str = "fft", **sn):
        super().__init__()
        sn = dict(sn, method=sn_method)  # the layers' own name of the SN method
        self.conv1 = SNDSConv(spatial_dims, in_channels, out_channels, kernel_size=3, stride=stride,
                              exact_pointwise=exact_pointwise, **sn)
        self.conv2 = SNDSConv(spatial_dims, out_channels, out_channels, kernel_size=3, stride=1,
                              exact_pointwise=exact_pointwise, **sn)
        if stride != 1 or in_channels != out_channels:
            # bias-free, as in ResNet: conv2 already carries a bias before the sum
            self.shortcut: nn.Module = SNPointwiseConv(
                spatial_dims, in_channels, out_channels, stride=stride, bias=False, exact=exact_pointwise, **sn
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


@register_model("resnet34ds")
class ResNet34DS(nn.Module):
    """ResNet-34 for CIFAR with every convolution a depthwise-separable conv, no batch norm (paper §4.2).

    Architecture: DS conv 3×3 ``in_channels → 64`` (stride 1) + ReLU; four stages of [3, 4, 6, 3]
    :class:`BasicBlockDS` with 64/128/256/512 channels, the first block of stages 2–4 with stride 2;
    global average pooling; SN fully connected layer ``512 → num_classes``. That is 33 DS convs (3 with
    stride 2), 3 strided pointwise projection shortcuts and 1 linear layer.

    Spectral normalization (paper §2.3, §4.2; DESIGN §1): each DS conv's depthwise part is normalized by
    the DFT bound at its input size and its pointwise part by the warm-start power method (tolerance
    ``eps``); projection shortcuts and the classifier by the power method. Every DS conv, projection and
    the classifier gets the same ``K`` with ``scaling`` ``"hard"`` (×K) or ``"soft"`` (×K·tanh(s), ``s``
    learnable, initialised to ``s_init``). Call :func:`invseg.layers.update_spectral_state` once per
    optimizer step (or :func:`invseg.layers.attach_spectral_update`).

    Args:
        num_classes: number of output logits (default 10).
        in_channels: input channels (default 3).
        K: Lipschitz constant per layer (> 0, default 1; paper: 1–10, timing runs K = 5 hard).
        scaling: ``"hard"`` (default) or ``"soft"``.
        s_init: initial ``s`` of soft scaling (default 3).
        sn_method: ``"fft"`` (invseg, default), ``"naive"`` (full-operator warm-start power method for the
            convs), ``"torch"`` (``torch.nn.utils.parametrizations.spectral_norm``, not a bound of the
            operator norm) or ``"none"`` (the same architecture without normalization and without K — the
            timing baseline).
        eps: power-method tolerance (paper: 0.01).
        spatial_dims: 2 (default, CIFAR); 1 and 3 give the same network on 1D/3D inputs.
        exact_pointwise: normalize the pointwise parts, projections and the classifier by their exact
            (SVD) norm at every update instead of the certified warm-start power method (default False,
            the paper's method; both are certified upper bounds, the exact norm is tighter and costs an
            ``O(n³)`` eigendecomposition per layer and step).
        sn_mode: ``"reparam"`` (σ differentiable in forward) or ``"project"`` (the paper's protocol: the
            updater rescales the weights in place after every optimizer step; forward is the plain conv
            times K). See :mod:`invseg.layers.base`.

    Input: ``(B, in_channels, *N)``; any ``N >= 1`` works (CIFAR: 32×32, stages at 32/16/8/4). The
    depthwise bounds follow the input size (a new size initialises the layers there on the next forward).
    Output: logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        K: float = 1.0,
        scaling: str = "hard",
        s_init: float = 3.0,
        sn_method: str = "fft",
        eps: float = 1e-2,
        spatial_dims: int = 2,
        exact_pointwise: bool = False,
        sn_mode: str = "reparam",
    ):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes")
        self.in_channels = check_int(in_channels, "in_channels")
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if sn_method not in METHODS:
            raise ValueError(f"sn_method must be one of {METHODS}, got {sn_method!r}")
        sn = dict(K=check_positive(K, "K"), scaling=scaling, s_init=s_init, eps=eps, sn_mode=sn_mode)
        layer_sn = dict(sn, method=sn_method)  # the layers' own name of the SN method
        d = spatial_dims
        c0 = RESNET34_CHANNELS[0]
        ex = bool(exact_pointwise)
        self.stem = SNDSConv(d, in_channels, c0, kernel_size=3, stride=1, exact_pointwise=ex, **layer_sn)
        stages = []
        prev = c0
        for i, (blocks, ch) in enumerate(zip(RESNET34_BLOCKS, RESNET34_CHANNELS)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlockDS(d, prev, ch, stride, ex, sn_method, **sn)]
            layers += [BasicBlockDS(d, ch, ch, 1, ex, sn_method, **sn) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            prev = ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = SNLinear(prev, num_classes, exact=ex, **layer_sn)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, 512)``."""
        x = F.relu(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=tuple(range(2, x.dim())))  # global average pool: (B, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
