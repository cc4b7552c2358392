"""Tests of the exact small-input path (invseg.spectral.exact_small): every channel's norm and the pruned search
against the dense SVD, the cap on exact solves, the gates (float64 throughout).
"""

import math

import pytest
import torch

import invseg.spectral.exact_small as exact_small
from invseg.spectral import (
    EXACT_FIRST_CANDIDATES,
    SMALL_INPUT_WORK,
    conv_apply,
    conv_spec,
    depthwise_exact_small,
    depthwise_geometry,
    depthwise_phase,
    exact_conv_norm,
    search_channels_full,
    use_exact_small,
)

REL = 1e-10


def _filters(c, kernel, seed, dtype=torch.float64):
    return torch.randn((c, 1, *kernel), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _exact_per_channel(w, n, s, p, dil, mode="zeros"):
    return torch.tensor([exact_conv_norm(w[i:i + 1], n, s, p, dil, groups=1, mode=mode) for i in range(w.shape[0])],
                        dtype=torch.float64)


EXACT_CASES = [
    ((3,), 9, 1, None, 1, "zeros"),
    ((4,), 8, 2, 1, 1, "zeros"),
    ((3, 3), 7, 1, None, 1, "zeros"),
    ((3, 3), 7, 2, None, 1, "zeros"),
    ((2, 2), 4, 1, 1, 1, "zeros"),
    ((3, 3), (5, 6), (1, 3), (0, 2), 1, "zeros"),
    ((3, 3), 5, 1, 2, 2, "zeros"),
    ((3, 3), 6, 2, 1, 1, "circular"),
    ((3, 3, 3), 3, 1, None, 1, "zeros"),
    ((2, 3, 3), 4, 2, 1, 1, "zeros"),
]


def _dense_operator_norm(theta, n, s, p, dil, mode):
    """Differentiable exact norm of one channel (autograd through the dense operator's SVD)."""
    spec = conv_spec(theta, n, s, p, dil, 1, mode)
    size = math.prod(spec.input_size)
    eye = torch.eye(size, dtype=torch.float64).reshape(size, 1, *spec.input_size)
    return torch.linalg.matrix_norm(conv_apply(eye, theta, spec).reshape(size, -1), ord=2)


@pytest.mark.parametrize("case", EXACT_CASES, ids=[f"{c[0]}-N{c[1]}-s{c[2]}-{c[5]}" for c in EXACT_CASES])
def test_exact_small_all_channels_equal_dense_svd(case):
    kernel, n, s, p, dil, mode = case
    w = _filters(5, kernel, seed=len(kernel) + sum(kernel))
    geom = depthwise_geometry(w, n, s, p, dil, mode)
    values, channel, phase = depthwise_exact_small(w, geom)
    exact = _exact_per_channel(w, n, s, p, dil, mode)
    torch.testing.assert_close(values, exact, rtol=1e-10, atol=1e-12)
    assert channel.shape == (1,) and int(channel) == int(exact.argmax())
    theta = w.reshape(5, -1)[channel[0]]
    assert float((phase[0] * theta).sum().abs()) == pytest.approx(float(exact.max()), rel=1e-10)


@pytest.mark.parametrize("case", EXACT_CASES, ids=[f"{c[0]}-N{c[1]}-s{c[2]}-{c[5]}" for c in EXACT_CASES])
@pytest.mark.parametrize("first", [1, EXACT_FIRST_CANDIDATES])
def test_pruned_exact_equals_unpruned_per_segment(case, first, monkeypatch):
    kernel, n, s, p, dil, mode = case
    monkeypatch.setattr(exact_small, "EXACT_FIRST_CANDIDATES", first)  # 1: the second round decides most segments
    segments = [9, 5, 1, 12, 14]
    c = sum(segments)
    w = _filters(c, kernel, seed=3 * len(kernel) + sum(kernel))
    w[9:14] = w[9:10]  # a segment of identical filters: every one of them is a candidate
    geom = depthwise_geometry(w, n, s, p, dil, mode)
    solved = []
    norms = exact_small._channel_norms
    monkeypatch.setattr(exact_small, "_channel_norms", lambda theta, *a: solved.append(theta.shape[0]) or norms(theta, *a))
    values, channel, phase = depthwise_exact_small(w, geom, segments)
    assert sum(solved) < c  # channels were left out (certified by their DFT bound)
    assert first > 1 or len(solved) == 2  # with one first candidate the identical filters need a second round
    monkeypatch.undo()
    full, _, _ = depthwise_exact_small(w, geom)  # every channel exact
    exact = _exact_per_channel(w, n, s, p, dil, mode)
    torch.testing.assert_close(full, exact, rtol=1e-10, atol=1e-12)
    assert bool((values >= exact * (1 - REL)).all())  # certified upper bounds everywhere
    assert channel.shape == (5,) and phase.shape == (5, math.prod(kernel))
    offset = 0
    for i, m in enumerate(segments):
        part = slice(offset, offset + m)
        assert offset <= int(channel[i]) < offset + m
        # the segment's maximum and its arg-max are exact, as the unpruned search finds them
        assert float(values[part].max()) == pytest.approx(float(exact[part].max()), rel=1e-10)
        assert float(values[channel[i]]) == pytest.approx(float(exact[part].max()), rel=1e-10)
        theta = w.reshape(c, -1)[channel[i]]
        assert float((phase[i] * theta).sum().abs()) == pytest.approx(float(exact[part].max()), rel=1e-10)
        offset += m


@pytest.mark.parametrize("noise", [0.0, 1e-6])
def test_pruned_exact_with_many_near_ties_stays_certified(noise, monkeypatch):
    # filters initialised alike: every channel is a candidate of the second round. Identical filters are solved
    # once (exact); distinct near-ties beyond EXACT_MAX_SOLVES keep their DFT bounds (certified, bounded cost).
    monkeypatch.setattr(exact_small, "EXACT_MAX_SOLVES", 3)
    monkeypatch.setattr(exact_small, "SMALL_INPUT_WORK", 1)  # the cap is EXACT_MAX_SOLVES (tiny inputs get more solves)
    monkeypatch.setattr(exact_small, "EXACT_FIRST_CANDIDATES", 1)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(1, 1, 3, 3, generator=gen, dtype=torch.float64).repeat(12, 1, 1, 1)
    w = w + noise * torch.randn(w.shape, generator=gen, dtype=torch.float64)
    geom = depthwise_geometry(w, 6, 1)
    values, channel, phase = depthwise_exact_small(w, geom, [12])
    exact = _exact_per_channel(w, 6, 1, None, 1)
    dft = search_channels_full(w, geom)[0]
    assert bool((values >= exact * (1 - REL)).all()) and bool((values <= dft * (1 + REL)).all())
    sigma = float((phase[0] * w.reshape(12, -1)[channel[0]]).sum().abs())
    assert sigma == pytest.approx(float(exact[channel[0]]), rel=1e-10)  # the phase is the channel's top pair
    if noise == 0.0:
        torch.testing.assert_close(values, exact, rtol=1e-10, atol=0)  # one distinct filter: all exact
    else:
        assert int((values - exact).abs().gt(1e-9 * exact).sum()) > 0  # some kept their DFT bound


def test_exact_phase_gradient_is_the_dense_norms():
    w = _filters(6, (3, 3), seed=11)
    geom = depthwise_geometry(w, 7, 2)
    _, channel, phase = depthwise_exact_small(w, geom, [6])
    theta = w[channel[0]].clone().requires_grad_(True)
    sigma = (phase[0] * theta.reshape(-1)).sum().abs()
    (g1,) = torch.autograd.grad(sigma, theta)
    theta2 = w[channel[0]].clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(_dense_operator_norm(theta2[None], 7, 2, None, 1, "zeros"), theta2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_exact_small_zero_filters():
    w = torch.zeros(12, 1, 3, 3, dtype=torch.float64)
    geom = depthwise_geometry(w, 6, 1)
    values, channel, phase = depthwise_exact_small(w, geom, [6, 6])
    assert torch.equal(values, torch.zeros(12, dtype=torch.float64)) and bool(torch.isfinite(phase).all())


@pytest.mark.parametrize("segments", [[5], [3, 4], [6, 0], [6.0], [True, 5]])
def test_exact_small_rejects_bad_segments(segments):
    w = _filters(6, (3, 3), seed=0)
    with pytest.raises(ValueError, match="segments"):
        depthwise_exact_small(w, depthwise_geometry(w, 5), segments)


def test_gates():
    # unpruned gate unchanged; the pruned gate covers MobileNetV2's 7x7 and 4x4 stages at 960 channels
    assert use_exact_small(256, (4, 4)) and not use_exact_small(257, (4, 4))
    assert SMALL_INPUT_WORK == 2**20
    assert use_exact_small(960, (7, 7), pruned=True) and use_exact_small(960, (4, 4), pruned=True)
    assert use_exact_small(512, (4, 4), pruned=True)
    assert not use_exact_small(960, (9, 9), pruned=True)  # more than SMALL_INPUT_POINTS
    assert not use_exact_small(384, (8, 8), pruned=True)  # 8x8: the pruned path costs 4-8x the DFT search there
    # the phase of the exact path and of the DFT path are both (rows, taps)
    w = _filters(2, (3, 3), seed=1)
    geom = depthwise_geometry(w, 7)
    state = search_channels_full(w, geom)[1][0]
    assert depthwise_phase(state, geom, torch.float64).shape[1] == depthwise_exact_small(w, geom)[2].shape[1]


def test_pruned_exact_cap_is_shared_by_the_segments(monkeypatch):
    """When the near-ties exceed the cap, every segment gets its share of exact solves: each layer's maximum
    stays (close to) exact, not only the layers holding the group's largest bounds."""
    monkeypatch.setattr(exact_small, "EXACT_MAX_SOLVES", 8)
    monkeypatch.setattr(exact_small, "SMALL_INPUT_WORK", 1)
    monkeypatch.setattr(exact_small, "EXACT_FIRST_CANDIDATES", 1)
    gen = torch.Generator().manual_seed(6)
    segs = [6, 6, 6, 6]
    # the first segment's filters are 3x larger: without sharing, its channels would take every solve
    w = torch.randn(24, 1, 3, 3, generator=gen, dtype=torch.float64)
    w[:6] *= 3.0
    geom = depthwise_geometry(w, 2, 1)
    values, channel, _ = depthwise_exact_small(w, geom, segs)
    exact = _exact_per_channel(w, 2, 1, None, 1)
    for i in range(4):
        part = slice(6 * i, 6 * i + 6)
        assert float(values[part].max()) >= float(exact[part].max()) * (1 - REL)
        solved = (values[part] - exact[part]).abs() <= 1e-9 * exact[part]
        assert bool(solved.any())  # each segment had exact solves
