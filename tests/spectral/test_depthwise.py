"""Tests of invseg.spectral.depthwise: the DFT bound of depthwise convs (DESIGN §1a, §1b, §1e).

Exactness checks use float64 weights and the dense-SVD reference ``exact_conv_norm`` (small N only).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invseg.spectral import (
    candidate_grids,
    depthwise_bound,
    depthwise_bound_dense,
    depthwise_geometry,
    depthwise_search,
    depthwise_sigma_at,
    exact_conv_norm,
)

REL = 1e-10  # float64 round-off allowance for "bound >= exact"


def _filters(c, kernel, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((c, 1, *kernel), generator=gen, dtype=dtype)


def _exact(w, n, stride=1, padding=None, dilation=1, mode="zeros"):
    return exact_conv_norm(w, n, stride, padding, dilation, groups=w.shape[0], mode=mode)


# --- bound >= exact ------------------------------------------------------------------------------

_N = {1: (11, 12), 2: (7, 8), 3: (5, 6)}


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("parity", [0, 1], ids=["odd_N", "even_N"])
def test_bound_ge_exact(d, k, s, parity):
    n = _N[d][parity]
    w = _filters(2, (k,) * d, seed=100 * d + 10 * k + s)
    bound = float(depthwise_bound(w, n, stride=s))
    exact = _exact(w, n, s)
    assert bound >= exact * (1 - REL)
    # the chunked search and the full-FFT reference compute the same number
    assert float(depthwise_bound_dense(w, n, stride=s)) == pytest.approx(bound, rel=1e-12)


@pytest.mark.parametrize("k,dilation", [(3, 1), (2, 1), (3, 2), (2, 3)])
@pytest.mark.parametrize("s", [1, 2])
def test_every_padding_and_dilation(k, dilation, s):
    k_eff = dilation * (k - 1) + 1
    w = _filters(2, (k, k), seed=k + 7 * dilation)
    for p in range(k_eff):  # 0 .. k_eff - 1
        for n in (8, 9):
            bound = float(depthwise_bound(w, n, s, p, dilation))
            assert bound >= _exact(w, n, s, p, dilation) * (1 - REL), (p, n)
            assert float(depthwise_bound_dense(w, n, s, p, dilation)) == pytest.approx(bound, rel=1e-12)
            # the paper's single grid M = N + 2p is valid too, and never tighter than the minimum
            paper = float(depthwise_bound_dense(w, n, s, p, dilation, paper_grid=True))
            assert paper >= bound * (1 - REL)


@pytest.mark.parametrize("stride", [(1, 2), (2, 1), (3, 1), (2, 3)])
def test_per_axis_stride(stride):
    w = _filters(3, (3, 3), seed=sum(stride))
    n = (9, 8)
    bound = float(depthwise_bound(w, n, stride))
    assert bound >= _exact(w, n, stride) * (1 - REL)
    assert float(depthwise_bound_dense(w, n, stride)) == pytest.approx(bound, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 3),
    data=st.data(),
    c=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_bound_ge_exact_hypothesis(d, data, c, seed):
    k = tuple(data.draw(st.sampled_from([1, 2, 3, 5])) for _ in range(d))
    dil = tuple(data.draw(st.sampled_from([1, 2])) for _ in range(d))
    k_eff = tuple(dl * (kk - 1) + 1 for kk, dl in zip(k, dil))
    p = tuple(data.draw(st.integers(0, ke - 1)) for ke in k_eff)
    s = tuple(data.draw(st.integers(1, 3)) for _ in range(d))
    n_max = {1: 16, 2: 9, 3: 5}[d]
    n = tuple(data.draw(st.integers(max(1, ke - 2 * pp), max(n_max, ke))) for ke, pp in zip(k_eff, p))
    w = _filters(c, k, seed)
    bound = float(depthwise_bound(w, n, s, p, dil))
    assert bound >= _exact(w, n, s, p, dil) * (1 - REL)
    assert float(depthwise_bound_dense(w, n, s, p, dil)) == pytest.approx(bound, rel=1e-11)


@pytest.mark.parametrize("k,s", [(1, 1), (1, 2), (2, 2), (2, 3), (3, 3)])
def test_kernel_not_longer_than_stride_is_exact(k, s):
    # with k <= s and no padding the rows of S have disjoint supports: ||S|| = max_c ||θ_c||, and the
    # aliasing formula gives exactly that (DESIGN §1b)
    w = _filters(2, (k, k), seed=k * s)
    n = 2 * s * 3
    bound = float(depthwise_bound(w, n, s, 0))
    assert bound == pytest.approx(_exact(w, n, s, 0), rel=1e-10)
    assert bound == pytest.approx(float(w.flatten(1).norm(dim=1).max()), rel=1e-10)


# --- circular mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("d,n", [(1, 12), (2, 6), (2, 8)])
@pytest.mark.parametrize("k,s", [(3, 1), (3, 2), (5, 1), (5, 2), (2, 2), (4, 2)])
def test_circular_equals_exact(d, n, k, s):
    p = (k - 1) // 2
    assert n % s == 0 and (n + 2 * p - k) // s + 1 == n // s  # the output rows cover the circle once
    w = _filters(2, (k,) * d, seed=k + s)
    bound = float(depthwise_bound(w, n, s, p, mode="circular"))
    assert bound == pytest.approx(_exact(w, n, s, p, mode="circular"), rel=1e-10)


@pytest.mark.parametrize("n,s", [(7, 2), (8, 3)])
def test_circular_stride_not_dividing_is_a_bound(n, s):
    w = _filters(2, (3, 3), seed=n)
    assert float(depthwise_bound(w, n, s, 1, mode="circular")) >= _exact(w, n, s, 1, mode="circular") * (1 - REL)


@pytest.mark.parametrize("n,s", [(8, 1), (8, 2)])
def test_circular_padding_with_repeated_rows_is_rejected(n, s):
    # 2p > k_eff - 1 in circular mode: output rows of the circulant repeat, max|Θ̂^N| is no bound
    # (k=3, p=2, N=8: max|Θ̂| 6.83 < exact 9.87), so the geometry is refused rather than under-bounded.
    w = _filters(1, (3, 3), seed=0)
    assert float(depthwise_bound(w, n, s, 1, mode="circular")) >= _exact(w, n, s, 1, mode="circular") * (1 - REL)
    with pytest.raises(ValueError, match="circular padding 2"):
        depthwise_bound(w, n, s, 2, mode="circular")


# --- tightness (the paper's Figure-2 protocol at N = 16) ------------------------------------------


def _dense_norms(w, n, s):
    """Exact norms of each single-channel filter's conv at once (dense operator, float64, Gram eigenvalues);
    the same numbers as exact_conv_norm per filter, batched."""
    c, length = w.shape[0], n * n
    eye = torch.eye(length, dtype=torch.float64).reshape(length, 1, n, n).expand(length, c, n, n)
    cols = torch.nn.functional.conv2d(eye, w, stride=s, padding=1, groups=c).reshape(length, c, -1)
    a = cols.permute(1, 2, 0)  # (C, out, in)
    return torch.linalg.eigvalsh(a @ a.transpose(1, 2)).amax(dim=1).sqrt()


@pytest.mark.parametrize("s,paper_range", [(1, (0.013, 0.020)), (2, (0.30, 0.50))])
def test_tightness_n16(s, paper_range):
    n, count = 16, 100
    w = _filters(count, (3, 3), seed=16)
    exact = _dense_norms(w, n, s)
    for i in (0, 1):  # the batched reference is the library's dense SVD
        assert float(exact[i]) == pytest.approx(_exact(w[i:i + 1], n, s), rel=1e-10)
    ours = torch.tensor([float(depthwise_bound(w[i:i + 1], n, s)) for i in range(count)], dtype=torch.float64)
    paper = torch.tensor(
        [float(depthwise_bound_dense(w[i:i + 1], n, s, paper_grid=True)) for i in range(count)], dtype=torch.float64
    )
    assert bool((ours >= exact * (1 - REL)).all()) and bool((paper >= exact * (1 - REL)).all())
    assert float((ours / exact - 1).median()) <= 0.013
    # the protocol reproduces the paper-grid numbers of DESIGN §1a/§1b (≈ 1.6 % and ≈ 39 %)
    lo, hi = paper_range
    assert lo <= float((paper / exact - 1).median()) <= hi


# --- chunked search, differentiable σ -------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel,n,s",
    [((3,), 13, 1), ((4,), 12, 2), ((3, 3), 8, 1), ((3, 2), (7, 9), (2, 1)), ((5, 5), 9, 2), ((3, 3, 3), 5, 1),
     ((2, 3, 3), 6, 2)],
)
def test_gradient_equals_full_fft_autograd(kernel, n, s):
    w1 = _filters(3, kernel, seed=len(kernel) * 31 + sum(kernel)).requires_grad_(True)
    w2 = w1.detach().clone().requires_grad_(True)
    v1 = depthwise_bound(w1, n, s)
    v2 = depthwise_bound_dense(w2, n, s)
    v1.backward()
    v2.backward()
    assert float(v1.detach()) == pytest.approx(float(v2.detach()), rel=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)
    assert w1.grad.abs().sum() > 0


@pytest.mark.parametrize("shape,n,s", [((6, 1, 3, 3), 20, 1), ((5, 1, 3, 3), (17, 20), (1, 2)), ((3, 1, 3, 3, 3), 8, 2),
                                       ((4, 1, 5), 40, 3)])
def test_tiny_memory_budget_gives_same_value_and_state(shape, n, s):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    geom = depthwise_geometry(w, n, s)
    v_big, st_big = depthwise_search(w, geom, memory_budget=2**30)
    v_small, st_small = depthwise_search(w, geom, memory_budget=4096)  # forces many chunks
    assert float(v_small) == pytest.approx(float(v_big), rel=1e-13)
    # The states agree up to exact ties (ω and -ω of the folded spectrum have the same value, and the
    # half-spectrum only halves the last axis): both must give the same σ and the same gradient.
    grads = []
    for state in (st_big, st_small):
        wg = w.clone().requires_grad_(True)
        sigma = depthwise_sigma_at(wg, state, geom)
        sigma.backward()
        assert float(sigma.detach()) == pytest.approx(float(v_big), rel=1e-12)
        grads.append(wg.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    assert st_small[0] == st_big[0] and torch.equal(st_small[1:1 + geom.spatial_dims], st_big[1:1 + geom.spatial_dims])


def test_state_layout():
    w = _filters(4, (3, 3), seed=1)
    geom = depthwise_geometry(w, (10, 11), (2, 1), 1)
    _, state = depthwise_search(w, geom)
    assert state.dtype == torch.int64 and state.shape == (1 + 2 * 2,)
    c, m, om = int(state[0]), state[1:3].tolist(), state[3:5].tolist()
    assert 0 <= c < 4
    assert tuple(m) in candidate_grids(geom)
    for a, (mm, o) in enumerate(zip(m, om)):
        assert mm >= geom.input_size[a] + geom.padding[a] and mm % geom.stride[a] == 0
        assert 0 <= o < mm // geom.stride[a]


def test_candidate_grids_start_at_n_plus_p():
    w = _filters(1, (5, 5))
    geom = depthwise_geometry(w, 9, 2, 2)
    grids = candidate_grids(geom, 3)
    assert sorted({g[0] for g in grids}) == [12, 14, 16]  # multiples of 2 >= N + p = 11
    assert len(grids) == 9


def test_float32_close_to_float64():
    w = _filters(8, (3, 3), seed=5)
    v64 = float(depthwise_bound(w, 32, 2))
    v32 = depthwise_bound(w.float(), 32, 2)
    assert v32.dtype == torch.float32
    assert float(v32) == pytest.approx(v64, rel=1e-5)


def test_grid_minimum_tighter_than_paper_grid_on_average():
    w = _filters(20, (3, 3), seed=9)
    ours = [float(depthwise_bound(w[i:i + 1], 12)) for i in range(20)]
    paper = [float(depthwise_bound_dense(w[i:i + 1], 12, paper_grid=True)) for i in range(20)]
    assert all(o <= p * (1 + REL) for o, p in zip(ours, paper))
    assert sum(ours) < sum(paper)


# --- bad arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(weight=torch.randn(3, 2, 3, 3), input_size=8), "(3, 2, 3, 3)"),
        (dict(weight=torch.randn(3, 1, 3, 3, 3, 3), input_size=8), "(3, 1, 3, 3, 3, 3)"),
        (dict(weight=torch.randn(3, 3), input_size=8), "(3, 3)"),
        (dict(weight=torch.randn(2, 1, 5, 5), input_size=2, padding=1), "(2, 2)"),
        (dict(weight=torch.randn(2, 1, 3, 3), input_size=0), "0"),
        (dict(weight=torch.randn(2, 1, 3, 3), input_size=8, padding=3), "3"),
        (dict(weight=torch.randn(2, 1, 3, 3), input_size=8, stride=0), "0"),
        (dict(weight=torch.randn(2, 1, 3, 3), input_size=(8, 8, 8)), "(8, 8, 8)"),
        (dict(weight=torch.randn(2, 1, 3, 3), input_size=8, mode="reflect"), "reflect"),
        (dict(weight=torch.randn(2, 1, 3, 3), input_size=8, grids=0), "0"),
        (dict(weight="not a tensor", input_size=8), "str"),
    ],
)
def test_bad_arguments_raise(kwargs, needle):
    with pytest.raises(ValueError) as err:
        depthwise_bound(**kwargs)
    assert needle in str(err.value)


def test_bound_of_zero_filter_is_zero():
    w = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    v = depthwise_bound(w, 6, 2)
    assert float(v) == 0.0 and math.isfinite(float(depthwise_bound_dense(w, 6, 2)))
