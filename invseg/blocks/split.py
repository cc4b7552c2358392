"""Channel split and merge: the invertible bookkeeping of the U-Net skip connections."""

from __future__ import annotations

import torch
from torch import Tensor

from invseg.blocks.base import InvertibleModule

__all__ = ["ChannelSplit", "ChannelMerge"]


def _check_split(split_channels: int) -> int:
    if split_channels < 1:
        raise ValueError(f"split_channels must be >= 1, got {split_channels}")
    return int(split_channels)


def _split(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if x.ndim < 2 or not 0 < k < x.shape[1]:
        raise ValueError(f"cannot split {k} channels off an input of shape {tuple(x.shape)}: need 0 < {k} < C")
    return x[:, :k], x[:, k:]


class ChannelSplit(InvertibleModule):
    """``x -> (x[:, :k], x[:, k:])`` (1 -> 2 tensors); inverse concatenates.

    In :class:`~invseg.nets.IUNet` the first part is the skip connection kept for the up path and
    the second part continues down.

    Args:
        split_channels: ``k``, channels of the first output (``0 < k < C``).
    """

    num_inputs = 1
    num_outputs = 2

    def __init__(self, split_channels: int) -> None:
        super().__init__()
        self.split_channels = _check_split(split_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, *s) -> ((B, k, *s), (B, C - k, *s))`` (views of ``x``)."""
        return _split(x, self.split_channels)

    def inverse(self, a: Tensor, b: Tensor) -> Tensor:
        """``((B, k, *s), (B, C - k, *s)) -> (B, C, *s)``."""
        return torch.cat((a, b), dim=1)

    def backward_step(self, y, grad_y, params):
        """Concatenate values and gradients (no parameters, nothing to recompute)."""
        return (torch.cat(y, dim=1),), (torch.cat(grad_y, dim=1),), ()

    def extra_repr(self) -> str:
        return f"split_channels={self.split_channels}"


class ChannelMerge(InvertibleModule):
    """``(a, b) -> cat(a, b)`` along channels (2 -> 1 tensors); the inverse of :class:`ChannelSplit`.

    Args:
        split_channels: channels of ``a`` (used by the inverse to split again).
    """

    num_inputs = 2
    num_outputs = 1

    def __init__(self, split_channels: int) -> None:
        super().__init__()
        self.split_channels = _check_split(split_channels)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """``((B, k, *s), (B, C - k, *s)) -> (B, C, *s)``."""
        if a.shape[1] != self.split_channels:
            raise ValueError(f"expected {self.split_channels} channels in the first input, got {a.shape[1]}")
        return torch.cat((a, b), dim=1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, *s) -> ((B, k, *s), (B, C - k, *s))``."""
        return _split(y, self.split_channels)

    def backward_step(self, y, grad_y, params):
        """Split values and gradients (no parameters, nothing to recompute)."""
        (y,), (g,) = y, grad_y
        return _split(y, self.split_channels), _split(g, self.split_channels), ()

    def extra_repr(self) -> str:
        return f"split_channels={self.split_channels}"
