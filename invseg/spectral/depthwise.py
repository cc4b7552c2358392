"""Operator-norm bounds of depthwise convolutions from the DFT of their filters (DESIGN §1a, §1b, §1e).

A depthwise conv with filters ``θ_c`` (``weight`` of shape ``(C, 1, *k)``), zero padding ``p``, stride ``s``
and dilation ``δ`` on inputs of spatial size ``N`` is block-diagonal over channels, so its norm is the
maximum over channels of the single-channel norms (never a product).

*Unit stride* (paper, Thm 2, generalised): embedding the input into any grid ``M >= N + p`` turns the
zero-padded conv into rows of a circulant conv on ``M``, hence ``||K|| <= max_j |Θ̂_c^M[j]|`` for every such
``M``; we take, per channel, the minimum over several grids (tighter than the paper's single grid
``M = N + 2p``).

*Stride s* (exact for circulant convs, beyond the paper): with ``s | M``, ``S Sᵀ`` is circulant on the
``M/s`` grid and ``||S||² = max_ω s^{-d} Σ_{q ∈ {0..s-1}^d} |Θ̂^M(ω + q M/s)|²``. For zero padding the
grids are the multiples of ``s`` that are ``>= N + p``.

*Memory* (§1e): the spectrum is evaluated without autograd, in chunks under a memory budget, as a
separable partial DFT (one small ``(F_a × k_a)`` DFT matrix per axis, so no padded filter is ever built).
Only the arg-max ``(channel, grid, frequency)`` is kept — ``1 + 2d`` integers — and σ is recomputed
differentiably at that single frequency (``s^d`` aliases for strides), which gives the same value and
the same gradient as autograd through the full FFT at ``O(k^d)`` memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._utils import as_tuple, check_spatial_dims

__all__ = [
    "DepthwiseGeometry",
    "depthwise_geometry",
    "candidate_grids",
    "depthwise_search",
    "depthwise_sigma_at",
    "depthwise_bound",
    "depthwise_bound_dense",
    "DEFAULT_MEMORY_BUDGET",
]

#: Default transient memory budget of one bound evaluation (bytes).
DEFAULT_MEMORY_BUDGET = 64 * 2**20

#: Default number of candidate grids per axis, by number of spatial dims (the product is searched).
_DEFAULT_GRIDS = {1: 8, 2: 6, 3: 3}


@dataclass(frozen=True)
class DepthwiseGeometry:
    """Validated geometry of a depthwise conv (all tuples have one entry per spatial axis).

    Attributes:
        channels: number of filters C.
        kernel: kernel size k.
        input_size: input spatial size N.
        stride: stride s.
        padding: padding p (zeros or circular).
        dilation: dilation δ.
        mode: ``"zeros"`` (zero padding) or ``"circular"``.
    """

    channels: int
    kernel: tuple[int, ...]
    input_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    mode: str

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel)

    @property
    def effective_kernel(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    @property
    def output_size(self) -> tuple[int, ...]:
        return tuple(
            (n + 2 * p - ke) // s + 1
            for n, p, ke, s in zip(self.input_size, self.padding, self.effective_kernel, self.stride)
        )


def depthwise_geometry(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    dilation: int | Sequence[int] = 1,
    mode: str = "zeros",
) -> DepthwiseGeometry:
    """Validate the arguments of a depthwise bound and return its geometry.

    Raises:
        ValueError: wrong weight shape, input smaller than the (dilated, padded) kernel, padding outside
            ``[0, k_eff - 1]``, non-positive stride/dilation, or an unknown mode — naming the value.
    """
    d = check_spatial_dims(weight)
    if weight.shape[1] != 1:
        raise ValueError(
            f"a depthwise weight must have shape (C, 1, *kernel), got {tuple(weight.shape)} "
            "(dim 1 must be 1: one filter per channel)"
        )
    if mode not in ("zeros", "circular"):
        raise ValueError(f"mode must be 'zeros' or 'circular', got {mode!r}")
    kernel = tuple(int(k) for k in weight.shape[2:])
    n = as_tuple(input_size, d, "input_size", minimum=1)
    s = as_tuple(stride, d, "stride", minimum=1)
    dil = as_tuple(dilation, d, "dilation", minimum=1)
    k_eff = tuple(dl * (k - 1) + 1 for k, dl in zip(kernel, dil))
    p = tuple((ke - 1) // 2 for ke in k_eff) if padding is None else as_tuple(padding, d, "padding", minimum=0)
    for a in range(d):
        if p[a] > k_eff[a] - 1:
            raise ValueError(
                f"padding must be <= k_eff - 1 = {k_eff[a] - 1} on axis {a} (kernel {kernel[a]}, dilation "
                f"{dil[a]}), got padding {p}"
            )
        if mode == "zeros" and n[a] + 2 * p[a] < k_eff[a]:
            raise ValueError(
                f"input_size {n} is smaller than the kernel on axis {a}: N + 2p = {n[a] + 2 * p[a]} < "
                f"effective kernel size {k_eff[a]} (the convolution would have an empty output)"
            )
        if mode == "circular" and p[a] > n[a]:
            raise ValueError(f"circular padding {p[a]} exceeds input_size {n[a]} on axis {a}")
    return DepthwiseGeometry(int(weight.shape[0]), kernel, n, s, p, dil, mode)


def candidate_grids(geom: DepthwiseGeometry, grids: int | None = None) -> list[tuple[int, ...]]:
    """The grids ``M`` searched for ``geom``: per axis the first ``grids`` multiples of ``s`` that are
    ``>= N + p`` (zeros), or exactly ``N`` (circular); all combinations over axes."""
    d = geom.spatial_dims
    if geom.mode == "circular":
        return [geom.input_size]
    g = _DEFAULT_GRIDS[d] if grids is None else int(grids)
    if g < 1:
        raise ValueError(f"grids must be >= 1, got {grids}")
    per_axis = []
    for n, p, s in zip(geom.input_size, geom.padding, geom.stride):
        first = -(-(n + p) // s) * s  # smallest multiple of s that is >= N + p
        per_axis.append([first + i * s for i in range(g)])
    return list(itertools.product(*per_axis))


def _fold_strides(geom: DepthwiseGeometry, grid: Sequence[int]) -> tuple[int, ...]:
    # The exact fold needs s | M. In circular mode M = N is fixed; where s does not divide N the
    # subsampling on that axis is bounded by 1 (a row restriction) and the axis is treated as unit stride.
    return tuple(s if m % s == 0 else 1 for s, m in zip(geom.stride, grid))


def _dft_matrix(
    grid: int, stride: int, kernel: int, dilation: int, freqs: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``E[ω, q, n] = exp(-2πi (ω + q M/s)(n δ) / M)`` of shape ``(len(freqs), s, k)``, complex ``dtype``.

    Angles are reduced modulo ``M`` in integer arithmetic before the float conversion (exact phases).
    """
    device = freqs.device
    om = grid // stride
    j = freqs[:, None] + torch.arange(stride, device=device)[None, :] * om  # (F, s)
    taps = torch.arange(kernel, device=device) * dilation  # (k,)
    phase = torch.remainder(j[:, :, None] * taps[None, None, :], grid).to(torch.float64)
    ang = phase * (-2.0 * math.pi / grid)
    return torch.polar(torch.ones_like(ang), ang).to(dtype)


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@torch.no_grad()
def depthwise_search(
    weight: torch.Tensor,
    geom: DepthwiseGeometry,
    grids: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the arg-max of the bound without autograd, chunked under ``memory_budget`` bytes.

    Returns:
        ``(value, state)``: ``value`` the bound (0-dim tensor, no grad) and ``state`` an int64 tensor
        ``[c*, M_1..M_d, ω_1..ω_d]`` (on ``weight.device``) from which :func:`depthwise_sigma_at`
        recomputes the same value differentiably. No host synchronisation happens here.
    """
    d = geom.spatial_dims
    real_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    cdtype = _complex_dtype(real_dtype)
    device = weight.device
    C = geom.channels
    w = weight.detach().reshape(C, *geom.kernel).to(real_dtype)
    best_val = torch.full((C,), float("inf"), dtype=real_dtype, device=device)
    best_state = torch.zeros((C, 2 * d), dtype=torch.int64, device=device)
    bytes_per_point = 3 * torch.empty((), dtype=cdtype).element_size()

    for grid in candidate_grids(geom, grids):
        strides = _fold_strides(geom, grid)
        oms = [m // s for m, s in zip(grid, strides)]
        # Real filters: the folded spectrum is symmetric under ω -> -ω, so half of the last axis suffices.
        nfreq = oms[:-1] + [oms[-1] // 2 + 1]
        mats = [
            _dft_matrix(grid[a], strides[a], geom.kernel[a], geom.dilation[a],
                        torch.arange(nfreq[a], device=device), cdtype)
            for a in range(d)
        ]  # each (F_a, s_a, k_a)
        rest = math.prod(nfreq[a] * strides[a] for a in range(1, d))
        per_row = rest * strides[0] * bytes_per_point  # one first-axis frequency of one channel
        rows = max(1, min(nfreq[0], memory_budget // max(per_row, 1)))
        ch_chunk = max(1, min(C, memory_budget // max(per_row * rows, 1)))
        grid_val = torch.empty((C,), dtype=real_dtype, device=device)
        grid_idx = torch.empty((C,), dtype=torch.int64, device=device)
        for c0 in range(0, C, ch_chunk):
            c1 = min(C, c0 + ch_chunk)
            wc = w[c0:c1].to(cdtype)
            ch_val = torch.full((c1 - c0,), -1.0, dtype=real_dtype, device=device)
            ch_idx = torch.zeros((c1 - c0,), dtype=torch.int64, device=device)
            for r0 in range(0, nfreq[0], rows):
                r1 = min(nfreq[0], r0 + rows)
                t = wc
                for a in range(d):
                    m = mats[a][r0:r1] if a == 0 else mats[a]
                    t = torch.tensordot(t, m.reshape(-1, geom.kernel[a]), dims=([1], [1]))
                # t: (c, F_0*s_0, ..., F_{d-1}*s_{d-1}) -> fold the aliases
                shape = [c1 - c0]
                for a in range(d):
                    shape += [(r1 - r0) if a == 0 else nfreq[a], strides[a]]
                power = t.abs().square().reshape(shape).sum(dim=tuple(range(2, 2 * d + 1, 2)))
                power = power.reshape(c1 - c0, -1)
                val, idx = power.max(dim=1)
                idx = idx + r0 * (rest // math.prod(strides[1:]) if d > 1 else 1)
                better = val > ch_val
                ch_val = torch.where(better, val, ch_val)
                ch_idx = torch.where(better, idx, ch_idx)
            grid_val[c0:c1] = ch_val
            grid_idx[c0:c1] = ch_idx
        grid_val = grid_val.div(math.prod(strides)).sqrt()
        # flat index over (nfreq_0, ..., nfreq_{d-1}) -> per-axis frequencies
        omegas = []
        rem = grid_idx
        for a in reversed(range(d)):
            omegas.append(torch.remainder(rem, nfreq[a]))
            rem = torch.div(rem, nfreq[a], rounding_mode="floor")
        omegas = torch.stack(omegas[::-1], dim=1)  # (C, d)
        state = torch.cat([torch.tensor(grid, device=device).expand(C, d), omegas], dim=1)
        better = grid_val < best_val
        best_val = torch.where(better, grid_val, best_val)
        best_state = torch.where(better[:, None], state, best_state)

    value, c_star = best_val.max(dim=0)
    state = torch.cat([c_star.reshape(1), best_state[c_star]])
    return value, state


def depthwise_sigma_at(weight: torch.Tensor, state: torch.Tensor, geom: DepthwiseGeometry) -> torch.Tensor:
    """Differentiable σ at a remembered arg-max ``state = [c, M_1..M_d, ω_1..ω_d]``.

    ``σ = sqrt(s^{-d} Σ_q |Σ_n θ_c[n] e^{-2πi ⟨n δ, (ω + q M/s)/M⟩}|²)`` — ``O(s^d k^d)`` work and
    memory, no host synchronisation. The value equals the full-spectrum maximum for the weights the
    state was searched on, and its gradient equals autograd through the full FFT.
    """
    d = geom.spatial_dims
    real_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    cdtype = _complex_dtype(real_dtype)
    with torch.autocast(weight.device.type, enabled=False):
        theta = weight.index_select(0, state[:1]).reshape(geom.kernel).to(real_dtype)
        t = theta.to(cdtype)
        fold = 1
        for a in range(d):
            m_a = state[1 + a]
            om_a = state[1 + d + a]
            # Whether the fold applies is static on the zeros path (s | M by construction); in circular mode
            # M = N is static too, so the per-axis stride used is known without reading the state.
            s_a = geom.stride[a] if geom.mode == "zeros" or geom.input_size[a] % geom.stride[a] == 0 else 1
            fold *= s_a
            j = om_a + torch.arange(s_a, device=weight.device) * torch.div(m_a, s_a, rounding_mode="floor")
            taps = torch.arange(geom.kernel[a], device=weight.device) * geom.dilation[a]
            phase = torch.remainder(j[:, None] * taps[None, :], m_a).to(torch.float64)
            ang = phase * (-2.0 * math.pi) / m_a.to(torch.float64)
            e = torch.polar(torch.ones_like(ang), ang).to(cdtype)  # (s_a, k_a)
            t = torch.tensordot(t, e, dims=([0], [1]))  # contracts the leading kernel axis
        return (t.abs().square().sum() / fold).sqrt()


def depthwise_bound(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    dilation: int | Sequence[int] = 1,
    mode: str = "zeros",
    grids: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """Upper bound of the operator norm of a depthwise conv (exact for circulant ones).

    Bounds ``||x ↦ F.conv{d}d(x, weight, stride=stride, padding=padding, dilation=dilation, groups=C)||₂``
    on inputs of spatial size ``input_size`` (``mode="circular"``: the conv after circular padding).

    Args:
        weight: ``(C, 1, *k)`` filters, 1, 2 or 3 spatial dims, any odd or even ``k``.
        input_size: spatial size ``N`` (int or one per axis).
        stride: stride ``s >= 1`` per axis. Strided convs use the exact aliasing formula (DESIGN §1b).
        padding: ``0 <= p <= k_eff - 1`` per axis; default ``(k_eff - 1) // 2``.
        dilation: dilation per axis.
        mode: ``"zeros"`` (zero padding, a bound: minimum over grids ``M >= N + p``) or ``"circular"``
            (exact when ``s`` divides ``N`` and the output covers the circle).
        grids: candidate grids per axis (default 8/6/3 for 1/2/3 dims; their product is searched).
        memory_budget: transient bytes of the no-grad search (default 64 MiB).

    Returns:
        0-dim tensor, differentiable w.r.t. ``weight`` (gradient equals autograd through the full FFT).
    """
    geom = depthwise_geometry(weight, input_size, stride, padding, dilation, mode)
    _, state = depthwise_search(weight, geom, grids, memory_budget)
    return depthwise_sigma_at(weight, state, geom)


def depthwise_bound_dense(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    dilation: int | Sequence[int] = 1,
    mode: str = "zeros",
    grids: int | None = None,
    paper_grid: bool = False,
) -> torch.Tensor:
    """The same bound by full FFTs of the zero-padded filters, with autograd through everything.

    This is the straightforward implementation (memory ``C·M^d`` kept for backward) used as the
    reference in tests and as the "per-layer FFT" baseline. ``paper_grid=True`` gives the paper's bound:
    the single grid ``M = N + 2p`` and, for strides, the unit-stride bound ``||S|| <= ||K||``.
    """
    geom = depthwise_geometry(weight, input_size, stride, padding, dilation, mode)
    d = geom.spatial_dims
    C = geom.channels
    k_eff = geom.effective_kernel
    theta = weight.reshape(C, *geom.kernel)
    if any(dl > 1 for dl in geom.dilation):
        dil = theta.new_zeros((C, *k_eff))
        dil[(slice(None),) + tuple(slice(None, None, dl) for dl in geom.dilation)] = theta
        theta = dil
    if paper_grid:
        grid_list = [tuple(n + 2 * p for n, p in zip(geom.input_size, geom.padding))]
    else:
        grid_list = candidate_grids(geom, grids)
    per_grid = []
    for grid in grid_list:
        strides = (1,) * d if paper_grid else _fold_strides(geom, grid)
        # a filter longer than the grid wraps around (aliased sum), exactly as the circulant does
        pad_shape = [max(m, ke) for m, ke in zip(grid, k_eff)]
        padded = theta.new_zeros((C, *pad_shape))
        padded[(slice(None),) + tuple(slice(0, ke) for ke in k_eff)] = theta
        for a in range(d):
            if pad_shape[a] > grid[a]:
                x = padded.movedim(a + 1, 1)
                reps = -(-pad_shape[a] // grid[a])
                x = torch.nn.functional.pad(x.movedim(1, -1), (0, reps * grid[a] - pad_shape[a]))
                x = x.reshape(*x.shape[:-1], reps, grid[a]).sum(-2).movedim(-1, 1)
                padded = x.movedim(1, a + 1)
        spec = torch.fft.fftn(padded, dim=tuple(range(1, d + 1))).abs().square()
        shape = [C]
        for m, s in zip(grid, strides):
            shape += [s, m // s]
        power = spec.reshape(shape).sum(dim=tuple(range(1, 2 * d, 2))) / math.prod(strides)
        per_grid.append(power.reshape(C, -1).amax(dim=1))
    return torch.stack(per_grid).amin(dim=0).amax().sqrt()
