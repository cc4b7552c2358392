"""Default sub-networks of the invertible blocks: spectrally normalized DS convs (DESIGN §1d)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from invseg.layers import SNDSConv

__all__ = ["SNDSSubnet", "ACTIVATIONS", "SubnetConstructor", "sn_ds_subnet", "DEFAULT_K"]

#: Default Lipschitz bound ``K`` of a sub-network, shared by :class:`SNDSSubnet`, :class:`invseg.nets.IUNet`
#: and the segmentation config. Below 1 so that the default is valid for every invertible block: an
#: i-ResNet block ``x + g(x)`` needs ``Lip(g) <= K < 1`` for its fixed-point inverse (DESIGN §2; the
#: iteration contracts by ``K`` per step, so 0.9 converges to 1e-6 in ~130 iterations), and couplings
#: invert exactly at any K, where K <= 1 also keeps the fp32 reconstruction error at ~1e-6 (README,
#: "Inversion error vs K"). Experiments that measured another K (the segmentation configs use 1.0) set it.
DEFAULT_K = 0.9

#: Signature of a sub-network constructor: ``(in_channels, out_channels) -> nn.Module`` mapping
#: ``(B, in_channels, *spatial)`` to ``(B, out_channels, *spatial)`` (FrEIA convention).
SubnetConstructor = Callable[[int, int], nn.Module]

#: Nonlinearities allowed between the DS convs; all are 1-Lipschitz, so the sub-network's
#: Lipschitz constant is bounded by the product of the convs' bounds.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "leaky_relu": partial(nn.LeakyReLU, negative_slope=0.1),
    "elu": nn.ELU,
    "relu": nn.ReLU,
}


class SNDSSubnet(nn.Module):
    """``num_convs`` SN depthwise-separable convs with a 1-Lipschitz nonlinearity between them.

    ``SNDSConv -> act -> SNDSConv [-> act -> SNDSConv ...]`` at unit stride, "same" padding, so
    ``(B, in_channels, *spatial) -> (B, out_channels, *spatial)`` for any spatial size.

    Every DS conv is normalized with bound ``K ** (1 / num_convs)`` (hard) or at most that (soft,
    ``K**(1/n) * tanh(s)``), so ``Lip(subnet) <= K`` for ``sn_method != "none"`` (paper §2.3,
    DESIGN §1d). With ``sn_method="none"`` the convs are plain DS convs and ``K`` is ignored.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels (>= 1).
        out_channels: output channels (>= 1).
        hidden_channels: channels between the convs; default ``max(in_channels, out_channels)``.
        K: Lipschitz bound of the whole sub-network (> 0). Default :data:`DEFAULT_K` (0.9).
        scaling: ``"hard"`` or ``"soft"``. Default ``"hard"``.
        sn_method: ``"fft"``, ``"naive"``, ``"torch"`` or ``"none"``. Default ``"fft"``.
        kernel_size: depthwise kernel size (odd). Default 3.
        activation: key of :data:`ACTIVATIONS`. Default ``"leaky_relu"``.
        num_convs: number of DS convs (>= 1). Default 2.
        sn_mode: ``"reparam"`` or ``"project"`` (see :mod:`invseg.layers.base`). Default ``"reparam"``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        hidden_channels: int | None = None,
        K: float = DEFAULT_K,
        scaling: str = "hard",
        sn_method: str = "fft",
        kernel_size: int = 3,
        activation: str = "leaky_relu",
        num_convs: int = 2,
        sn_mode: str = "reparam",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        if not K > 0:
            raise ValueError(f"K must be > 0, got {K}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        hidden = max(in_channels, out_channels) if hidden_channels is None else hidden_channels
        widths = [in_channels] + [hidden] * (num_convs - 1) + [out_channels]
        k_each = float(K) ** (1.0 / num_convs)
        layers: list[nn.Module] = []
        for i in range(num_convs):
            if i > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(
                SNDSConv(
                    spatial_dims,
                    widths[i],
                    widths[i + 1],
                    kernel_size=kernel_size,
                    K=k_each,
                    scaling=scaling,
                    method=sn_method,
                    sn_mode=sn_mode,
                )
            )
        self.net = nn.Sequential(*layers)
        self.K = float(K)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, *spatial) -> (B, out_channels, *spatial)``."""
        return self.net(x)


def sn_ds_subnet(spatial_dims: int, **kwargs) -> SubnetConstructor:
    """Return a constructor ``(in_channels, out_channels) -> SNDSSubnet(spatial_dims, ..., **kwargs)``."""
    return partial(SNDSSubnet, spatial_dims, **kwargs)
