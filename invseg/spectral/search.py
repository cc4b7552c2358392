"""The arg-max search of the depthwise DFT bound over candidate grids and frequencies (DESIGN §1e).

The spectrum is evaluated without autograd, in chunks under a memory budget, as a cosine series of each filter's
autocorrelation (real matrix products against tables cached per geometry; a stride keeps only the lags that are
multiples of ``s``, see the comment above ``_SearchPlan``), so no padded filter is ever built. Only the arg-max
``(channel, grid, frequency)`` is kept — ``1 + 2d`` integers — from which :mod:`invseg.spectral.depthwise`
recomputes σ differentiably; :func:`phase_from_tables` gives the phase matrices of many arg-maxes at once from the
search's cached DFT tables.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from invseg.utils import conv_fn

from .geometry import DepthwiseGeometry, _grid_sizes, grids_per_axis

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "depthwise_search",
    "depthwise_search_channels",
    "search_channels_full",
    "search_transient_bytes",
    "phase_from_tables",
]

#: Default transient memory budget of one bound evaluation (bytes).
DEFAULT_MEMORY_BUDGET = 64 * 2**20


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


def _build_axis_grid_matrices(geom: DepthwiseGeometry, g: int, device, cdtype) -> list[torch.Tensor]:
    """Per axis the stacked DFT matrix ``E`` of shape ``(g_a, F, s, k_a)`` over the ``g_a`` candidate grids of that
    axis (fold stride ``s`` and valid frequencies as in :func:`_layout`), with zero rows beyond each grid's valid
    frequencies (they contribute power 0, which never changes a maximum of non-negative powers)."""
    lay = _layout(geom, g)
    out = []
    for a, (ms, s, nfreq, F) in enumerate(zip(lay["per_axis"], lay["folds"], lay["nfreq"], lay["F"])):
        E = torch.zeros((len(ms), F, s, geom.kernel[a]), dtype=cdtype, device=device)
        for gi, m in enumerate(ms):
            E[gi, : nfreq[gi]] = _dft_matrix(
                m, s, geom.kernel[a], geom.dilation[a], torch.arange(nfreq[gi], device=device), cdtype
            )
        out.append(E)
    return out


# --- the search: lag form (autocorrelation against cached cosine tables) -------------------------------------
#
# For a real filter the folded power is a cosine series of its autocorrelation
# ``r_c[Δ] = Σ_n θ_c[n] θ_c[n + Δ]`` (taps ``n``, lags ``Δ``):
#
#     s^{-d} Σ_q |Θ̂_c^M(ω + q M/s)|² = Σ_{Δ : s | δΔ} r_c[Δ] cos(2π ⟨ω, δΔ⟩ / M),  ω on the M/s grid,
#
# because ``Σ_q e^{2πi q δΔ / s}`` is ``s`` when ``s | δΔ`` and 0 otherwise (per axis). So a stride folds
# the aliases for free (only lags that are multiples of s survive, on the smaller M/s grid), the result is
# real, and ``r[-Δ] = r[Δ]`` halves the lags. Two evaluations of that series, both real matmuls against
# tables that depend on the geometry only (cached):
#
# * "table": one ``(C × J) @ (J × points)`` product with the full cosine table of the half-space lags
#   (small inputs: one GEMM per group of layers);
# * "split": the first axis apart from the others (``cos(θ₀Δ₀ + φ) = cos θ₀Δ₀ cos φ − sin θ₀Δ₀ sin φ``):
#   ``A, B = r @ [cos φ; sin φ]`` over the other axes' lags, then one product with the first axis'
#   ``[h cos θ₀Δ₀, −h sin θ₀Δ₀]`` (``h = 1`` for ``Δ₀ = 0``, 2 otherwise), chunked over channels and
#   first-axis frequencies under the memory budget (large inputs, 3D).
#
# The arg-max is the same as that of the partial DFT it replaces (the same numbers up to round-off); σ is
# recomputed at the arg-max from the filter's DFT (``depthwise_phase``), so values and gradients do not
# depend on how the search was evaluated.

#: Largest cosine table (bytes) of the "table" evaluation; larger geometries use the "split" one.
_TABLE_MAX_BYTES = 2**20
#: Chunk size (bytes) the search works in below the memory budget: spectrum blocks that stay in the CPU's
#: caches. One-off timing (2-core CPU, one thread, 32 channels at 128³): 28 ms with 4-8 MiB chunks, 93 ms with
#: 64 MiB ones, 32 ms with 1 MiB; no change for the small 2D layers, which fit one chunk.
_CHUNK_BYTES = 4 * 2**20
#: Byte cap of the per-geometry cache of search plans (oldest evicted first).
_PLAN_CACHE_MAX_BYTES = 256 * 2**20

_PLAN_CACHE: dict = {}


def _axis_lags(geom: DepthwiseGeometry, folds: Sequence[int]) -> list[list[int]]:
    """Per axis the lags ``Δ`` (in taps) that survive the alias fold: ``s | δΔ``."""
    return [[lag for lag in range(-(k - 1), k) if (dl * lag) % s == 0]
            for k, dl, s in zip(geom.kernel, geom.dilation, folds)]


def _angles(freqs: torch.Tensor, lags: torch.Tensor, grid: int, dilation: int) -> torch.Tensor:
    """``(ω δΔ mod M) / M`` of shape ``(len(freqs), len(lags))`` in float64 (exact integer reduction first)."""
    return torch.remainder(freqs[:, None] * (lags[None, :] * dilation), grid).to(torch.float64) / grid


def _layout(geom: DepthwiseGeometry, g: int) -> dict:
    """Sizes of a search plan, without building its tables (grids, folds, valid frequencies, lags)."""
    d = geom.spatial_dims
    per_axis = _grid_sizes(geom, g)
    folds = [s if all(m % s == 0 for m in ms) else 1 for s, ms in zip(geom.stride, per_axis)]
    # real filters: the folded spectrum is symmetric under ω -> -ω (jointly), so half of the last axis
    nfreq = [[m // s if a < d - 1 else (m // s) // 2 + 1 for m in ms]
             for a, (ms, s) in enumerate(zip(per_axis, folds))]
    F = [max(nf) for nf in nfreq]
    lags = _axis_lags(geom, folds)
    half = [lag for lag in itertools.product(*lags) if next((x for x in lag if x), 0) >= 0]
    n_combo = math.prod(len(m) for m in per_axis)
    head = [lag for lag in lags[0] if lag >= 0]
    n_tail = math.prod(len(x) for x in lags[1:])
    tail_points = math.prod(len(m) for m in per_axis[1:]) * math.prod(F[1:])
    return dict(per_axis=per_axis, folds=folds, nfreq=nfreq, F=F, lags=lags, half=half, n_combo=n_combo,
                table_points=len(half) * n_combo * math.prod(F), head=head, n_tail=n_tail,
                tail_points=tail_points)


def _bytes_per_channel(lay: dict, kind: str, elem: int, K: int) -> int:
    """Transient bytes per channel of an unchunked search (spectrum values and intermediates)."""
    if kind == "table":
        return (lay["n_combo"] * math.prod(lay["F"]) + K * K) * elem
    rows = len(lay["per_axis"][0]) * lay["F"][0]
    return ((2 * len(lay["head"]) + rows) * lay["tail_points"] + K * K) * elem


def _default_kind(lay: dict, elem: int) -> str:
    """"table" while its cosine table is small and it does at most 3x the split form's multiply-adds (per
    channel: ``J·P`` against ``2·n0·(n_tail + G0·F0)·P_tail``). One-off timings (2-core CPU, one thread): the
    table form is faster for every 2D and 1D layer of MobileNetV2 / ResNet-34-DS (1.6-2x the split form's speed,
    at 1.7-2.1x its multiply-adds: fewer, larger matrix products), the split form for 3D (3-8x fewer
    multiply-adds: 0.44 vs 1.64 ms for 32 channels at 32³, 12 vs 54 ms for 64 at 4³ with 6 grids per axis)."""
    rows = len(lay["per_axis"][0]) * lay["F"][0]
    split = 2 * len(lay["head"]) * (lay["n_tail"] + rows) * lay["tail_points"]
    small = lay["table_points"] * elem <= _TABLE_MAX_BYTES
    return "table" if small and lay["table_points"] <= 3 * split else "split"


class _SearchPlan:
    """Everything the search of one geometry needs except the weights (cached per geometry and grid count).

    Attributes:
        kind: ``"table"`` or ``"split"`` (see the comment above).
        lag_left, lag_index: the plan's lags of each filter's autocorrelation (see :func:`_lag_sums`).
        combos: number of grid combinations ``G``; freqs: padded frequencies per combination.
        axes: the per-axis DFT tables of :func:`phase_from_tables`.
    """

    def __init__(self, geom: DepthwiseGeometry, g: int, device, real: torch.dtype, kind: str):
        d = geom.spatial_dims
        lay = _layout(geom, g)
        per_axis, folds, nfreq, F, lags, half = (lay[k] for k in ("per_axis", "folds", "nfreq", "F", "lags", "half"))
        n_combo = lay["n_combo"]
        self.axes = _axis_grid_matrices(geom, g, device, _complex_dtype(real))
        self.fold = math.prod(folds)
        taps = list(itertools.product(*[range(k) for k in geom.kernel]))
        K = len(taps)
        self.kind = kind
        self.elem = torch.empty((), dtype=real).element_size()
        self.per_channel = _bytes_per_channel(lay, kind, self.elem, K)
        i64 = dict(dtype=torch.int64)
        if self.kind == "table":
            lag_list = half
            # r[Δ] + r[-Δ] = 2 r[Δ]: the factor 2 of the non-zero lags goes into the table
            twice = torch.tensor([1.0 if not any(lag) else 2.0 for lag in half], dtype=torch.float64)
            combos = list(itertools.product(*[range(len(m)) for m in per_axis]))
            lag_t = torch.tensor(half, **i64).reshape(len(half), d)
            table = torch.zeros(n_combo, *F, len(half), dtype=torch.float64)
            for ci, gi in enumerate(combos):
                frac = torch.zeros(*F, len(half), dtype=torch.float64)
                valid = torch.ones(*F, 1, dtype=torch.bool)
                for a in range(d):
                    shape = [1] * d + [-1]
                    shape[a] = F[a]
                    ang = _angles(torch.arange(F[a], **i64), lag_t[:, a], per_axis[a][gi[a]], geom.dilation[a])
                    frac = frac + ang.reshape(shape)
                    vshape = [1] * (d + 1)
                    vshape[a] = F[a]
                    valid = valid & (torch.arange(F[a]) < nfreq[a][gi[a]]).reshape(vshape)
                table[ci] = torch.cos(2 * math.pi * frac) * valid * twice  # zero columns: power 0 never wins
            self.table = table.reshape(-1, len(half)).t().contiguous().to(device=device, dtype=real)
            self.table_t = self.table.t().contiguous()  # (G·F, J)
            self.combo_grid = torch.tensor([[per_axis[a][gi[a]] for a in range(d)] for gi in combos], **i64)
            self.combo_gidx = torch.tensor(combos, **i64).reshape(n_combo, d)
            self.omega = torch.tensor(list(itertools.product(*[range(f) for f in F])), **i64).reshape(-1, d)
            self.combos, self.freqs = n_combo, math.prod(F)
            tensors = [self.table, self.table_t]
            rows = 2 * self.fold * K
            if n_combo * math.prod(F) * rows * torch.empty((), dtype=real).element_size() <= _FLAT_PHASE_MAX_BYTES:
                tables = _PhaseTables(self.axes)
                cols_g = self.combo_gidx.repeat_interleave(math.prod(F), dim=0).to(device)
                cols_o = self.omega.repeat(n_combo, 1).to(device)
                tables.flat = _phases_per_axis(self.axes, cols_g, cols_o).to(real)  # (G·F, 2·Πs, Πk)
                gw = [math.prod(len(m) for m in per_axis[a + 1:]) * math.prod(F) for a in range(d)]
                ow = [math.prod(F[a + 1:]) for a in range(d)]
                tables.weights = (torch.tensor(gw, **i64).to(device), torch.tensor(ow, **i64).to(device))
                self.axes = tables
                tensors.append(tables.flat)
        else:
            head = [lag for lag in lags[0] if lag >= 0]
            tail = list(itertools.product(*lags[1:]))  # all signs
            lag_list = [(h,) + t for h, t in itertools.product(head, tail)]  # r[Δ₀ >= 0, Δ_tail], (head, tail)
            # first axis: (G0·F0, 2·n0) rows [h cos θ₀Δ₀ | −h sin θ₀Δ₀], zero rows beyond valid frequencies
            h_lags = torch.tensor(head, **i64)
            weight = torch.where(h_lags == 0, 1.0, 2.0).to(torch.float64)
            rows = []
            for m, nf in zip(per_axis[0], nfreq[0]):
                ang = 2 * math.pi * _angles(torch.arange(F[0], **i64), h_lags, m, geom.dilation[0])
                blk = torch.cat([weight * torch.cos(ang), -weight * torch.sin(ang)], dim=1)
                blk[nf:] = 0
                rows.append(blk)
            self.head = torch.cat(rows).to(device=device, dtype=real)  # (G0·F0, 2·n0)
            # other axes: (2, n_tail, Gt·Ft) [cos φ; sin φ], φ = 2π Σ_a ω_a δ_a Δ_a / M_a
            dt = d - 1
            t_combos = list(itertools.product(*[range(len(m)) for m in per_axis[1:]]))
            t_lags = torch.tensor(tail, **i64).reshape(len(tail), dt)
            Ft = F[1:]
            tab = torch.zeros(2, len(tail), len(t_combos), *Ft, dtype=torch.float64)
            for ci, gi in enumerate(t_combos):
                frac = torch.zeros(len(tail), *Ft, dtype=torch.float64)
                valid = torch.ones(1, *Ft, dtype=torch.bool)
                for a in range(dt):
                    shape = [-1] + [1] * dt
                    shape[1 + a] = Ft[a]
                    ang = _angles(torch.arange(Ft[a], **i64), t_lags[:, a], per_axis[1 + a][gi[a]],
                                  geom.dilation[1 + a])
                    frac = frac + ang.t().reshape(shape)
                    vshape = [1] * (dt + 1)
                    vshape[1 + a] = Ft[a]
                    valid = valid & (torch.arange(Ft[a]) < nfreq[1 + a][gi[a]]).reshape(vshape)
                tab[0, :, ci] = torch.cos(2 * math.pi * frac) * valid
                tab[1, :, ci] = torch.sin(2 * math.pi * frac) * valid
            self.tail = tab.reshape(2, len(tail), -1).to(device=device, dtype=real)
            self.n_head, self.n_tail = len(head), len(tail)
            self.head_grids, self.head_freqs = len(per_axis[0]), F[0]
            self.tail_combos, self.tail_freqs = len(t_combos), math.prod(Ft)
            self.head_grid = torch.tensor(per_axis[0], **i64)
            nt_c, nt_f = len(t_combos), math.prod(Ft)
            self.tail_grid = torch.tensor([[per_axis[1 + a][gi[a]] for a in range(dt)] for gi in t_combos],
                                          **i64).reshape(nt_c, dt)
            self.tail_gidx = torch.tensor(t_combos, **i64).reshape(nt_c, dt)
            self.tail_omega = torch.tensor(list(itertools.product(*[range(f) for f in Ft])), **i64).reshape(nt_f, dt)
            self.combos, self.freqs = n_combo, F[0] * self.tail_freqs
            tensors = [self.head, self.tail]
        # the plan's lags of the autocorrelation r[c, Δ] = Σ_n θ_c[n] θ_c[n + Δ], two ways (chosen by size in
        # _lag_sums): the positions in the full (2k - 1)^d lag grid of a grouped self-convolution, and
        # lag_left (K, J·K) with r = bmm(θ @ lag_left, θ)
        index = {lag: j for j, lag in enumerate(lag_list)}
        J = len(lag_list)
        pm = torch.zeros(K, J, K, dtype=torch.float64)
        for i, t in enumerate(taps):
            for i2, t2 in enumerate(taps):
                j = index.get(tuple(b - a for a, b in zip(t, t2)))
                if j is not None:
                    pm[i, j, i2] = 1.0
        self.lag_left = pm.reshape(K, J * K).to(device=device, dtype=real)
        full = [2 * k - 1 for k in geom.kernel]
        self.lag_index = torch.tensor([sum((x + k - 1) * math.prod(full[a + 1:])
                                           for a, (x, k) in enumerate(zip(lag, geom.kernel))) for lag in lag_list],
                                      **i64).to(device)
        if self.kind == "table":
            self.combo_grid, self.combo_gidx, self.omega = (
                t.to(device) for t in (self.combo_grid, self.combo_gidx, self.omega))
        else:
            self.head_grid, self.tail_grid, self.tail_gidx, self.tail_omega = (
                t.to(device) for t in (self.head_grid, self.tail_grid, self.tail_gidx, self.tail_omega))
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors + [self.lag_left])


_KIND_CACHE: dict = {}


def _search_plan(geom: DepthwiseGeometry, g: int, device, real: torch.dtype, memory_budget: int | None = None
                 ) -> _SearchPlan:
    """The cached plan of ``geom`` with ``g`` grids per axis: the "table" form where its cosine table is small
    and one channel's spectrum fits ``memory_budget``, else the "split" form (chunkable below one channel)."""
    gkey = (geom.kernel, geom.input_size, geom.stride, geom.padding, geom.dilation, geom.mode, g, real)
    sizes = _KIND_CACHE.get(gkey)
    if sizes is None:  # the default kind and the table form's bytes per channel (geometry only)
        lay = _layout(geom, g)
        elem = torch.empty((), dtype=real).element_size()
        kind = _default_kind(lay, elem)
        if len(_KIND_CACHE) >= 4096:
            _KIND_CACHE.clear()
        sizes = _KIND_CACHE[gkey] = (kind, _bytes_per_channel(lay, kind, elem, math.prod(geom.kernel)))
    kind = sizes[0]
    if kind == "table" and memory_budget is not None and sizes[1] > memory_budget:
        kind = "split"
    key = (gkey, str(device), kind)
    plan = _PLAN_CACHE.pop(key, None)
    if plan is None:
        plan = _SearchPlan(geom, g, device, real, kind)
        total = sum(p.nbytes for p in _PLAN_CACHE.values())
        while _PLAN_CACHE and total + plan.nbytes > _PLAN_CACHE_MAX_BYTES:
            total -= _PLAN_CACHE.pop(next(iter(_PLAN_CACHE))).nbytes  # the least recently used
    _PLAN_CACHE[key] = plan  # (re)inserted last: most recently used
    return plan


def search_transient_bytes(geom: DepthwiseGeometry, grids: int | None = None,
                           dtype: torch.dtype = torch.float32) -> int:
    """Transient bytes an unchunked search of ``geom`` would hold (all channels, all grids): the chunked
    search never exceeds ``min(this, memory_budget)`` (and holds at least one channel's share of one
    first-axis frequency). Used to keep a batched search over several layers within what one layer's
    search would take."""
    elem = 8 if dtype == torch.float64 else 4
    lay = _layout(geom, grids_per_axis(geom, grids))
    return geom.channels * _bytes_per_channel(lay, _default_kind(lay, elem), elem, math.prod(geom.kernel))


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

    The folded power of every candidate grid is evaluated as a cosine series of each filter's
    autocorrelation (module comment above ``_SearchPlan``): real matrix products against tables cached
    per geometry, a handful of kernel launches per call whatever the number of grids and channels.
    Chunks run over channels (and, for inputs whose single-channel spectrum exceeds the budget, over
    first-axis frequencies), each at most ``min(memory_budget, 4 MiB)`` (cache-sized blocks are faster);
    at least one channel's share of one first-axis frequency is always held.

    Returns:
        ``(values, states, grid_index, axes)``: ``values[c] = min_M max_ω σ_c(M, ω)`` (shape ``(C,)``),
        ``states[c] = [M_1..M_d, ω_1..ω_d]`` (int64, ``(C, 2d)``) where it is attained, the per-axis
        index of that grid among the candidates (``(C, d)``) and the cached per-axis DFT tables (for
        :func:`phase_from_tables`). No host synchronisation happens here.
    """
    values, states, gidx, plan = _search(weight, geom, grids, memory_budget, True)
    return values, states, gidx, plan.axes


def _search(weight, geom, grids, memory_budget, with_states: bool):
    """:func:`search_channels_full` (``with_states=False``: the values only, states and grid indices None)."""
    real = torch.float64 if weight.dtype == torch.float64 else torch.float32
    C = geom.channels
    memory_budget = min(int(memory_budget), _CHUNK_BYTES)
    plan = _search_plan(geom, grids_per_axis(geom, grids), weight.device, real, memory_budget)
    with torch.autocast(weight.device.type, enabled=False):  # full precision under AMP
        w = weight.detach().reshape(C, -1).to(real)
        r = _lag_sums(w, plan, geom.kernel)  # (C, J)
        if plan.kind == "table":
            values, states, gidx = _search_table(plan, r, memory_budget, with_states)
        else:
            values, states, gidx = _search_split(plan, r, memory_budget, with_states)
    return values.clamp_min(0).sqrt(), states, gidx, plan


#: ``C · (Πk)³`` from which :func:`_lag_sums` takes the grouped self-convolution (2D: 360 filters, 3D: 14).
_CONV_LAG_WORK = 2**18


def _lag_sums(w: torch.Tensor, plan: _SearchPlan, kernel: tuple[int, ...]) -> torch.Tensor:
    """The autocorrelation of each filter ``w`` ``(C, Πk)`` at the plan's lags, ``(C, J)``: for many taps a grouped
    self-convolution over the full lag grid, else one small batched product (one-off timing, 2-core CPU: 60 vs 210 µs
    for 2,880 3×3 filters, 40 vs 19 µs for 192; 41 vs 76 µs for 32 3×3×3 filters)."""
    C, K = w.shape
    if C * K**3 >= _CONV_LAG_WORK:
        x = w.reshape(1, C, *kernel)
        full = conv_fn(len(kernel))(x, x.reshape(C, 1, *kernel), padding=[k - 1 for k in kernel], groups=C)
        return full.reshape(C, -1)[:, plan.lag_index]
    return torch.bmm((w @ plan.lag_left).view(C, -1, K), w[:, :, None]).view(C, -1)


def _search_table(plan: _SearchPlan, r: torch.Tensor, memory_budget: int, with_states: bool = True):
    C = r.shape[0]
    step = max(1, min(C, memory_budget // max(plan.per_channel, 1)))
    G, F = plan.combos, plan.freqs
    vals, combos, idxs = [], [], []
    for c0 in range(0, C, step):
        rc = r[c0:c0 + step]
        if G == 1 and with_states:
            v, i = (rc @ plan.table).max(dim=1)  # (c, F) -> over the frequencies
            vals.append(v)
            idxs.append(i)
            continue
        if rc.shape[0] < 16:  # few channels: (c, G, F), the reductions along the contiguous frequencies
            power = (rc @ plan.table).view(-1, G, F)
            v, combo = power.amax(dim=2).min(dim=1)
            vals.append(v)
            if with_states:
                idxs.append(power.gather(1, combo[:, None, None].expand(-1, 1, F))[:, 0].argmax(dim=1))
                combos.append(combo)
            continue
        # (G, F, c): plain maxima over the frequencies run along the outer axis, vectorised over channels
        # (a reduction that tracks indices costs ~4-8x more on CPU, so only the winning grid gets one)
        power = torch.mm(plan.table_t, rc.t()).view(G, F, -1)
        v, combo = power.amax(dim=1).min(dim=0)  # the tightest grid per channel
        vals.append(v)
        if with_states:
            idxs.append(power[combo, :, torch.arange(rc.shape[0], device=rc.device)].argmax(dim=1))
            combos.append(combo)
    values = vals[0] if len(vals) == 1 else torch.cat(vals)
    if not with_states:
        return values, None, None
    fidx = idxs[0] if len(idxs) == 1 else torch.cat(idxs)
    if G == 1:
        states = torch.cat([plan.combo_grid.expand(C, -1), plan.omega[fidx]], dim=1)
        return values, states, plan.combo_gidx.expand(C, -1)
    combo = combos[0] if len(combos) == 1 else torch.cat(combos)
    states = torch.cat([plan.combo_grid[combo], plan.omega[fidx]], dim=1)
    return values, states, plan.combo_gidx[combo]


def _search_split(plan: _SearchPlan, r: torch.Tensor, memory_budget: int, with_states: bool = True):
    C = r.shape[0]
    n0, nt = plan.n_head, plan.n_tail
    g0, f0 = plan.head_grids, plan.head_freqs
    gt, ft = plan.tail_combos, plan.tail_freqs
    pt = gt * ft
    elem = plan.elem
    r = r.reshape(C, n0, nt).transpose(0, 1)  # (n0, C, nt)
    per_row = pt * elem  # one channel, one first-axis frequency
    step = max(1, min(C, memory_budget // max(plan.per_channel, 1)))
    if step == 1 and plan.per_channel > memory_budget:  # row blocks of one grid at a time
        r_step = max(1, (memory_budget - 2 * n0 * per_row) // per_row)
        blocks = [(g, r0, min(f0, r0 + r_step)) for g in range(g0) for r0 in range(0, f0, r_step)]
    else:
        blocks = [(None, 0, f0)]
    best_val = best_f0 = best_ft = None
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        c = c1 - c0
        x = torch.matmul(r[:, c0:c1].reshape(1, n0 * c, nt), plan.tail)  # (2, n0·c, Pt): [A; B]
        x = x.reshape(2 * n0, c * pt)
        for g, r0, r1 in blocks:
            head = plan.head if g is None else plan.head[g * f0 + r0:g * f0 + r1]
            gs = g0 if g is None else 1
            power = (head @ x).reshape(gs, r1 - r0, c, gt, ft)
            if not with_states:
                v = power.amax(dim=(1, 4))
                i0 = i_t = None
            else:
                # the maximum over the other axes' frequencies without indices first (a plain reduction is ~4x
                # faster on CPU than one that tracks indices), the arg-max then only in the winning row
                v, i0 = power.amax(dim=4).max(dim=1)  # (gs, c, Gt): over the first axis' frequencies
                row = power.gather(1, i0[:, None, :, :, None].expand(gs, 1, c, gt, ft))
                i_t = row.argmax(dim=4).squeeze(1)
                i0 = i0 + r0
            if len(blocks) == 1 and step >= C:  # one chunk: the common case
                best_val, best_f0, best_ft = v, i0, i_t
                continue
            if best_val is None:
                best_val = torch.full((g0, C, gt), -1.0, dtype=v.dtype, device=v.device)
                best_f0 = torch.zeros((g0, C, gt), dtype=torch.int64, device=v.device)
                best_ft = torch.zeros_like(best_f0)
            gsl = slice(None) if g is None else slice(g, g + 1)
            old = best_val[gsl, c0:c1]
            better = v > old
            best_val[gsl, c0:c1] = torch.where(better, v, old)
            if with_states:
                best_f0[gsl, c0:c1] = torch.where(better, i0, best_f0[gsl, c0:c1])
                best_ft[gsl, c0:c1] = torch.where(better, i_t, best_ft[gsl, c0:c1])
    # (G0, C, Gt) -> (C, G0·Gt): grid combinations in row-major order over axes, as candidate_grids
    if not with_states:
        return best_val.transpose(0, 1).reshape(C, g0 * gt).amin(dim=1), None, None
    best_val, best_f0, best_ft = (t.transpose(0, 1).reshape(C, g0 * gt) for t in (best_val, best_f0, best_ft))
    values, combo = best_val.min(dim=1)  # the tightest grid per channel
    om0 = best_f0.gather(1, combo[:, None])
    omt = plan.tail_omega[best_ft.gather(1, combo[:, None])[:, 0]]
    hg = torch.div(combo, gt, rounding_mode="floor")
    tg = combo - hg * gt
    states = torch.cat([plan.head_grid[hg][:, None], plan.tail_grid[tg], om0, omt], dim=1)
    gidx = torch.cat([hg[:, None], plan.tail_gidx[tg]], dim=1)
    return values, states, gidx


def phase_from_tables(axes, grid_index: torch.Tensor, omega: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Batched phase matrices (as :func:`depthwise_phase`) gathered from a search's cached DFT tables.

    Args:
        axes: the tables returned by :func:`search_channels_full`.
        grid_index: ``(L, d)`` per-axis grid indices; omega: ``(L, d)`` per-axis frequencies.

    Returns:
        ``(L, 2·Πs, Πk)`` real phase matrices — a few gathers per axis for a whole group of layers.
    """
    flat = getattr(axes, "flat", None)
    if flat is not None:  # every (grid, frequency) of a small search precomputed: one gather
        gw, ow = axes.weights
        return flat[(grid_index * gw).sum(dim=1) + (omega * ow).sum(dim=1)].to(dtype)
    return _phases_per_axis(axes, grid_index, omega).to(dtype)


def _phases_per_axis(axes, grid_index: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    e = None
    for a, ax in enumerate(axes):
        ea = ax[grid_index[:, a], omega[:, a]]  # (L, s_a, k_a)
        e = ea if e is None else (e[:, :, None, :, None] * ea[:, None, :, None, :]).reshape(
            ea.shape[0], e.shape[1] * ea.shape[1], e.shape[2] * ea.shape[2])
    return torch.cat([e.real, e.imag], dim=1)


class _PhaseTables(list):
    """The per-axis DFT tables (a list of :func:`_build_axis_grid_matrices`) and, for small searches, every column's phase matrix
    ``flat`` ``(G·F, 2·Πs, Πk)`` with the index weights of ``(grid_index, omega)`` (see
    :func:`phase_from_tables`)."""

    flat = None
    weights = None


#: Largest precomputed phase table (bytes) of one search plan.
_FLAT_PHASE_MAX_BYTES = 2 * 2**20


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
