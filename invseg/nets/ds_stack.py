"""DSStack: a plain (non-invertible) stack of SN depthwise-separable convs, the memory reference.

The network of DESIGN §3's state target ("3D stack 8×DS(32 ch)"): an input conv, ``depth`` SN DS
convs at constant width, a 1x1 head. Trained with plain autograd, so every layer keeps its
activations; its spectral state is what :mod:`invseg.experiments.memory_compare` compares across SN
methods.
"""

from __future__ import annotations

from torch import Tensor, nn

from invseg.blocks import ACTIVATIONS
from invseg.layers import METHODS, SCALINGS, SNDSConv
from invseg.nets.registry import register_model
from invseg.utils import check_int, check_spatial_dims, conv_module, is_int

__all__ = ["DSStack"]


@register_model("ds_stack")
class DSStack(nn.Module):
    """Input conv -> ``depth`` × (SN DS conv -> activation) at ``channels`` channels -> 1x1 head.

    Each DS conv is :class:`~invseg.layers.SNDSConv` ``(channels -> channels)`` with the activation
    between its depthwise and pointwise parts (so both parts keep their bias), followed by the same
    activation. With a spectral method every DS conv is ``K``-Lipschitz (DESIGN §1d). The input conv
    (``3**d`` kernel) and the head (1x1 conv to ``out_channels`` logits) are plain convolutions.

    Memory: plain autograd, activations grow linearly with ``depth``. Persistent spectral state per
    DS conv: ``"fft"`` 1 + 3d int64 (depthwise) and ``channels`` floats (pointwise);
    ``"naive"`` two ``(1, channels, *N)`` feature maps (one per part) for inputs of spatial size N.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels (>= 1).
        out_channels: output channels / classes of the logits (>= 1).
        channels: width of the DS convs (>= 1). Default 32.
        depth: number of SN DS convs (>= 1). Default 8.
        kernel_size: depthwise kernel size (odd). Default 3.
        K: Lipschitz constant of each DS conv (> 0). Default 1.0.
        scaling: ``"hard"`` (default) or ``"soft"``.
        sn_method: ``"fft"`` (default), ``"naive"``, ``"torch"`` or ``"none"``.
        sn_mode: ``"reparam"`` (default) or ``"project"``.
        activation: key of :data:`invseg.blocks.ACTIVATIONS`. Default ``"leaky_relu"``.

    Input: ``(B, in_channels, *N)``, any N with ``N_j >= 1``. Output: ``(B, out_channels, *N)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: int = 32,
        depth: int = 8,
        kernel_size: int = 3,
        K: float = 1.0,
        scaling: str = "hard",
        sn_method: str = "fft",
        activation: str = "leaky_relu",
        sn_mode: str = "reparam",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("channels", channels), ("depth", depth)):
            check_int(value, name)
        if not is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if not K > 0:
            raise ValueError(f"K must be > 0, got {K!r}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        if sn_method not in METHODS:
            raise ValueError(f"sn_method must be one of {METHODS}, got {sn_method!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        act = ACTIVATIONS[activation]
        conv = conv_module(spatial_dims)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.depth = depth
        self.sn_method = sn_method
        self.input_layer = conv(in_channels, channels, kernel_size=3, padding=1)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [
                SNDSConv(spatial_dims, channels, channels, kernel_size, K=K, scaling=scaling, method=sn_method,
                         activation=act(), sn_mode=sn_mode),
                act(),
            ]
        self.layers = nn.Sequential(*layers)
        self.head = conv(channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, *N) -> (B, out_channels, *N)`` logits."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DSStack expects input (B, {self.in_channels}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got {tuple(x.shape)}"
            )
        return self.head(self.layers(self.input_layer(x)))

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, channels={self.channels}, depth={self.depth}, "
                f"sn_method={self.sn_method!r}")
