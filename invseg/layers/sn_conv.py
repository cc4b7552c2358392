"""Spectrally normalized depthwise, pointwise and depthwise-separable convolutions (1D/2D/3D).

Each layer computes ``conv(x, weight · K_eff / σ) + bias`` where σ bounds the operator norm of the conv
without the scale, so the layer is ``K_eff``-Lipschitz (``K`` for hard, ``K·tanh(s)`` for soft scaling).
Scaling the weight rather than the output costs a weight-sized multiply, not an activation-sized one.

Methods (the same layer for every comparison):

* ``"fft"`` — invseg: depthwise by the DFT bound (arg-max state of ``1 + 2d`` integers, DESIGN §1e),
  pointwise by the warm-start power method on the ``Cout × Cin`` matrix (state: ``Cin`` floats).
* ``"naive"`` — the warm-start full-operator power method (state: one input-sized feature map per
  layer, ``(1, Cin, *N)``); σ = ``||A u||`` costs one extra conv per forward.
* ``"torch"`` — ``torch.nn.utils.parametrizations.spectral_norm`` on the weight (torch's semantics:
  the norm of the reshaped weight matrix, updated in every training forward).
* ``"none"`` — no normalization and no scale (K is ignored): the plain conv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from invseg.spectral import (
    DEFAULT_MEMORY_BUDGET,
    depthwise_exact_small,
    use_exact_small,
    conv_apply,
    conv_spec,
    depthwise_geometry,
    depthwise_phase,
    depthwise_sigma_from_phase,
    fold_strides,
    grids_per_axis,
    naive_power_method,
    phase_from_tables,
    pointwise_norm_exact,
    search_channels_full,
    search_transient_bytes,
)
from invseg.spectral._utils import as_tuple

from .base import SpectralNormLayer, batched_power_update
from .depthwise_op import depthwise_conv

__all__ = ["SNDepthwiseConv", "SNPointwiseConv", "SNDSConv", "conv_fn"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_fn(spatial_dims: int):
    """``F.conv{1,2,3}d`` for ``spatial_dims`` (the one place the dimension picks the op)."""
    if spatial_dims not in _CONV:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return _CONV[spatial_dims]


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_input(x: torch.Tensor, channels: int, spatial_dims: int, who: str) -> tuple[int, ...]:
    if x.dim() != spatial_dims + 2 or x.shape[1] != channels:
        raise ValueError(
            f"{who} expects input of shape (B, {channels}, *spatial) with {spatial_dims} spatial dims, "
            f"got {tuple(x.shape)}"
        )
    return tuple(x.shape[2:])


def _init_conv_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    # the same default initialisation as torch.nn.ConvNd
    nn.init.kaiming_uniform_(weight, a=5**0.5)
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / fan_in**0.5 if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class SNDepthwiseConv(SpectralNormLayer):
    """Spectrally normalized depthwise conv (one filter per channel), 1D/2D/3D.

    σ is the DFT bound of :func:`invseg.spectral.depthwise_bound` for the current input size: the minimum
    over several grids for unit stride, the exact aliasing formula for strides (DESIGN §1a/§1b).

    Args:
        spatial_dims: 1, 2 or 3.
        channels: number of channels C (in = out).
        kernel_size: int or per-axis, odd or even (default 3).
        stride: int or per-axis (default 1).
        padding: per-axis zero padding, ``<= k_eff - 1`` (default ``(k_eff - 1) // 2``: "same" for odd k).
        dilation: int or per-axis (default 1).
        bias: add a learnable bias (default True).
        K, scaling, s_init: Lipschitz scale (see :class:`~invseg.layers.LipschitzScale`).
        method: ``"fft"`` (default), ``"naive"``, ``"torch"`` or ``"none"``.
        eps: stopping tolerance of the naive power method. max_iter: its iteration cap per update.
        padding_mode: ``"zeros"`` or ``"circular"`` (then σ is exact when the stride divides N).
        grids: candidate grids per axis for the unit-stride bound (default by dims, see
            :func:`invseg.spectral.candidate_grids`).

    Memory: persistent state is ``1 + 3d`` int64 (arg-max channel, grid, frequency; input size) for
    "fft"; one ``(1, C, *N)`` tensor for "naive". The search is chunked under 64 MiB and kept out of
    autograd; σ is recomputed differentiably at the remembered frequency.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | None = None,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        K: float = 1.0,
        scaling: str = "hard",
        s_init: float = 3.0,
        method: str = "fft",
        eps: float = 1e-2,
        padding_mode: str = "zeros",
        grids: int | None = None,
        max_iter: int = 100,
    ):
        super().__init__(method, K, scaling, s_init)
        d = spatial_dims
        conv_fn(d)
        self.spatial_dims = d
        self.channels = _check_positive_int(channels, "channels")
        self.kernel_size = as_tuple(kernel_size, d, "kernel_size", minimum=1)
        self.stride = as_tuple(stride, d, "stride", minimum=1)
        self.dilation = as_tuple(dilation, d, "dilation", minimum=1)
        k_eff = tuple(dl * (k - 1) + 1 for k, dl in zip(self.kernel_size, self.dilation))
        self.padding = (
            tuple((ke - 1) // 2 for ke in k_eff) if padding is None else as_tuple(padding, d, "padding", minimum=0)
        )
        if any(p > ke - 1 for p, ke in zip(self.padding, k_eff)):
            raise ValueError(f"padding must be <= k_eff - 1 = {tuple(ke - 1 for ke in k_eff)}, got {self.padding}")
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.eps = float(eps)
        self.max_iter = int(max_iter)
        self.grids = grids
        self.weight = nn.Parameter(torch.empty(channels, 1, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        _init_conv_weight(self.weight, self.bias)
        if method == "fft":
            self.register_buffer("sn_state", torch.zeros(1 + 2 * d, dtype=torch.int64))
            self.register_buffer("sn_input_size", torch.zeros(d, dtype=torch.int64))
        elif method == "naive":
            self.register_buffer("sn_u", None)
            self.register_buffer("sn_input_size", torch.zeros(d, dtype=torch.int64))
        elif method == "torch":
            nn.utils.parametrizations.spectral_norm(self, "weight")

    def _needs_input_size(self) -> bool:
        return True

    def _weight_version(self) -> int:
        return self.weight._version

    def _fused_kind(self):
        return "dw" if self.method == "fft" else None

    def _geometry(self, size):
        return depthwise_geometry(self.weight, size, self.stride, self.padding, self.dilation, self.padding_mode)

    def _group_key(self):
        if self.method != "fft":
            return None
        w = self.weight
        cached = getattr(self, "_key_cache", None)
        if cached is not None and cached[0] == (self._seen_size, w.dtype, w.device):
            return cached[1]  # the key is recomputed only when the input size, dtype or device changes
        # the number of candidate grids depends on the layer's own channel count (work budget): layers are
        # batched only with layers that search the same grids, so batching never changes a bound
        g = grids_per_axis(self._geometry(self._seen_size), self.grids)
        exact = use_exact_small(self.channels, self._seen_size)
        key = (self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode, g, exact,
               self._seen_size, w.dtype, w.device)
        self._key_cache = ((self._seen_size, w.dtype, w.device), key)
        return key

    @staticmethod
    def _group_update(layers, check, iters, search=True):
        """One chunked search over the concatenated channels of equal-geometry layers, then a batched
        per-layer arg-max and phase gather (device ops only, a fixed handful per group).

        ``search=False`` (between searches, :class:`~invseg.layers.SpectralUpdater` ``search_every``) keeps
        the arg-max and certifies the bound for the current weights instead: the per-channel bound is a
        norm of a linear function of the filter, so ``bound_c(θ) <= bound_c(θ₀) + ||θ_c − θ₀_c||₁`` with ``θ₀``
        the weights of the last search (each DFT value moves by at most the ℓ1 norm of the change, and the
        alias fold and the exact small-input norm keep that). σ in forward is then the value at the
        remembered frequency plus the detached slack up to that certificate: never below the bound."""
        ref = layers[0]
        size = ref._seen_size
        weights = torch.cat([layer.weight.detach() for layer in layers]) if len(layers) > 1 else ref.weight.detach()
        if not search and all(layer._sn_ref is not None and layer._sn_ref[0] == size
                              for layer in layers):
            SNDepthwiseConv._group_certify(layers, weights)
            return
        geom = depthwise_geometry(weights, size, ref.stride, ref.padding, ref.dilation, ref.padding_mode)
        if use_exact_small(ref.channels, size):  # the group key holds channels for this path
            SNDepthwiseConv._group_update_exact(layers, weights, geom)
            return
        # The group's chunks never hold more than the largest single layer's search would: batching saves
        # launches without making the transient grow with the number of layers.
        g = grids_per_axis(ref._geometry(size), ref.grids)  # the same for every layer of the group
        one = max(search_transient_bytes(ref._geometry(size), g, ref.weight.dtype) // ref.channels * c
                  for c in {layer.channels for layer in layers})
        budget = min(DEFAULT_MEMORY_BUDGET, max(one, 1))
        values, states, gidx, axes = search_channels_full(weights, geom, g, budget)
        d = ref.spatial_dims
        counts = [layer.channels for layer in layers]
        if len(set(counts)) == 1:  # the usual case: one reduction for the whole group
            c = counts[0]
            _, ci = values.reshape(len(layers), c).max(dim=1)
            rows = ci + torch.arange(len(layers), device=ci.device) * c
        else:
            offsets = [sum(counts[:i]) for i in range(len(counts))]
            ci = torch.stack([values[o:o + n].max(dim=0)[1] for o, n in zip(offsets, counts)])
            rows = ci + torch.tensor(offsets, device=ci.device)
        full = torch.cat([ci[:, None], states[rows]], dim=1)  # (L, 1 + 2d)
        real = torch.float64 if ref.weight.dtype == torch.float64 else torch.float32
        phases = phase_from_tables(axes, gidx[rows], states[rows, d:], real)  # (L, 2S, K)
        fold = math.prod(fold_strides(geom))
        SNDepthwiseConv._remember_search(layers, weights, values, size)
        for i, layer in enumerate(layers):
            layer.sn_state.copy_(full[i])
            if layer._written_size != size:  # a host-to-device copy only when the input size changed
                layer.sn_input_size.copy_(torch.tensor(size))
                layer._written_size = size
            layer._sn_phase, layer._fold = phases[i], fold
            layer._mark_updated(size)

    @staticmethod
    def _group_update_exact(layers, weights, geom) -> None:
        """Small inputs (at most ``SMALL_INPUT_POINTS`` points, where the DFT bound is loosest): the exact norm
        by a dense SVD of each channel's operator. State ``[c, 0, ..., 0]`` marks this path; σ = |phase·θ_c|
        with ``phase[t] = uᵀ S_t v`` of the top singular pair (exact value and gradient)."""
        size = layers[0]._seen_size
        values, _, _ = depthwise_exact_small(weights, geom)
        real = torch.float64 if weights.dtype == torch.float64 else torch.float32
        SNDepthwiseConv._remember_search(layers, weights, values, size)
        offset = 0
        for layer in layers:
            c = layer.channels
            _, ci = values[offset:offset + c].max(dim=0)
            offset += c
            layer.sn_state.zero_()
            layer.sn_state[:1].copy_(ci.reshape(1))
            if layer._written_size != size:
                layer.sn_input_size.copy_(torch.tensor(size))
                layer._written_size = size
            layer._sn_phase, layer._fold = layer._exact_phase(ci.reshape(1), size, real), 1
            layer._mark_updated(size)

    @staticmethod
    def _remember_search(layers, weights, values, size) -> None:
        """Keep each layer's searched weights and per-channel bounds (derived, not persistent) for the
        certified updates between searches; the slack of a fresh search is 0."""
        offset = 0
        flat = weights.reshape(weights.shape[0], -1)
        for layer in layers:
            c = layer.channels
            layer._sn_ref = (size, flat[offset:offset + c].clone(), values[offset:offset + c].to(flat.dtype))
            layer._sn_cert = None
            offset += c

    @staticmethod
    def _group_certify(layers, weights) -> None:
        """``max_c bound_c(θ₀) + ||θ_c − θ₀_c||₁`` per layer (see :meth:`_group_update`): a handful of device
        ops per group, no search, no host synchronisation."""
        flat = weights.reshape(weights.shape[0], -1)
        ref_w = torch.cat([layer._sn_ref[1] for layer in layers]) if len(layers) > 1 else layers[0]._sn_ref[1]
        ref_v = torch.cat([layer._sn_ref[2] for layer in layers]) if len(layers) > 1 else layers[0]._sn_ref[2]
        per_channel = ref_v + (flat - ref_w).abs().sum(dim=1)
        counts = [layer.channels for layer in layers]
        if len(set(counts)) == 1:
            certs = per_channel.reshape(len(layers), counts[0]).amax(dim=1)
        else:
            certs = torch.stack([part.amax() for part in per_channel.split(counts)])
        for layer, cert in zip(layers, certs):
            layer._sn_cert = cert
            layer._mark_updated(layer._seen_size)

    def _exact_phase(self, channel: torch.Tensor, size, real) -> torch.Tensor:
        geom = self._geometry(size)
        one = depthwise_geometry(self.weight[:1], size, self.stride, self.padding, self.dilation, self.padding_mode)
        _, _, phase = depthwise_exact_small(self.weight.detach().index_select(0, channel), one)
        return phase.to(real)

    def _refresh_phase(self, size) -> None:
        if use_exact_small(self.channels, size):  # the exact path (after loading a state): same weights, same SVD
            real = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
            self._sn_phase, self._fold = self._exact_phase(self.sn_state[:1], size, real), 1
            return
        geom = self._geometry(size)
        self._fold = 1
        for s in fold_strides(geom):
            self._fold *= s
        real = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        # derived from sn_state (not persistent): rows [Re; Im] of the remembered frequency's phases
        self._sn_phase = depthwise_phase(self.sn_state[1:], geom, real)

    def _conv_spec(self, size):
        return conv_spec(self.weight, size, self.stride, self.padding, self.dilation, self.channels, self.padding_mode)

    def _update_state(self, size):
        self._naive_update(size)  # method "naive" ("fft" takes the batched path of update_spectral_state)

    def _ensure_phase(self) -> None:
        """Rebuild the derived phase matrix from ``sn_state`` when missing (after loading) or on another device."""
        if getattr(self, "_sn_phase", None) is None or self._sn_phase.device != self.weight.device:
            self._refresh_phase(self._seen_size)

    def _state_sigma(self) -> torch.Tensor:
        self._ensure_phase()
        return depthwise_sigma_from_phase(self.weight, self.sn_state[:1], self._sn_phase, self._fold)

    def _sigma(self) -> torch.Tensor:
        if self.method == "fft":
            return self._certified(self._state_sigma())
        return self._naive_sigma()

    def _on_load(self) -> None:
        self._sn_phase = None  # rebuilt from the loaded state on first use
        self._sn_ref = self._sn_cert = None  # the next update searches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = _check_input(x, self.channels, self.spatial_dims, type(self).__name__)
        w = self.normalized_weight(size)
        if self.padding_mode == "circular":
            pad = [q for p in reversed(self.padding) for q in (p, p)]
            return depthwise_conv(F.pad(x, pad, mode="circular"), w, self.bias, self.stride, 0, self.dilation)
        return depthwise_conv(x, w, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, channels={self.channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, method={self.method!r}")


class SNPointwiseConv(SpectralNormLayer):
    """Spectrally normalized pointwise (1×…×1) conv, 1D/2D/3D, optional stride (paper, Thm 3).

    σ = ``||Θ v||`` of the ``Cout × Cin`` connectivity matrix with the warm-start power vector ``v``
    (stopping rule ``||ΘᵀΘv − σ²v|| <= eps σ²``), or the exact SVD norm when ``exact=True``. A strided
    pointwise conv is a subsampling after the unstrided one: the same σ bounds it.

    Args:
        spatial_dims, in_channels, out_channels: as for ``nn.ConvNd`` with kernel size 1.
        stride: int or per-axis (default 1).
        bias: learnable bias (default True).
        K, scaling, s_init: Lipschitz scale.
        method: ``"fft"`` (the efficient matrix power method), ``"naive"``, ``"torch"``, ``"none"``.
        eps: power-method tolerance (paper: 0.01). max_iter: iteration cap per update.
        exact: use the exact (SVD) norm — a certified bound, no state.

    Memory: persistent state is ``Cin`` floats ("fft") or ``(1, Cin, *N)`` ("naive").
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int | Sequence[int] = 1,
        bias: bool = True,
        K: float = 1.0,
        scaling: str = "hard",
        s_init: float = 3.0,
        method: str = "fft",
        eps: float = 1e-2,
        max_iter: int = 100,
        exact: bool = False,
    ):
        super().__init__(method, K, scaling, s_init)
        d = spatial_dims
        conv_fn(d)
        self.spatial_dims = d
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.out_channels = _check_positive_int(out_channels, "out_channels")
        self.stride = as_tuple(stride, d, "stride", minimum=1)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.max_iter = int(max_iter)
        self.exact = bool(exact)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *([1] * d)))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_conv_weight(self.weight, self.bias)
        if method == "fft" and not exact:
            gen = torch.Generator().manual_seed(0)
            v0 = torch.randn(in_channels, generator=gen)
            # sn_v = 0 means "never updated" (a loaded zero state is not trusted); the updates start from
            # the fixed unit vector _sn_v0 (derived, not persistent)
            self.register_buffer("sn_v", torch.zeros(in_channels))
            self.register_buffer("_sn_v0", v0 / v0.norm(), persistent=False)
        elif method == "naive":
            self.register_buffer("sn_u", None)
            self.register_buffer("sn_input_size", torch.zeros(d, dtype=torch.int64))
        elif method == "torch":
            nn.utils.parametrizations.spectral_norm(self, "weight")

    def _needs_input_size(self) -> bool:
        return self.method == "naive"

    def _fused_kind(self):
        return "matrix" if self.method == "fft" and not self.exact else None

    def _group_key(self):
        if self.method != "fft" or self.exact:
            return None
        w = self.weight
        return ("matrix", w.dtype, w.device)  # any shapes: one stopping test (host sync) per iteration

    @staticmethod
    def _group_update(layers, check, iters, search=True):
        batched_power_update(layers, [layer.weight.reshape(layer.weight.shape[0], -1) for layer in layers],
                             check, iters)

    def _conv_spec(self, size):
        return conv_spec(self.weight, size, self.stride, 0, 1, 1)

    def _update_state(self, size):
        if self.method == "naive":  # method "fft" takes the batched path (exact=True keeps no state)
            self._naive_update(size)

    def _sigma(self) -> torch.Tensor:
        a = self.weight.reshape(self.out_channels, self.in_channels)
        if self.method == "fft":
            if self.exact:
                return pointwise_norm_exact(a)[0]
            # elementwise product + sum rather than matmul: autocast keeps it in the weight's precision
            return torch.linalg.vector_norm((a * self.sn_v.to(a.dtype)).sum(dim=1))
        return self._naive_sigma()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = _check_input(x, self.in_channels, self.spatial_dims, type(self).__name__)
        w = self.normalized_weight(size)
        return conv_fn(self.spatial_dims)(x, w, self.bias, self.stride)

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}, stride={self.stride}, method={self.method!r}")


class SNDSConv(nn.Module):
    """Spectrally normalized depthwise-separable conv: depthwise (spatial) then pointwise (channels).

    Normalized part-wise (DESIGN §1d): ``Lip(pw ∘ act ∘ dw) <= ||pw||·Lip(act)·||dw||``, each part
    divided by its own σ and the scale K (hard) or ``K·tanh(s)`` (soft) applied once, on the pointwise
    weight. With a 1-Lipschitz ``activation`` (ReLU, ELU, LeakyReLU, ...) the block is K-Lipschitz.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels, out_channels: channel counts.
        kernel_size: depthwise kernel (default 3). stride: applied by the depthwise part (default 1).
        K: Lipschitz constant (> 0, default 1). scaling: ``"hard"`` or ``"soft"``. s_init: soft init (3).
        method: ``"fft"`` (default), ``"naive"``, ``"torch"`` or ``"none"`` — used for both parts.
        activation: optional module applied between the parts (default None: a linear DS conv, as in the
            paper's ResNet-34-DS; the depthwise bias is then dropped as redundant).
        bias: pointwise bias (default True). padding, dilation: of the depthwise part.
        eps: power-method tolerance (paper: 0.01). exact_pointwise: SVD norm for the pointwise part.
        grids: candidate grids per axis of the depthwise bound.

    Input sizes: any spatial size with ``N + 2p >= k_eff``; the bound follows a change of input size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        K: float = 1.0,
        scaling: str = "hard",
        method: str = "fft",
        activation: nn.Module | None = None,
        bias: bool = True,
        padding: int | Sequence[int] | None = None,
        dilation: int | Sequence[int] = 1,
        s_init: float = 3.0,
        eps: float = 1e-2,
        exact_pointwise: bool = False,
        grids: int | None = None,
    ):
        super().__init__()
        self.depthwise = SNDepthwiseConv(
            spatial_dims, in_channels, kernel_size, stride, padding, dilation, bias=activation is not None,
            K=1.0, scaling="hard", method=method, eps=eps, grids=grids,
        )
        self.activation = activation
        self.pointwise = SNPointwiseConv(
            spatial_dims, in_channels, out_channels, 1, bias=bias, K=K, scaling=scaling, s_init=s_init,
            method=method, eps=eps, exact=exact_pointwise,
        )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(x)
        if self.activation is not None:
            x = self.activation(x)
        return self.pointwise(x)
