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
    "grids_per_axis",
    "DEFAULT_WORK_BUDGET",
    "depthwise_search",
    "depthwise_search_channels",
    "search_channels_full",
    "search_transient_bytes",
    "phase_from_tables",
    "depthwise_sigma_at",
    "depthwise_phase",
    "depthwise_sigma_from_phase",
    "fold_strides",
    "depthwise_bound",
    "depthwise_bound_dense",
    "DEFAULT_MEMORY_BUDGET",
    "SMALL_INPUT_POINTS",
    "SMALL_INPUT_WORK",
    "use_exact_small",
    "depthwise_exact_small",
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
        if mode == "circular" and ((n[a] + 2 * p[a] - k_eff[a]) // s[a]) * s[a] >= n[a]:
            raise ValueError(
                f"circular padding {p[a]} on axis {a} gives more output rows than input_size {n[a]} (kernel "
                f"{kernel[a]}, stride {s[a]}): rows of the circulant repeat and max|Θ̂| is no bound; use "
                f"2p <= k_eff - 1 = {k_eff[a] - 1}"
            )
    return DepthwiseGeometry(int(weight.shape[0]), kernel, n, s, p, dil, mode)


#: Work budget (spectrum points, summed over channels and grids) that caps the default number of grids.
DEFAULT_WORK_BUDGET = 2**18


def grids_per_axis(geom: DepthwiseGeometry, grids: int | None = None) -> int:
    """Number of candidate grids per axis: ``grids`` if given, else the default for the dimension
    (8/6/3 for 1/2/3 dims), lowered until ``C · Π_a(g · M_a)`` spectrum points fit
    :data:`DEFAULT_WORK_BUDGET` (at least 1). Large inputs and wide layers therefore use one grid, the
    paper's ``M = N + 2p``: the gain of more grids shrinks like ``1/N`` while their cost grows like
    ``g^d``, and the search runs once per optimization step."""
    if geom.mode == "circular":
        return 1
    if grids is not None:
        if isinstance(grids, bool) or not isinstance(grids, int) or grids < 1:
            raise ValueError(f"grids must be a positive int, got {grids!r}")
        return grids
    g = _DEFAULT_GRIDS[geom.spatial_dims]
    while g > 1 and geom.channels * math.prod(g * (n + p + g) for n, p in zip(geom.input_size, geom.padding)) > DEFAULT_WORK_BUDGET:
        g -= 1
    return g


def candidate_grids(geom: DepthwiseGeometry, grids: int | None = None) -> list[tuple[int, ...]]:
    """The grids ``M`` searched for ``geom``: per axis ``g`` candidates (zeros; ``g`` from
    :func:`grids_per_axis`) — the paper's grid ``N + 2p`` and the smallest other multiples of ``s`` that are
    ``>= N + p`` — or exactly ``N`` (circular); all combinations over axes."""
    if geom.mode == "circular":
        return [geom.input_size]
    return list(itertools.product(*_grid_sizes(geom, grids_per_axis(geom, grids))))


def _grid_sizes(geom: DepthwiseGeometry, g: int) -> list[list[int]]:
    if geom.mode == "circular":
        return [[n] for n in geom.input_size]
    out = []
    for n, p, s in zip(geom.input_size, geom.padding, geom.stride):
        # The paper's grid N + 2p (rounded up to a multiple of s) is always a candidate, so the minimum is
        # never looser than the paper's bound; the other g - 1 candidates are the smallest valid grids.
        paper = -(-(n + 2 * p) // s) * s
        first = -(-(n + p) // s) * s  # smallest multiple of s that is >= N + p
        others = [m for m in (first + i * s for i in range(g)) if m != paper][: g - 1]
        out.append(sorted([paper] + others))
    return out


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


_AXES_CACHE: dict = {}
_AXES_CACHE_MAX = 512


def _axis_grid_matrices(geom: DepthwiseGeometry, grids: int | None, device, cdtype):
    """Cached :func:`_build_axis_grid_matrices`: the DFT matrices depend on the geometry only (not on the
    weights), so a training loop builds them once per layer geometry instead of once per step."""
    g = grids_per_axis(geom, grids)
    key = (geom.kernel, geom.input_size, geom.stride, geom.padding, geom.dilation, geom.mode, g, str(device), cdtype)
    axes = _AXES_CACHE.get(key)
    if axes is None:
        if len(_AXES_CACHE) >= _AXES_CACHE_MAX:
            _AXES_CACHE.clear()
        axes = _AXES_CACHE[key] = _build_axis_grid_matrices(geom, g, device, cdtype)
    return axes


def _build_axis_grid_matrices(geom: DepthwiseGeometry, g: int, device, cdtype):
    """Per axis: the candidate grid sizes, fold strides, frequency counts and the stacked DFT matrix.

    Returns a list over axes of ``(ms, s, nfreq, F, E, ms_tensor)``: ``ms`` the grid sizes (``g_a`` of
    them), ``s`` the fold stride, ``nfreq[g]`` the valid frequencies of grid ``g``, ``F = max(nfreq)``,
    ``E`` of shape ``(g_a, F, s, k_a)`` with zero rows beyond ``nfreq[g]`` (they contribute power 0,
    which never changes a maximum of non-negative powers), and ``ms`` as a device tensor.
    """
    d = geom.spatial_dims
    out = []
    per_axis = _grid_sizes(geom, g)
    for a in range(d):
        ms = per_axis[a]
        s = geom.stride[a] if all(m % geom.stride[a] == 0 for m in ms) else 1
        # Real filters: the folded spectrum is symmetric under ω -> -ω (jointly on all axes), so half of
        # the last axis suffices.
        nfreq = [m // s if a < d - 1 else (m // s) // 2 + 1 for m in ms]
        F = max(nfreq)
        E = torch.zeros((len(ms), F, s, geom.kernel[a]), dtype=cdtype, device=device)
        for gi, m in enumerate(ms):
            E[gi, : nfreq[gi]] = _dft_matrix(
                m, s, geom.kernel[a], geom.dilation[a], torch.arange(nfreq[gi], device=device), cdtype
            )
        out.append((ms, s, nfreq, F, E, torch.tensor(ms, device=device)))
    return out


def search_transient_bytes(geom: DepthwiseGeometry, grids: int | None = None, dtype: torch.dtype = torch.float32) -> int:
    """Transient bytes an unchunked search of ``geom`` would hold (all channels, all grids): the chunked
    search never exceeds ``min(this, memory_budget)``. Used to keep a batched search over several layers
    within what one layer's search would take."""
    cdtype = _complex_dtype(torch.float64 if dtype == torch.float64 else torch.float32)
    axes = _axis_grid_matrices(geom, grids, "cpu", cdtype)
    points = math.prod(len(ax[0]) * ax[3] * ax[1] for ax in axes)
    return geom.channels * points * 3 * torch.empty((), dtype=cdtype).element_size()


@torch.no_grad()
def depthwise_search_channels(
    weight: torch.Tensor,
    geom: DepthwiseGeometry,
    grids: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bound and arg-max (see :func:`search_channels_full`).

    Returns:
        ``(values, states)``: ``values[c] = min_M max_ω σ_c(M, ω)`` (shape ``(C,)``) and
        ``states[c] = [M_1..M_d, ω_1..ω_d]`` (int64, shape ``(C, 2d)``) where it is attained.
    """
    values, states, _, _ = search_channels_full(weight, geom, grids, memory_budget)
    return values, states


@torch.no_grad()
def search_channels_full(
    weight: torch.Tensor,
    geom: DepthwiseGeometry,
    grids: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
):
    """Per-channel bound and arg-max, without autograd, chunked under ``memory_budget`` bytes.

    All candidate grids are evaluated in one separable partial-DFT contraction (each axis contracts
    its kernel extent against the stacked DFT matrices of all its grids), so the number of kernel
    launches does not grow with the number of grids; chunks run over channels and first-axis rows.

    Returns:
        ``(values, states, grid_index, axes)``: ``values[c] = min_M max_ω σ_c(M, ω)`` (shape ``(C,)``),
        ``states[c] = [M_1..M_d, ω_1..ω_d]`` (int64, ``(C, 2d)``) where it is attained, the per-axis
        index of that grid among the candidates (``(C, d)``) and the cached per-axis DFT tables (for
        :func:`phase_from_tables`). No host synchronisation happens here.
    """
    d = geom.spatial_dims
    real_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    cdtype = _complex_dtype(real_dtype)
    device = weight.device
    C = geom.channels
    w = weight.detach().reshape(C, *geom.kernel).to(cdtype)
    axes = _axis_grid_matrices(geom, grids, device, cdtype)
    gs = [len(ax[0]) for ax in axes]
    Fs = [ax[3] for ax in axes]
    ss = [ax[1] for ax in axes]
    fold = math.prod(ss)
    n_combo = math.prod(gs)
    n_combo_rest = math.prod(gs[1:])
    rest_freq = math.prod(Fs[1:])
    bytes_per_point = 3 * torch.empty((), dtype=cdtype).element_size()
    per_row = n_combo_rest * rest_freq * math.prod(ss) * bytes_per_point  # one first-axis row, one channel
    per_group = per_row * Fs[0]
    # chunks over the first axis: several whole grids at once, or row blocks of one grid
    if per_group <= memory_budget:
        g_step = max(1, min(gs[0], memory_budget // per_group))
        row_chunks = [(g0, min(gs[0], g0 + g_step), 0, Fs[0]) for g0 in range(0, gs[0], g_step)]
    else:
        r_step = max(1, memory_budget // per_row)
        row_chunks = [(g0, g0 + 1, r0, min(Fs[0], r0 + r_step)) for g0 in range(gs[0]) for r0 in range(0, Fs[0], r_step)]
    mats_rest = [ax[4].reshape(-1, geom.kernel[a]) for a, ax in enumerate(axes)]
    best_val = torch.full((C, n_combo), -1.0, dtype=real_dtype, device=device)
    best_idx = torch.zeros((C, n_combo), dtype=torch.int64, device=device)
    for (g0, g1, r0, r1) in row_chunks:
        span = max(1, (r1 - r0) * (g1 - g0))
        ch_chunk = max(1, min(C, memory_budget // max(per_row * span, 1)))
        e0 = axes[0][4][g0:g1, r0:r1].reshape(-1, geom.kernel[0])
        for c0 in range(0, C, ch_chunk):
            c1 = min(C, c0 + ch_chunk)
            t = w[c0:c1]
            for a in range(d):
                t = torch.tensordot(t, e0 if a == 0 else mats_rest[a], dims=([1], [1]))
            # t: (c, [g F s]_0, ..., [g F s]_{d-1}) -> power folded over the aliases s
            shape = [c1 - c0, g1 - g0, r1 - r0, ss[0]]
            for a in range(1, d):
                shape += [gs[a], Fs[a], ss[a]]
            sq = torch.view_as_real(t).square()
            power = sq[..., 0] + sq[..., 1]  # |t|²; 8× faster on CPU than a reduction over the size-2 axis
            alias_dims = tuple(range(3, 3 * d + 1, 3))
            power = power.reshape(shape)
            if fold > 1:  # sum over the aliases by adding slices: a reduction over these small strided axes
                for dim in reversed(alias_dims):  # measured 1.3 ms of a 2.6 ms search (96 ch, 64², stride 2)
                    acc = power.select(dim, 0)
                    for q in range(1, power.shape[dim]):
                        acc = acc + power.select(dim, q)
                    power = acc
            else:
                power = power.squeeze(alias_dims)
            # power: (c, g_0, F_0, g_1, F_1, ...) -> (c, g_0, g_1, ..., F_0, F_1, ...)
            perm = [0] + [1 + 2 * a for a in range(d)] + [2 + 2 * a for a in range(d)]
            power = power.permute(perm).reshape(c1 - c0, (g1 - g0) * n_combo_rest, -1)
            val, idx = power.max(dim=2)
            idx = idx + r0 * rest_freq  # local first-axis row -> global frequency index
            sl = slice(g0 * n_combo_rest, g1 * n_combo_rest)
            better = val > best_val[c0:c1, sl]
            best_val[c0:c1, sl] = torch.where(better, val, best_val[c0:c1, sl])
            best_idx[c0:c1, sl] = torch.where(better, idx, best_idx[c0:c1, sl])
    values, combo = best_val.min(dim=1)  # the tightest grid per channel
    fidx = best_idx.gather(1, combo[:, None])[:, 0]
    grid_cols, gidx_cols, freq_cols = [], [], []
    rem_c, rem_f = combo, fidx
    for a in reversed(range(d)):
        gi = torch.remainder(rem_c, gs[a])
        gidx_cols.append(gi)
        grid_cols.append(axes[a][5][gi])
        rem_c = torch.div(rem_c, gs[a], rounding_mode="floor")
        freq_cols.append(torch.remainder(rem_f, Fs[a]))
        rem_f = torch.div(rem_f, Fs[a], rounding_mode="floor")
    states = torch.stack(grid_cols[::-1] + freq_cols[::-1], dim=1)
    return values.clamp_min(0).div(fold).sqrt(), states, torch.stack(gidx_cols[::-1], dim=1), axes


def phase_from_tables(axes, grid_index: torch.Tensor, omega: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Batched phase matrices (as :func:`depthwise_phase`) gathered from a search's cached DFT tables.

    Args:
        axes: the tables returned by :func:`search_channels_full`.
        grid_index: ``(L, d)`` per-axis grid indices; omega: ``(L, d)`` per-axis frequencies.

    Returns:
        ``(L, 2·Πs, Πk)`` real phase matrices — a few gathers per axis for a whole group of layers.
    """
    e = None
    for a, ax in enumerate(axes):
        ea = ax[4][grid_index[:, a], omega[:, a]]  # (L, s_a, k_a)
        e = ea if e is None else (e[:, :, None, :, None] * ea[:, None, :, None, :]).reshape(
            ea.shape[0], e.shape[1] * ea.shape[1], e.shape[2] * ea.shape[2])
    return torch.cat([e.real, e.imag], dim=1).to(dtype)


@torch.no_grad()
def depthwise_search(
    weight: torch.Tensor,
    geom: DepthwiseGeometry,
    grids: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the arg-max of the bound without autograd (see :func:`depthwise_search_channels`).

    Returns:
        ``(value, state)``: ``value`` the bound (0-dim tensor, no grad) and ``state`` an int64 tensor
        ``[c*, M_1..M_d, ω_1..ω_d]`` (on ``weight.device``) from which :func:`depthwise_sigma_at`
        recomputes the same value differentiably. No host synchronisation happens here.
    """
    values, states = depthwise_search_channels(weight, geom, grids, memory_budget)
    value, c_star = values.max(dim=0)
    return value, torch.cat([c_star.reshape(1), states[c_star]])


def fold_strides(geom: DepthwiseGeometry) -> tuple[int, ...]:
    """The per-axis strides folded exactly by the aliasing formula (see ``_axis_grid_matrices``)."""
    if geom.mode == "circular":
        return tuple(s if n % s == 0 else 1 for s, n in zip(geom.stride, geom.input_size))
    return geom.stride


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


#: Inputs with at most this many spatial points get the exact norm (dense per-channel SVD) in the layers ...
SMALL_INPUT_POINTS = 64
#: ... when ``channels · points³`` (the SVD work) stays below this (e.g. 256 channels at 4×4, 4 at 8×8): a
#: batched SVD per step is not free (measured on CPU: 2,560 16×16 SVDs ~ 30 ms).
SMALL_INPUT_WORK = 2**20


def use_exact_small(channels: int, input_size: Sequence[int]) -> bool:
    """Whether the SN layers take the exact dense-SVD path for this layer (tiny input, affordable SVDs)."""
    n = math.prod(input_size)
    return n <= SMALL_INPUT_POINTS and channels * n**3 <= SMALL_INPUT_WORK

_SHIFT_CACHE: dict = {}


def _shift_operators(geom: DepthwiseGeometry, device, dtype) -> torch.Tensor:
    """``S`` of shape ``(Πk, n_out·n_in)``: the single-channel conv operator is ``Σ_t θ[t] S_t`` (cached)."""
    key = (geom.kernel, geom.input_size, geom.stride, geom.padding, geom.dilation, geom.mode, str(device), dtype)
    ops = _SHIFT_CACHE.get(key)
    if ops is None:
        from .reference import conv_apply, conv_spec  # a lazy import: reference imports nothing from here

        n_in = math.prod(geom.input_size)
        k = math.prod(geom.kernel)
        taps = torch.eye(k, dtype=torch.float64).reshape(k, 1, *geom.kernel)
        spec = conv_spec(taps[:1], geom.input_size, geom.stride, geom.padding, geom.dilation, 1, geom.mode)
        eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, *geom.input_size)
        cols = [conv_apply(eye, taps[t:t + 1], spec).reshape(n_in, -1).t() for t in range(k)]  # (n_out, n_in)
        ops = torch.stack(cols).reshape(k, -1).to(device=device, dtype=dtype)
        if len(_SHIFT_CACHE) >= 256:
            _SHIFT_CACHE.clear()
        _SHIFT_CACHE[key] = ops
    return ops


@torch.no_grad()
def depthwise_exact_small(weight: torch.Tensor, geom: DepthwiseGeometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact per-channel operator norms of a depthwise conv on a small input (dense SVD of each channel's
    ``n_out × n_in`` operator), for inputs where the DFT bound is loose (``N`` close to ``k``).

    Returns:
        ``(values, channel, phase)``: the per-channel norms ``(C,)``, the arg-max channel (1-element
        int64), and ``phase`` of shape ``(1, Πk)`` with ``phase[t] = uᵀ S_t v`` for the top singular pair
        ``(u, v)`` of that channel — so ``σ = |phase · θ_c|`` is differentiable, equals the exact norm for
        the weights it was computed on, and has the exact gradient ``u vᵀ`` (projected on the taps).
    """
    real = torch.float64 if weight.dtype == torch.float64 else torch.float32
    ops = _shift_operators(geom, weight.device, real)  # (K, n_out·n_in)
    n_in = math.prod(geom.input_size)
    with torch.autocast(weight.device.type, enabled=False):  # full precision under AMP
        theta = weight.detach().reshape(geom.channels, -1).to(real)
        mats = (theta @ ops).reshape(geom.channels, -1, n_in)  # (C, n_out, n_in)
        values = torch.linalg.matrix_norm(mats, ord=2)
        _, c = values.max(dim=0)
        u, _, vh = torch.linalg.svd(mats[c])
        phase = (ops.reshape(ops.shape[0], -1, n_in) @ vh[0]) @ u[:, 0]  # (K,): u^T S_t v
    return values, c.reshape(1), phase.reshape(1, -1)


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
