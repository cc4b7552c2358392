"""Tests of invseg.train.step.train_step: the one training step of the trainers and the benchmarks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from invseg.layers import SpectralUpdater, spectral_summary
from invseg.nets import create_model
from invseg.train.amp import make_grad_scaler
from invseg.train.step import StepResult, train_step


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("iunet", spatial_dims=2, in_channels=1, out_channels=3, channels=[4, 8], num_blocks=1)


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 16, 16, generator=gen), torch.randint(0, 3, (2, 16, 16), generator=gen)


def _loss(out, y):
    return F.cross_entropy(out.float(), y)


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_train_step_equals_the_hand_written_step(grad_clip):
    x, y = _batch()
    a, b = _net(), _net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, 1, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, 1, gamma=0.5)
    up_a, up_b = SpectralUpdater(a), SpectralUpdater(b)
    for _ in range(3):
        res = train_step(a, x, y, _loss, opt_a, grad_clip=grad_clip, scheduler=sched_a, updater=up_a,
                         return_output=True)
        opt_b.zero_grad(set_to_none=True)
        out = b(x)
        loss = _loss(out, y)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(b.parameters(), grad_clip)
        opt_b.step()
        sched_b.step()
        up_b()
        assert isinstance(res, StepResult)
        assert torch.equal(res.loss, loss.detach().float()) and torch.equal(res.local_loss, res.loss)
        assert torch.equal(res.output, out.detach()) and not res.output.requires_grad
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    sa, sb = spectral_summary(a), spectral_summary(b)
    assert [i.bound for _, i in sa] == [i.bound for _, i in sb]  # the updater ran after each optimizer step


def test_check_stops_before_any_update():
    x, y = _batch()
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    calls = []

    def updater():
        calls.append("update")

    def check(loss):
        raise FloatingPointError(f"loss {float(loss):.3f}")

    with pytest.raises(FloatingPointError, match="loss"):
        train_step(net, x, y, _loss, opt, check=check, updater=updater)
    assert not calls
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())  # (the forward may init SN state)
    assert all(p.grad is None for p in net.parameters())


def test_reduce_feeds_check_and_result():
    x, y = _batch()
    net = _net()
    seen = []
    res = train_step(net, x, y, _loss, torch.optim.SGD(net.parameters(), lr=0.0), reduce=lambda v: v * 0 + 7.0,
                     check=seen.append)
    assert float(seen[0]) == 7.0 and float(res.loss) == 7.0 and float(res.local_loss) != 7.0
    assert res.output is None


def test_disabled_scaler_is_the_plain_step_and_fp16_needs_a_scaler():
    x, y = _batch()
    a, b = _net(), _net()
    opt_a, opt_b = torch.optim.Adam(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), 1e-2)
    train_step(a, x, y, _loss, opt_a, scaler=make_grad_scaler("cpu", "fp32"))
    train_step(b, x, y, _loss, opt_b)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="fp16"):
        train_step(a, x, y, _loss, opt_a, precision="fp16")


def test_bf16_autocast_on_cpu_runs_forward_in_bf16():
    x, y = _batch()
    net = _net()
    res = train_step(net, x, y, _loss, torch.optim.SGD(net.parameters(), lr=0.01), precision="bf16",
                     return_output=True)
    assert res.output.dtype == torch.bfloat16
    assert res.loss.dtype == torch.float32 and torch.isfinite(res.loss)
