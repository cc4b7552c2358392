"""Spectrally normalized full (dense-channel) convolution, e.g. for a network's stem."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from invseg.spectral import conv_spec, rounding_margin
from invseg.spectral.full_conv import (
    full_conv_projection,
    full_conv_search,
    full_conv_sigma_from_projection,
)
from invseg.utils import check_int, conv_fn, int_tuple

from .base import SpectralNormLayer, write_snapshots
from .matrix import BOUND_FLOOR
from .naive import naive_group_update, naive_sigma

__all__ = ["SNConv"]


class SNConv(SpectralNormLayer):
    """Spectrally normalized full convolution (all input channels to all output channels), 1D/2D/3D.

    Meant for layers with few channels such as a network's stem. σ for ``method``:

    * ``"fft"`` — the multi-channel DFT bound (:func:`~invseg.spectral.full_conv_search`) at the state's
      input size; state ``[M, ω]`` + input size (``3d`` int64) and the bound; a certified upper bound,
      certified between searches by ``bound(θ₀) + sqrt(Σ_{o,i} ||θ_oi − θ₀_oi||₁²)``. In reparam mode σ is
      ``||W P||`` with ``P`` the top singular direction at the remembered frequency
      (:func:`~invseg.spectral.full_conv_projection`): the value and gradient of the bound.
    * ``"naive"`` — the warm-start full-operator power method (state: one ``(1, Cin, *N)`` input map;
      converges from below to within ``eps``; not certified).
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
        sn_mode: ``"reparam"`` (default) or ``"project"``.

    Memory: the fft search holds ``Cout·Cin·ΠM`` complex values transiently, once per search.
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
        sn_mode: str = "reparam",
    ):
        super().__init__(method, K, scaling, s_init, sn_mode)
        conv_fn(spatial_dims)  # validates spatial_dims
        d = spatial_dims
        self.spatial_dims = d
        self.in_channels = check_int(in_channels, "in_channels")
        self.out_channels = check_int(out_channels, "out_channels")
        self.kernel_size = int_tuple(kernel_size, d, "kernel_size", minimum=1)
        self.stride = int_tuple(stride, d, "stride", minimum=1)
        self.padding = (
            tuple((k - 1) // 2 for k in self.kernel_size) if padding is None else int_tuple(padding, d, "padding", minimum=0)
        )
        if any(p > k - 1 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"padding must be <= kernel_size - 1 on every axis, got {self.padding}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps, self.max_iter = float(eps), check_int(max_iter, "max_iter")
        self.grids = None if grids is None else check_int(grids, "grids")
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
        ref = conv_cls(in_channels, out_channels, self.kernel_size, bias=bias)  # torch's default initialisation
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        if method == "fft":
            self.register_buffer("sn_state", torch.zeros(2 * d, dtype=torch.int64))
            self.register_buffer("_sn_proj", None, persistent=False)  # derived from sn_state and the weights
        elif method == "naive":
            self.register_buffer("sn_u", None)  # shaped (1, Cin, *N) on the first update
        if method in ("fft", "naive"):
            self.register_buffer("sn_input_size", torch.zeros(d, dtype=torch.int64))
            self.register_buffer("sn_bound", torch.zeros(()))
        elif method == "torch":
            nn.utils.parametrizations.spectral_norm(self, "weight")

    def _conv_spec(self, size):
        return conv_spec(self.weight, size, self.stride, self.padding)

    def _covers(self, size) -> bool:
        if self._size is None or self.method != "fft":
            return size == self._size
        return len(size) == len(self._size) and all(n <= m for n, m in zip(size, self._size))

    def _group_key(self):
        if self.method in ("fft", "naive") and self._size is not None:
            self._conv_spec(self._size)  # validates the geometry
            return ("full", id(self))  # stems are few: each is updated on its own
        return None

    def _path(self) -> str:
        return "naive" if self.method == "naive" else "full-dft"

    @staticmethod
    def _group_update(layers, *, search=True, check=True, iters=1, slack_tol=None, rescale=False):
        """Search (or, between searches, certify) each stem; ``rescale`` divides the weight by its bound."""
        if layers[0].method == "naive":
            naive_group_update(layers, check=check, iters=iters, rescale=rescale)
            return
        for layer in layers:
            redo = search or layer._sn_ref is None
            if not redo:
                delta = (layer.weight.detach() - layer._sn_ref).abs().sum(dim=tuple(range(2, layer.weight.dim())))
                layer.sn_bound.add_(torch.linalg.vector_norm(delta).to(layer.sn_bound.dtype))
                if check and slack_tol is not None:
                    redo = bool(layer.sn_bound > (1.0 + slack_tol) * layer._state_sigma().detach())
            if redo:
                layer._search()
            layer._since_search = 0 if redo else layer._since_search + 1
            if rescale:
                top = layer.sn_bound.clone()
                layer.weight.data.div_(top)
                margin = rounding_margin(layer.weight.dtype, layer.weight[0].numel())
                layer.sn_bound.copy_(torch.full_like(top, margin))
            write_snapshots([layer])

    def _search(self) -> None:
        with torch.no_grad():
            w = self.weight.detach()
            scale = w.abs().amax().clamp_min(torch.finfo(w.dtype).tiny)  # the bound is homogeneous
            value, state = full_conv_search(w / scale, self._size, self.stride, self.padding, self.grids)
            margin = rounding_margin(value.dtype, self.in_channels * self.weight[0, 0].numel())
            self.sn_bound.copy_((value * scale * margin).clamp_min(BOUND_FLOOR))
            self.sn_state.copy_(state)
            self._refresh_projection()

    def _refresh_projection(self) -> None:
        self._sn_proj = full_conv_projection(self.weight, self.sn_state, self.stride)

    def _state_sigma(self) -> torch.Tensor:
        if self.method == "naive":
            return naive_sigma(self)
        # σ = ||W P|| with the top singular direction at the remembered frequency (derived, not persistent):
        # the value and gradient of full_conv_sigma_at for the searched weights, at a fraction of its ops
        return full_conv_sigma_from_projection(self.weight, self._sn_proj, self.stride)

    def _loaded_size(self):
        size = tuple(int(v) for v in self.sn_input_size.tolist())
        return size if all(v > 0 for v in size) else None

    def _recertify_loaded(self) -> None:
        if self.method == "naive":  # an uncertified baseline: the loaded state is used as it is
            return
        with torch.no_grad():
            loaded_bound, loaded_state = self.sn_bound.clone(), self.sn_state.clone()
            self._search()
            self.sn_bound.copy_(torch.maximum(self.sn_bound, loaded_bound))
            if bool(loaded_bound > 0) and not torch.equal(loaded_state, self.sn_state):  # saved between
                self.sn_state.copy_(loaded_state)  # searches: keep its frequency
                self._refresh_projection()

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
                f"padding={self.padding}, method={self.method!r}, sn_mode={self.sn_mode!r}")
