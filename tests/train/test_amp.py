"""Tests for invseg.train.amp: autocast contexts and grad scalers per precision."""

from __future__ import annotations

import warnings

import pytest
import torch

from invseg.train.amp import autocast_context, make_grad_scaler

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "device, precision, dtype",
    [
        ("cpu", "fp32", torch.float32),
        ("cpu", "bf16", torch.bfloat16),
        pytest.param("cuda", "fp32", torch.float32, marks=[pytest.mark.gpu, requires_cuda]),
        pytest.param("cuda", "bf16", torch.bfloat16, marks=[pytest.mark.gpu, requires_cuda]),
        pytest.param("cuda", "fp16", torch.float16, marks=[pytest.mark.gpu, requires_cuda]),
    ],
)
def test_autocast_dtype(device, precision, dtype):
    layer = torch.nn.Linear(4, 4).to(device)
    with autocast_context(device, precision):
        out = layer(torch.randn(2, 4, device=device))
    assert out.dtype == dtype


def test_fp32_does_not_disable_outer_autocast():
    layer = torch.nn.Linear(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_context("cpu", "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16


def test_fp16_on_cpu_rejected():
    with pytest.raises(ValueError, match="precision='fp16' needs device_type='cuda'"):
        autocast_context("cpu", "fp16")
    with pytest.raises(ValueError, match="precision='fp16'"):
        make_grad_scaler(torch.device("cpu"), "fp16")


@pytest.mark.parametrize("device, precision", [("cpu", "fp8"), ("tpu", "fp32"), ("cpu", "FP32")])
def test_bad_arguments(device, precision):
    with pytest.raises(ValueError, match="must be one of"):
        autocast_context(device, precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scaler_disabled_is_passthrough_on_cpu(precision):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation / "CUDA not available" warnings
        scaler = make_grad_scaler("cpu", precision)
    assert isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled()
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    loss = (p * 3).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.full((2,), -2.0))


@pytest.mark.gpu
@requires_cuda
def test_scaler_enabled_for_fp16_cuda():
    scaler = make_grad_scaler("cuda", "fp16")
    assert scaler.is_enabled()
    assert not make_grad_scaler("cuda", "bf16").is_enabled()
