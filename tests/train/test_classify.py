"""Tests of invseg.train.classify and the classification scripts: one-epoch runs on tiny synthetic
CIFAR-10 (official pickle format) and ImageNet (JPEG class folders), exact resume, the SN bound on a
trained model, and validation at the door (the Table 1 sweep: tests/experiments/test_cifar_grid.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from invseg.analysis.bound_accuracy import depthwise_exact_norm
from invseg.config import load_config
from invseg.layers import SNDepthwiseConv, SNLinear, SNPointwiseConv
from invseg.train.checkpoint import load_checkpoint
from invseg.train.classify import (
    ClassifyConfig,
    build_classifier,
    check_classify_config,
    train_classifier,
)

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small(tmp_path: Path, data_root: Path, run: str, *extra: str) -> list[str]:
    """Overrides of a seconds-long CPU run: MobileNetV2 x0.35 on synthetic CIFAR, 1 step per epoch."""
    return [
        "data.dataset=synthetic_cifar10", f"data.root={data_root}", "data.synthetic_train_per_class=1",
        "data.synthetic_val_per_class=1", "model.name=mobilenetv2", "model.kwargs.width_mult=0.35", "model.kwargs.K=5.0",
        "train.batch_size=4", "train.max_steps_per_epoch=1", "train.max_eval_steps=1", "train.epochs=1",
        "train.device=cpu", "train.progress=false", "train.log_every=1", "train.milestones=[1]",
        f"output.run_dir={tmp_path / run}", "output.plot=false", *extra,
    ]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cifar10_resnet34ds_one_epoch_on_synthetic_pickles(tmp_path):
    """The paper's CIFAR model, one epoch of 2 steps, data written in the official pickle format."""
    cfg = load_config(ClassifyConfig, ROOT / "configs" / "cifar10_resnet34ds.yaml", [
        "data.dataset=synthetic_cifar10", f"data.root={tmp_path / 'cifar'}", "data.num_workers=0",
        "data.synthetic_train_per_class=1", "data.synthetic_val_per_class=1", "train.epochs=1",
        "train.batch_size=2", "train.max_steps_per_epoch=2", "train.max_eval_steps=1", "train.device=cpu",
        "train.progress=false", "train.log_every=1", f"output.run_dir={tmp_path / 'run'}",
    ])
    summary = train_classifier(cfg)
    assert (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert (summary["epochs"], summary["steps"], summary["num_classes"]) == (1, 2, 10)
    assert 0.0 <= summary["best_acc1"] <= summary["best_acc5"] <= 100.0
    run = tmp_path / "run"
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    epoch_record = [r for r in _records(run) if "val/acc1" in r]
    assert len(epoch_record) == 1
    for key in ("train/loss", "train/acc1", "val/loss", "val/acc5", "lr", "time/epoch_s", "time/step_s"):
        assert key in epoch_record[0], key
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["kwargs"]["K"] == 5.0


def test_imagenet_mobilenetv2_one_epoch_on_synthetic_jpegs(tmp_path):
    cfg = load_config(ClassifyConfig, ROOT / "configs" / "imagenet_mobilenetv2.yaml", [
        "data.dataset=synthetic_imagenet", f"data.root={tmp_path / 'imagenet'}", "data.num_workers=0",
        "data.image_size=32", "data.synthetic_num_classes=3", "data.synthetic_jpeg_size=[40,48]",
        "model.kwargs.width_mult=0.35", "train.epochs=1", "train.batch_size=4", "train.max_steps_per_epoch=2",
        "train.device=cpu", "train.progress=false", "train.checkpoint_every=0",
        f"output.run_dir={tmp_path / 'run'}",
    ])
    summary = train_classifier(cfg)
    assert len(list((tmp_path / "imagenet" / "train").glob("*/*.JPEG"))) == 15
    assert (summary["steps"], summary["num_classes"]) == (2, 3)
    assert summary["final"]["val/count"] == 6  # the whole val split: 3 classes x 2 images
    assert summary["best_acc5"] == 100.0  # top-min(5, 3) of 3 classes always hits


def test_resume_continues_the_uninterrupted_run(tmp_path):
    """2 epochs straight == 1 epoch, stop, resume for the 2nd (weights, spectral state, lr schedule)."""
    data = tmp_path / "data"
    straight = load_config(ClassifyConfig, None, _small(tmp_path, data, "a", "train.epochs=2"))
    train_classifier(straight)
    first = load_config(ClassifyConfig, None, _small(tmp_path, data, "b", "train.epochs=1"))
    train_classifier(first)
    resumed = load_config(ClassifyConfig, None, _small(tmp_path, data, "b", "train.epochs=2"))
    summary = train_classifier(resumed)
    assert summary["resumed_from"] is not None and summary["epochs"] == 2
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.allclose(value.double(), b["model"][key].double(), rtol=0, atol=1e-6), key
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    epochs_a = [(r["epoch"], r["val/acc1"]) for r in _records(tmp_path / "a") if "val/acc1" in r]
    epochs_b = [(r["epoch"], r["val/acc1"]) for r in _records(tmp_path / "b") if "val/acc1" in r]
    assert epochs_a == epochs_b and len(epochs_a) == 2


@pytest.mark.parametrize("exact_pointwise", [True, False])
def test_trained_model_respects_K(tmp_path, exact_pointwise):
    """After a few SGD steps every depthwise conv (DFT bound: certified) is <= K; with exact pointwise
    norms every pointwise / linear layer is too. With the paper's warm-start power method (eps = 0.01) a
    pointwise layer can exceed K by a few percent (the method converges from below; measured 3.3 % here),
    so only the depthwise layers are asserted in that case."""
    K = 5.0
    cfg = load_config(ClassifyConfig, None, _small(tmp_path, tmp_path / "data", "run", "train.max_steps_per_epoch=3",
                                                   f"model.kwargs.exact_pointwise={str(exact_pointwise).lower()}"))
    train_classifier(cfg)
    model = build_classifier(cfg.model, 10)
    model.load_state_dict(load_checkpoint(tmp_path / "run" / "last.pt")["model"])
    counts = {"depthwise": 0, "pointwise": 0}
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SNDepthwiseConv):
                size = tuple(int(v) for v in layer.sn_input_size)
                w = layer.weight * (layer.scale() / layer.sigma())
                norm = depthwise_exact_norm(w, size, layer.stride, layer.padding).value
                assert norm <= K * (1 + 1e-6), (size, norm)
                counts["depthwise"] += 1
            elif isinstance(layer, (SNPointwiseConv, SNLinear)) and exact_pointwise:
                w = (layer.weight * (layer.scale() / layer.sigma())).reshape(layer.weight.shape[0], -1)
                assert float(torch.linalg.matrix_norm(w.double(), ord=2)) <= K * (1 + 1e-5)
                counts["pointwise"] += 1
    assert counts["depthwise"] == 17
    assert counts["pointwise"] == (35 if exact_pointwise else 0)  # 16 expansions, 17 projections, head, classifier


@pytest.mark.parametrize(
    "dataset, expected",
    [("cifar10", "no_such_cifar"), ("imagenet", "no_such_cifar")],
)
def test_missing_data_root_names_the_path(tmp_path, dataset, expected):
    cfg = load_config(ClassifyConfig, None, [f"data.dataset={dataset}", f"data.root={tmp_path / 'no_such_cifar'}",
                                             "train.device=cpu", f"output.run_dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match=expected):
        train_classifier(cfg)
    assert not (tmp_path / "run").exists()  # validated before the run folder is made


def test_incomplete_dataset_names_the_missing_file(tmp_path, capsys):
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        train_classifier(load_config(ClassifyConfig, None, [
            "data.dataset=cifar10", f"data.root={tmp_path / 'cifar'}", "train.device=cpu",
            f"output.run_dir={tmp_path / 'run'}"]))
    (tmp_path / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    rc = _script("train_classifier").main([
        "--config", str(ROOT / "configs" / "imagenet_mobilenetv2.yaml"), "--set", f"data.root={tmp_path / 'imagenet'}",
        "--set", "train.device=cpu", "--set", f"output.run_dir={tmp_path / 'run'}"])
    assert rc == 3  # a missing data folder: ExitCode.DATA
    assert str(tmp_path / "imagenet" / "val") in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["train.batch_size=128"], 3, "train.batch_size"),
        (["train.milestones=[250, 150]"], 1, "train.milestones"),
        (["train.gamma=0"], 1, "train.gamma"),
        (["train.max_steps_per_epoch=0"], 1, "train.max_steps_per_epoch"),
    ],
)
def test_config_rules_name_the_key(overrides, world_size, message):
    cfg = load_config(ClassifyConfig, None, overrides)
    with pytest.raises(ValueError, match=message):
        check_classify_config(cfg, world_size)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.kwargs.width_mult=0.5"], r"model\.kwargs\.width_mult.*not an argument of model 'resnet34ds'"),
        (["model.kwargs.method=none"], r"did you mean 'model\.kwargs\.sn_method'"),
        (["model.kwargs.num_classes=3"], r"model\.kwargs\.num_classes.*set by the trainer"),
        (["model.method=none"], r"key 'model\.method' was renamed: use 'model\.kwargs\.sn_method'"),
        (["model.K=2"], r"key 'model\.K' was renamed: use 'model\.kwargs\.K'"),
    ],
)
def test_model_kwargs_are_checked_against_the_constructor(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(ClassifyConfig, ROOT / "configs" / "cifar10_resnet34ds.yaml", overrides)


def test_old_model_keys_in_a_file_name_the_new_key(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "resnet34ds", "K": 5.0, "method": "fft"}}))
    with pytest.raises(ValueError, match=rf"{path}.*key 'model\.K' was renamed: use 'model\.kwargs\.K'"):
        load_config(ClassifyConfig, path)


def test_unknown_and_mistyped_keys_are_rejected():
    with pytest.raises(ValueError, match="train.lrr"):
        load_config(ClassifyConfig, None, ["train.lrr=0.1"])
    with pytest.raises(ValueError, match="scaling must be one of"):
        build_classifier(load_config(ClassifyConfig, None, ["model.kwargs.scaling=medium"]).model, 10)


@pytest.mark.parametrize("name", ["cifar10_resnet34ds", "cifar10_resnet34ds_timing", "imagenet_mobilenetv2",
                                  "imagenet_mobilenetv2_timing"])
def test_shipped_configs_hold_the_paper_settings(name):
    cfg = load_config(ClassifyConfig, ROOT / "configs" / f"{name}.yaml")
    check_classify_config(cfg, world_size=2)
    t, m, kw = cfg.train, cfg.model, cfg.model.kwargs
    assert (t.batch_size, t.momentum, t.gamma, kw["eps"]) == (128, 0.9, 0.1, 0.01)
    if name.startswith("cifar10"):
        assert (m.name, t.epochs, t.milestones, kw["K"], kw["scaling"], t.lr) == (
            "resnet34ds", 300, [150, 250], 5.0, "hard", 1e-2)
    else:
        assert (m.name, t.epochs, t.milestones, kw["K"], kw["scaling"], kw["s_init"], t.lr) == (
            "mobilenetv2", 150, [50, 100], 40.0, "soft", 0.5, 3e-4)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_real_dataset_refuses_a_synthetic_root(tmp_path):
    # a smoke run wrote synthetic pickles into the root: a "real" run must not silently train on them
    from invseg.data import write_synthetic_cifar10

    root = tmp_path / "cifar"
    write_synthetic_cifar10(root, num_train=10, num_test=10)
    (root / "synthetic.json").write_text("{}")
    cfg = load_config(ClassifyConfig, None, ["data.dataset=cifar10", f"data.root={root}", "train.device=cpu",
                                             f"output.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="synthetic"):
        train_classifier(cfg)
