"""MobileNetV2 (Sandler et al., 2018) without batch norm, every layer spectrally normalized (paper §4.3).

The architecture is torchvision's (inverted residuals, ReLU6, width multiplier, channels rounded to
multiples of ``round_nearest``) with batch norm removed and every conv/linear layer replaced by its SN
counterpart: 17 depthwise convs (13 unit-stride, 4 stride-2), the pointwise expansions and projections,
the 1×1 head conv and the classifier. An inverted residual's depthwise conv, ReLU6 and linear projection
form a DS conv with an activation between its parts (:class:`~invseg.layers.SNDSConv`, paper Table 6:
"Activations depthwise separable convolutions: ReLU6").

The stem is a *full* 3×3 stride-2 convolution (3 → 32 channels), neither depthwise nor pointwise. It is
normalized by :class:`SNConv`, which extends the DFT argument of DESIGN §1a/§1b to multi-channel convs:
for a circulant conv on a grid ``M`` (``s | M``) the operator is block-diagonal in frequency and

    ||S||₂ = max_ω ||B_ω||₂ / s^{d/2},   B_ω = [Θ̂^M(ω + q·M/s)]_{q ∈ {0..s-1}^d}   (Cout × Cin·s^d),

with ``Θ̂^M(j)`` the ``Cout × Cin`` matrix of the filters' DFTs on ``M``; for zero padding every grid
``M >= N + p`` with ``s | M`` gives an upper bound (the minimum over a few is taken). Why not the naive
full-operator power method for the stem: its state is one input image per layer (3·224² floats = 588 KiB
on ImageNet), above the whole network's state budget of DESIGN §3 (≤ 64 KB); the DFT bound keeps ``3d``
integers, is a certified upper bound (the power method converges from below), and costs one FFT of the
``Cout·Cin`` filters per optimizer step (96 filters on a 226² grid for ImageNet, ~40 MB transient).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from invseg.layers import SNDSConv, SNLinear, SNPointwiseConv, SpectralNormLayer, conv_fn
from invseg.spectral import conv_apply, conv_spec, naive_power_method

from .registry import register_model
from .resnet_ds import _check_int, _check_K, _check_spatial_dims, count_layers, depthwise_layers

__all__ = [
    "MobileNetV2",
    "InvertedResidual",
    "SNConv",
    "full_conv_grids",
    "full_conv_search",
    "full_conv_sigma_at",
    "full_conv_bound",
    "make_divisible",
    "INVERTED_RESIDUAL_SETTING",
    "depthwise_layers",
    "count_layers",
]

#: (expansion t, output channels c, repeats n, first stride s) per stage (Sandler et al., Table 2).
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding: the nearest multiple of ``divisor`` (at least ``min_value``,
    default ``divisor``), never more than 10 % below ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# -- operator-norm bound of a full (dense-channel) convolution --------------------------------------


def _tuple(value, d: int, name: str, minimum: int) -> tuple[int, ...]:
    out = (value,) * d if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(out) != d or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in out):
        raise ValueError(f"{name} must be an int >= {minimum} or {d} such ints, got {value!r}")
    return out


def full_conv_grids(
    input_size: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    grids: int | None = None,
) -> list[tuple[int, ...]]:
    """Candidate grids ``M`` of the full-conv bound: per axis the first ``grids`` multiples of ``s`` that are
    ``>= max(N + p, k)``, all combinations over axes. Every such grid gives a valid upper bound.

    ``grids=None``: 2 per axis for inputs of at most ``64^2`` points, else 1 (more grids gain < 0.02 % there:
    measured median overestimation for 16×3×3×3 filters at N = 32 is 0.21 % with one grid, 0.20 % with two;
    at N = 8 3.6 % vs 2.0 %).
    """
    if grids is None:
        grids = 2 if math.prod(input_size) <= 64**2 else 1
    if isinstance(grids, bool) or not isinstance(grids, int) or grids < 1:
        raise ValueError(f"grids must be an int >= 1, got {grids!r}")
    per_axis = []
    for n, k, s, p in zip(input_size, kernel, stride, padding):
        first = -(-max(n + p, k) // s) * s
        per_axis.append([first + i * s for i in range(grids)])
    return list(itertools.product(*per_axis))


def _real_complex(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    return (torch.float64, torch.complex128) if dtype == torch.float64 else (torch.float32, torch.complex64)


def _check_geometry(weight, input_size, stride, padding):
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (3, 4, 5):
        raise ValueError(
            "weight must have shape (Cout, Cin, *kernel) with 1, 2 or 3 spatial dims, got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    d = weight.dim() - 2
    kernel = tuple(int(k) for k in weight.shape[2:])
    n = _tuple(input_size, d, "input_size", 1)
    s = _tuple(stride, d, "stride", 1)
    p = tuple((k - 1) // 2 for k in kernel) if padding is None else _tuple(padding, d, "padding", 0)
    for a in range(d):
        if p[a] > kernel[a] - 1:
            raise ValueError(f"padding must be <= kernel - 1 = {kernel[a] - 1} on axis {a}, got {p}")
        if n[a] + 2 * p[a] < kernel[a]:
            raise ValueError(f"input_size {n} is smaller than the kernel {kernel} with padding {p} (empty output)")
    return d, kernel, n, s, p


@torch.no_grad()
def full_conv_search(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    grids: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bound of ``||x ↦ F.conv{d}d(x, weight, stride=stride, padding=padding)||₂`` (zero padding,
    no groups) on inputs of spatial size ``input_size``, searched without autograd.

    For each candidate grid ``M`` (:func:`full_conv_grids`), the filters' DFT on ``M`` is folded into the
    ``Cout × Cin·s^d`` matrices ``B_ω`` (``ω`` on the ``M/s`` grid) and the bound on that grid is
    ``max_ω ||B_ω||₂ / s^{d/2}`` (exact for the circulant conv); the minimum over the grids is returned.

    Memory: ``O(Cout·Cin·ΠM)`` complex entries transient (meant for stems and other convs with few
    channels; a depthwise conv should use :func:`invseg.spectral.depthwise_bound`).

    Returns:
        ``(value, state)``: the bound (0-dim, no grad) and the int64 state ``[M_1..M_d, ω_1..ω_d]`` from which
        :func:`full_conv_sigma_at` recomputes the same value differentiably.
    """
    d, kernel, n, s, p = _check_geometry(weight, input_size, stride, padding)
    real, _ = _real_complex(weight.dtype)
    w = weight.detach().to(real)
    cout, cin = int(w.shape[0]), int(w.shape[1])
    fold = math.prod(s)
    device = w.device
    best_val = torch.tensor(float("inf"), dtype=real, device=device)
    best_state = torch.zeros(2 * d, dtype=torch.int64, device=device)
    for grid in full_conv_grids(n, kernel, s, p, grids):
        spec = torch.fft.fftn(w, s=grid, dim=tuple(range(2, 2 + d)))  # (Cout, Cin, *M), M >= k: no crop
        shape = [cout, cin]
        for m_a, s_a in zip(grid, s):
            shape += [s_a, m_a // s_a]  # frequency j = q·(M/s) + ω, alias index q major
        spec = spec.reshape(shape)
        perm = [3 + 2 * a for a in range(d)] + [0, 1] + [2 + 2 * a for a in range(d)]
        b = spec.permute(perm).reshape(-1, cout, cin * fold)  # (Ω, Cout, Cin·s^d)
        gram = b.mH @ b if cin * fold <= cout else b @ b.mH  # the smaller Hermitian Gram matrix
        lam = torch.linalg.eigvalsh(gram)[:, -1]  # (Ω,) largest eigenvalue = ||B_ω||²
        val, idx = lam.max(dim=0)
        val = (val.clamp_min(0) / fold).sqrt()
        omegas = []
        rem = idx
        for m_a, s_a in reversed(list(zip(grid, s))):
            omegas.append(torch.remainder(rem, m_a // s_a))
            rem = torch.div(rem, m_a // s_a, rounding_mode="floor")
        state = torch.cat([torch.tensor(grid, device=device), torch.stack(omegas[::-1])])
        better = val < best_val
        best_val = torch.where(better, val, best_val)
        best_state = torch.where(better, state, best_state)
    return best_val, best_state


def full_conv_sigma_at(weight: torch.Tensor, state: torch.Tensor, stride: int | Sequence[int] = 1) -> torch.Tensor:
    """Differentiable ``||B_ω||₂ / s^{d/2}`` at a remembered ``state = [M_1..M_d, ω_1..ω_d]``.

    ``B_ω`` is built from ``Cout·Cin·s^d`` DFT values computed directly from the filters (``O(Cout·Cin·k^d·s^d)``
    work and memory, no host synchronisation); its value equals the search's maximum for the weights the
    state was found on.
    """
    d = weight.dim() - 2
    s = _tuple(stride, d, "stride", 1)
    real, cplx = _real_complex(weight.dtype)
    cout = int(weight.shape[0])
    with torch.autocast(weight.device.type, enabled=False):
        t = weight.to(real).to(cplx)  # (Cout, Cin, *k)
        for a in range(d):
            m_a, om_a = state[a], state[d + a]
            j = om_a + torch.arange(s[a], device=weight.device) * torch.div(m_a, s[a], rounding_mode="floor")
            taps = torch.arange(weight.shape[2 + a], device=weight.device)
            phase = torch.remainder(j[:, None] * taps[None, :], m_a).to(torch.float64)  # exact integer phases
            ang = phase * (-2.0 * math.pi) / m_a.to(torch.float64)
            e = torch.polar(torch.ones_like(ang), ang).to(cplx)  # (s_a, k_a)
            t = torch.tensordot(t, e, dims=([2], [1]))  # contracts the next kernel axis, appends s_a
        b = t.reshape(cout, -1)  # (Cout, Cin·s^d)
        return torch.linalg.matrix_norm(b, ord=2) / math.sqrt(math.prod(s))


def full_conv_bound(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    grids: int | None = None,
) -> torch.Tensor:
    """Upper bound of the operator norm of a full conv (see :func:`full_conv_search`), differentiable
    w.r.t. ``weight``."""
    _, state = full_conv_search(weight, input_size, stride, padding, grids)
    return full_conv_sigma_at(weight, state, stride)


class SNConv(SpectralNormLayer):
    """Spectrally normalized full convolution (all input channels to all output channels), 1D/2D/3D.

    Meant for layers with few channels such as a network's stem. σ for ``method``:

    * ``"fft"`` — the multi-channel DFT bound (:func:`full_conv_search`, module docstring) at the current
      input size; state ``[M, ω]`` + input size (``3d`` int64); a certified upper bound.
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
        d = _check_spatial_dims(spatial_dims)
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

    def _spec(self, size):
        return conv_spec(self.weight, size, self.stride, self.padding)

    def _update_state(self, size):
        if self.method == "fft":
            _, state = full_conv_search(self.weight, size, self.stride, self.padding, self.grids)
            self.sn_state.copy_(state)
        else:  # naive
            u = self.sn_u if self.sn_u is not None and tuple(self.sn_u.shape[2:]) == tuple(size) else None
            self.sn_u, _ = naive_power_method(self.weight, u, self._spec(size), eps=self.eps, max_iter=self.max_iter)
        self.sn_input_size.copy_(torch.tensor(size))

    def _sigma(self) -> torch.Tensor:
        if self.method == "fft":
            return full_conv_sigma_at(self.weight, self.sn_state, self.stride)
        spec = self._spec(self._seen_size)
        return torch.linalg.vector_norm(conv_apply(self.sn_u.to(self.weight.dtype), self.weight, spec))

    def spectral_state_tensors(self) -> list[torch.Tensor]:
        if self.method == "fft":
            return [self.sn_state, self.sn_input_size]
        if self.method == "naive":
            return [t for t in (self.sn_u, self.sn_input_size) if t is not None]
        return []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "sn_u"
        if self.method == "naive" and key in state_dict:
            if self.sn_u is None or self.sn_u.shape != state_dict[key].shape:
                self.sn_u = torch.empty_like(state_dict[key], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _after_load(self) -> None:
        size = tuple(int(v) for v in self.sn_input_size.tolist())
        if all(v > 0 for v in size):
            self._seen_size = size
            super()._after_load()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SNConv expects input of shape (B, {self.in_channels}, *spatial) with {self.spatial_dims} "
                f"spatial dims, got {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        w = self.weight if self.method == "none" else self.weight * self.normalized_scale(size)
        return conv_fn(self.spatial_dims)(x, w, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, method={self.method!r}")


# -- the network --------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual without batch norm: pointwise expansion + ReLU6 (omitted when
    ``expand_ratio == 1``), then a DS conv = depthwise 3×3 (stride ``stride``) + ReLU6 + linear pointwise
    projection; identity residual when ``stride == 1`` and the channels match.

    With SN on, expansion and DS conv are each ``K``-Lipschitz: the block is at most ``K²``-Lipschitz
    (``K² + 1`` with the residual; ``K`` and ``K + 1`` without expansion).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels, out_channels: channel counts.
        stride: depthwise stride.
        expand_ratio: hidden channels = ``round(in_channels · expand_ratio)``.
        exact_pointwise: exact (SVD) norms for the pointwise layers (default False).
        **sn: ``K``, ``scaling``, ``s_init``, ``method``, ``eps`` for every SN layer of the block.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int, expand_ratio: float,
                 exact_pointwise: bool = False, **sn):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        if hidden < 1:
            raise ValueError(f"expand_ratio must give at least one hidden channel, got {expand_ratio!r}")
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.expand = (
            SNPointwiseConv(spatial_dims, in_channels, hidden, exact=exact_pointwise, **sn)
            if expand_ratio != 1 else None
        )
        self.conv = SNDSConv(spatial_dims, hidden, out_channels, kernel_size=3, stride=stride,
                             activation=nn.ReLU6(), exact_pointwise=exact_pointwise, **sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else F.relu6(self.expand(x))
        out = self.conv(out)
        return x + out if self.use_res_connect else out


@register_model("mobilenetv2")
class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision's architecture) without batch norm, every layer spectrally normalized.

    Layers: :class:`SNConv` stem 3×3 stride 2 ``in_channels → 32·w`` + ReLU6; 17 :class:`InvertedResidual`
    blocks (settings :data:`INVERTED_RESIDUAL_SETTING`: 17 depthwise convs, 4 of them stride 2);
    pointwise head ``→ 1280·max(1, w)`` + ReLU6; global average pool; dropout; :class:`~invseg.layers.SNLinear`
    classifier. Channel counts are ``make_divisible(c · width_mult, round_nearest)``.

    Spectral normalization (paper §4.3, Table 4/6): depthwise convs by the DFT bound at their input size,
    pointwise layers and the classifier by the warm-start power method (tolerance ``eps``), the stem by
    the multi-channel DFT bound; every layer scaled by the same ``K`` (hard, or soft ``K·tanh(s)``; the
    paper trains with soft scaling, K = 10–40, s_init = 3 or 0.5). Call
    :func:`invseg.layers.update_spectral_state` once per optimizer step.

    Args:
        num_classes: number of logits (default 1000).
        width_mult: channel multiplier (default 1.0; > 0).
        K: Lipschitz constant per layer (> 0, default 1).
        scaling: ``"hard"`` (default) or ``"soft"``.
        s_init: initial ``s`` of soft scaling (default 3).
        method: ``"fft"`` (default), ``"naive"``, ``"torch"``, or ``"none"`` (no normalization: the timing
            baseline with the same architecture).
        eps: power-method tolerance (paper: 0.01).
        dropout: dropout probability before the classifier (default 0.2, in [0, 1)).
        in_channels: input channels (default 3).
        round_nearest: channel rounding (default 8).
        spatial_dims: 2 (default); 1 and 3 give the same network on 1D/3D inputs.
        exact_pointwise: normalize the pointwise layers and the classifier by their exact (SVD) norm
            instead of the warm-start power method (default False, the paper's method; see
            :class:`~invseg.nets.ResNet34DS`). With ``method="fft"`` every layer's bound is then certified.

    Input: ``(B, in_channels, *N)``, any ``N >= 2`` (ImageNet: 224, stages at 112/56/28/14/7). Output:
    logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        K: float = 1.0,
        scaling: str = "hard",
        s_init: float = 3.0,
        method: str = "fft",
        eps: float = 1e-2,
        dropout: float = 0.2,
        in_channels: int = 3,
        round_nearest: int = 8,
        spatial_dims: int = 2,
        exact_pointwise: bool = False,
    ):
        super().__init__()
        self.num_classes = _check_int(num_classes, "num_classes")
        self.in_channels = _check_int(in_channels, "in_channels")
        self.spatial_dims = d = _check_spatial_dims(spatial_dims)
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        _check_int(round_nearest, "round_nearest")
        self.width_mult = float(width_mult)
        sn = dict(K=_check_K(K), scaling=scaling, s_init=s_init, method=method, eps=eps)
        ex = bool(exact_pointwise)

        channels = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        self.stem = SNConv(d, in_channels, channels, kernel_size=3, stride=2, **sn)
        blocks = []
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                blocks.append(InvertedResidual(d, channels, out, s if i == 0 else 1, t, ex, **sn))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = SNPointwiseConv(d, channels, self.last_channel, exact=ex, **sn)
        self.dropout = nn.Dropout(dropout)
        self.classifier = SNLinear(self.last_channel, num_classes, exact=ex, **sn)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, last_channel)``."""
        x = F.relu6(self.stem(x))
        x = F.relu6(self.head(self.blocks(x)))
        return x.mean(dim=tuple(range(2, x.dim())))  # global average pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.forward_features(x)))
