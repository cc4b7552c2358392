"""Fused normalization (fused_spectral_scales) against the per-layer path, and the stem's fast σ/search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import invseg.spectral.full_conv as full_conv
from invseg.layers import (
    SNConv,
    SNDepthwiseConv,
    SNDSConv,
    SNLinear,
    SNPointwiseConv,
    fused_spectral_scales,
    spectral_layers,
    update_spectral_state,
)
from invseg.nets import MobileNetV2, ResNet34DS
from invseg.spectral import (
    exact_conv_norm,
    full_conv_projection,
    full_conv_search,
    full_conv_sigma_at,
    full_conv_sigma_from_projection,
)


class _Mixed(nn.Module):
    """Every layer kind with a fused form, unequal shapes, soft and hard scaling, exact-small and DFT paths."""

    def __init__(self):
        super().__init__()
        self.a = SNDSConv(2, 3, 8, K=2.0, activation=nn.ReLU())
        self.b = SNDSConv(2, 8, 8, stride=2, K=1.5, scaling="soft", s_init=0.7)
        self.c = SNDSConv(2, 8, 8, K=1.5, scaling="soft", s_init=0.3)  # groups with b (same shapes, soft)
        self.dw = SNDepthwiseConv(2, 8, kernel_size=5)
        self.pw = SNPointwiseConv(2, 8, 6, exact=True)  # no fused form: per-layer path
        self.stem = SNConv(2, 6, 6, stride=2)  # no fused form: per-layer path
        self.fc = SNLinear(6, 4, K=3.0)

    def forward(self, x):
        with fused_spectral_scales(self):
            x = self.c(self.b(self.a(x)))
            x = self.stem(self.pw(self.dw(x)))
            return self.fc(x.mean(dim=(2, 3)))


def _run(model, x, fused: bool):
    for layer in spectral_layers(model):
        layer._fused_weight = None
    model.zero_grad(set_to_none=True)
    out = model(x) if fused else _MixedPerLayer.forward(model, x)
    out.square().sum().backward()
    return out.detach(), [p.grad.detach().clone() for p in model.parameters()]


class _MixedPerLayer:
    @staticmethod
    def forward(model, x):
        x = model.c(model.b(model.a(x)))
        x = model.stem(model.pw(model.dw(x)))
        return model.fc(x.mean(dim=(2, 3)))


def _prepared(model, x):
    model(x).sum().backward()  # first forward initialises every state (per-layer path)
    update_spectral_state(model)
    return model


@pytest.mark.parametrize("size", [16, 7])
def test_fused_equals_per_layer_values_and_gradients(size):
    torch.manual_seed(0)
    model = _Mixed().double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    _prepared(model, x)
    out_f, grads_f = _run(model, x, fused=True)
    out_p, grads_p = _run(model, x, fused=False)
    torch.testing.assert_close(out_f, out_p, rtol=1e-12, atol=1e-12)
    for gf, gp in zip(grads_f, grads_p):
        torch.testing.assert_close(gf, gp, rtol=1e-10, atol=1e-12)


def test_fused_path_is_taken_and_cleared():
    torch.manual_seed(0)
    model = _Mixed()
    x = torch.randn(1, 3, 12, 12)
    _prepared(model, x)
    seen = []
    for layer in spectral_layers(model):
        layer.register_forward_pre_hook(lambda m, a: seen.append((m, m._fused_weight is not None)))
    model(x)
    fused = {m for m, f in seen if f}
    assert {model.a.depthwise, model.a.pointwise, model.b.pointwise, model.dw, model.fc} <= fused
    assert model.pw not in fused and model.stem not in fused  # no fused form
    assert all(layer._fused_weight is None for layer in spectral_layers(model))  # cleared afterwards


def test_stale_state_falls_back_and_updates():
    torch.manual_seed(0)
    model = _Mixed()
    x = torch.randn(1, 3, 12, 12)
    _prepared(model, x)
    with torch.no_grad():
        model.a.depthwise.weight.mul_(3.0)  # an in-place change: stale state for that layer
    before = model.a.depthwise.num_updates
    model(x)
    assert model.a.depthwise.num_updates == before + 1  # it updated in its own forward
    # a new input size: the depthwise layers re-search rather than use a fused weight of the old size
    n = model.dw.num_updates
    out = model(torch.randn(1, 3, 20, 20))
    assert model.dw.num_updates == n + 1 and out.shape == (1, 4)
    bound = exact_conv_norm(model.dw.weight.detach().double(), (10, 10), padding=model.dw.padding,
                            groups=model.dw.channels)
    assert float(model.dw.sigma().detach()) >= float(bound) * (1 - 1e-6)


def test_fused_weight_not_used_in_other_grad_mode():
    torch.manual_seed(0)
    layer = SNPointwiseConv(2, 4, 4)
    x = torch.randn(1, 4, 5, 5)
    layer(x)
    update_spectral_state(layer)
    calls = []
    per_layer = layer.normalized_scale
    layer.normalized_scale = lambda size: calls.append(size) or per_layer(size)  # spy on the per-layer path
    with fused_spectral_scales(layer):
        fused_w = layer._fused_weight[0]
        assert fused_w.requires_grad
        layer(x)
        assert calls == []  # same grad mode: the fused weight
        with torch.no_grad():  # e.g. the forward of a memory-efficient block: the per-layer path
            out = layer(x)
        assert calls == [(5, 5)]
        torch.testing.assert_close(out, F.conv2d(x, fused_w.detach(), layer.bias.detach()))  # same values


def test_nested_contexts_compute_once():
    torch.manual_seed(0)
    model = ResNet34DS(num_classes=3)
    x = torch.randn(1, 3, 8, 8)
    _prepared(model, x)
    with fused_spectral_scales(model):
        outer = model.fc._fused_weight
        model(x)  # forward opens a nested context: a no-op
        assert model.fc._fused_weight is outer
    assert model.fc._fused_weight is None


@pytest.mark.parametrize("factory", [lambda: ResNet34DS(num_classes=5),
                                     lambda: MobileNetV2(num_classes=5, width_mult=0.35, K=4.0, scaling="soft", dropout=0.0)])
def test_networks_fused_match_per_layer(factory):
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([1, 3])
    results = []
    for fused in (True, False, True):
        model.fused_sn = fused
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    # the first forward initialises the states (per-layer); steps 2 (per-layer) and 3 (fused) run on the same
    # weights and states (per-layer) and 3 (fused) run on the same weights and states
    (o2, g2), (o3, g3) = results[1], results[2]
    torch.testing.assert_close(o3, o2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g3, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# -- the stem: projection-form σ and the pruned exact search ---------------------------------------------

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


def test_snconv_sigma_is_the_bound_after_update_and_load():
    torch.manual_seed(3)
    layer = SNConv(2, 3, 8, stride=2).double()
    x = torch.randn(1, 3, 18, 18, dtype=torch.float64)
    layer(x)
    value, _ = full_conv_search(layer.weight, (18, 18), 2, 1)
    torch.testing.assert_close(layer.sigma(), value, rtol=1e-12, atol=0)
    fresh = SNConv(2, 3, 8, stride=2).double()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.sigma(), value, rtol=1e-12, atol=0)


def test_fused_under_bf16_autocast_matches_per_layer():
    torch.manual_seed(5)
    model = MobileNetV2(num_classes=4, width_mult=0.35, K=3.0, scaling="soft", dropout=0.0)
    x = torch.randn(2, 3, 16, 16)
    _prepared(model, x)
    grads = []
    for fused in (True, False):
        model.fused_sn = fused
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):  # bf16 convs on identical fp32 normalized weights: the same numbers
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_get_no_gradient():
    torch.manual_seed(6)
    model = _Mixed()
    x = torch.randn(1, 3, 12, 12)
    _prepared(model, x)
    model.a.pointwise.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert model.a.pointwise.weight.grad is None and model.b.pointwise.weight.grad is not None


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


def test_double_backward_through_fused_weights_equals_per_layer():
    """A gradient penalty (create_graph=True) through the fused path gives the per-layer path's gradients."""
    torch.manual_seed(8)
    model = MobileNetV2(num_classes=3, width_mult=0.35, K=3.0, scaling="soft", dropout=0.0).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    _prepared(model, x)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fused in (True, False):
        model.fused_sn = fused
        model.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(model(x).square().sum(), params, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        results.append([p.grad.clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_one_layer_at_two_input_sizes_in_one_forward():
    torch.manual_seed(9)
    layer = SNDSConv(2, 4, 4)
    a, b = torch.randn(1, 4, 10, 10), torch.randn(1, 4, 14, 14)
    layer(a)
    update_spectral_state(layer)
    with fused_spectral_scales(layer):
        out = layer(a).sum() + layer(b).sum()  # the second call re-searches in place: backward still works
    out.backward()
    assert layer.depthwise.weight.grad is not None and layer.depthwise._seen_size == (14, 14)


def test_plan_follows_a_changed_K():
    torch.manual_seed(11)
    layer = SNPointwiseConv(2, 4, 4, K=2.0)
    x = torch.randn(1, 4, 5, 5)
    layer(x)
    update_spectral_state(layer)
    with fused_spectral_scales(layer):
        first = layer(x)
    layer.scale.K = 1.0
    with fused_spectral_scales(layer):
        second = layer(x)
    bias = layer.bias.detach()[None, :, None, None]
    torch.testing.assert_close(second - bias, (first - bias) / 2, rtol=1e-6, atol=1e-6)
