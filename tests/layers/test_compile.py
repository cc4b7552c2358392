"""torch.compile and SN layers: a layer's forward compiles with fullgraph=True in both modes, and a compiled
network trains with the updater between steps without recompiling (the updater writes state in place)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F

from invseg.layers import SNConv, SNDepthwiseConv, SNLinear, SNPointwiseConv, SpectralUpdater
from invseg.nets import create_model

LAYERS = [
    (lambda mode: SNDepthwiseConv(2, 4, 3, sn_mode=mode), (2, 4, 8, 8)),
    (lambda mode: SNDepthwiseConv(2, 4, 3, sn_mode=mode), (2, 4, 3, 3)),  # the exact tiny-input path
    (lambda mode: SNPointwiseConv(2, 4, 6, sn_mode=mode), (2, 4, 5, 5)),
    (lambda mode: SNLinear(5, 3, scaling="soft", sn_mode=mode), (2, 5)),
    (lambda mode: SNConv(2, 3, 4, stride=2, sn_mode=mode), (2, 3, 8, 8)),
]


@pytest.fixture
def graphs():
    """A dynamo backend that records each compiled graph (compilation count) and runs it eagerly."""
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    dynamo.reset()
    yield backend, compiled
    dynamo.reset()


@pytest.mark.parametrize("mode", ["reparam", "project"])
@pytest.mark.parametrize("idx", range(len(LAYERS)))
def test_layer_forward_compiles_fullgraph_and_trains(idx, mode, graphs):
    backend, compiled = graphs
    build, shape = LAYERS[idx]
    torch.manual_seed(idx)
    layer = build(mode)
    x = torch.randn(shape)
    layer(x)  # initialise at this input size (eager)
    fast = torch.compile(layer, fullgraph=True, backend=backend)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    updater = SpectralUpdater(layer, search_every=2)
    for _ in range(3):
        opt.zero_grad()
        fast(x).square().sum().backward()
        opt.step()
        updater()
    torch.testing.assert_close(fast(x), layer(x), rtol=0, atol=0)
    assert len(compiled) == 1  # no recompilation across updates


@pytest.mark.parametrize("mode", ["reparam", "project"])
@pytest.mark.parametrize("name", ["mobilenetv2", "iunet"])
def test_compiled_network_trains_without_recompiling(name, mode, graphs):
    backend, compiled = graphs
    torch.manual_seed(0)
    if name == "mobilenetv2":
        model = create_model("mobilenetv2", num_classes=4, width_mult=0.35, sn_mode=mode)
        x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2,))
    else:
        model = create_model("iunet", spatial_dims=3, in_channels=1, out_channels=2, channels=[8, 16],
                             num_blocks=1, memory_efficient=False, sn_mode=mode)
        x, y = torch.randn(1, 1, 8, 8, 8), torch.randint(0, 2, (1, 8, 8, 8))
    model(x)
    fast = torch.compile(model, fullgraph=True, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    updater = SpectralUpdater(model, search_every=2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(fast(x), y)
        loss.backward()
        opt.step()
        updater()
        losses.append(loss.item())
    assert len(compiled) == 1, f"{len(compiled)} graphs: the updater caused recompilation"
    assert all(torch.isfinite(torch.tensor(losses)))
