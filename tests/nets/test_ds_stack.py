"""DSStack: the plain SN DS-conv stack used as the memory reference."""

import pytest
import torch

from invseg.layers import SNDSConv, spectral_layers
from invseg.nets.ds_stack import DSStack


@pytest.mark.parametrize("spatial_dims,size", [(1, (9,)), (2, (6, 7)), (3, (4, 5, 6))])
@pytest.mark.parametrize("method", ["fft", "naive", "none"])
def test_shapes_and_gradients(spatial_dims, size, method):
    torch.manual_seed(0)
    net = DSStack(spatial_dims, 2, 3, channels=4, depth=2, sn_method=method)
    x = torch.randn(2, 2, *size)
    y = net(x)
    assert y.shape == (2, 3, *size)
    y.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(isinstance(m, SNDSConv) for m in net.modules()) == 2
    assert len(spectral_layers(net)) == 4


@pytest.mark.parametrize("method", ["fft", "naive"])
def test_each_ds_conv_is_k_lipschitz(method):
    # ||f(x + t) - f(x)|| <= K ||t|| for the linear parts; the activations are 1-Lipschitz
    torch.manual_seed(0)
    K = 0.7
    net = DSStack(2, 1, 2, channels=4, depth=2, K=K, sn_method=method)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(5.0)  # large weights: without normalization the ratio would far exceed K
        x = torch.randn(3, 4, 8, 8)
        for conv in (m for m in net.modules() if isinstance(m, SNDSConv)):
            conv(x)  # the state follows the scaled weights
            t = 1e-2 * torch.randn_like(x)
            ratio = (conv(x + t) - conv(x)).flatten(1).norm(dim=1) / t.flatten(1).norm(dim=1)
            assert (ratio <= K * (1 + 1e-4)).all(), ratio


def test_registered():
    from invseg.nets import create_model

    assert isinstance(create_model("ds_stack", spatial_dims=3, in_channels=1, out_channels=2), DSStack)


@pytest.mark.parametrize("kwargs,match", [
    (dict(spatial_dims=4), "spatial_dims"),
    (dict(channels=0), "channels"),
    (dict(depth=True), "depth"),
    (dict(kernel_size=2), "kernel_size"),
    (dict(K=0.0), "K"),
    (dict(sn_method="exact"), "sn_method"),
    (dict(activation="tanh"), "activation"),
    (dict(scaling="medium"), "scaling"),
])
def test_rejects_bad_arguments(kwargs, match):
    args = dict(spatial_dims=3, in_channels=1, out_channels=2) | kwargs
    with pytest.raises(ValueError, match=match):
        DSStack(**args)


def test_rejects_wrong_input():
    net = DSStack(3, 1, 2, channels=4, depth=1)
    with pytest.raises(ValueError, match="expects input"):
        net(torch.randn(1, 2, 4, 4, 4))
