"""CUDA-only checks of the SN layers (skipped without a GPU; CI has none)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from invseg.layers import SpectralUpdater
from invseg.nets import create_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("mode", ["reparam", "project"])
@pytest.mark.parametrize("name", ["mobilenetv2", "iunet"])
def test_no_host_synchronisation_between_checks(name, mode):
    """With check_every = search_every = 4, the training steps between checks (forward, backward, optimizer
    step and spectral update) never synchronise with the host."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    if name == "mobilenetv2":
        model = create_model("mobilenetv2", num_classes=10, width_mult=0.35, sn_mode=mode).to(dev)
        x, y = torch.randn(4, 3, 64, 64, device=dev), torch.randint(0, 10, (4,), device=dev)
    else:
        model = create_model("iunet", spatial_dims=3, in_channels=1, out_channels=2, channels=[8, 16, 32],
                             num_blocks=1, sn_mode=mode).to(dev)
        x, y = torch.randn(1, 1, 16, 16, 16, device=dev), torch.randint(0, 2, (1, 16, 16, 16), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    updater = SpectralUpdater(model, check_every=4, search_every=4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        updater()

    for _ in range(5):  # updates 0..4: initialisation, a whole cycle, and the check/search of update 4
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # updates 5, 6, 7: between checks
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
