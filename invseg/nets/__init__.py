"""Networks and the model registry.

Segmentation:   IUNet (1D/2D/3D invertible U-Net), iunet_channel_plan, COUPLINGS
Classification: MobileNetV2, InvertedResidual, ResNet34DS, BasicBlockDS (paper §4.2-4.4)
Reference:      DSStack (a plain stack of SN DS convs, for memory comparisons)
Inspection:     count_layers, depthwise_layers
Baseline:       monai_unet (MONAI's UNet, imported on first call)
Registry:     register_model, create_model, list_models, get_model_class, model_arguments, check_model_kwargs
              (registered names: "iunet", "mobilenetv2", "resnet34ds", "ds_stack", "monai_unet")
"""

from invseg.nets.ds_stack import DSStack
from invseg.nets.iunet import COUPLINGS, IUNet, iunet_channel_plan
from invseg.nets.mobilenetv2 import InvertedResidual, MobileNetV2
from invseg.nets.monai_unet import monai_unet
from invseg.nets.resnet_ds import BasicBlockDS, ResNet34DS, count_layers, depthwise_layers
from invseg.nets.registry import (
    check_model_kwargs,
    create_model,
    get_model_class,
    list_models,
    model_arguments,
    register_model,
)

__all__ = [
    "IUNet",
    "iunet_channel_plan",
    "COUPLINGS",
    "DSStack",
    "MobileNetV2",
    "InvertedResidual",
    "ResNet34DS",
    "BasicBlockDS",
    "count_layers",
    "depthwise_layers",
    "monai_unet",
    "register_model",
    "create_model",
    "get_model_class",
    "list_models",
    "model_arguments",
    "check_model_kwargs",
]
