"""Tests of the depthwise search internals (invseg.spectral.search): the lag-form evaluation against the full
FFT of the zero-padded filters, both evaluation forms and their chunking (float64 throughout).
"""

import itertools

import pytest
import torch

import invseg.spectral.search as search
from invseg.spectral import (
    DEFAULT_MEMORY_BUDGET,
    candidate_grids,
    depthwise_bound_dense,
    depthwise_geometry,
    depthwise_phase,
    depthwise_sigma_at,
    exact_conv_norm,
    grids_per_axis,
    phase_from_tables,
    search_channels_full,
    search_transient_bytes,
)
from invseg.spectral.geometry import _grid_sizes

REL = 1e-10


def _filters(c, kernel, seed, dtype=torch.float64):
    return torch.randn((c, 1, *kernel), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _exact_per_channel(w, n, s, p, dil, mode="zeros"):
    return torch.tensor([exact_conv_norm(w[i:i + 1], n, s, p, dil, groups=1, mode=mode) for i in range(w.shape[0])],
                        dtype=torch.float64)


# randomized geometries: (kernel, input size, stride, padding, dilation, mode); padding None = (k_eff - 1) // 2
CASES = [
    ((3,), 13, 1, None, 1, "zeros"),
    ((4,), 12, 2, 1, 1, "zeros"),
    ((5,), 17, 3, 4, 1, "zeros"),
    ((2,), 9, 1, 0, 3, "zeros"),
    ((3, 3), 8, 1, None, 1, "zeros"),
    ((3, 3), 9, 2, None, 1, "zeros"),
    ((2, 4), (7, 9), (1, 2), (1, 0), 1, "zeros"),
    ((3, 2), (10, 8), (3, 1), (2, 1), (2, 1), "zeros"),
    ((5, 5), 9, 2, 2, 1, "zeros"),
    ((3, 3), 8, 2, 1, 1, "circular"),
    ((3, 3, 3), 5, 1, None, 1, "zeros"),
    ((2, 3, 3), (6, 5, 7), (2, 1, 3), (1, 1, 0), 1, "zeros"),
    ((3, 3, 3), 6, 2, 1, (1, 2, 1), "zeros"),
]


def _force(monkeypatch, kind):
    """Every plan in the given evaluation form (``"table"``: whatever its size, still split below one channel)."""
    monkeypatch.setattr(search, "_default_kind", lambda lay, elem: kind)
    monkeypatch.setattr(search, "_KIND_CACHE", {})
    monkeypatch.setattr(search, "_PLAN_CACHE", {})


def _force_split(monkeypatch):
    _force(monkeypatch, "split")


@pytest.mark.parametrize("form", ["table", "split", "split-chunked"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-N{c[1]}-s{c[2]}-{c[5]}" for c in CASES])
def test_search_equals_full_fft_and_bounds_exact(case, form, monkeypatch):
    kernel, n, s, p, dil, mode = case
    c = 4
    w = _filters(c, kernel, seed=sum(kernel) * 7 + len(kernel))
    geom = depthwise_geometry(w, n, s, p, dil, mode)
    _force(monkeypatch, "table" if form == "table" else "split")
    budget = 2048 if form == "split-chunked" else DEFAULT_MEMORY_BUDGET  # many channel / row chunks
    values, states, gidx, axes = search_channels_full(w, geom, memory_budget=budget)
    d = geom.spatial_dims
    assert values.shape == (c,) and states.shape == (c, 2 * d) and gidx.shape == (c, d)
    # per channel: the full-FFT reference over the same candidate grids (the previous implementation's value)
    for i in range(c):
        ref = float(depthwise_bound_dense(w[i:i + 1], n, s, p, dil, mode))
        assert float(values[i]) == pytest.approx(ref, rel=1e-12)
        # the state reproduces the value (differentiably), on a candidate grid, at a valid frequency
        sigma = depthwise_sigma_at(w, torch.cat([torch.tensor([i]), states[i]]), geom)
        assert float(sigma) == pytest.approx(ref, rel=1e-12)
        grid = tuple(states[i, :d].tolist())
        assert grid in candidate_grids(geom)
        per_axis = _grid_sizes(geom, grids_per_axis(geom))
        assert all(per_axis[a][int(gidx[i, a])] == grid[a] for a in range(d))
    # a certified upper bound of every channel's exact norm
    exact = _exact_per_channel(w, n, s, p, dil, mode)
    assert bool((values >= exact * (1 - REL)).all())


@pytest.mark.parametrize("form", ["table", "split"])
@pytest.mark.parametrize("case", CASES[:3] + CASES[5:8] + CASES[-2:], ids=lambda c: f"{c[0]}-s{c[2]}")
def test_phase_from_tables_equals_depthwise_phase(case, form, monkeypatch):
    kernel, n, s, p, dil, mode = case
    _force(monkeypatch, form)
    w = _filters(5, kernel, seed=1)
    geom = depthwise_geometry(w, n, s, p, dil, mode)
    _, states, gidx, axes = search_channels_full(w, geom)
    flat = getattr(axes, "flat", None)
    if form == "split":
        assert flat is None
    elif len(kernel) < 3:  # the one-gather path of small table plans (every 1D/2D case here)
        assert flat is not None
    d = geom.spatial_dims
    got = phase_from_tables(axes, gidx, states[:, d:], torch.float64)
    want = torch.stack([depthwise_phase(states[i], geom, torch.float64) for i in range(5)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-N{c[1]}-s{c[2]}-{c[5]}" for c in CASES])
@pytest.mark.parametrize("form", ["table", "split"])
def test_lag_sums_by_convolution_equal_the_batched_product(case, form, monkeypatch):
    kernel, n, s, p, dil, mode = case
    _force(monkeypatch, form)
    w = _filters(3, kernel, seed=7)
    geom = depthwise_geometry(w, n, s, p, dil, mode)
    plan = search._search_plan(geom, grids_per_axis(geom), w.device, torch.float64)
    flat = w.reshape(3, -1)
    monkeypatch.setattr(search, "_CONV_LAG_WORK", 0)
    by_conv = search._lag_sums(flat, plan, geom.kernel)
    monkeypatch.setattr(search, "_CONV_LAG_WORK", 2**62)
    by_bmm = search._lag_sums(flat, plan, geom.kernel)
    torch.testing.assert_close(by_conv, by_bmm, rtol=1e-12, atol=1e-12)
    # and the definition r[Δ] = Σ_n θ[n] θ[n + Δ], Δ read back from its position in the (2k - 1)^d lag grid
    full = [2 * k - 1 for k in kernel]
    theta = w.reshape(3, *kernel)
    for j, pos in enumerate(plan.lag_index.tolist()):
        lag = []
        for a in reversed(range(len(kernel))):
            lag.append(pos % full[a] - (kernel[a] - 1))
            pos //= full[a]
        lag = lag[::-1]
        ref = torch.zeros(3, dtype=torch.float64)
        for tap in itertools.product(*[range(k) for k in kernel]):
            other = tuple(t + x for t, x in zip(tap, lag))
            if all(0 <= o < k for o, k in zip(other, kernel)):
                ref += theta[(slice(None),) + tap] * theta[(slice(None),) + other]
        torch.testing.assert_close(by_bmm[:, j], ref, rtol=1e-12, atol=1e-12)


def test_forms_and_chunks_agree_float32(monkeypatch):
    w = _filters(13, (3, 3), seed=5, dtype=torch.float32)
    geom = depthwise_geometry(w, 24, 2)
    v_table, s_table, _, _ = search_channels_full(w, geom, 3)
    _force_split(monkeypatch)
    for budget in (DEFAULT_MEMORY_BUDGET, 3000):
        v_split, s_split, _, _ = search_channels_full(w, geom, 3, budget)
        torch.testing.assert_close(v_split, v_table, rtol=2e-6, atol=0)
        sig = torch.stack([depthwise_sigma_at(w, torch.cat([torch.tensor([i]), s_split[i]]), geom) for i in range(13)])
        torch.testing.assert_close(sig, v_table, rtol=2e-6, atol=0)


def test_search_under_autocast_keeps_full_precision():
    w = _filters(8, (3, 3), seed=2, dtype=torch.float32)
    geom = depthwise_geometry(w, 16, 1)
    ref = search_channels_full(w, geom)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = search_channels_full(w, geom)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_zero_filter_gives_zero_at_a_valid_state():
    w = torch.zeros(3, 1, 3, 3, dtype=torch.float64)
    geom = depthwise_geometry(w, 9, 2)
    values, states, gidx, _ = search_channels_full(w, geom)
    assert torch.equal(values, torch.zeros(3, dtype=torch.float64))
    assert tuple(states[0, :2].tolist()) in candidate_grids(geom)
    assert float(depthwise_sigma_at(w, torch.cat([torch.tensor([0]), states[0]]), geom)) == 0.0


def test_transient_bytes_cover_the_chunks():
    # the split form of a large 3D input: one channel's spectrum exceeds the chunk size, the search still runs
    geom = depthwise_geometry(torch.zeros(2, 1, 3, 3, 3), 40)
    assert search_transient_bytes(geom) >= 2 * 40**3 * 4 // 2  # at least half a spectrum per channel (float32)
    w = _filters(2, (3, 3, 3), seed=1, dtype=torch.float32)
    v_small = search_channels_full(w, geom, memory_budget=2**16)[0]
    v_big = search_channels_full(w, geom)[0]
    torch.testing.assert_close(v_small, v_big, rtol=2e-6, atol=0)
