"""Tests of invseg.experiments.paper and its scripts: MobileNetV2 per-layer bound
accuracy (torchvision and invseg layouts), Table 2 timing with synthetic tensors and a data loader."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from invseg.experiments.paper import (
    MOBILENETV2_DEPTHWISE_STRIDES,
    format_timing_table,
    mobilenetv2_depthwise_weights,
    time_classifier,
)

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mobilenetv2_strides_are_the_architecture():
    assert len(MOBILENETV2_DEPTHWISE_STRIDES) == 17
    assert [i for i, s in enumerate(MOBILENETV2_DEPTHWISE_STRIDES) if s == 2] == [1, 3, 6, 13]


def test_bound_accuracy_script_on_a_torchvision_state_dict(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    path = tmp_path / "mobilenet_v2_random.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    rc = _script("bound_accuracy_mobilenetv2").main([str(path), "--input-size", "64", "--out", str(tmp_path / "out"),
                                                    "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "bound_accuracy.json").read_text())
    layers = data["layers"]
    assert len(layers) == 17 and layers[0]["name"] == "features.1.conv.0.0.weight"
    assert [r["input_size"] for r in layers] == [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 4, 4, 4, 4, 2, 2, 2]
    for r in layers:  # both are upper bounds of the exact norm
        assert r["paper_bound"] >= r["exact"] * (1 - 1e-9), r
        assert r["ours_bound"] >= r["exact"] * (1 - 1e-9), r
        assert r["ours_bound"] <= r["paper_bound"] * (1 + 1e-9), r
    s = data["summary"]
    assert (s["stride1"]["layers"], s["stride2"]["layers"]) == (13, 4)
    # the aliasing bound is much tighter than the paper's ||S|| <= ||K|| on stride-2 layers
    assert s["stride2"]["ours_mean"] < 0.3 * s["stride2"]["paper_mean"]
    assert "stride 2" in capsys.readouterr().out


def test_depthwise_weights_of_invseg_mobilenetv2_and_bad_inputs(tmp_path):
    from invseg.nets.mobilenetv2 import MobileNetV2

    model = MobileNetV2(num_classes=10, width_mult=0.35)
    found = mobilenetv2_depthwise_weights({"model": model.state_dict()})  # an invseg checkpoint layout
    assert len(found) == 17 and all("depthwise" in k for k, _ in found)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        mobilenetv2_depthwise_weights(tmp_path / "nope.pth")
    partial = dict(found[:3])
    with pytest.raises(ValueError, match="found 3"):
        mobilenetv2_depthwise_weights(partial)
    assert _script("bound_accuracy_mobilenetv2").main([str(tmp_path / "nope.pth")]) == 3  # a missing input file: ExitCode.DATA


def test_time_classifier_with_synthetic_tensors_and_a_loader():
    kwargs = {"width_mult": 0.35, "K": 10.0}
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=2)
    rows = time_classifier("mobilenetv2", kwargs, batch=2, input_size=32, num_classes=3, steps=2, rounds=1,
                           warmup=1, data=data, epoch_steps=2)
    assert [r.method for r in rows] == ["none", "reparam"]
    assert rows[0].step_ratio == pytest.approx(1.0) and rows[1].step_ratio > 0
    for r in rows:
        assert r.input_shape == (2, 3, 32, 32) and r.steps == 2
        assert r.epoch_steps == 2 and r.steps_per_epoch == 4 and math.isfinite(r.epoch_s) and r.epoch_s > 0
    assert rows[0].epoch_ratio == pytest.approx(1.0)
    table = format_timing_table(rows)
    assert "| mobilenetv2 | 2×3×32×32 | fp32 | reparam |" in table and "from 2 steps" in table


def test_time_classifier_with_searches_every_n_steps():
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))), batch_size=2)
    rows = time_classifier("resnet34ds", {}, batch=2, input_size=8, num_classes=3, steps=2, rounds=1, warmup=0,
                           data=data, epoch_steps=2, sn_search_every=2, methods=("none", "project"))
    assert [r.method for r in rows] == ["none", "project@2"]
    assert rows[1].steps == 2 and rows[1].epoch_steps == 2 and rows[1].epoch_s > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"batch": 0}, "batch"), ({"methods": ()}, "methods"), ({"model_kwargs": {"sn_method": "fft"}}, "sn_method"),
     ({"sn_search_every": 0}, "sn_search_every"), ({"methods": ("none", "svd")}, "unknown method")],
)
def test_time_classifier_rejects_bad_arguments(kwargs, message):
    args = dict(model_name="resnet34ds", model_kwargs={}, batch=2, input_size=8, num_classes=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        time_classifier(**args)
