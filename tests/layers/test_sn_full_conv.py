"""Tests of the full-convolution SN layer (SNConv, the stems' layer) and its multi-channel DFT bound
(invseg.spectral.full_conv_bound / full_conv_search / full_conv_sigma_at), against the exact operator norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from invseg.layers import SNConv
from invseg.spectral import exact_conv_norm, full_conv_bound, full_conv_search, full_conv_sigma_at, state_bytes

METHODS = ("fft", "naive", "torch", "none")


# -- SNConv: the full-conv DFT bound -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cout, cin, kernel, size, stride",
    [
        (8, 3, (3, 3), (8, 8), 1),
        (8, 3, (3, 3), (16, 16), 2),
        (4, 6, (3, 3), (7, 9), 2),   # odd sizes, Cin·s^d > Cout
        (5, 2, (5,), (12,), 2),     # 1D, kernel 5
        (3, 2, (3, 3, 3), (5, 5, 5), 1),  # 3D
        (4, 3, (3, 3), (1, 2), 2),  # input smaller than the kernel: a valid but loose bound
    ],
)
def test_full_conv_bound_is_upper_bound(cout, cin, kernel, size, stride):
    torch.manual_seed(1)
    w = torch.randn(cout, cin, *kernel, dtype=torch.float64)
    bound = float(full_conv_bound(w, size, stride))
    exact = exact_conv_norm(w, size, stride)
    assert bound >= exact * (1 - 1e-9)
    if min(size) >= 5:
        assert bound <= exact * 1.25  # measured: 0.1-9 % at these sizes (2x at N = 1)


def test_full_conv_bound_tightens_with_size():
    # zero padding is the only source of slack: the relative gap shrinks with N (cf. DESIGN §1a)
    torch.manual_seed(2)
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    gaps = [float(full_conv_bound(w, n, 2)) / exact_conv_norm(w, n, 2) - 1 for n in (6, 12)]
    assert gaps[1] < gaps[0] and gaps[1] < 0.05


def test_full_conv_bound_exact_for_pointwise():
    # a 1x1 conv has a flat spectrum: the bound is the matrix norm (paper Thm 3), exact for every grid and stride
    torch.manual_seed(3)
    w = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    expected = float(torch.linalg.matrix_norm(w[..., 0, 0], ord=2))
    for stride in (1, 2):
        assert float(full_conv_bound(w, (6, 6), stride)) == pytest.approx(expected, rel=1e-10)


def test_full_conv_sigma_at_value_and_gradient():
    torch.manual_seed(4)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    value, state = full_conv_search(w, (10, 10), 2)
    sigma = full_conv_sigma_at(w, state, 2)
    assert float(sigma.detach()) == pytest.approx(float(value), rel=1e-10)
    assert not value.requires_grad and sigma.requires_grad
    # the analytic gradient at the frozen arg-max equals finite differences
    assert torch.autograd.gradcheck(lambda t: full_conv_sigma_at(t, state, 2), (w,))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stride", [1, 2])
def test_snconv_matches_conv_and_normalizes(method, stride):
    torch.manual_seed(5)
    layer = SNConv(2, 3, 8, kernel_size=3, stride=stride, K=2.0, method=method)
    x = torch.randn(2, 3, 12, 12)
    y = layer(x)
    assert y.shape == F.conv2d(x, torch.zeros(8, 3, 3, 3), stride=stride, padding=1).shape
    if method == "none":
        assert torch.allclose(y, F.conv2d(x, layer.weight, layer.bias, stride, 1))
        assert state_bytes(layer) == 0
    if method in ("fft", "naive"):
        norm = exact_conv_norm(layer.normalized_weight((12, 12)), 12, stride)
        assert norm <= 2.0 * (1 + 1e-2)
        assert norm >= 2.0 * (0.9 if method == "fft" else 0.99)
    if method == "fft":
        assert state_bytes(layer) == 6 * 8 + 4  # [M, ω] + input size: 3d int64, and the bound


def test_snconv_state_roundtrip():
    torch.manual_seed(6)
    a = SNConv(2, 3, 4, stride=2, method="fft")
    x = torch.randn(1, 3, 10, 10)
    ya = a(x)
    b = SNConv(2, 3, 4, stride=2, method="fft")
    b.load_state_dict(a.state_dict())
    assert b.spectral_info().updates == 0  # loading certifies, it is not an update
    assert torch.equal(b(x), ya)
    assert b.spectral_info().updates == 0  # and forward does not update either


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"padding": 3}, "padding"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"stride": (1, 2, 3)}, "stride"),
        ({"grids": 0}, "grids"),
        ({"spatial_dims": 0}, "spatial_dims"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_snconv_bad_arguments(kwargs, match):
    args = {"spatial_dims": 2, "in_channels": 3, "out_channels": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        SNConv(**args)
