"""Contract tests of every invertible block: round trip, memcnn's checker, shapes, bad arguments."""

import warnings

import pytest
import torch

from invseg.blocks import (
    AdditiveCoupling,
    AffineCoupling,
    ChannelMerge,
    ChannelSplit,
    InvertibleChannelMixing,
    InvertibleResidual,
    OrthogonalDownsample,
    OrthogonalUpsample,
    SNDSSubnet,
    sn_ds_subnet,
)

with warnings.catch_warnings():  # memcnn installs a process-wide UserWarning filter at import
    warnings.simplefilter("ignore")
    import memcnn

C = 4  # channels of the blocks under test
N = 8  # spatial size per axis



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: a single intra-op thread avoids OpenMP oversubscription on shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _block(kind: str, d: int):
    sub = sn_ds_subnet(d, K=0.7, sn_method="fft")
    return {
        "additive": lambda: AdditiveCoupling(C, sub),
        "additive_rev": lambda: AdditiveCoupling(C, sub, reverse=True),
        "affine": lambda: AffineCoupling(C, sub),
        "affine_soft": lambda: AffineCoupling(C, sn_ds_subnet(d, K=2.0, scaling="soft"), reverse=True, clamp=1.0),
        "residual": lambda: InvertibleResidual(C, sub, K=0.7),
        "mixing": lambda: InvertibleChannelMixing(d, C, init="random"),
        "down_haar": lambda: OrthogonalDownsample(d, C, init="haar"),
        "down_squeeze": lambda: OrthogonalDownsample(d, C, init="squeeze"),
        "up": lambda: OrthogonalUpsample(d, C * 2**d),
        "split": lambda: ChannelSplit(1),
        "merge": lambda: ChannelMerge(1),
    }[kind]()


def _input_shapes(kind: str, d: int):
    if kind == "up":
        return ((2, C * 2**d) + (N // 2,) * d,)
    if kind == "merge":
        return ((2, 1) + (N,) * d, (2, C - 1) + (N,) * d)
    return ((2, C) + (N,) * d,)


def _perturb(module: torch.nn.Module) -> None:
    """Move all parameters away from their (often symmetric) initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


KINDS = ["additive", "additive_rev", "affine", "affine_soft", "residual", "mixing", "down_haar", "down_squeeze", "up",
         "split", "merge"]


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_memcnn_contract(kind, d):
    torch.manual_seed(0)
    block = _block(kind, d)
    _perturb(block)
    shapes = _input_shapes(kind, d)
    xs = tuple(torch.randn(s) for s in shapes)
    with torch.no_grad():
        ys = block(*xs)
        ys = ys if isinstance(ys, tuple) else (ys,)
        assert len(ys) == block.num_outputs
        xr = block.inverse(*ys)
        xr = xr if isinstance(xr, tuple) else (xr,)
    for x, r in zip(xs, xr):
        assert r.shape == x.shape
        assert (r - x).norm() / x.norm() <= 1e-5
    shapes = shapes[0] if len(shapes) == 1 else shapes
    assert memcnn.is_invertible_module(block, test_input_shape=shapes, atol=1e-5)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_resampling_shapes_and_orthogonality(d):
    torch.manual_seed(0)
    down, up = OrthogonalDownsample(d, C), OrthogonalUpsample(d, C * 2**d)
    x = torch.randn((2, C) + (N,) * d)
    y = down(x)
    assert y.shape == (2, C * 2**d) + (N // 2,) * d
    assert torch.allclose(y.norm(), x.norm(), rtol=1e-5)  # orthogonal operator preserves the norm
    assert torch.allclose(up(y), x, atol=1e-5)  # same init: up is the inverse of down
    # Haar init: channel c * 2**d is the patch mean times sqrt(2**d)
    mean = torch.nn.functional.avg_pool1d if d == 1 else (
        torch.nn.functional.avg_pool2d if d == 2 else torch.nn.functional.avg_pool3d)
    assert torch.allclose(y[:, :: 2**d], mean(x, 2) * 2 ** (d / 2), atol=1e-5)


def test_orthogonal_resampling_is_learnable_and_stays_orthogonal():
    torch.manual_seed(0)
    down = OrthogonalDownsample(2, 2)
    opt = torch.optim.SGD(down.parameters(), lr=0.5)
    x = torch.randn(1, 2, 4, 4)
    for _ in range(3):
        opt.zero_grad()
        down(x)[:, 0].sum().backward()
        opt.step()
    w = down.matrix()
    assert not torch.allclose(w, OrthogonalDownsample(2, 2).matrix())  # it moved
    assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-5)
    assert torch.allclose(down.inverse(down(x)), x, atol=1e-5)


def test_mixing_flip_swaps_halves():
    m = InvertibleChannelMixing(2, 4, init="flip")
    x = torch.randn(1, 4, 3, 3)
    assert torch.equal(m(x), torch.cat([x[:, 2:], x[:, :2]], 1))


def test_coupling_transforms_one_half_only():
    torch.manual_seed(0)
    blk = AdditiveCoupling(4, sn_ds_subnet(2))
    x = torch.randn(1, 4, 6, 6)
    y = blk(x)
    assert torch.equal(y[:, 2:], x[:, 2:]) and not torch.allclose(y[:, :2], x[:, :2])
    rev = AdditiveCoupling(4, sn_ds_subnet(2), reverse=True)
    y = rev(x)
    assert torch.equal(y[:, :2], x[:, :2]) and not torch.allclose(y[:, 2:], x[:, 2:])


def test_affine_scale_is_bounded():
    blk = AffineCoupling(2, lambda cin, cout: torch.nn.Conv1d(cin, cout, 1), clamp=1.5)
    with torch.no_grad():
        blk.subnet.weight.fill_(0.0)
        blk.subnet.bias.copy_(torch.tensor([1e4, 0.0]))  # huge raw log-scale, zero shift
    x = torch.ones(1, 2, 5)
    y = blk(x)
    assert torch.allclose(y[:, 0], torch.full((1, 5), 1.5).exp(), rtol=1e-5)
    assert torch.allclose(blk.inverse(y), x)


def test_subnet_lipschitz_bound():
    """The default sub-network is K-Lipschitz: ||F(a) - F(b)|| <= K ||a - b|| on random pairs."""
    torch.manual_seed(0)
    net = SNDSSubnet(2, 3, 5, K=0.5)
    _perturb(net)
    a, b = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ratio = (net(a) - net(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratio.max() <= 0.5 * 1.01


@pytest.mark.parametrize("K", [1.0, 1.5, 0.0])
def test_residual_rejects_K_outside_unit_interval(K):
    with pytest.raises(ValueError, match="0 < K < 1"):
        InvertibleResidual(4, sn_ds_subnet(2, K=max(K, 0.1)), K=K)


def test_residual_inverse_reports_non_convergence():
    class Expanding(torch.nn.Module):  # Lipschitz 3: y = x + g(x) is not inverted by the iteration
        def __init__(self, cin, cout):
            super().__init__()

        def forward(self, x):
            return 3.0 * x

    blk = InvertibleResidual(2, Expanding, K=0.5, max_iter=20)
    y = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match=r"did not converge: K=0.5, \d+ iterations .*residual"):
        blk.inverse(y)


def test_residual_inverse_converges_to_tolerance():
    torch.manual_seed(0)
    blk = InvertibleResidual(4, sn_ds_subnet(2, K=0.9), K=0.9, tol=1e-7)
    _perturb(blk)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        y = blk(x)
        assert (blk.inverse(y) - x).norm() / x.norm() <= 1e-6


@pytest.mark.parametrize("sn_mode", ["reparam", "project"])
def test_residual_stays_a_contraction_when_weights_change_without_an_update(sn_mode):
    """The i-ResNet inverse needs Lip(g) <= K < 1: it holds by the layers' certificates even after a fused
    optimizer (no version bump, no update hook) grew the sub-network's weights."""
    torch.manual_seed(1)
    blk = InvertibleResidual(4, sn_ds_subnet(2, K=0.9, sn_mode=sn_mode), K=0.9, tol=1e-7)
    x = torch.randn(2, 4, 8, 8)
    blk(x)
    weights = [p for name, p in blk.named_parameters() if name.endswith("weight")]  # not the (unbounded) biases
    opt = torch.optim.SGD(weights, lr=0.5, fused=True)
    for _ in range(5):
        opt.zero_grad()
        (-blk(x).square().sum()).backward()  # ascent: the weights grow
        opt.step()
    assert max(float(p.detach().norm()) for p in weights) > 5.0
    a, b = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    with torch.no_grad():
        ratio = (blk.g(a) - blk.g(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        assert ratio.max() <= 0.9 * (1 + 1e-5)
        y = blk(x)
        assert (blk.inverse(y) - x).norm() / x.norm() <= 1e-6


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AdditiveCoupling(7, sn_ds_subnet(2)), "even"),
        (lambda: AffineCoupling(4, sn_ds_subnet(2), clamp=0.0), "clamp"),
        (lambda: OrthogonalDownsample(4, 2), "spatial_dims"),
        (lambda: OrthogonalDownsample(2, 2, init="wavelet"), "init"),
        (lambda: OrthogonalUpsample(2, 6), "multiple of 2\\*\\*spatial_dims=4"),
        (lambda: InvertibleChannelMixing(2, 3, init="eye"), "init"),
        (lambda: ChannelSplit(0), "split_channels"),
        (lambda: SNDSSubnet(2, 2, 2, activation="tanh"), "activation"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="even"):
        OrthogonalDownsample(2, 2)(torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="channels"):
        AdditiveCoupling(4, sn_ds_subnet(2))(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match="0 < 4 < C"):
        ChannelSplit(4)(torch.randn(1, 4, 3))


@pytest.mark.parametrize("learnable", [True, False])
def test_float64_cast_keeps_3d_haar_resampling_orthogonal(learnable):
    # 1/sqrt(8) is not exact in float32: without re-projection a float64 copy is orthogonal only to ~6e-8
    from invseg.blocks._orthogonal import OrthogonalMatrix, haar_matrix

    m = OrthogonalMatrix(haar_matrix(3, torch.float32), learnable=learnable).double()
    w = m()
    assert w.dtype == torch.float64
    err = (w @ w.T - torch.eye(8, dtype=torch.float64)).abs().max().item()
    assert err < 1e-14, err
    torch.testing.assert_close(w, haar_matrix(3, torch.float64), atol=1e-7, rtol=0)
