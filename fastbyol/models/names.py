"""The encoder names `--arch` and `--stem` accept, without torch: the command line's flags, help and checks read them
here (`fastbyol --help` loads no torch); `registry.py` builds `ARCHS` from the same tables, in the same order.

    resnetD, resnetDxK      D in RESNET_DEPTHS, K in WIDTH_MULTIPLIERS (the BYOL paper's widths)
    wide_resnetD_2          torchvision's wide ResNets
    resnet-tiny             the default preset's CPU encoder
    vit_SIZE_patchP         timm's names; vit-tiny-cpu, the CPU-sized ViT
    module.path:factory     an encoder of the user's own (`is_custom_arch`)
"""

from __future__ import annotations

import re

STEMS = ("auto", "imagenet", "small", "small-s2")
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)  # resnet.DEPTHS's keys: torchvision's table plus ResNet-200
WIDTH_MULTIPLIERS = (1, 2, 3, 4)
WIDE_RESNET_DEPTHS = (50, 101)  # wide_resnet50_2, wide_resnet101_2
VIT_VARIANTS = (("tiny", 16), ("small", 16), ("base", 16), ("tiny", 4), ("small", 4))  # (size, patch)
CUSTOM_ARCH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # module.path:factory


def resnet_name(depth: int, k: int = 1) -> str:
    return f"resnet{depth}" if k == 1 else f"resnet{depth}x{k}"


def vit_name(size: str, patch: int) -> str:
    return f"vit_{size}_patch{patch}"


ARCH_NAMES: tuple[str, ...] = (
    *[resnet_name(d, k) for d in RESNET_DEPTHS for k in WIDTH_MULTIPLIERS],
    *[f"wide_resnet{d}_2" for d in WIDE_RESNET_DEPTHS],
    "resnet-tiny",
    *[vit_name(s, p) for s, p in VIT_VARIANTS],
    "vit-tiny-cpu",
)


def is_custom_arch(name: str) -> bool:
    """Whether `name` has the form module.path:factory (an encoder of the user's own)."""
    return bool(CUSTOM_ARCH.match(name))


def check_own_arch_names(names) -> None:
    """ValueError (one line) unless every name has the form module.path:factory: what `--arch` names on commands that
    may import an encoder of the user's own (eval, finetune, export, train --resume)."""
    bad = sorted(n for n in names if not is_custom_arch(n))
    if bad:
        raise ValueError(f"--arch {bad[0]}: here --arch names an encoder of your own (module.path:factory) that a run "
                         "may import; registry encoders need no --arch")
