"""The stem's multi-channel DFT bound: projection-form σ, the pruned exact search, Gram-first matrices."""

from __future__ import annotations

import pytest
import torch

import invseg.spectral.full_conv as full_conv
from invseg.spectral import (
    full_conv_projection,
    full_conv_search,
    full_conv_sigma_at,
    full_conv_sigma_from_projection,
)


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

