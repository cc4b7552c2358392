"""Tests of invseg.layers: SN depthwise / pointwise / DS conv and SN Linear (DESIGN §1d, §1f)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from invseg.layers import (
    SNDepthwiseConv,
    SNDSConv,
    SNLinear,
    SNPointwiseConv,
    attach_spectral_update,
    spectral_state_frozen,
    update_spectral_state,
)
from invseg.spectral import depthwise_bound, exact_conv_norm, state_bytes

EPS = 1e-2  # the layers' default power-method tolerance


def _seed(m, seed=0):
    torch.manual_seed(seed)
    return m


def _operator_norm(layer, in_shape):
    """True operator norm of the (affine) layer on inputs of shape ``in_shape`` (dense Jacobian, float64)."""
    n_in = math.prod(in_shape)
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *in_shape)
    with torch.no_grad():
        out = layer(basis) - layer(torch.zeros(1, *in_shape, dtype=torch.float64))
    return float(torch.linalg.matrix_norm(out.reshape(n_in, -1), ord=2))


_LAYERS = [
    # (factory, input shape without batch)
    (lambda **kw: SNDepthwiseConv(1, 3, 3, **kw), (3, 12)),
    (lambda **kw: SNDepthwiseConv(2, 2, 3, stride=2, **kw), (2, 8, 8)),
    (lambda **kw: SNDepthwiseConv(2, 2, (2, 4), stride=(1, 2), **kw), (2, 7, 8)),
    (lambda **kw: SNDepthwiseConv(3, 2, 3, **kw), (2, 4, 4, 4)),
    (lambda **kw: SNPointwiseConv(1, 4, 6, **kw), (4, 5)),
    (lambda **kw: SNPointwiseConv(2, 5, 3, stride=2, **kw), (5, 4, 4)),
    (lambda **kw: SNPointwiseConv(3, 3, 4, **kw), (3, 3, 3, 3)),
    (lambda **kw: SNDSConv(2, 3, 4, **kw), (3, 6, 6)),
    (lambda **kw: SNDSConv(2, 2, 3, stride=2, **kw), (2, 8, 8)),
    (lambda **kw: SNDSConv(1, 2, 5, kernel_size=4, **kw), (2, 10)),
    (lambda **kw: SNDSConv(3, 2, 2, **kw), (2, 4, 4, 4)),
    (lambda **kw: SNLinear(7, 5, **kw), (7,)),
]


@pytest.mark.parametrize("method", ["fft", "naive"])
@pytest.mark.parametrize("K", [1.0, 2.5])
@pytest.mark.parametrize("idx", range(len(_LAYERS)))
def test_true_operator_norm_at_most_K(idx, K, method):
    factory, shape = _LAYERS[idx]
    layer = _seed(factory(K=K, method=method), idx).double()
    lip = _operator_norm(layer, shape)
    assert lip <= K * (1 + EPS)
    assert lip >= 0.5 * K  # normalized, not just shrunk


@pytest.mark.parametrize("idx", [0, 1, 3, 7])
def test_soft_scaling_bounds_by_K_tanh_s(idx):
    factory, shape = _LAYERS[idx]
    layer = _seed(factory(K=2.0, scaling="soft", s_init=0.5), idx).double()
    sn = [m for m in layer.modules() if hasattr(m, "scale") and m.scale is not None and m.scale.s is not None]
    assert len(sn) == 1  # K·tanh(s) is applied once per layer (for DS: on the pointwise part)
    with torch.no_grad():
        sn[0].scale.s.fill_(0.3)
    target = 2.0 * math.tanh(0.3)
    assert _operator_norm(layer, shape) <= target * (1 + EPS)
    assert sn[0].scale.s.requires_grad


@pytest.mark.parametrize("n", [9, 12])
def test_depthwise_fft_is_a_certified_bound_and_K(n):
    layer = _seed(SNDepthwiseConv(2, 3, 3, K=1.5)).double()
    layer(torch.zeros(1, 3, n, n, dtype=torch.float64))
    sigma = float(layer.sigma().detach())
    assert sigma == pytest.approx(float(depthwise_bound(layer.weight.detach(), n)), rel=1e-12)
    assert sigma >= exact_conv_norm(layer.weight.detach(), n, groups=3) * (1 - 1e-10)
    assert _operator_norm(layer, (3, n, n)) <= 1.5 * (1 + 1e-10)  # no power-method slack for the FFT bound


@pytest.mark.parametrize("d,n,stride", [(1, 7, 1), (2, 4, 1), (2, 7, 2), (2, 8, 1), (3, 4, 1)])
def test_depthwise_small_inputs_use_the_exact_norm(d, n, stride):
    # at most SMALL_INPUT_POINTS input points: a dense SVD per channel replaces the (loose) DFT bound
    layer = _seed(SNDepthwiseConv(d, 3, 3, stride=stride, K=1.5)).double()
    x = torch.randn(2, 3, *([n] * d), dtype=torch.float64)
    layer(x)
    exact = exact_conv_norm(layer.weight.detach(), n, stride, groups=3)
    sigma = float(layer.sigma().detach())
    assert sigma == pytest.approx(exact, rel=1e-10)
    assert sigma <= float(depthwise_bound(layer.weight.detach(), n, stride)) * (1 + 1e-12)
    assert _operator_norm(layer, (3,) + (n,) * d) == pytest.approx(1.5, rel=1e-10)  # exactly K, no slack
    # the gradient of sigma is the exact one: u v^T of the top singular pair, via autograd of the dense norm
    (g,) = torch.autograd.grad(layer.sigma(), layer.weight)
    w = layer.weight.detach().clone().requires_grad_(True)
    from invseg.spectral.exact_small import _shift_operators
    ops = _shift_operators(layer._geometry((n,) * d), "cpu", torch.float64)
    mats = (w.reshape(3, -1) @ ops).reshape(3, -1, n**d)
    (g_ref,) = torch.autograd.grad(torch.linalg.matrix_norm(mats, ord=2).max(), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)
    # a state_dict round trip restores the same sigma without a new update
    other = SNDepthwiseConv(d, 3, 3, stride=stride, K=1.5).double()
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), layer(x))
    assert other.num_updates == 0


@pytest.mark.parametrize("d,stride", [(1, 1), (2, 2), (3, 1)])
def test_naive_method_agrees_with_exact(d, stride):
    n = {1: 12, 2: 8, 3: 4}[d]
    layer = _seed(SNDepthwiseConv(d, 2, 3, stride=stride, method="naive", eps=1e-6), d).double()
    layer(torch.zeros(1, 2, *([n] * d), dtype=torch.float64))
    for _ in range(20):  # warm-started updates (<= 100 iterations each) continue the same power method
        update_spectral_state(layer)
    exact = exact_conv_norm(layer.weight.detach(), n, stride, groups=2)
    sigma = float(layer.sigma().detach())
    assert sigma <= exact * (1 + 1e-12)  # from below: the naive method is not certified
    assert sigma == pytest.approx(exact, rel=1e-4)
    assert layer.spectral_info().path == "naive" and not layer.spectral_info().certified
    pw = _seed(SNPointwiseConv(d, 3, 2, method="naive", eps=1e-8)).double()
    pw(torch.zeros(1, 3, *([n] * d), dtype=torch.float64))
    exact_pw = float(torch.linalg.matrix_norm(pw.weight.detach().reshape(2, 3), ord=2))
    assert float(pw.sigma().detach()) == pytest.approx(exact_pw, rel=1e-6)


# --- once-per-step state updates --------------------------------------------------------------------


def _ds(method="fft", sn_mode="reparam"):
    return _seed(SNDSConv(2, 4, 4, method=method, sn_mode=sn_mode))


def _counts(m):
    return (m.depthwise.spectral_info().updates, m.pointwise.spectral_info().updates)


def _step(m, x, opt):
    opt.zero_grad(set_to_none=True)
    m(x).square().sum().backward()
    opt.step()


@pytest.mark.parametrize("sn_mode", ["reparam", "project"])
def test_forward_never_updates_the_state(sn_mode):
    m = _ds(sn_mode=sn_mode)
    x = torch.randn(2, 4, 9, 9)
    m(x)
    assert _counts(m) == (1, 1)  # initialised by the first forward
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    _step(m, x, opt)
    for _ in range(3):
        m(x)
    assert _counts(m) == (1, 1)  # a changed weight is certified in forward, not re-searched
    info = m.depthwise.spectral_info()
    assert info.certificate > info.bound  # the certificate includes the weights' change
    update_spectral_state(m)
    assert _counts(m) == (2, 2)
    # after the update σ is the bound of the new weights (reparam: value; project: the weights were rescaled)
    bound = float(depthwise_bound(m.depthwise.weight.detach(), 9))
    assert float(m.depthwise.sigma().detach()) == pytest.approx(bound, rel=1e-5)
    if sn_mode == "project":
        assert bound == pytest.approx(1.0, rel=1e-5)


def test_state_frozen_context():
    m = _ds()
    x = torch.randn(1, 4, 8, 8)
    m(x)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    _step(m, x, opt)
    with spectral_state_frozen():
        y1 = m(x)
        y2 = m(x)
        with pytest.raises(RuntimeError, match="frozen"):
            update_spectral_state(m)
    assert _counts(m) == (1, 1)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_frozen_context_still_initialises_a_fresh_layer():
    m = _ds()
    with spectral_state_frozen():
        m(torch.randn(1, 4, 6, 6))
    assert _counts(m) == (1, 1)


def test_update_before_any_forward_skips_input_size_dependent_layers():
    m = _ds()
    update_spectral_state(m)
    assert m.depthwise.spectral_info().updates == 0  # input size unknown: skipped, initialises on first forward
    assert m.depthwise.spectral_info().path == "uninitialised"
    m(torch.randn(1, 4, 8, 8))
    assert m.depthwise.spectral_info().updates == 1


def test_fused_adam_with_attached_hook_keeps_sigma_in_sync():
    m = _ds()
    x = torch.randn(1, 4, 9, 9)
    opt = torch.optim.Adam(m.parameters(), lr=0.05, fused=True)
    handle = attach_spectral_update(opt, m)
    m(x)
    for step in range(3):
        _step(m, x, opt)
        assert _counts(m) == (2 + step, 2 + step)  # the hook updated once per step
        m(x)
        assert _counts(m) == (2 + step, 2 + step)  # and forward did not update again
        bound = float(depthwise_bound(m.depthwise.weight.detach(), 9))
        assert float(m.depthwise.sigma().detach()) == pytest.approx(bound, rel=1e-5)
    handle.remove()


def test_input_size_change_reruns_the_bound():
    m = _ds()
    m(torch.randn(1, 4, 8, 8))
    m(torch.randn(1, 4, 12, 10))
    assert m.depthwise.spectral_info().updates == 2
    assert m.pointwise.spectral_info().updates == 1  # the pointwise norm does not depend on the input size
    assert m.depthwise.spectral_info().input_size == (12, 10)
    assert tuple(m.depthwise.sn_input_size.tolist()) == (12, 10)
    assert float(m.depthwise.sigma().detach()) == pytest.approx(
        float(depthwise_bound(m.depthwise.weight.detach(), (12, 10))), rel=1e-5)


@pytest.mark.parametrize("sn_mode", ["reparam", "project"])
@pytest.mark.parametrize("method", ["fft", "naive"])
def test_state_dict_round_trip_resumes_exactly(method, sn_mode):
    m = _ds(method, sn_mode)
    x = torch.randn(1, 4, 8, 8)
    m(x)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):
        _step(m, x, opt)
        update_spectral_state(m)
    y = m(x)
    keys = set(m.state_dict())
    fresh = _seed(SNDSConv(2, 4, 4, method=method, sn_mode=sn_mode), seed=123)
    fresh.load_state_dict(copy.deepcopy(m.state_dict()))
    assert set(fresh.state_dict()) == keys
    if method == "fft":  # the same keys at every step, from construction on (naive's state is shaped by the input)
        assert keys == set(_ds(method, sn_mode).state_dict())
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    for layer in (m, fresh):  # and training continues on the same trajectory
        _step(layer, x, torch.optim.SGD(layer.parameters(), lr=0.1))
        update_spectral_state(layer)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


def test_checkpoint_saved_between_searches_keeps_its_certificate():
    m = _ds()
    x = torch.randn(1, 4, 8, 8)
    m(x)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):
        _step(m, x, opt)
        update_spectral_state(m, search=False)  # the certificate has grown past the weights' bound
    fresh = _seed(SNDSConv(2, 4, 4), seed=5)
    fresh.load_state_dict(m.state_dict())
    assert fresh.depthwise.spectral_info().certificate == m.depthwise.spectral_info().certificate
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


def test_load_state_dict_does_not_count_as_an_update():
    m = _ds()
    x = torch.randn(1, 4, 8, 8)
    m(x)
    m.load_state_dict(m.state_dict())
    m(x)
    assert _counts(m) == (1, 1)


# --- state accounting -------------------------------------------------------------------------------


def test_state_bytes_fft_small():
    m = SNDSConv(3, 32, 32)
    m(torch.randn(1, 32, 6, 6, 6))
    # depthwise: arg-max (1 + 2·3 int64) + input size (3 int64) + per-channel bound (32 float32);
    # pointwise: power vector (32 float32), its bound and deflated bound (2 float32)
    assert state_bytes(m) == (7 + 3) * 8 + 32 * 4 + (32 + 2) * 4
    assert state_bytes(m) <= 512


def test_state_bytes_naive_counts_feature_maps():
    m = SNDSConv(3, 32, 32, method="naive", eps=0.5)
    n = 6
    m(torch.randn(1, 32, n, n, n))
    feature_map = 1 * 32 * n**3 * 4  # one float32 (1, C, N, N, N) vector per part
    input_size = 3 * 8
    assert state_bytes(m) == 2 * (feature_map + input_size + 4)


def test_state_bytes_torch_method_counts_u_and_v():
    m = SNDSConv(2, 4, 6, method="torch")
    m(torch.randn(1, 4, 5, 5))
    # torch's parametrization: u (out rows) and v (in columns) of the reshaped weight, float32
    assert state_bytes(m) == (4 + 9) * 4 + (6 + 4) * 4


# --- other methods, gradients ---------------------------------------------------------------------


def test_method_none_is_the_plain_conv():
    m = _seed(SNDepthwiseConv(2, 3, 3, method="none", K=5.0))
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, 1, 1, 1, 3))


@pytest.mark.parametrize("method", ["fft", "naive", "torch"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_gradients_reach_every_parameter(method, d):
    m = _seed(SNDSConv(d, 2, 3, method=method, scaling="soft", activation=torch.nn.ReLU()))
    x = torch.randn(2, 2, *([5] * d))
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_linear_exact_and_power():
    lin = _seed(SNLinear(6, 4, K=3.0, exact=True)).double()
    assert _operator_norm(lin, (6,)) == pytest.approx(3.0, rel=1e-10)
    lin2 = _seed(SNLinear(6, 4, K=3.0)).double()
    assert _operator_norm(lin2, (6,)) <= 3.0 * (1 + EPS)


# --- bad arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,needle",
    [
        (lambda: SNDSConv(2, 4, 4, K=0.0), "0.0"),
        (lambda: SNDSConv(2, 4, 4, K=-1), "-1"),
        (lambda: SNDepthwiseConv(2, 4, K=float("inf")), "inf"),
        (lambda: SNLinear(4, 4, K=0), "0"),
        (lambda: SNDSConv(2, 4, 4, method="power"), "power"),
        (lambda: SNLinear(4, 4, method="exact"), "exact"),
        (lambda: SNDSConv(2, 4, 4, scaling="medium"), "medium"),
        (lambda: SNDSConv(4, 4, 4), "4"),
        (lambda: SNDepthwiseConv(2, 0), "0"),
        (lambda: SNDepthwiseConv(2, 3, 3, padding=3), "3"),
        (lambda: SNPointwiseConv(2, 3, 3, eps=0), "0"),
        (lambda: SNDepthwiseConv(2, 3, (3, 3, 3)), "(3, 3, 3)"),
    ],
)
def test_bad_constructor_arguments_raise(build, needle):
    with pytest.raises(ValueError) as err:
        build()
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "layer,x,needle",
    [
        (SNDepthwiseConv(2, 3, 5, padding=0), torch.randn(1, 3, 3, 3), "(3, 3)"),  # input smaller than kernel
        (SNDepthwiseConv(2, 3), torch.randn(1, 4, 8, 8), "(1, 4, 8, 8)"),  # wrong channels
        (SNDSConv(2, 3, 3).pointwise, torch.randn(1, 3, 8), "(1, 3, 8)"),  # wrong number of dims
        (SNLinear(5, 2), torch.randn(3, 4), "(3, 4)"),
    ],
)
def test_bad_inputs_raise(layer, x, needle):
    with pytest.raises(ValueError) as err:
        layer(x)
    assert needle in str(err.value)


# --- the batched (grouped) update gives the per-layer result ---------------------------------------


@pytest.mark.parametrize("spatial_dims,size", [(1, 16), (2, 10), (3, 6)])
def test_grouped_update_matches_per_layer_update(spatial_dims, size):
    torch.manual_seed(0)
    # 3 layers of one depthwise/pointwise geometry, one with other channels, one strided
    net = torch.nn.Sequential(
        *[SNDSConv(spatial_dims, 6, 6, activation=torch.nn.ReLU()) for _ in range(3)],
        SNDSConv(spatial_dims, 6, 4), SNDSConv(spatial_dims, 4, 4, stride=2),
    ).double()
    x = torch.randn(2, 6, *([size] * spatial_dims), dtype=torch.float64)
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    net(x).square().sum().backward()
    opt.step()  # weights moved: every state is stale
    grouped, single = net, copy.deepcopy(net)
    update_spectral_state(grouped)
    for m in single.modules():
        if m is not single and isinstance(m, (SNDepthwiseConv, SNPointwiseConv)):
            update_spectral_state(m)  # each layer on its own
    for a, b in zip(grouped.modules(), single.modules()):
        if isinstance(a, SNDepthwiseConv):  # the same search: identical value
            assert torch.equal(a.sn_state[:1], b.sn_state[:1])
            assert float(a.sigma().detach()) == pytest.approx(float(b.sigma().detach()), rel=1e-12)
            assert a.spectral_info().updates == b.spectral_info().updates == 2
        elif isinstance(a, SNPointwiseConv):  # the batched power method stops when all meet eps
            exact = float(torch.linalg.matrix_norm(a.weight.detach().flatten(1), ord=2))
            assert float(a.sigma().detach()) == pytest.approx(float(b.sigma().detach()), rel=EPS)
            assert exact <= float(a.sigma().detach()) <= exact * (1 + EPS)  # certified, and within eps
    torch.testing.assert_close(grouped(x), single(x), rtol=2 * EPS, atol=0)


def test_grouped_update_without_check_runs_fixed_iterations_and_no_host_sync_path():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[SNPointwiseConv(2, 8, 8) for _ in range(3)])
    x = torch.randn(1, 8, 4, 4)
    net(x)
    v_before = [m.sn_v.clone() for m in net]
    with torch.no_grad():
        for m in net:
            m.weight.mul_(1.5).add_(0.1 * torch.randn_like(m.weight))
    update_spectral_state(net, check=False, iters=1)
    for m, v in zip(net, v_before):  # exactly one power iteration from the warm start
        a = m.weight.detach().reshape(8, 8)
        w = a.t() @ (a @ v)
        torch.testing.assert_close(m.sn_v, w / w.norm())

