"""Encoders and the BYOL model: `byol` (the wrapper and its heads), `resnet`, `vit`, `registry` (one table of names
that the CLI's `--arch`, the presets and `build_encoder` read; a new family is one file and one registry line), and
`names` (the names alone, without torch: what `fastbyol --help` reads).

Every name below is imported on first use, so `fastbyol.models.names` loads no torch.
"""

import importlib

_HOMES = {
    "BYOL": "byol", "feature_dim_of": "byol", "mlp": "byol", "params_sha256": "byol",
    "ARCHS": "registry", "Arch": "registry", "OwnEncoders": "registry", "build_encoder": "registry", "call_factory": "registry",
    "load_factory": "registry",
    "is_custom_arch": "names", "ARCH_NAMES": "names", "STEMS": "names",
    "BasicBlock": "resnet", "Bottleneck": "resnet", "ResNet": "resnet", "resnet": "resnet", "resnet_tiny": "resnet",
    "VisionTransformer": "vit", "vit": "vit",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
