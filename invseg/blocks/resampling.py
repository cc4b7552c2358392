"""Learnable invertible (orthogonal) down- and upsampling by a factor 2 per axis (iUNet §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from invseg.blocks._orthogonal import OrthogonalMatrix, haar_matrix
from invseg.blocks.base import InvertibleModule
from invseg.utils import check_spatial_dims, conv_fn, conv_transpose_fn

__all__ = ["OrthogonalDownsample", "OrthogonalUpsample", "RESAMPLING_INITS"]

#: Initialisations of the resampling matrix: ``"haar"`` (per channel, the orthonormal d-D Haar
#: transform of each 2**d patch: output channel ``c * 2**d`` is the patch average times
#: ``sqrt(2**d)``) or ``"squeeze"`` (identity: a plain space-to-depth, ``pixel_unshuffle`` order).
RESAMPLING_INITS = ("haar", "squeeze")


def _init_matrix(spatial_dims: int, channels: int, init: str) -> Tensor:
    if init not in RESAMPLING_INITS:
        raise ValueError(f"init must be one of {RESAMPLING_INITS}, got {init!r}")
    n = 2**spatial_dims
    if init == "squeeze":
        return torch.eye(channels * n)
    # kron(I_C, H): rows (c, j) -- filter j of channel c --, columns (c, k) -- patch position k.
    return torch.kron(torch.eye(channels, dtype=torch.float64), haar_matrix(spatial_dims, torch.float64)).float()


class _OrthogonalResampling(InvertibleModule):
    """Stride-2 conv with kernel ``2**d`` whose ``(C 2^d) x (C 2^d)`` matrix is orthogonal.

    The matrix ``W`` acts on each non-overlapping ``2 x ... x 2`` patch of every channel: rows are
    output channels, columns are (input channel, patch position) in the order of a conv weight
    ``(C 2^d, C, 2, ..., 2)``. As the patches are disjoint and ``W`` is orthogonal, the operator is
    orthogonal: its inverse is the transposed conv with the same weight.
    """

    def __init__(self, spatial_dims: int, low_channels: int, init: str, learnable: bool) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if low_channels < 1:
            raise ValueError(f"channels must be >= 1, got {low_channels}")
        self.low_channels = low_channels  # channels at the fine resolution
        self.high_channels = low_channels * 2**spatial_dims  # channels at the coarse resolution
        self.init = init
        self.matrix = OrthogonalMatrix(_init_matrix(spatial_dims, low_channels, init), learnable)
        self._conv = conv_fn(self.spatial_dims)
        self._conv_t = conv_transpose_fn(self.spatial_dims)

    def _kernel(self, dtype: torch.dtype) -> Tensor:
        # (C 2^d, C 2^d) -> (C 2^d, C, 2, ..., 2)
        w = self.matrix()
        return w.reshape(self.high_channels, self.low_channels, *([2] * self.spatial_dims)).to(dtype)

    def _down(self, x: Tensor) -> Tensor:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.low_channels:
            raise ValueError(
                f"expected input (B, {self.low_channels}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got shape {tuple(x.shape)}"
            )
        odd = [s for s in x.shape[2:] if s % 2]
        if odd:
            raise ValueError(f"spatial sizes must be even for downsampling by 2, got {tuple(x.shape[2:])}")
        # autocast would pick the conv dtype itself; outside it, follow the input's dtype.
        return self._conv(x, self._kernel(x.dtype), stride=2)

    def _up(self, y: Tensor) -> Tensor:
        if y.ndim != self.spatial_dims + 2 or y.shape[1] != self.high_channels:
            raise ValueError(
                f"expected input (B, {self.high_channels}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got shape {tuple(y.shape)}"
            )
        return self._conv_t(y, self._kernel(y.dtype), stride=2)

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, fine_channels={self.low_channels}, "
            f"coarse_channels={self.high_channels}, init={self.init!r}, learnable={self.matrix.learnable}"
        )


class OrthogonalDownsample(_OrthogonalResampling):
    """Invertible downsampling ``(B, C, *N) -> (B, C 2^d, *N/2)``, an orthogonal operator.

    Args:
        spatial_dims: 1, 2 or 3.
        channels: input channels ``C``.
        init: ``"haar"`` (default) or ``"squeeze"``, see :data:`RESAMPLING_INITS`.
        learnable: learn the orthogonal matrix (``torch.nn.utils.parametrizations.orthogonal``).
            Default True.

    Input spatial sizes must be even (ValueError otherwise).
    """

    def __init__(self, spatial_dims: int, channels: int, init: str = "haar", learnable: bool = True) -> None:
        super().__init__(spatial_dims, channels, init, learnable)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *N) -> (B, C 2^d, *N/2)``."""
        return self._down(x)

    def inverse(self, y: Tensor) -> Tensor:
        """``(B, C 2^d, *N/2) -> (B, C, *N)``."""
        return self._up(y)


class OrthogonalUpsample(_OrthogonalResampling):
    """Invertible upsampling ``(B, C, *N) -> (B, C / 2^d, *2N)``, the inverse of a downsampling.

    Args:
        spatial_dims: 1, 2 or 3.
        channels: input channels ``C`` (a multiple of ``2**spatial_dims``).
        init: ``"haar"`` (default) or ``"squeeze"``, see :data:`RESAMPLING_INITS`; with the same
            ``init`` an untrained upsampling is the exact inverse of an untrained downsampling.
        learnable: learn the orthogonal matrix. Default True.
    """

    def __init__(self, spatial_dims: int, channels: int, init: str = "haar", learnable: bool = True) -> None:
        factor = 2 ** check_spatial_dims(spatial_dims)
        if channels < factor or channels % factor:
            raise ValueError(
                f"channels must be a positive multiple of 2**spatial_dims={factor} for upsampling, got {channels}"
            )
        super().__init__(spatial_dims, channels // factor, init, learnable)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *N) -> (B, C / 2^d, *2N)``."""
        return self._up(x)

    def inverse(self, y: Tensor) -> Tensor:
        """``(B, C / 2^d, *2N) -> (B, C, *N)``; spatial sizes must be even."""
        return self._down(y)
