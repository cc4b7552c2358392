"""Tests of invseg.train.seg_config: the shipped configs load, unknown keys / wrong types / old model keys are
rejected naming the key, the model section is checked against the registered constructor, and the network a
config describes is built through the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from invseg.config import load_config
from invseg.nets import IUNet
from invseg.train.seg_config import SegConfig, build_seg_model, check_seg_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["seg3d_synthetic.yaml", "seg3d_msd_spleen.yaml", "seg3d_msd_cpu.yaml", "seg3d_mni152.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(SegConfig, REPO / "configs" / name)
    assert cfg.model.name == "iunet" and len(cfg.data.patch_size) == 3


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.lrr=0.1", "train.lrr"),
        ("model.depth=3", "model.depth"),
        ("model.kwargs.depth=3", r"model\.kwargs\.depth.*not an argument of model 'iunet'.*Accepted: channels, num_blocks"),
        ("model.kwargs.method=fft", r"did you mean 'model\.kwargs\.sn_method'"),
        ("model.kwargs.in_channels=2", r"model\.kwargs\.in_channels.*set by the trainer"),
        ("model.channels=[4,8]", r"key 'model\.channels' was renamed: use 'model\.kwargs\.channels'"),
        ("model.sn_method=none", r"key 'model\.sn_method' was renamed: use 'model\.kwargs\.sn_method'"),
        ("model.name=unet", r"unknown model name 'unet'; known models: .*monai_unet"),
        ("train.max_steps=ten", "train.max_steps"),
        ("train.optimizer=adamw", "train.optimizer"),
        ("data.patch_size=[32,x,32]", r"data.patch_size"),
        ("guard.action=explode", "guard.action"),
    ],
)
def test_config_rejects_unknown_keys_and_wrong_types(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(SegConfig, REPO / "configs" / "seg3d_synthetic.yaml", overrides=[override])


def test_old_flat_model_section_in_a_file_names_the_new_key(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "iunet", "channels": [8, 16]}}))
    with pytest.raises(ValueError, match=rf"{path}.*key 'model\.channels' was renamed: use 'model\.kwargs\.channels'"):
        load_config(SegConfig, path)


def test_build_seg_model_passes_the_kwargs_and_the_data_arguments():
    cfg = load_config(SegConfig, None, ["model.kwargs={channels: [4, 8], num_blocks: 1, K: 0.5}"])
    net = build_seg_model(cfg.model, 2, 3)
    assert isinstance(net, IUNet) and (net.in_channels, net.out_channels, net.channels) == (2, 3, (4, 8))
    cfg.model.kwargs["depth"] = 2  # set in code, after loading: checked again before building
    with pytest.raises(ValueError, match=r"model\.kwargs\.depth"):
        check_seg_config(cfg)
    with pytest.raises(ValueError, match=r"model\.kwargs\.depth"):
        build_seg_model(cfg.model, 2, 3)
