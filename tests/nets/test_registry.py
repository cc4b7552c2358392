"""Tests of the model registry: names, `{name, kwargs}` checks against the constructor, monai_unet."""

from __future__ import annotations

import pytest
import torch

from invseg.nets import check_model_kwargs, create_model, list_models, model_arguments

SEG = ("spatial_dims", "in_channels", "out_channels")


def test_every_net_is_registered():
    assert {"iunet", "monai_unet", "mobilenetv2", "resnet34ds", "ds_stack"} <= set(list_models())


def test_model_arguments_follow_the_signature():
    accepted, required, any_keyword = model_arguments("iunet")
    assert accepted[:4] == ["spatial_dims", "in_channels", "out_channels", "channels"]
    assert required == ["spatial_dims", "in_channels", "out_channels", "channels"] and not any_keyword


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("iunet", {"channels": [4, 8], "method": "fft"}, r"'model\.kwargs\.method' is not an argument of model 'iunet' "
                                                         r"\(did you mean 'model\.kwargs\.sn_method'\?\)\. Accepted: channels"),
        ("iunet", {"channels": [4, 8], "in_channels": 2}, r"'model\.kwargs\.in_channels' is set by the trainer"),
        ("iunet", {"num_blocks": 1}, r"needs 'model\.kwargs\.channels'"),
        ("resnet34ds", {"width_mult": 0.5}, r"'model\.kwargs\.width_mult' is not an argument of model 'resnet34ds'"),
        ("unet", {}, r"model\.name: unknown model name 'unet'; known models: .*monai_unet"),
    ],
)
def test_check_model_kwargs_names_the_key_and_the_accepted_names(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_model_kwargs(name, kwargs, provided=SEG)


def test_check_model_kwargs_accepts_a_valid_section():
    check_model_kwargs("iunet", {"channels": [4, 8], "sn_method": "none", "K": 0.5}, provided=SEG)
    check_model_kwargs("mobilenetv2", {"width_mult": 0.35, "sn_method": "fft"}, provided=("num_classes",))


def test_monai_unet_strides_default_to_two_per_level():
    net = create_model("monai_unet", spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8, 16],
                       num_res_units=1)
    assert list(net.strides) == [2, 2]
    assert net(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


@pytest.mark.parametrize("kwargs, match", [({"channels": [4]}, "at least 2 levels"),
                                           ({"channels": [4, 8], "strides": [2, 2]}, "strides must have")])
def test_monai_unet_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("monai_unet", spatial_dims=3, in_channels=1, out_channels=2, **kwargs)
