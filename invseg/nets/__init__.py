"""Networks and the model registry.

Segmentation: IUNet (1D/2D/3D invertible U-Net), iunet_channel_plan, COUPLINGS
Registry:     register_model, create_model, list_models, get_model_class
              (registered names: "iunet"; MobileNetV2 and ResNet34DS register themselves when added)
"""

from invseg.nets.iunet import COUPLINGS, IUNet, iunet_channel_plan
from invseg.nets.registry import create_model, get_model_class, list_models, register_model

__all__ = [
    "IUNet",
    "iunet_channel_plan",
    "COUPLINGS",
    "register_model",
    "create_model",
    "get_model_class",
    "list_models",
]
