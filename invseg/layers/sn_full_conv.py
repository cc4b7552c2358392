"""Spectrally normalized full (dense-channel) convolution, e.g. for a network's stem."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from invseg.spectral import conv_spec
from invseg.spectral.full_conv import (
    _tuple,
    full_conv_projection,
    full_conv_search,
    full_conv_sigma_from_projection,
)

from .base import SpectralNormLayer
from .sn_conv import conv_fn

__all__ = ["SNConv"]


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class SNConv(SpectralNormLayer):
    """Spectrally normalized full convolution (all input channels to all output channels), 1D/2D/3D.

    Meant for layers with few channels such as a network's stem. σ for ``method``:

    * ``"fft"`` — the multi-channel DFT bound (:func:`full_conv_search`, module docstring) at the current
      input size; state ``[M, ω]`` + input size (``3d`` int64); a certified upper bound. In forward σ is
      ``||W P||`` with ``P`` the top singular direction at the remembered frequency (derived once per update,
      :func:`~invseg.spectral.full_conv_projection`): the same value and gradient as the bound.
    * ``"naive"`` — the warm-start full-operator power method (state: one ``(1, Cin, *N)`` input map;
      converges from below to within ``eps``).
    * ``"torch"`` — ``torch.nn.utils.parametrizations.spectral_norm`` (norm of the reshaped weight matrix,
      not a bound of the conv's operator norm).
    * ``"none"`` — the plain conv (no normalization, no K).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels, out_channels: channel counts.
        kernel_size: int or per-axis (default 3). stride: int or per-axis (default 1).
        padding: zero padding per axis, ``<= k - 1`` (default ``(k - 1) // 2``).
        bias: learnable bias (default True).
        K, scaling, s_init: Lipschitz scale (:class:`~invseg.layers.LipschitzScale`).
        method: ``"fft"`` (default), ``"naive"``, ``"torch"`` or ``"none"``.
        eps: naive power-method tolerance. max_iter: its iteration cap per update.
        grids: candidate grids per axis of the DFT bound (default None: 2 up to 64² inputs, else 1).

    Memory: the fft search holds ``Cout·Cin·ΠM`` complex values transiently, once per optimizer step.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | None = None,
        bias: bool = True,
        K: float = 1.0,
        scaling: str = "hard",
        s_init: float = 3.0,
        method: str = "fft",
        eps: float = 1e-2,
        max_iter: int = 100,
        grids: int | None = None,
    ):
        super().__init__(method, K, scaling, s_init)
        conv_fn(spatial_dims)  # validates spatial_dims
        d = spatial_dims
        self.spatial_dims = d
        self.in_channels = _check_int(in_channels, "in_channels")
        self.out_channels = _check_int(out_channels, "out_channels")
        self.kernel_size = _tuple(kernel_size, d, "kernel_size", 1)
        self.stride = _tuple(stride, d, "stride", 1)
        self.padding = (
            tuple((k - 1) // 2 for k in self.kernel_size) if padding is None else _tuple(padding, d, "padding", 0)
        )
        if any(p > k - 1 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"padding must be <= kernel_size - 1 on every axis, got {self.padding}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps, self.max_iter = float(eps), _check_int(max_iter, "max_iter")
        self.grids = None if grids is None else _check_int(grids, "grids")
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
        ref = conv_cls(in_channels, out_channels, self.kernel_size, bias=bias)  # torch's default initialisation
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        if method == "fft":
            self.register_buffer("sn_state", torch.zeros(2 * d, dtype=torch.int64))
        elif method == "naive":
            self.register_buffer("sn_u", None)  # shaped (1, Cin, *N) on the first update
        if method in ("fft", "naive"):
            self.register_buffer("sn_input_size", torch.zeros(d, dtype=torch.int64))
        elif method == "torch":
            nn.utils.parametrizations.spectral_norm(self, "weight")

    def _needs_input_size(self) -> bool:
        return True

    def _conv_spec(self, size):
        return conv_spec(self.weight, size, self.stride, self.padding)

    def _update_state(self, size):
        if self.method == "naive":
            self._naive_update(size)
            return
        value, state = full_conv_search(self.weight, size, self.stride, self.padding, self.grids)
        self.sn_state.copy_(state)
        self._sn_proj = full_conv_projection(self.weight, state, self.stride)
        self._sn_ref, self._sn_cert = (size, self.weight.detach().clone(), value.to(self.weight.dtype)), None
        if self._written_size != size:  # a host-to-device copy only when the input size changed
            self.sn_input_size.copy_(torch.tensor(size))
            self._written_size = size

    def _state_sigma(self) -> torch.Tensor:
        # σ = ||W P|| with the top singular direction at the remembered frequency (derived, not persistent):
        # the value and gradient of full_conv_sigma_at for these weights, at a fraction of its ops
        proj = getattr(self, "_sn_proj", None)
        real = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        if proj is None or proj.device != self.weight.device or proj.dtype != real:
            proj = self._sn_proj = full_conv_projection(self.weight, self.sn_state, self.stride)
        return full_conv_sigma_from_projection(self.weight, proj, self.stride)

    def _sigma(self) -> torch.Tensor:
        if self.method == "fft":
            return self._certified(self._state_sigma())
        return self._naive_sigma()

    def _update_or_certify(self, search: bool) -> None:
        """Between searches (``search=False``): keep the state and certify the bound for the current weights,
        ``bound(θ) <= bound(θ₀) + sqrt(Σ_{o,i} ||θ_{o,i} − θ₀_{o,i}||₁²)`` on the remembered grid (each entry of
        ``B_ω`` moves by at most the ℓ1 norm of its filter's change; Frobenius bounds the spectral norm)."""
        ref = self._sn_ref
        if search or self.method != "fft" or ref is None or ref[0] != self._seen_size:
            self.update_spectral_state()
            return
        with torch.no_grad():
            delta = (self.weight.detach() - ref[1]).abs().sum(dim=tuple(range(2, self.weight.dim())))
            self._sn_cert = ref[2] + torch.linalg.vector_norm(delta)
        self._mark_updated(self._seen_size)

    def _on_load(self) -> None:
        self._sn_proj = None  # rebuilt from the loaded state (and weights) on first use
        self._sn_ref = self._sn_cert = None  # the next update searches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SNConv expects input of shape (B, {self.in_channels}, *spatial) with {self.spatial_dims} "
                f"spatial dims, got {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        w = self.normalized_weight(size)
        return conv_fn(self.spatial_dims)(x, w, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, method={self.method!r}")


# -- the network --------------------------------------------------------------------------------------
