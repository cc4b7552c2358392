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

*Memory and cost* (§1e): the arg-max ``(channel, grid, frequency)`` is found without autograd
(:mod:`invseg.spectral.search`, chunked under a memory budget) and σ is recomputed differentiably at that
single frequency (``s^d`` aliases for strides) from the filter's DFT (:func:`depthwise_sigma_at`), which
gives the same value and the same gradient as autograd through the full FFT at ``O(k^d)`` memory.

The geometry and candidate grids: :mod:`invseg.spectral.geometry`. *Small inputs*:
:func:`~invseg.spectral.depthwise_exact_small` (:mod:`invseg.spectral.exact_small`) gives the exact norm
(dense operators, pruned by the DFT bounds) where the DFT bound is loosest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .geometry import DepthwiseGeometry, _fold_strides, candidate_grids, depthwise_geometry, fold_strides
from .search import DEFAULT_MEMORY_BUDGET, depthwise_search

__all__ = [
    "depthwise_phase",
    "depthwise_sigma_from_phase",
    "depthwise_sigma_at",
    "depthwise_bound",
    "depthwise_bound_dense",
]

def depthwise_phase(state: torch.Tensor, geom: DepthwiseGeometry, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real phase matrix of the remembered frequency: shape ``(2·Πs, Πk)``, rows ``[Re; Im]`` of
    ``e^{-2πi⟨nδ, (ω + q M/s)/M⟩}`` over the aliases ``q`` (rows) and the taps ``n`` (columns), so that
    ``σ² = ||P θ_c||² / Πs``. Built on the state's device without host synchronisation."""
    d = geom.spatial_dims
    strides = fold_strides(geom)
    e = None
    for a in range(d):
        m_a = state[a]
        om_a = state[d + a]
        s_a = strides[a]
        j = om_a + torch.arange(s_a, device=state.device) * torch.div(m_a, s_a, rounding_mode="floor")
        taps = torch.arange(geom.kernel[a], device=state.device) * geom.dilation[a]
        phase = torch.remainder(j[:, None] * taps[None, :], m_a).to(torch.float64)
        ang = phase * (-2.0 * math.pi) / m_a.to(torch.float64)
        ea = torch.polar(torch.ones_like(ang), ang)  # (s_a, k_a)
        # outer product over axes: rows (q_1..q_a), columns (n_1..n_a)
        e = ea if e is None else (e[:, None, :, None] * ea[None, :, None, :]).reshape(
            e.shape[0] * ea.shape[0], e.shape[1] * ea.shape[1])
    return torch.cat([e.real, e.imag], dim=0).to(dtype)


def depthwise_sigma_from_phase(
    weight: torch.Tensor, channel: torch.Tensor, phase: torch.Tensor, fold: int
) -> torch.Tensor:
    """Differentiable σ of channel ``channel`` (1-element int64 tensor) from its phase matrix.

    Uses elementwise products and sums (not matmul), so autocast leaves it in the weight's precision.
    """
    # the index is cloned: autograd keeps it for backward, and the layer's state may be updated in place
    # before then (a layer used at two input sizes in one forward)
    theta = weight.reshape(weight.shape[0], -1).index_select(0, channel.clone())  # (1, Πk)
    sigma = torch.linalg.vector_norm((phase.to(theta.dtype) * theta).sum(dim=1))  # over (2·Πs,)
    return sigma if fold == 1 else sigma * (1.0 / math.sqrt(fold))


def depthwise_sigma_at(weight: torch.Tensor, state: torch.Tensor, geom: DepthwiseGeometry) -> torch.Tensor:
    """Differentiable σ at a remembered arg-max ``state = [c, M_1..M_d, ω_1..ω_d]``.

    ``σ = sqrt(s^{-d} Σ_q |Σ_n θ_c[n] e^{-2πi ⟨n δ, (ω + q M/s)/M⟩}|²)`` — ``O(s^d k^d)`` work and
    memory, no host synchronisation. The value equals the full-spectrum maximum for the weights the
    state was searched on, and its gradient equals autograd through the full FFT.
    """
    real_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    phase = depthwise_phase(state[1:], geom, real_dtype)
    return depthwise_sigma_from_phase(weight.to(real_dtype), state[:1], phase, math.prod(fold_strides(geom)))


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
        grids: candidate grids per axis (default: :func:`grids_per_axis`; their product is searched).
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
