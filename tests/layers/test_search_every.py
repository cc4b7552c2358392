"""Certified updates between DFT searches (SpectralUpdater(search_every=n), update_spectral_state(search=False))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invseg.layers import (
    SNConv,
    SNDepthwiseConv,
    SNDSConv,
    SNLinear,
    SpectralUpdater,
    fused_spectral_scales,
    spectral_layers,
    update_spectral_state,
)
from invseg.spectral import exact_conv_norm, full_conv_search


class _Net(nn.Module):
    """A stem, strided and unit-stride depthwise layers (DFT path at 12², exact-small path at 6²), a head."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.stem = SNConv(2, 3, 6, stride=2, K=1.5)
        self.a = SNDSConv(2, 6, 6, stride=1, K=1.2)
        self.b = SNDSConv(2, 6, 6, stride=2, K=1.2, scaling="soft", s_init=1.0)
        self.c = SNDSConv(2, 6, 6, kernel_size=5, K=1.2)
        self.fc = SNLinear(6, 3)

    def forward(self, x):
        ctx = fused_spectral_scales(self) if self.fused else torch.enable_grad()
        with ctx:
            x = F.relu(self.stem(x))
            x = self.c(F.relu(self.b(F.relu(self.a(x)))))
            return self.fc(x.mean(dim=(2, 3)))


def _exact(layer, size) -> float:
    w = layer.weight.detach().double()
    if isinstance(layer, SNDepthwiseConv):
        return exact_conv_norm(w, size, layer.stride, layer.padding, layer.dilation, groups=layer.channels)
    return exact_conv_norm(w, size, layer.stride, layer.padding)


@pytest.mark.parametrize("fused", [False, True])
def test_sigma_stays_an_upper_bound_between_searches(fused):
    torch.manual_seed(0)
    model = _Net(fused).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updater = SpectralUpdater(model, search_every=4, slack_tol=None)  # periodic searches only
    x = torch.randn(4, 3, 24, 24, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    searched_layers = [m for m in spectral_layers(model) if isinstance(m, (SNDepthwiseConv, SNConv))]
    slack_seen = False
    for step in range(9):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        updater()
        for layer in searched_layers:
            sigma = float(layer.sigma().detach())
            exact = _exact(layer, layer._seen_size)
            assert sigma >= exact * (1 - 1e-9), (step, layer, sigma, exact)
            if updater.count % 4 == 1:  # this update searched: no slack, σ is the bound itself
                assert layer._sn_cert is None
            else:
                cert = layer._sn_cert
                assert float(cert) >= exact * (1 - 1e-9)
                assert sigma >= float(cert) * (1 - 1e-12)  # σ in forward is lifted to the certificate
                layer._sn_cert = None
                raw = float(layer.sigma().detach())  # the value at the remembered frequency alone
                layer._sn_cert = cert
                slack_seen |= raw < float(cert) * (1 - 1e-9)
    assert slack_seen


def test_certificate_is_the_search_plus_l1_change():
    torch.manual_seed(1)
    layer = SNDepthwiseConv(2, 5, kernel_size=3).double()
    layer(torch.randn(1, 5, 16, 16, dtype=torch.float64))
    v0 = float(layer.sigma().detach())
    delta = 1e-3 * torch.randn_like(layer.weight)
    with torch.no_grad():
        layer.weight.add_(delta)
    update_spectral_state(layer, search=False)
    per_channel = layer._sn_ref[2] + delta.reshape(5, -1).abs().sum(dim=1)
    assert float(layer._sn_cert) == pytest.approx(float(per_channel.max()), rel=1e-12)
    assert v0 <= float(per_channel.max()) + 1e-12
    # σ in forward is lifted to the certificate, with the gradient of the remembered frequency
    cert, layer._sn_cert = layer._sn_cert, None
    raw = float(layer.sigma().detach())
    layer._sn_cert = cert
    sigma = layer.sigma()
    assert float(sigma.detach()) == pytest.approx(max(float(cert), raw), rel=1e-12)
    grad, = torch.autograd.grad(sigma, layer.weight)
    assert grad.abs().sum() > 0
    # the next search replaces the certificate by the bound of the current weights
    update_spectral_state(layer)
    assert layer._sn_cert is None and float(layer.sigma().detach()) <= float(per_channel.max()) + 1e-12


def test_search_false_searches_layers_never_searched_at_their_size():
    torch.manual_seed(2)
    layer = SNDepthwiseConv(2, 4)
    layer(torch.randn(1, 4, 10, 10))
    layer(torch.randn(1, 4, 14, 14))  # a new input size: the forward re-searched
    assert layer._sn_ref[0] == (14, 14)
    stem = SNConv(2, 3, 4, stride=2)
    stem(torch.randn(1, 3, 12, 12))
    stem._sn_ref = None  # e.g. after loading a checkpoint
    update_spectral_state(stem, search=False)
    assert stem._sn_ref is not None and stem._sn_cert is None


def test_stem_certificate_bounds_the_exact_norm():
    torch.manual_seed(3)
    stem = SNConv(2, 3, 8, stride=2).double()
    stem(torch.randn(1, 3, 14, 14, dtype=torch.float64))
    for _ in range(3):
        with torch.no_grad():
            stem.weight.add_(0.05 * torch.randn_like(stem.weight))
        stem._seen_version = stem._weight_version()  # as after an update hook: the layer does not re-search
        update_spectral_state(stem, search=False)
        exact = _exact(stem, (14, 14))
        searched = float(full_conv_search(stem.weight, (14, 14), 2, 1)[0])
        assert float(stem._sn_cert) >= searched * (1 - 1e-12) >= exact * (1 - 1e-9)
        assert float(stem.sigma().detach()) >= searched * (1 - 1e-12)


def test_updater_searches_every_n():
    torch.manual_seed(4)
    layer = SNDepthwiseConv(2, 4)
    layer(torch.randn(1, 4, 10, 10))
    updater = SpectralUpdater(layer, search_every=3, slack_tol=None)
    pattern = []
    for _ in range(7):
        updater()
        pattern.append(layer._sn_cert is None)
    assert pattern == [True, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="search_every"):
        SpectralUpdater(layer, search_every=0)


def test_checkpoint_saved_between_searches_keeps_its_certificate():
    torch.manual_seed(5)
    m = SNDepthwiseConv(2, 4, 3).double()
    m(torch.randn(1, 4, 12, 12, dtype=torch.float64))
    with torch.no_grad():
        m.weight.copy_(torch.randn_like(m.weight))  # far from the searched weights
    update_spectral_state(m, search=False)
    state = m.state_dict()
    assert "sn_cert" in state
    n = SNDepthwiseConv(2, 4, 3).double()
    n.load_state_dict(state)  # strict: the extra key is consumed
    exact = _exact(n, (12, 12))
    assert float(n.sigma().detach()) == pytest.approx(float(m.sigma().detach()), rel=1e-12)
    assert float(n.sigma().detach()) >= exact * (1 - 1e-9)
    assert n.num_updates == 0  # no re-search: the exact state of the saved run
    update_spectral_state(n, search=False)  # no reference weights after loading: this update searches
    assert n._sn_cert is None and float(n.sigma().detach()) >= exact * (1 - 1e-9)
    # a checkpoint saved right after a search (or by an older version) has no certificate key
    update_spectral_state(m)
    assert "sn_cert" not in m.state_dict()
    SNDepthwiseConv(2, 4, 3).double().load_state_dict(m.state_dict())


def test_stem_checkpoint_between_searches():
    torch.manual_seed(6)
    stem = SNConv(2, 3, 8, stride=2).double()
    stem(torch.randn(1, 3, 14, 14, dtype=torch.float64))
    with torch.no_grad():
        stem.weight.add_(0.3 * torch.randn_like(stem.weight))
    stem._seen_version = stem._weight_version()
    update_spectral_state(stem, search=False)
    fresh = SNConv(2, 3, 8, stride=2).double()
    fresh.load_state_dict(stem.state_dict())
    assert float(fresh.sigma().detach()) == pytest.approx(float(stem.sigma().detach()), rel=1e-12)
    assert float(fresh.sigma().detach()) >= _exact(fresh, (14, 14)) * (1 - 1e-9)


def test_slack_tolerance_searches_when_the_certificate_gets_loose():
    torch.manual_seed(7)
    model = _Net(fused=True).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updater = SpectralUpdater(model, search_every=50, slack_tol=0.01)
    x = torch.randn(4, 3, 24, 24, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    certified = [m for m in spectral_layers(model) if isinstance(m, (SNDepthwiseConv, SNConv))]
    searches = 0
    for step in range(8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        before = [m.num_updates for m in certified]
        updater()
        for layer in certified:
            sigma = float(layer.sigma().detach())
            assert sigma >= _exact(layer, layer._seen_size) * (1 - 1e-9)
            if layer._sn_cert is not None:  # kept only while within 1 % of the remembered frequency's σ
                assert float(layer._sn_cert) <= 1.01 * float(layer._raw_sigma()) * (1 + 1e-12)
        searches += sum(m._sn_cert is None for m in certified) if step else 0
    assert searches > 0  # this learning rate moves the weights fast: some groups were searched early
    with pytest.raises(ValueError, match="slack_tol"):
        SpectralUpdater(model, slack_tol=-1)
