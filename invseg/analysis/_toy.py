"""Tiny reference models for testing the memory measurement (private).

Built from plain ``torch.nn`` layers only, so their saved activations can be counted by hand:
a chain of ``depth`` convolutions keeps the input of every convolution for backward.
"""

from __future__ import annotations

from torch import nn

from invseg.utils import check_spatial_dims, conv_module


def conv_chain(channels: int = 16, depth: int = 4, spatial_dims: int = 2, kernel_size: int = 1,
               bias: bool = False) -> nn.Sequential:
    """A chain of ``depth`` ``channels -> channels`` convolutions, no activations.

    With plain autograd a forward on ``(B, channels, *spatial)`` saves ``depth`` activations of
    that shape (the input of each conv); a loss on the output (``square``) saves one more.

    Args:
        channels: input = output channels. Default 16.
        depth: number of convolutions. Default 4.
        spatial_dims: 1, 2 or 3. Default 2.
        kernel_size: odd kernel size, "same" padding. Default 1.
        bias: convolutions with bias. Default False.
    """
    check_spatial_dims(spatial_dims)
    if channels < 1 or depth < 1:
        raise ValueError(f"channels and depth must be >= 1, got channels={channels}, depth={depth}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size!r}")
    conv = conv_module(spatial_dims)
    return nn.Sequential(*(conv(channels, channels, kernel_size, padding=kernel_size // 2, bias=bias)
                           for _ in range(depth)))
