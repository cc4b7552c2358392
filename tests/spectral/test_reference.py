"""Tests of invseg.spectral.reference: exact norms, the adjoint, the naive full-operator power method."""

import pytest
import torch
import torch.nn.functional as F

from invseg.spectral import (
    MAX_DENSE_SIZE,
    conv_adjoint,
    conv_apply,
    conv_power_method,
    conv_spec,
    exact_conv_norm,
    naive_power_method,
)


def _w(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


_CASES = [
    # (weight shape, N, stride, padding, dilation, groups, mode)
    ((2, 2, 3), 9, 2, 1, 1, 1, "zeros"),
    ((2, 1, 3, 3), 8, 2, 1, 1, 2, "zeros"),
    ((2, 1, 3, 3), 9, 2, 1, 1, 2, "zeros"),
    ((3, 3, 3, 3), 7, 3, 0, 1, 1, "zeros"),
    ((3, 3, 3, 3), 8, 3, 2, 1, 1, "zeros"),
    ((2, 1, 2, 4), (8, 7), (2, 1), (1, 3), 1, 2, "zeros"),
    ((2, 1, 3, 3), 10, 2, 3, 2, 2, "zeros"),
    ((4, 1, 3, 3, 3), 5, 2, 1, 1, 2, "zeros"),
    ((2, 1, 3, 3), 8, 2, 1, 1, 2, "circular"),
    ((2, 1, 3, 3), 7, 2, 1, 1, 2, "circular"),
    ((2, 2, 1, 1), 6, 2, 0, 1, 1, "zeros"),
]


@pytest.mark.parametrize("shape,n,s,p,dil,groups,mode", _CASES)
def test_adjoint_is_the_true_adjoint(shape, n, s, p, dil, groups, mode):
    w = _w(shape, seed=len(shape))
    spec = conv_spec(w, n, s, p, dil, groups, mode)
    x = _w((2, spec.in_channels, *spec.input_size), seed=1)
    ax = conv_apply(x, w, spec)
    assert tuple(ax.shape[2:]) == spec.output_size
    y = _w(tuple(ax.shape), seed=2)
    aty = conv_adjoint(y, w, spec)
    assert aty.shape == x.shape  # output_padding restores the input size
    assert float((ax * y).sum()) == pytest.approx(float((x * aty).sum()), rel=1e-12)


def test_adjoint_output_padding_stride2_pad1_n32():
    # a published naive implementation gets 31x31 here (no output_padding)
    w = _w((1, 1, 3, 3))
    spec = conv_spec(w, 32, 2, 1)
    assert spec.output_size == (16, 16) and spec.output_padding == (1, 1)
    y = _w((1, 1, 16, 16), seed=3)
    assert conv_adjoint(y, w, spec).shape == (1, 1, 32, 32)
    assert F.conv_transpose2d(y, w, stride=2, padding=1).shape == (1, 1, 31, 31)  # the trap itself


@pytest.mark.parametrize("shape,n,s,p,dil,groups,mode", _CASES)
def test_exact_norm_equals_dense_matrix_svd(shape, n, s, p, dil, groups, mode):
    w = _w(shape, seed=len(shape) + 10)
    spec = conv_spec(w, n, s, p, dil, groups, mode)
    # the full operator as an explicit matrix (all groups together), column by column
    n_in = spec.in_channels * int(torch.tensor(spec.input_size).prod())
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, spec.in_channels, *spec.input_size)
    mat = conv_apply(basis, w, spec).reshape(n_in, -1).t()
    expected = float(torch.linalg.matrix_norm(mat, ord=2))
    assert exact_conv_norm(w, n, s, p, dil, groups, mode) == pytest.approx(expected, rel=1e-12)


def test_grouped_norm_is_max_over_groups():
    w = _w((6, 2, 3, 3), seed=7)
    w[2:4] *= 3.0  # make the groups clearly different
    per_group = [exact_conv_norm(w[2 * g:2 * g + 2], 6, 1) for g in range(3)]
    total = exact_conv_norm(w, 6, 1, groups=3)
    assert total == pytest.approx(max(per_group), rel=1e-12)
    assert total != pytest.approx(per_group[0] * per_group[1] * per_group[2], rel=1e-3)


@pytest.mark.parametrize("shape,n,s,p,dil,groups,mode", _CASES[:6])
def test_converged_power_method_matches_dense(shape, n, s, p, dil, groups, mode):
    w = _w(shape, seed=len(shape) + 20)
    exact = exact_conv_norm(w, n, s, p, dil, groups, mode)
    pm = conv_power_method(w, n, s, p, dil, groups, mode, tol=1e-14, max_iter=50000)
    assert pm <= exact * (1 + 1e-10)
    assert pm == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("s,p", [(1, 1), (2, 1), (2, 0), (3, 1)])
def test_naive_power_method(s, p):
    w = _w((3, 1, 3, 3), seed=s + p)
    spec = conv_spec(w, 10, s, p, 1, 3)
    u, it = naive_power_method(w, None, spec, eps=1e-4, max_iter=20000)
    assert it < 20000
    assert u.shape == (1, 3, 10, 10)  # the state is a whole feature map
    assert float(u.norm()) == pytest.approx(1.0, rel=1e-12)
    sigma = float(conv_apply(u, w, spec).norm())
    exact = exact_conv_norm(w, 10, s, p, groups=3)
    assert sigma <= exact * (1 + 1e-12)
    assert sigma == pytest.approx(exact, rel=1e-3)
    # warm start: already converged
    _, it2 = naive_power_method(w, u, spec, eps=1e-4, max_iter=20000)
    assert it2 == 1 < it


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(weight=torch.randn(2, 1, 5, 5), input_size=2, padding=0), "(2, 2)"),
        (dict(weight=torch.randn(3, 1, 3, 3), input_size=8, groups=2), "groups=2"),
        (dict(weight=torch.randn(2, 1, 3, 3), input_size=8, mode="reflect"), "reflect"),
        (dict(weight=torch.randn(2, 1, 3, 3), input_size=8, stride=0), "0"),
        (dict(weight=torch.randn(2, 1, 3, 3, 3, 3), input_size=8), "(2, 1, 3, 3, 3, 3)"),
    ],
)
def test_bad_arguments_raise(kwargs, needle):
    with pytest.raises(ValueError) as err:
        exact_conv_norm(**kwargs)
    assert needle in str(err.value)


def test_dense_size_limit_raises_naming_the_size():
    side = int(MAX_DENSE_SIZE**0.5) + 1
    with pytest.raises(ValueError, match=str(side * side)):
        exact_conv_norm(torch.randn(1, 1, 3, 3), side)
