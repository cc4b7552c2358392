"""Spectrally normalized depthwise, pointwise and depthwise-separable convolutions (1D/2D/3D).

Each layer computes ``conv(x, weight · K_eff / σ) + bias`` where σ is a certified upper bound of the
operator norm of the conv without the scale (:mod:`invseg.layers.base`), so the layer is
``K_eff``-Lipschitz (``K`` for hard, ``K·tanh(s)`` for soft scaling). Scaling the weight rather than the
output costs a weight-sized multiply, not an activation-sized one.

Methods (the same layer for every comparison):

* ``"fft"`` — invseg: depthwise by the DFT bound (arg-max state of ``1 + 2d`` integers, DESIGN §1e; the
  exact norm for tiny inputs), pointwise by the certified warm-start power method on the ``Cout × Cin``
  matrix (:mod:`invseg.layers.matrix`).
* ``"naive"`` — the warm-start full-operator power method (state: one input-sized feature map per
  layer, ``(1, Cin, *N)``); σ = ``||A u||`` costs one extra conv per forward; not certified.
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
    conv_spec,
    depthwise_exact_small,
    depthwise_geometry,
    depthwise_phase,
    fold_strides,
    grids_per_axis,
    phase_from_tables,
    rounding_margin,
    search_channels_full,
    search_transient_bytes,
    use_exact_small,
)
from invseg.utils import check_int, conv_fn, int_tuple

from .base import SpectralNormLayer, write_snapshots
from .depthwise_op import depthwise_conv
from .matrix import BOUND_FLOOR, MatrixSpectralNorm
from .naive import naive_group_update, naive_sigma

__all__ = ["SNDepthwiseConv", "SNPointwiseConv", "SNDSConv"]

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


def _exact_small(channels: int, size) -> bool:
    """Whether a depthwise layer takes the exact tiny-input path (its own gate, or the pruned one: the layers
    call :func:`~invseg.spectral.depthwise_exact_small` with ``segments``, exact for each layer's maximum)."""
    return use_exact_small(channels, size) or use_exact_small(channels, size, pruned=True)


def _real(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class SNDepthwiseConv(SpectralNormLayer):
    """Spectrally normalized depthwise conv (one filter per channel), 1D/2D/3D.

    σ is the DFT bound of :func:`invseg.spectral.depthwise_bound` for the input size of the state: the
    minimum over several grids for unit stride, the exact aliasing formula for strides (DESIGN §1a/§1b),
    and the exact norm (dense SVD of each channel's operator) for tiny inputs
    (:func:`invseg.spectral.use_exact_small`). Between the updater's DFT searches (``search_every``) the
    per-channel bound is certified by ``bound_c(θ) <= bound_c(θ₀) + ||θ_c − θ₀_c||₁``.

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
        sn_mode: ``"reparam"`` (default) or ``"project"`` (DESIGN §1h, :mod:`invseg.layers.base`).
        eps: stopping tolerance of the naive power method. max_iter: its iteration cap per update.
        padding_mode: ``"zeros"`` or ``"circular"`` (then σ is exact when the stride divides N).
        grids: candidate grids per axis for the unit-stride bound (default by dims, see
            :func:`invseg.spectral.candidate_grids`).

    Input sizes: any with ``N + 2p >= k_eff``. The state is for one size; with zero padding it also bounds
    every smaller input (the operator on a smaller input is a submatrix).

    Memory: persistent state is ``1 + 3d`` int64 and ``C`` floats (per-channel bound) for "fft"; one
    ``(1, C, *N)`` tensor for "naive"; plus a snapshot of the weights (``C·Πk`` floats, not saved). The
    search is chunked under 64 MiB and kept out of autograd; σ is recomputed differentiably at the
    remembered frequency.
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
        sn_mode: str = "reparam",
    ):
        super().__init__(method, K, scaling, s_init, sn_mode)
        d = spatial_dims
        conv_fn(d)
        self.spatial_dims = d
        self.channels = check_int(channels, "channels")
        self.kernel_size = int_tuple(kernel_size, d, "kernel_size", minimum=1)
        self.stride = int_tuple(stride, d, "stride", minimum=1)
        self.dilation = int_tuple(dilation, d, "dilation", minimum=1)
        k_eff = tuple(dl * (k - 1) + 1 for k, dl in zip(self.kernel_size, self.dilation))
        self.padding = (
            tuple((ke - 1) // 2 for ke in k_eff) if padding is None else int_tuple(padding, d, "padding", minimum=0)
        )
        if any(p > ke - 1 for p, ke in zip(self.padding, k_eff)):
            raise ValueError(f"padding must be <= k_eff - 1 = {tuple(ke - 1 for ke in k_eff)}, got {self.padding}")
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.padding_mode = padding_mode
        self.eps = float(eps)
        self.max_iter = check_int(max_iter, "max_iter")
        self.grids = grids
        self.weight = nn.Parameter(torch.empty(channels, 1, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        _init_conv_weight(self.weight, self.bias)
        self._exact_path = False  # the exact tiny-input path at the state's size
        self._fold_scale = 1.0  # 1 / sqrt(Πs) of the state's fold
        if method == "fft":
            self.register_buffer("sn_state", torch.zeros(1 + 2 * d, dtype=torch.int64))
            self.register_buffer("sn_input_size", torch.zeros(d, dtype=torch.int64))
            self.register_buffer("sn_bound", torch.zeros(channels))
            self.register_buffer("_sn_phase", None, persistent=False)  # derived from sn_state
        elif method == "naive":
            self.register_buffer("sn_u", None)
            self.register_buffer("sn_input_size", torch.zeros(d, dtype=torch.int64))
            self.register_buffer("sn_bound", torch.zeros(()))
        elif method == "torch":
            nn.utils.parametrizations.spectral_norm(self, "weight")

    # -- geometry and groups -------------------------------------------------------------------------
    def _geometry(self, size, weight=None):
        w = self.weight if weight is None else weight
        return depthwise_geometry(w, size, self.stride, self.padding, self.dilation, self.padding_mode)

    def _covers(self, size) -> bool:
        if self._size is None or self.method != "fft":
            return size == self._size
        if self.padding_mode == "circular":
            return size == self._size
        return len(size) == len(self._size) and all(n <= m for n, m in zip(size, self._size))

    def _group_key(self):
        if self.method == "naive":
            return ("naive", id(self))
        if self.method != "fft" or self._size is None:
            return None
        w = self.weight
        cached = getattr(self, "_key_cache", None)
        if cached is not None and cached[0] == (self._size, w.dtype, w.device):
            return cached[1]  # recomputed only when the input size, dtype or device changes
        # the number of candidate grids depends on the layer's own channel count (work budget): layers are
        # batched only with layers that search the same grids, so batching never changes a bound
        g = grids_per_axis(self._geometry(self._size), self.grids)
        exact = _exact_small(self.channels, self._size)
        key = ("dw", self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode, g, exact,
               self._size, w.dtype, w.device)
        self._key_cache = ((self._size, w.dtype, w.device), key)
        return key

    def _path(self) -> str:
        if self.method == "naive":
            return "naive"
        return "exact-small" if self._exact_path else "dft"

    def _conv_spec(self, size):
        return conv_spec(self.weight, size, self.stride, self.padding, self.dilation, self.channels, self.padding_mode)

    # -- the updater's side --------------------------------------------------------------------------
    @staticmethod
    def _group_update(layers, *, search=True, check=True, iters=1, slack_tol=None, rescale=False):
        """Search (or, between searches, certify) a group of equal-geometry layers (no grad).

        Search: one chunked DFT search over the concatenated channels (each layer scaled to max |θ| = 1
        first: the bound is homogeneous, and this keeps |Θ̂|² clear of underflow), then per layer the
        arg-max channel and its phase matrix. Certify (``search=False``): ``bound_c += ||θ_c − θ_ref,c||₁``;
        with ``check`` and ``slack_tol`` a layer whose certificate is more than ``slack_tol`` above σ at its
        remembered frequency is searched again. ``rescale`` (project mode) divides each weight by its bound.
        """
        if layers[0].method == "naive":
            naive_group_update(layers, check=check, iters=iters, rescale=rescale)
            return
        redo = layers if search else [layer for layer in layers if layer._sn_ref is None]
        certify = [layer for layer in layers if layer not in redo]
        if certify:
            loose = SNDepthwiseConv._certify(certify, slack_tol if check else None)
            redo = redo + loose
        if redo:
            SNDepthwiseConv._search(redo)
        searched = {id(layer) for layer in redo}
        for layer in layers:
            layer._since_search = 0 if id(layer) in searched else layer._since_search + 1
        if rescale:  # project mode: each weight divided by its bound (homogeneous: the bounds follow)
            tops = [layer.sn_bound.amax() for layer in layers]
            torch._foreach_div_([layer.weight.data for layer in layers], tops)
            torch._foreach_div_([layer.sn_bound for layer in layers], tops)
            margin = rounding_margin(layers[0].weight.dtype, math.prod(layers[0].kernel_size))
            torch._foreach_mul_([layer.sn_bound for layer in layers], margin)
        write_snapshots(layers)

    @staticmethod
    def _search(layers) -> None:
        ref = layers[0]
        size = ref._size
        weights = torch.cat([layer.weight.detach() for layer in layers]) if len(layers) > 1 else ref.weight.detach()
        counts = [layer.channels for layer in layers]
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        # each layer scaled to max |θ| = 1 (the bound is homogeneous; this keeps |Θ̂|² clear of underflow): one
        # factor per layer, so that channels keep their relative sizes for the arg-max and the pruning
        tops = torch.stack([part.abs().amax() for part in weights.split(counts)]).clamp_min(
            torch.finfo(weights.dtype).tiny)
        scale = tops.repeat_interleave(torch.tensor(counts, device=tops.device))
        unit = weights / scale.reshape(-1, *([1] * (weights.dim() - 1)))
        real = _real(weights.dtype)
        margin = rounding_margin(real, math.prod(ref.kernel_size) * math.prod(ref.stride))
        if _exact_small(ref.channels, size):  # one pruned call for the group: each layer's maximum is exact
            geom = depthwise_geometry(unit, size, ref.stride, ref.padding, ref.dilation, ref.padding_mode)
            values, channels, phases = depthwise_exact_small(unit, geom, segments=counts)
            values = values.to(real) * scale.to(real) * margin
            for i, (layer, o, c) in enumerate(zip(layers, offsets, counts)):
                layer._write_search(values[o:o + c], channels[i:i + 1] - o, phases[i:i + 1].to(real), 1.0,
                                    exact=True)
            return
        geom = depthwise_geometry(unit, size, ref.stride, ref.padding, ref.dilation, ref.padding_mode)
        # The group's chunks never hold more than the largest single layer's search would: batching saves
        # launches without making the transient grow with the number of layers.
        g = grids_per_axis(ref._geometry(size), ref.grids)  # the same for every layer of the group
        one = max(search_transient_bytes(ref._geometry(size), g, ref.weight.dtype) // ref.channels * c
                  for c in set(counts))
        values, states, gidx, axes = search_channels_full(unit, geom, g, min(DEFAULT_MEMORY_BUDGET, max(one, 1)))
        values = values.to(real) * scale.to(real) * margin
        d = ref.spatial_dims
        if len(set(counts)) == 1:  # the usual case: one reduction for the whole group
            _, ci = values.reshape(len(layers), counts[0]).max(dim=1)
            rows = ci + torch.arange(len(layers), device=ci.device) * counts[0]
        else:
            ci = torch.stack([values[o:o + n].max(dim=0)[1] for o, n in zip(offsets, counts)])
            rows = ci + torch.tensor(offsets, device=ci.device)
        full = torch.cat([ci[:, None], states[rows]], dim=1)  # (L, 1 + 2d)
        phases = phase_from_tables(axes, gidx[rows], states[rows, d:], real)  # (L, 2S, K)
        fold = 1.0 / math.sqrt(math.prod(fold_strides(geom)))
        for i, (layer, o, c) in enumerate(zip(layers, offsets, counts)):
            layer._write_search(values[o:o + c], full[i], phases[i], fold, exact=False)

    def _write_search(self, values, state, phase, fold_scale, exact) -> None:
        """Store one layer's search result: per-channel bound, arg-max state, phase (derived)."""
        self.sn_bound.copy_(values.clamp_min(BOUND_FLOOR))
        if exact:
            self.sn_state.zero_()
            self.sn_state[:1].copy_(state.reshape(1))
        else:
            self.sn_state.copy_(state)
        if self._sn_phase is None or self._sn_phase.shape != phase.shape or self._sn_phase.device != phase.device:
            self._sn_phase = phase.clone()
        else:
            self._sn_phase.copy_(phase)
        self._fold_scale, self._exact_path = fold_scale, exact

    @staticmethod
    def _certify(layers, slack_tol):
        """``bound_c += ||θ_c − θ_ref,c||₁`` for each layer; returns the layers to search again (slack test)."""
        weights = [layer.weight.detach() for layer in layers]
        refs = [layer._sn_ref for layer in layers]
        diffs = torch._foreach_sub(weights, refs)
        for layer, diff in zip(layers, diffs):
            layer.sn_bound.add_(diff.reshape(layer.channels, -1).abs().sum(dim=1).to(layer.sn_bound.dtype))
        if slack_tol is None:
            return []
        with torch.no_grad():
            at_state = torch.stack([layer._state_sigma() for layer in layers])
            top = torch.stack([layer.sn_bound.amax() for layer in layers])
            flags = (top > (1.0 + slack_tol) * at_state.to(top.dtype)).tolist()  # one host sync per group
        return [layer for layer, flag in zip(layers, flags) if flag]

    # -- forward's side --------------------------------------------------------------------------------
    def _state_sigma(self) -> torch.Tensor:
        if self.method == "naive":
            return naive_sigma(self)
        theta = self.weight.reshape(self.channels, -1).index_select(0, self.sn_state[:1])  # (1, Πk)
        sigma = torch.linalg.vector_norm((self._sn_phase.to(theta.dtype) * theta).sum(dim=1))
        return sigma if self._fold_scale == 1.0 else sigma * self._fold_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = _check_input(x, self.channels, self.spatial_dims, type(self).__name__)
        w = self.normalized_weight(size)
        if self.padding_mode == "circular":
            pad = [q for p in reversed(self.padding) for q in (p, p)]
            return depthwise_conv(F.pad(x, pad, mode="circular"), w, self.bias, self.stride, 0, self.dilation)
        return depthwise_conv(x, w, self.bias, self.stride, self.padding, self.dilation)

    # -- checkpoints -----------------------------------------------------------------------------------
    def _loaded_size(self):
        size = tuple(int(v) for v in self.sn_input_size.tolist())
        return size if all(v > 0 for v in size) else None

    def _recertify_loaded(self) -> None:
        """Search the loaded weights at the loaded size; keep the loaded arg-max (exact resume) and the larger
        of the loaded and the fresh per-channel bounds."""
        if self.method == "naive":  # an uncertified baseline: the loaded state is used as it is
            return
        with torch.no_grad():
            loaded_bound, loaded_state = self.sn_bound.clone(), self.sn_state.clone()
            self._search([self])  # the training path's own search: identical state and phase for the same weights
            self.sn_bound.copy_(torch.maximum(self.sn_bound, loaded_bound))
            computed = bool(loaded_bound.any())
            if computed and not torch.equal(loaded_state, self.sn_state):  # saved between searches: keep its
                self.sn_state.copy_(loaded_state)  # arg-max (σ's value is the certificate either way)
                self._refresh_phase()

    def _refresh_phase(self) -> None:
        """The derived phase matrix of ``sn_state`` at the state's size (after loading a state)."""
        real = _real(self.weight.dtype)
        if self._exact_path:  # same weights, same SVD: the phase of the remembered channel's top singular pair
            channel = self.sn_state[:1]
            one = self._geometry(self._size, self.weight[:1])
            _, _, phase = depthwise_exact_small(self.weight.detach().index_select(0, channel), one)
            self._sn_phase = phase.to(real)
            self._fold_scale = 1.0
            return
        geom = self._geometry(self._size)
        self._sn_phase = depthwise_phase(self.sn_state[1:], geom, real)
        self._fold_scale = 1.0 / math.sqrt(math.prod(fold_strides(geom)))

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, channels={self.channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, method={self.method!r}, "
                f"sn_mode={self.sn_mode!r}")


class SNPointwiseConv(MatrixSpectralNorm):
    """Spectrally normalized pointwise (1×…×1) conv, 1D/2D/3D, optional stride (paper, Thm 3).

    σ is a certified upper bound of the norm of the ``Cout × Cin`` connectivity matrix: the warm-start
    power method (stopping rule ``||ΘᵀΘv − σ²v|| <= eps σ²``) certified by its residual and deflated bound
    (:mod:`invseg.layers.matrix`), or the exact SVD norm at every update when ``exact=True``. A strided
    pointwise conv is a subsampling after the unstrided one: the same σ bounds it.

    Args:
        spatial_dims, in_channels, out_channels: as for ``nn.ConvNd`` with kernel size 1.
        stride: int or per-axis (default 1).
        bias: learnable bias (default True).
        K, scaling, s_init: Lipschitz scale.
        method: ``"fft"`` (the certified matrix power method), ``"naive"``, ``"torch"``, ``"none"``.
        sn_mode: ``"reparam"`` (default) or ``"project"``.
        eps: power-method tolerance (paper: 0.01). max_iter: iteration cap per update.
        exact: the exact (SVD) norm at every update instead of the power method (tighter, ``O(n³)``).

    Memory: persistent state is ``Cin + 2`` floats ("fft") or ``(1, Cin, *N)`` ("naive"), plus a snapshot
    of the weight (not saved).
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
        sn_mode: str = "reparam",
    ):
        super().__init__(method, K, scaling, s_init, sn_mode)
        d = spatial_dims
        conv_fn(d)
        self.spatial_dims = d
        self.in_channels = check_int(in_channels, "in_channels")
        self.out_channels = check_int(out_channels, "out_channels")
        self.stride = int_tuple(stride, d, "stride", minimum=1)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *([1] * d)))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_conv_weight(self.weight, self.bias)
        self._init_matrix_state(in_channels, eps, max_iter, exact)
        if method == "naive":
            self._size_dependent = True
            self.register_buffer("sn_u", None)
            self.register_buffer("sn_input_size", torch.zeros(d, dtype=torch.int64))
            self.register_buffer("sn_bound", torch.zeros(()))
        elif method == "torch":
            nn.utils.parametrizations.spectral_norm(self, "weight")

    def _group_key(self):
        if self.method == "naive":
            return ("naive", id(self)) if self._size is not None else None
        return super()._group_key()

    @staticmethod
    def _group_update(layers, *, search=True, check=True, iters=1, slack_tol=None, rescale=False):
        if layers[0].method == "naive":
            naive_group_update(layers, check=check, iters=iters, rescale=rescale)
        else:
            MatrixSpectralNorm._group_update(layers, search=search, check=check, iters=iters, slack_tol=slack_tol,
                                             rescale=rescale)

    def _path(self) -> str:
        return "naive" if self.method == "naive" else super()._path()

    def _conv_spec(self, size):
        return conv_spec(self.weight, size, self.stride, 0, 1, 1)

    def _state_sigma(self) -> torch.Tensor:
        return naive_sigma(self) if self.method == "naive" else super()._state_sigma()

    def _legacy_defaults(self):
        return ("sn_bound",) if self.method == "naive" else super()._legacy_defaults()

    def _loaded_size(self):
        if self.method != "naive":
            return super()._loaded_size()
        size = tuple(int(v) for v in self.sn_input_size.tolist())
        return size if all(v > 0 for v in size) else None

    def _recertify_loaded(self) -> None:
        if self.method != "naive":  # the naive baseline is not certified: its loaded state is used as it is
            super()._recertify_loaded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = _check_input(x, self.in_channels, self.spatial_dims, type(self).__name__)
        w = self.normalized_weight(size)
        return conv_fn(self.spatial_dims)(x, w, self.bias, self.stride)

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}, stride={self.stride}, method={self.method!r}, "
                f"sn_mode={self.sn_mode!r}")


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
        eps: power-method tolerance (paper: 0.01). exact_pointwise: exact (SVD) norm of the pointwise part at
            every update.
        grids: candidate grids per axis of the depthwise bound.
        sn_mode: ``"reparam"`` (default) or ``"project"`` for both parts.

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
        sn_mode: str = "reparam",
    ):
        super().__init__()
        self.depthwise = SNDepthwiseConv(
            spatial_dims, in_channels, kernel_size, stride, padding, dilation, bias=activation is not None,
            K=1.0, scaling="hard", method=method, eps=eps, grids=grids, sn_mode=sn_mode,
        )
        self.activation = activation
        self.pointwise = SNPointwiseConv(
            spatial_dims, in_channels, out_channels, 1, bias=bias, K=K, scaling=scaling, s_init=s_init,
            method=method, eps=eps, exact=exact_pointwise, sn_mode=sn_mode,
        )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.method = method
        self.sn_mode = sn_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(x)
        if self.activation is not None:
            x = self.activation(x)
        return self.pointwise(x)
