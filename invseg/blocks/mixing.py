"""Invertible channel mixing: a 1x1 conv with an orthogonal matrix (Glow's 1x1 conv, orthogonal)."""

from __future__ import annotations

import torch
from torch import Tensor

from invseg.blocks._orthogonal import OrthogonalMatrix
from invseg.blocks.base import InvertibleModule
from invseg.utils import check_spatial_dims, conv_fn

__all__ = ["InvertibleChannelMixing", "MIXING_INITS"]

#: Initialisations: ``"identity"``; ``"flip"`` (swap the two channel halves, so a one-sided
#: coupling after it transforms the other half); ``"random"`` (Haar-distributed orthogonal, drawn
#: from torch's global generator).
MIXING_INITS = ("identity", "flip", "random")


def _init_matrix(channels: int, init: str) -> Tensor:
    if init not in MIXING_INITS:
        raise ValueError(f"init must be one of {MIXING_INITS}, got {init!r}")
    if init == "identity":
        return torch.eye(channels)
    if init == "flip":
        return torch.roll(torch.eye(channels), shifts=channels // 2, dims=0)
    q, r = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class InvertibleChannelMixing(InvertibleModule):
    """``y = W x`` per voxel with an orthogonal ``C x C`` matrix ``W``; inverse ``x = W^T y``.

    ``W`` is learnable through ``torch.nn.utils.parametrizations.orthogonal``; the operator is
    orthogonal (norm 1, exact inverse up to rounding).

    Args:
        spatial_dims: 1, 2 or 3.
        channels: ``C`` (>= 1).
        init: one of :data:`MIXING_INITS`. Default ``"identity"``.
        learnable: learn ``W``. Default True.
    """

    def __init__(self, spatial_dims: int, channels: int, init: str = "identity", learnable: bool = True) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.init = init
        self.matrix = OrthogonalMatrix(_init_matrix(channels, init), learnable)
        self._conv = conv_fn(self.spatial_dims)

    def _mix(self, x: Tensor, transpose: bool) -> Tensor:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected input (B, {self.channels}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got shape {tuple(x.shape)}"
            )
        w = self.matrix()
        w = w.mT if transpose else w
        return self._conv(x, w.reshape(self.channels, self.channels, *([1] * self.spatial_dims)).to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *spatial) -> (B, C, *spatial)``."""
        return self._mix(x, transpose=False)

    def inverse(self, y: Tensor) -> Tensor:
        """``(B, C, *spatial) -> (B, C, *spatial)``."""
        return self._mix(y, transpose=True)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, channels={self.channels}, init={self.init!r}"
