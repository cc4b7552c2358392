"""Tests for invseg.config: strict typed loading, overrides, YAML files, argparse glue."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from invseg.config import (
    add_config_arguments,
    apply_overrides,
    config_from_args,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


@dataclass
class BlockConfig:
    kind: Literal["additive", "affine"] = "additive"  # coupling type
    depth: int = 2  # blocks per level


@dataclass
class ModelConfig:
    name: str = "iunet"  # registry name
    channels: tuple[int, ...] = (4, 8)  # channels per level
    kernel: tuple[int, int] = (3, 3)  # fixed-length tuple
    K: float = 1.0  # Lipschitz constant
    block: BlockConfig = field(default_factory=BlockConfig)  # nested block settings
    extra_block: Optional[BlockConfig] = None  # optional nested dataclass


@dataclass
class TrainConfig:
    lr: float = 0.1  # learning rate
    epochs: int = 3  # epochs
    amp: bool = False  # mixed precision
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast precision
    resume: Optional[str] = None  # checkpoint to resume from
    milestones: list[int] = field(default_factory=lambda: [1, 2])  # LR decay epochs
    loss_weights: dict[str, float] = field(default_factory=dict)  # per-term weights
    out_dir: Path = Path("runs/x")  # output folder


@dataclass
class ExperimentConfig:
    seed: int = 0  # global seed
    model: ModelConfig = field(default_factory=ModelConfig)  # network
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation


@dataclass
class NonDefaultNested:
    # nested default differs from the nested class's own defaults
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="custom", K=5.0))  # model


@dataclass
class Required:
    size: int  # no default: must be given


# ---------------------------------------------------------------------------------------------
# from_dict
# ---------------------------------------------------------------------------------------------


def test_defaults_when_empty():
    assert from_dict(ExperimentConfig, {}) == ExperimentConfig()
    assert from_dict(ExperimentConfig, None) == ExperimentConfig()


def test_nested_lists_literal_optional_dict():
    cfg = from_dict(
        ExperimentConfig,
        {
            "seed": 7,
            "model": {"channels": [8, 16, 32], "kernel": [5, 5], "K": 2, "block": {"kind": "affine"},
                      "extra_block": {"depth": 4}},
            "train": {"lr": 0.01, "precision": "bf16", "resume": "a.pt", "milestones": [5],
                      "loss_weights": {"dice": 1, "ce": 0.5}, "out_dir": "out/run"},
        },
    )
    assert cfg.seed == 7
    assert cfg.model.channels == (8, 16, 32) and isinstance(cfg.model.channels, tuple)
    assert cfg.model.kernel == (5, 5)
    assert cfg.model.K == 2.0 and isinstance(cfg.model.K, float)  # int accepted for float
    assert cfg.model.block == BlockConfig(kind="affine", depth=2)  # missing nested key keeps default
    assert cfg.model.extra_block == BlockConfig(depth=4)
    assert cfg.model.name == "iunet"
    assert cfg.train.precision == "bf16"
    assert cfg.train.resume == "a.pt"
    assert cfg.train.milestones == [5]
    assert cfg.train.loss_weights == {"dice": 1.0, "ce": 0.5}
    assert cfg.train.out_dir == Path("out/run")


def test_partial_nested_merges_over_field_default():
    cfg = from_dict(NonDefaultNested, {"model": {"channels": [2]}})
    assert cfg.model.name == "custom" and cfg.model.K == 5.0 and cfg.model.channels == (2,)


def test_round_trip_to_dict():
    cfg = from_dict(ExperimentConfig, {"model": {"extra_block": {}}, "train": {"loss_weights": {"a": 2.0}}})
    plain = to_dict(cfg)
    assert plain["model"]["channels"] == [4, 8]  # tuples become lists
    assert plain["train"]["out_dir"] == "runs/x"
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert from_dict(ExperimentConfig, plain) == cfg


def test_unknown_key_at_depth_two_is_named():
    with pytest.raises(ValueError) as info:
        from_dict(ExperimentConfig, {"model": {"block": {"dpeth": 3}}})
    msg = str(info.value)
    assert "model.block.dpeth" in msg
    assert "kind" in msg and "depth" in msg  # lists the valid keys


def test_unknown_top_level_key():
    with pytest.raises(ValueError, match=r"'trian'.*valid keys.*seed, model, train"):
        from_dict(ExperimentConfig, {"trian": {}})


@pytest.mark.parametrize(
    "data, key, expected",
    [
        ({"seed": "3"}, "seed", "int"),
        ({"seed": 3.0}, "seed", "int"),
        ({"seed": True}, "seed", "int"),  # bool is not an int
        ({"train": {"amp": 1}}, "train.amp", "bool"),  # int is not a bool
        ({"train": {"amp": "true"}}, "train.amp", "bool"),  # string is not a bool
        ({"train": {"lr": "fast"}}, "train.lr", "float"),
        ({"train": {"lr": True}}, "train.lr", "float"),
        ({"model": {"name": 3}}, "model.name", "str"),
        ({"model": {"channels": [8, "x"]}}, "model.channels[1]", "int"),
        ({"model": {"channels": 8}}, "model.channels", "tuple[int, ...]"),
        ({"train": {"milestones": [1.5]}}, "train.milestones[0]", "int"),
        ({"train": {"resume": 5}}, "train.resume", "Optional[str]"),
        ({"model": {"block": 3}}, "model.block", "BlockConfig"),
        ({"train": {"loss_weights": {"dice": "a"}}}, "train.loss_weights.dice", "float"),
        ({"train": {"loss_weights": [1.0]}}, "train.loss_weights", "dict[str, float]"),
    ],
)
def test_wrong_type_names_key_type_and_value(data, key, expected):
    with pytest.raises(ValueError) as info:
        from_dict(ExperimentConfig, data, where="exp.yaml")
    msg = str(info.value)
    assert msg.startswith("exp.yaml:")
    assert f"'{key}'" in msg
    assert expected in msg


def test_wrong_type_message_contains_value():
    with pytest.raises(ValueError, match=r"'seed' expects int, got '3' \(type str\)"):
        from_dict(ExperimentConfig, {"seed": "3"})


@pytest.mark.parametrize("value", ["fp64", "FP16", 16])
def test_literal_rejects_other_values(value):
    with pytest.raises(ValueError, match=r"train\.precision.*'fp32', 'bf16', 'fp16'"):
        from_dict(ExperimentConfig, {"train": {"precision": value}})


def test_literal_does_not_confuse_bool_and_int():
    @dataclass
    class L:
        x: Literal[1, 2] = 1  # numeric literal

    assert from_dict(L, {"x": 2}).x == 2
    with pytest.raises(ValueError, match="'x'"):
        from_dict(L, {"x": True})


def test_fixed_tuple_length_checked():
    with pytest.raises(ValueError, match=r"model\.kernel.*exactly 2 elements, got 3"):
        from_dict(ExperimentConfig, {"model": {"kernel": [3, 3, 3]}})


def test_optional_accepts_none_and_float_accepts_numeric_string():
    cfg = from_dict(ExperimentConfig, {"train": {"resume": None, "lr": "1e-3"}})
    assert cfg.train.resume is None
    assert cfg.train.lr == pytest.approx(1e-3)


def test_missing_required_key():
    with pytest.raises(ValueError, match="missing required key 'size'"):
        from_dict(Required, {})
    assert from_dict(Required, {"size": 3}).size == 3


# ---------------------------------------------------------------------------------------------
# apply_overrides
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("train.lr=1e-3", lambda c: c.train.lr, 1e-3),  # YAML 1.1 reads "1e-3" as a string
        ("train.lr=-2E-4", lambda c: c.train.lr, -2e-4),
        ("train.lr=0.5", lambda c: c.train.lr, 0.5),
        ("train.lr=1", lambda c: c.train.lr, 1.0),
        ("model.channels=[8,16]", lambda c: c.model.channels, (8, 16)),
        ("train.milestones=[]", lambda c: c.train.milestones, []),
        ("train.amp=true", lambda c: c.train.amp, True),
        ("train.resume=null", lambda c: c.train.resume, None),
        ("train.resume=runs/a/last.pt", lambda c: c.train.resume, "runs/a/last.pt"),
        ("model.name=001", lambda c: c.model.name, "001"),  # str field keeps the raw string
        ("model.block.kind=affine", lambda c: c.model.block.kind, "affine"),
        ("model.extra_block.depth=5", lambda c: c.model.extra_block, BlockConfig(depth=5)),
        ("train.loss_weights.dice=2", lambda c: c.train.loss_weights, {"dice": 2.0}),
        ("model.block={depth: 9}", lambda c: c.model.block, BlockConfig(depth=9)),
        ("seed=12", lambda c: c.seed, 12),
    ],
)
def test_overrides(override, getter, expected):
    cfg = load_config(ExperimentConfig, overrides=[override])
    assert getter(cfg) == expected
    value = getter(cfg)
    if isinstance(expected, float):
        assert isinstance(value, float)


def test_overrides_apply_in_order_and_merge_with_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  block:\n    kind: affine\ntrain:\n  lr: 0.2\n  epochs: 9\n")
    cfg = load_config(ExperimentConfig, path, overrides=["train.lr=1e-3", "train.lr=3e-3", "model.block={depth: 5}"])
    assert cfg.train.lr == pytest.approx(3e-3)
    assert cfg.train.epochs == 9  # from the file
    assert cfg.model.block == BlockConfig(kind="affine", depth=5)  # mapping override merges
    assert cfg.train.precision == "fp32"  # default


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lrr=0.1", "train.lrr"),
        ("model.block.dpeth=3", "model.block.dpeth"),
        ("nope=1", "nope"),
        ("seed.x=1", "seed"),  # descending into a scalar
    ],
)
def test_override_unknown_path_raises(override, named):
    with pytest.raises(ValueError, match=f"'{named}'"):
        apply_overrides({}, [override], ExperimentConfig)


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=1", "train.lr=[1,"])
def test_override_malformed(override):
    with pytest.raises(ValueError, match="override"):
        apply_overrides({}, [override], ExperimentConfig)


def test_override_wrong_type_reported_by_key():
    with pytest.raises(ValueError, match=r"'train\.epochs' expects int, got 'many'"):
        load_config(ExperimentConfig, overrides=["train.epochs=many"])


def test_override_without_cls_builds_nested_dict():
    data = apply_overrides({"train": {"epochs": 2}}, ["train.lr=0.5", "model.channels=[1, 2]"])
    assert data == {"train": {"epochs": 2, "lr": 0.5}, "model": {"channels": [1, 2]}}


@dataclass
class NetConfig:
    name: str = "iunet"  # registry name
    kwargs: dict[str, Any] = field(default_factory=lambda: {"channels": [4, 8], "depth": 2})  # constructor args

    __config_renamed__ = {"channels": "kwargs.channels", "method": "kwargs.sn_method"}

    def __config_check__(self, where: str, path: str) -> None:
        if "bad" in self.kwargs:
            raise ValueError(f"{where}: key '{path}.kwargs.bad' is not allowed")


@dataclass
class NetExperiment:
    net: NetConfig = field(default_factory=NetConfig)  # the network


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["net.kwargs.depth=3"], {"channels": [4, 8], "depth": 3}),  # one entry of the default mapping
        (["net.kwargs={width: 5}"], {"width": 5}),  # a mapping replaces a dict-typed field
        (["net.kwargs={width: 5}", "net.kwargs.depth=1"], {"width": 5, "depth": 1}),
    ],
)
def test_dict_field_overrides(overrides, expected):
    assert load_config(NetExperiment, overrides=overrides).net.kwargs == expected


@pytest.mark.parametrize(
    "data, match",
    [
        ({"net": {"channels": [8]}}, r"x\.yaml: key 'net\.channels' was renamed: use 'net\.kwargs\.channels'"),
        ({"net": {"method": "fft"}}, r"key 'net\.method' was renamed: use 'net\.kwargs\.sn_method'"),
        ({"net": {"kwargs": {"bad": 1}}}, r"x\.yaml: key 'net\.kwargs\.bad' is not allowed"),
    ],
)
def test_renamed_keys_and_section_checks(data, match):
    with pytest.raises(ValueError, match=match):
        from_dict(NetExperiment, data, where="x.yaml")


def test_renamed_key_in_an_override():
    with pytest.raises(ValueError, match=r"override 'net\.method=fft': key 'net\.method' was renamed: use "
                                         r"'net\.kwargs\.sn_method'"):
        load_config(NetExperiment, overrides=["net.method=fft"])


# ---------------------------------------------------------------------------------------------
# files and argparse
# ---------------------------------------------------------------------------------------------


def test_missing_file_named(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(ExperimentConfig, path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("train: [1, 2\n", "invalid YAML"),
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("just a string\n", "top level must be a mapping"),
    ],
)
def test_bad_yaml_names_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_config(ExperimentConfig, path)
    assert "bad.yaml" in str(info.value)


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(ExperimentConfig, path) == ExperimentConfig()


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  block:\n    width: 3\n")
    with pytest.raises(ValueError, match=r"exp\.yaml.*'model\.block\.width'"):
        load_config(ExperimentConfig, path)


def test_yaml_scientific_notation_in_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    assert load_config(ExperimentConfig, path).train.lr == pytest.approx(1e-3)


def test_save_and_reload(tmp_path):
    cfg = load_config(ExperimentConfig, overrides=["model.channels=[2,4,8]", "train.resume=x.pt", "train.lr=1e-4"])
    out = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left
    assert load_config(ExperimentConfig, out) == cfg


def test_argparse_glue(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 4\n")
    parser = add_config_arguments(argparse.ArgumentParser(), default_config=path)
    args = parser.parse_args(["--set", "train.lr=1e-3", "--set", "model.channels=[8,16]"])
    cfg = config_from_args(ExperimentConfig, args)
    assert cfg.seed == 4 and cfg.train.lr == pytest.approx(1e-3) and cfg.model.channels == (8, 16)

    args = add_config_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.config is None and args.overrides == []
    assert config_from_args(ExperimentConfig, args) == ExperimentConfig()


def test_not_a_dataclass():
    with pytest.raises(TypeError):
        from_dict(dict, {})
