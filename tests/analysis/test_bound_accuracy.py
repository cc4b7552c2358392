"""Tests of invseg.analysis.bound_accuracy: the exact reference at any size, the accuracy protocol and the
measured cost of one bound evaluation."""

from __future__ import annotations

import pytest
import torch

from invseg.analysis import bound_accuracy, depthwise_exact_norm, measure_peak_bytes, reference_norms
from invseg.spectral import depthwise_bound, exact_conv_norm, lanczos_conv_norms


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dense_limit", [1024, 0])  # dense SVD per channel / Lanczos per channel
def test_depthwise_exact_norm_matches_dense_svd(stride, dense_limit):
    torch.manual_seed(stride)
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    got = depthwise_exact_norm(w, 12, stride, dense_limit=dense_limit)
    ref = exact_conv_norm(w, 12, stride=stride, groups=6)
    assert got.method == ("dense" if dense_limit else "lanczos")
    assert 1 <= got.channels_checked <= 6
    assert got.value == pytest.approx(ref, rel=1e-9)
    assert got.value <= ref * (1 + 1e-12)  # Lanczos reports a certified lower bound


@pytest.mark.parametrize("stride", [1, 2])
def test_lanczos_matches_dense_per_channel(stride):
    torch.manual_seed(10 + stride)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    dense, method, change = reference_norms(w, 14, stride, dense_max=32)
    assert method == "dense" and change == 0.0
    sigma, change = lanczos_conv_norms(w, 14, stride)
    for c in range(3):
        assert float(dense[c]) == pytest.approx(exact_conv_norm(w[c:c + 1], 14, stride=stride), rel=1e-12)
    assert torch.allclose(sigma.double(), dense, rtol=1e-8)
    assert bool((sigma <= dense * (1 + 1e-12)).all())  # ||A x|| of a unit vector: never above the truth
    assert change <= 1e-9


def test_bound_accuracy_records_are_valid_bounds():
    recs = bound_accuracy([6], strides=(1, 2), filters_for=5, seed=1)
    assert [(r.input_size, r.stride, r.reference) for r in recs] == [(6, 1, "dense"), (6, 2, "dense")]
    for r in recs:
        assert min(r.min_ratio.values()) >= 1 - 1e-9  # bound / exact >= 1 for both bounds
        assert r.median["invseg"] <= r.median["paper"] + 1e-12  # the min over grids is never looser


def test_measure_peak_bytes_sees_the_evaluation():
    small = measure_peak_bytes(4, 2, 16, "chunked")
    large = measure_peak_bytes(64, 2, 128, "dense")  # one full complex spectrum alone is 64*130^2*8 = 8.3 MiB
    assert 0 <= small < large
    assert large >= 64 * 130 ** 2 * 8
    with pytest.raises(ValueError, match="device"):
        measure_peak_bytes(4, 2, 16, "chunked", device="tpu")
