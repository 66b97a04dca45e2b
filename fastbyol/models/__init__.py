"""Encoders and the BYOL model: `byol` (the wrapper and its heads), `resnet`, `vit`, and `registry` (one table of
names that the CLI's `--arch`, the presets and `build_encoder` read; a new family is one file and one registry line).
"""

from .byol import BYOL, feature_dim_of, mlp, params_sha256
from .registry import ARCHS, Arch, OwnEncoders, build_encoder, call_factory, is_custom_arch, load_factory
from .resnet import STEMS, BasicBlock, Bottleneck, ResNet, resnet, resnet_tiny
from .vit import VisionTransformer, vit

__all__ = ["ARCHS", "Arch", "BYOL", "OwnEncoders", "BasicBlock", "Bottleneck", "ResNet", "STEMS", "VisionTransformer",
           "build_encoder", "call_factory", "feature_dim_of", "is_custom_arch", "load_factory", "mlp", "params_sha256",
           "resnet", "resnet_tiny", "vit"]
