"""Tests of invseg.spectral.full_conv (the stem's multi-channel DFT bound): the search against the full FFT of the
zero-padded filters and the dense SVD (float64), the pruned exact eigenvalue search, the Gram-first matrices and
the projection-form σ."""

from __future__ import annotations

import math

import pytest
import torch

import invseg.spectral.full_conv as full_conv
from invseg.spectral import (
    exact_conv_norm,
    full_conv_projection,
    full_conv_search,
    full_conv_sigma_at,
    full_conv_sigma_from_projection,
)
from invseg.spectral.full_conv import full_conv_grids


@pytest.mark.parametrize("shape,size,stride", [((8, 3, 3, 3), (20, 20), 2), ((5, 7, 3, 2), (9, 11), (1, 2)),
                                               ((4, 6, 3), (17,), 2), ((4, 2, 3, 3, 3), (6, 7, 8), 2)])
def test_full_conv_projection_value_and_gradient(shape, size, stride):
    torch.manual_seed(1)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    _, state = full_conv_search(w, size, stride)
    a = full_conv_sigma_at(w, state, stride)
    b = full_conv_sigma_from_projection(w, full_conv_projection(w, state, stride), stride)
    ga, = torch.autograd.grad(a, w)
    gb, = torch.autograd.grad(b, w)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=0)
    torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12)


def test_pruned_search_equals_full_search(monkeypatch):
    torch.manual_seed(2)
    for trial in range(12):
        w = torch.randn(16, 3, 3, 3, dtype=torch.float64)
        if trial % 3 == 1:
            w = w.cumsum(-1).cumsum(-2)  # smooth filters: a broad spectral peak
        if trial % 3 == 2:
            w[:, :, 1, 1] += 4.0  # a dominant centre tap: a flat spectrum
        for size, stride in (((64, 64), 2), ((40, 40), 1)):
            pruned = full_conv_search(w, size, stride)
            monkeypatch.setattr(full_conv, "PRUNE_CANDIDATES", 10**9)  # no pruning: every frequency
            full = full_conv_search(w, size, stride)
            monkeypatch.undo()
            torch.testing.assert_close(pruned[0], full[0], rtol=1e-12, atol=0)
            assert torch.equal(pruned[1], full[1]) or torch.isclose(
                full_conv_sigma_at(w, pruned[1], stride), full[0], rtol=1e-12)


def test_pruned_search_falls_back_when_not_certified(monkeypatch):
    # a flat spectrum (the identity-like filter bank): many frequencies tie, the candidates cannot certify
    w = torch.zeros(12, 12, 3, 3, dtype=torch.float64)
    w[torch.arange(12), torch.arange(12), 1, 1] = 1.0
    w += 1e-3 * torch.randn(12, 12, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []
    original = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda g: calls.append(g.shape[0]) or original(g))
    value, state = full_conv_search(w, (48, 48), 1)
    assert max(calls) > full_conv.PRUNE_CANDIDATES  # the full batch was solved
    monkeypatch.setattr(full_conv, "PRUNE_CANDIDATES", 10**9)
    torch.testing.assert_close(value, full_conv_search(w, (48, 48), 1)[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape,grid,stride", [((32, 3, 3, 3), (66, 66), (2, 2)), ((4, 6, 3, 2), (10, 12), (1, 2)),
                                               ((5, 2, 3), (18,), (2,)), ((3, 2, 3, 3, 3), (8, 8, 10), (2, 1, 2))])
def test_gram_first_equals_fft_of_padded_filters(shape, grid, stride):
    """The stem search's Gram matrices, built without forming B, against fftn of the zero-padded filters."""
    import math

    torch.manual_seed(7)
    w = torch.randn(*shape, dtype=torch.float64)
    d, (cout, cin), fold = w.dim() - 2, shape[:2], math.prod(stride)
    spec = torch.fft.fftn(w, s=grid, dim=tuple(range(2, 2 + d)))
    sizes = [cout, cin]
    for m, s in zip(grid, stride):
        sizes += [s, m // s]  # frequency j = q·(M/s) + ω
    perm = [3 + 2 * a for a in range(d)] + [0, 1] + [2 + 2 * a for a in range(d)]
    b = spec.reshape(sizes).permute(perm).reshape(-1, cout, cin * fold)
    reference = b.mH @ b if cin * fold <= cout else b @ b.mH
    got = full_conv._folded_grams(w, grid, stride, torch.complex128)
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12 * float(reference.abs().max()))


def _fft_bound(w, size, stride, padding):
    """min over the candidate grids of max_ω ||B_ω|| / s^{d/2}, every frequency solved (fftn of padded filters)."""
    d = w.dim() - 2
    kernel = tuple(w.shape[2:])
    best = math.inf
    for grid in full_conv_grids(size, kernel, stride, padding):
        spec = torch.fft.fftn(w, s=grid, dim=tuple(range(2, 2 + d)))
        shape = [w.shape[0], w.shape[1]]
        for m, s in zip(grid, stride):
            shape += [s, m // s]
        perm = [3 + 2 * a for a in range(d)] + [0, 1] + [2 + 2 * a for a in range(d)]
        b = spec.reshape(shape).permute(perm).reshape(-1, w.shape[0], w.shape[1] * math.prod(stride))
        best = min(best, float(torch.linalg.matrix_norm(b, ord=2).max()) / math.sqrt(math.prod(stride)))
    return best


CASES = [
    ((6, 3, 3), (17,), (2,), (1,)),
    ((4, 2, 4), (12,), (3,), (2,)),
    ((8, 3, 3, 3), (20, 20), (2, 2), (1, 1)),
    ((16, 3, 3, 3), (40, 40), (2, 2), (1, 1)),  # enough frequencies for the pruned CPU search
    ((5, 7, 3, 2), (9, 11), (1, 2), (1, 0)),
    ((3, 12, 3, 3), (30, 30), (1, 1), (1, 1)),  # Cout < Cin·s^d: the left Gram BBᴴ
    ((12, 12, 5, 5), (24, 24), (2, 2), (2, 2)),
    ((4, 2, 3, 3, 3), (6, 7, 8), (2, 1, 2), (1, 1, 1)),
]


@pytest.mark.parametrize("shape,size,stride,padding", CASES, ids=[str(c[0]) + str(c[2]) for c in CASES])
def test_search_equals_full_fft_and_bounds_exact(shape, size, stride, padding):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    value, state = full_conv_search(w, size, stride, padding)
    assert float(value) == pytest.approx(_fft_bound(w, size, stride, padding), rel=1e-12)
    assert float(full_conv_sigma_at(w, state, stride)) == pytest.approx(float(value), rel=1e-12)
    d = w.dim() - 2
    for a in range(d):  # a frequency of the half spectrum (the other half is conjugate)
        nf = state[a] // stride[a]
        assert 0 <= int(state[d + a]) < (nf if a < d - 1 else nf // 2 + 1)
    if math.prod(size) * shape[1] <= 2048:
        assert float(value) >= exact_conv_norm(w, size, stride, padding) * (1 - 1e-10)


@pytest.mark.parametrize("shape,grid,stride", [((8, 3, 3, 3), (22, 22), (2, 2)), ((3, 12, 3, 3), (31, 31), (1, 1)),
                                               ((4, 2, 3, 3, 3), (8, 8, 10), (2, 1, 2)), ((5, 2, 4), (18,), (3,))])
def test_half_spectrum_is_the_first_half(shape, grid, stride):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = full_conv._folded_grams(w, grid, stride, torch.complex128)
    half = full_conv._folded_grams(w, grid, stride, torch.complex128, half=True)
    f = [m // s for m, s in zip(grid, stride)]
    full = full.reshape(*f, *full.shape[1:])[..., : f[-1] // 2 + 1, :, :]
    torch.testing.assert_close(half, full.reshape(half.shape), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["gauss", "smooth", "flat"])
def test_pruned_eigenvalue_search_is_exact(kind, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 3, 3, 3, generator=gen, dtype=torch.float64)
    if kind == "smooth":
        w = w.cumsum(-1).cumsum(-2)
    if kind == "flat":  # a dominant centre tap: almost every frequency ties, the fallback solves the survivors
        w = 1e-3 * w
        w[:, :, 1, 1] += torch.randn(24, 3, generator=gen, dtype=torch.float64)
    gram = full_conv._folded_grams(w, (66, 66), (2, 2), torch.complex128, half=True)
    solved = []
    eig = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda g: solved.append(g.shape[0]) or eig(g))
    val, idx = full_conv._largest_eigenvalue(gram)
    monkeypatch.undo()
    lam = torch.linalg.eigvalsh(gram)[:, -1]
    assert float(val) == pytest.approx(float(lam.max()), rel=1e-12)
    assert float(lam[idx]) == pytest.approx(float(lam.max()), rel=1e-12)
    if kind != "flat":
        assert sum(solved) < gram.shape[0] // 4  # pruned


def test_projection_of_zero_filters_is_finite():
    w = torch.zeros(3, 12, 3, 3, dtype=torch.float64)  # Cout < Cin·s^d: the left Gram and its fallback
    value, state = full_conv_search(w, 10, 2)
    proj = full_conv_projection(w, state, 2)
    assert float(value) == 0.0 and bool(torch.isfinite(proj).all())


def test_search_under_autocast_keeps_full_precision():
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    ref = full_conv_search(w, 24, 2)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = full_conv_search(w, 24, 2)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
