"""MONAI's UNet under the registry name ``monai_unet``: the conventional baseline of the segmentation comparison."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from invseg.nets.registry import register_model

__all__ = ["monai_unet"]


@register_model("monai_unet")
def monai_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int],
    strides: Sequence[int] | None = None,
    kernel_size: int | Sequence[int] = 3,
    up_kernel_size: int | Sequence[int] = 3,
    num_res_units: int = 0,
    act: Any = "PRELU",
    norm: Any = "INSTANCE",
    dropout: float = 0.0,
    bias: bool = True,
    adn_ordering: str = "NDA",
) -> nn.Module:
    """``monai.networks.nets.UNet`` with these arguments (MONAI's defaults), ``strides`` defaulting to 2 per level.

    Args:
        spatial_dims, in_channels, out_channels, channels, kernel_size, up_kernel_size, num_res_units, act,
            norm, dropout, bias, adn_ordering: as in ``monai.networks.nets.UNet``.
        strides: stride of every down step, ``len(channels) - 1`` entries; ``None`` (default): 2 each.

    Raises:
        ValueError: ``channels`` with fewer than 2 levels, or ``strides`` of the wrong length.

    MONAI is imported on the first call, not when :mod:`invseg.nets` is imported.
    """
    from monai.networks.nets import UNet

    channels = list(channels)
    if len(channels) < 2:
        raise ValueError(f"channels must list at least 2 levels for monai_unet, got {channels}")
    strides = [2] * (len(channels) - 1) if strides is None else list(strides)
    if len(strides) != len(channels) - 1:
        raise ValueError(f"strides must have len(channels) - 1 = {len(channels) - 1} entries for monai_unet, "
                         f"got {strides}")
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=channels,
                strides=strides, kernel_size=kernel_size, up_kernel_size=up_kernel_size,
                num_res_units=num_res_units, act=act, norm=norm, dropout=dropout, bias=bias,
                adn_ordering=adn_ordering)
